/**
 * What the migration engine needs from a machine: RAM blocks, dirty logging,
 * vCPU stop/start, run state, and device state as vmstate sections. The
 * VMM's Machine implements it (lib/machine/migratable.ts); unit tests can
 * implement it over plain memory.
 */
import type { VmState, VmStateDescription } from '../stream/vmstate';
import type { RunState } from './state';
import type { RamBlockRef } from './ram';

/** One device's migratable state (a FULL section). */
export interface DeviceStateSection {
  idstr: string;
  instanceId: number;
  vmsd: VmStateDescription;
  state: VmState;
}

export interface MigratableMachine {
  /** Configuration section machine name ('none', 'ferry-pvh', ...): both sides must agree. */
  readonly configName: string;
  readonly ramBlocks: readonly RamBlockRef[];
  readonly runState: RunState;
  setRunState(state: RunState): void;

  /**
   * Starts dirty logging on every RAM block (the next sync reports writes
   * since now). Returns true when protection is deferred (KVM's
   * INITIALLY_SET): until dirtyLogProtect covers a page or a sync protects
   * the rest, every page counts as dirty and writes to it are not tracked,
   * so the engine protects each range before it first reads it.
   */
  dirtyLogStart(): boolean;
  /** Write-protects pages [first, first + count) of RAM block `index` (after a deferred start). */
  dirtyLogProtect(index: number, first: number, count: number): void;
  /**
   * Fetches and clears the dirty log of RAM block `index`: one bit per 4 KiB
   * page in block-offset order, little-endian 64-bit words.
   */
  dirtyLogSync(index: number): Uint8Array;
  dirtyLogStop(): void;
  /** Optional: make the RAM views the engine will use now, off the migration's clock. */
  warmRam?(): void;

  /** QEMU's vm_stop_force_state(finish-migrate): vCPUs quiescent, run state finish-migrate. */
  stopVcpus(): Promise<void>;
  /** QEMU's vm_start: run state running, every vCPU started. */
  startVcpus(): Promise<void>;

  /** Device state sections to send (timer and globalstate are added by the engine). */
  saveDevices(): DeviceStateSection[];
  /** How to read a device section this machine accepts; undefined = unknown device. */
  deviceVmsd(idstr: string, instanceId: number): VmStateDescription | undefined;
  /** Applies loaded device sections (all of them at once, after EOF). */
  loadDevices(sections: DeviceStateSection[]): Promise<void>;
}
