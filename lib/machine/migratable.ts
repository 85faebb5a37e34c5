/**
 * The Machine as the migration engine sees it (MigratableMachine): RAM
 * blocks, dirty logging, vCPU stop/start with QEMU's run states and events,
 * and device state as savevm sections (vmstate.ts).
 */
import type { DeviceStateSection, MigratableMachine } from '../migration/machine-port';
import { PageBitmap } from '../migration/bitmap';
import type { RamBlockRef } from '../migration/ram';
import type { RunState } from '../migration/state';
import type { VmStateDescription } from '../stream/vmstate';
import type { Machine } from './machine';
import { sectionsFromState, stateFromSections, vmsdFor } from './vmstate';

/** Configuration-section machine names: QEMU's for `none`, ferry's own for the PVH machine. */
export const CONFIG_NAMES = { none: 'none', pvh: 'ferry-pvh' } as const;

export class MigratableAdapter implements MigratableMachine {
  readonly configName: string;
  readonly ramBlocks: readonly RamBlockRef[];
  private readonly bitmaps: PageBitmap[];

  constructor(private readonly machine: Machine) {
    this.configName = CONFIG_NAMES[machine.machineType];
    this.ramBlocks = machine.ramBlocks.map((b) => ({ idstr: b.idstr, size: b.size, memory: b.memory, view: (o: number, l: number) => b.view(o, l) }));
    this.bitmaps = machine.ramBlocks.map((b) => new PageBitmap(b.pages));
  }

  warmRam(): void {
    for (const b of this.machine.ramBlocks) b.warmViews();
  }

  get runState(): RunState {
    return this.machine.runState;
  }

  setRunState(state: RunState): void {
    this.machine.setRunState(state);
  }

  dirtyLogStart(): boolean {
    // INITIALLY_SET: nothing is protected yet and every page reads dirty; the engine protects
    // ranges as it reaches them. Otherwise start from a clean, protected log.
    const deferred = this.machine.dirtyLog.initiallySet;
    for (let i = 0; i < this.machine.ramBlocks.length; i++) {
      this.machine.ramBlocks[i]!.enableDirtyLog();
      if (!deferred) this.dirtyLogSync(i);
    }
    return deferred;
  }

  dirtyLogProtect(index: number, first: number, count: number): void {
    this.machine.ramBlocks[index]!.protectPages(first, count);
  }

  dirtyLogSync(index: number): Uint8Array {
    const bm = this.bitmaps[index]!;
    bm.clearAll();
    this.machine.ramBlocks[index]!.syncDirtyLog(bm);
    return bm.bytes;
  }

  dirtyLogStop(): void {
    for (const b of this.machine.ramBlocks) if (b.dirtyLogging) b.disableDirtyLog();
  }

  async stopVcpus(): Promise<void> {
    await this.machine.stop('finish-migrate');
  }

  async startVcpus(): Promise<void> {
    await this.machine.cont();
  }

  saveDevices(): DeviceStateSection[] {
    if (this.machine.machineType === 'none') return [];
    return sectionsFromState(this.machine.captureState());
  }

  deviceVmsd(idstr: string, instanceId: number): VmStateDescription | undefined {
    return vmsdFor(idstr, instanceId, this.machine.cpus, this.machine.machineType === 'pvh');
  }

  async loadDevices(sections: DeviceStateSection[]): Promise<void> {
    const m = this.machine;
    if (m.machineType === 'none') return;
    const state = stateFromSections(
      { machineType: m.machineType, cpus: m.cpus, ram: m.ramBlocks.map((b) => ({ idstr: b.idstr, size: b.size })) },
      sections,
      m.hasIrqchip,
    );
    m.restoreState(state);
  }
}
