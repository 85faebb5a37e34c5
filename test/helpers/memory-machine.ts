/**
 * A MigratableMachine that is plain guest memory (native GuestMemory, no KVM,
 * no vCPUs) for in-process tests of the migration engine. Its "dirty log" is
 * a bitmap the test sets with write(); it records every run-state change and
 * every loadDevices/startVcpus call so tests can prove a failed load never
 * started the guest.
 *
 * The RAM block may be a sub-range of a bigger mapping (`memOffset`), so a
 * test can surround it with guard bytes and check nothing was written there.
 */
import { PageBitmap } from '../../lib/migration/bitmap';
import type { DeviceStateSection, MigratableMachine } from '../../lib/migration/machine-port';
import type { RamBlockRef } from '../../lib/migration/ram';
import type { RunState } from '../../lib/migration/state';
import type { VmStateDescription } from '../../lib/stream/vmstate';
import type { GuestMemory } from '../../lib/native';

export const PAGE = 4096;

export interface MemoryMachineOptions {
  /** Block offset inside `memory` (default 0). */
  memOffset?: number;
  /** Block size (default: the rest of the mapping after memOffset). */
  size?: number;
  /** RAM block idstr (default 'ram', QEMU's `-M none` block). */
  idstr?: string;
  /** Configuration section machine name (default 'none'). */
  configName?: string;
  /** Device sections this machine saves and accepts (default none). */
  devices?: DeviceStateSection[];
}

export class MemoryMachine implements MigratableMachine {
  readonly configName: string;
  readonly ramBlocks: readonly RamBlockRef[];
  runState: RunState;
  /** Every run state this machine has been in, the initial one first. */
  readonly runStates: RunState[];
  readonly dirty: PageBitmap;
  readonly memOffset: number;
  readonly size: number;
  started = 0;
  stopped = 0;
  /** Device sections passed to loadDevices, one array per call. */
  readonly loaded: DeviceStateSection[][] = [];
  private readonly devices: DeviceStateSection[];

  constructor(
    readonly memory: GuestMemory,
    runState: RunState,
    opts: MemoryMachineOptions = {},
  ) {
    this.memOffset = opts.memOffset ?? 0;
    this.size = opts.size ?? memory.size - this.memOffset;
    if (this.memOffset % PAGE !== 0 || this.size % PAGE !== 0 || this.memOffset + this.size > memory.size) {
      throw new RangeError(`RAM block [${this.memOffset}, +${this.size}) does not fit a ${memory.size}-byte mapping page-aligned`);
    }
    this.configName = opts.configName ?? 'none';
    this.ramBlocks = [{ idstr: opts.idstr ?? 'ram', size: this.size, memory, memOffset: this.memOffset }];
    this.runState = runState;
    this.runStates = [runState];
    this.dirty = new PageBitmap(this.size / PAGE);
    this.devices = opts.devices ?? [];
  }

  setRunState(s: RunState): void {
    this.runState = s;
    this.runStates.push(s);
  }
  dirtyLogStart(): boolean {
    this.dirty.clearAll();
    return false;
  }
  dirtyLogProtect(): void {}
  dirtyLogSync(): Uint8Array {
    const out = new Uint8Array(this.dirty.bytes);
    this.dirty.clearAll();
    return out;
  }
  dirtyLogStop(): void {}
  async stopVcpus(): Promise<void> {
    this.stopped++;
    this.setRunState('finish-migrate');
  }
  async startVcpus(): Promise<void> {
    this.started++;
    this.setRunState('running');
  }
  saveDevices(): DeviceStateSection[] {
    return this.devices;
  }
  deviceVmsd(idstr: string, instanceId: number): VmStateDescription | undefined {
    return this.devices.find((d) => d.idstr === idstr && d.instanceId === instanceId)?.vmsd;
  }
  async loadDevices(sections: DeviceStateSection[]): Promise<void> {
    this.loaded.push(sections);
  }

  /** The block's bytes (a live view, not a copy). */
  ram(): Uint8Array {
    return new Uint8Array(this.memory.view(this.memOffset, this.size));
  }

  /** The guest writes a page: new content and a dirty bit. */
  write(page: number, byte: number): void {
    new Uint8Array(this.memory.view(this.memOffset + page * PAGE, PAGE)).fill(byte);
    this.dirty.set(page);
  }
}

/**
 * Guest RAM with canaries: one native mapping laid out as
 * [guard | RAM block | guard], the guards filled with a known pattern. A
 * destination that writes outside its RAM block (a bad offset check, a view
 * over the wrong range) changes a guard; check() reports the first changed
 * byte. The block sits at a page-aligned offset so RAM views stay aligned.
 */
export class GuardedMemory {
  readonly memory: GuestMemory;
  private readonly pattern: Buffer;

  constructor(
    createMemory: (size: number) => GuestMemory,
    readonly blockSize: number,
    readonly guardSize = 64 << 10,
  ) {
    if (guardSize % PAGE !== 0 || blockSize % PAGE !== 0) throw new RangeError('guard and block sizes must be page multiples');
    this.memory = createMemory(guardSize * 2 + blockSize);
    this.pattern = Buffer.alloc(guardSize);
    // Not a run of one byte: a shifted or partial write still shows.
    for (let i = 0; i < guardSize; i++) this.pattern[i] = (i * 131 + 0x5a) & 0xff;
    this.pattern.copy(this.guard('before'));
    this.pattern.copy(this.guard('after'));
  }

  private guard(which: 'before' | 'after'): Buffer {
    const at = which === 'before' ? 0 : this.guardSize + this.blockSize;
    return Buffer.from(this.memory.view(at, this.guardSize));
  }

  /** The block's bytes (live view). */
  block(): Buffer {
    return Buffer.from(this.memory.view(this.guardSize, this.blockSize));
  }

  /** Zeroes the block (a fresh destination). */
  clearBlock(): void {
    this.block().fill(0);
  }

  /** undefined when both guards are intact, else where the first change is. */
  check(): string | undefined {
    for (const which of ['before', 'after'] as const) {
      const g = this.guard(which);
      if (!g.equals(this.pattern)) {
        let i = 0;
        while (g[i] === this.pattern[i]) i++;
        return `guard ${which} the RAM block changed at byte ${i} of ${this.guardSize} (0x${this.pattern[i]!.toString(16)} -> 0x${g[i]!.toString(16)})`;
      }
    }
    return undefined;
  }

  /** A destination machine whose one RAM block is the guarded block. */
  machine(runState: RunState = 'inmigrate', opts: Omit<MemoryMachineOptions, 'memOffset' | 'size'> = {}): MemoryMachine {
    return new MemoryMachine(this.memory, runState, { ...opts, memOffset: this.guardSize, size: this.blockSize });
  }
}
