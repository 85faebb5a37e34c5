/**
 * Machine: one KVM guest under TypeScript control — its RAM blocks, vCPUs,
 * in-kernel interrupt controllers and PIT, the 16550 serial port and a few
 * fixed ports, and its run state with QEMU's names.
 *
 * Machine types:
 * - 'pvh': RAM block 'pc.ram' (or 'mem0' with a memory-backend file) mapped
 *   [0, min(ram, 3G)) at GPA 0 and the rest at 4 GiB; in-kernel irqchip
 *   (PIC, IOAPIC, LAPICs) and PIT; KVM's TSS at 0xfffbd000; `cpus` vCPUs
 *   with APIC id = index; a PVH ELF loaded by loadGuest().
 * - 'none': RAM only (QEMU's `-M none`): block 'ram' ('mem0' with
 *   memPath) at GPA 0, no vCPU, no irqchip, no devices.
 *
 * Life cycle: new Machine(config) -> (loadGuest() | restore state) ->
 * cont() -> stop()/cont()... -> close(). The machine starts in 'prelaunch'
 * with every vCPU thread parked.
 *
 * Events:
 *   'runstate' (state, previous)   every run-state change
 *   'qmp-event' (name, data)       STOP, RESUME, SHUTDOWN, RESET in QEMU's shapes
 *   'shutdown' ({guest, reason})   after the SHUTDOWN event: the owner should exit
 *   'guest-error' (message)        vCPU failure details (internal error, ...)
 *
 * Invariant: vCPU state is read or written only while every vCPU is paused
 * (`vcpusPaused`); stop()/cont() serialise on one promise chain so a stop
 * racing a cont never leaves vCPUs half-paused.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';

import { FerryError } from '../errors';
import { native, type GuestMemory, type Kvm, type KvmProbe, type Vcpu, type VcpuExit, type Vm } from '../native';
import { buildE820, loadPvh, pvhCpuState, type PhysMemory, type PvhBoot } from './pvh';
import { DIRTY_LOG_INITIALLY_SET, DIRTY_LOG_MANUAL_PROTECT_ENABLE, planRamSlots, RamBlock } from './ram';
import { checkTransition, needsReset, type RunState } from './runstate';
import { NullSink, Uart16550, type SerialSink } from './serial';
import {
  captureState,
  captureVcpu,
  probeReadableMsrs,
  restoreState,
  restoreVcpu,
  type MachineState,
  type RestoreReport,
  type StateHost,
  type VcpuState,
} from './state';
import {
  decodeCpuid,
  decodeRegs,
  decodeSregs,
  encodeCpuid,
  encodeRegs,
  encodeSregs,
  MISC_ENABLE_FAST_STRING,
  KVM_APIC_TIMER_KHZ,
  MSR_IA32_MISC_ENABLE,
  vcpuCpuid,
} from './x86';

export type MachineType = 'pvh' | 'none';

export interface MachineConfig {
  machineType: MachineType;
  /** Bytes of guest RAM (multiple of 4 KiB). */
  ramSize: number;
  /** vCPUs ('pvh': 1..; ignored for 'none', which has none). */
  cpus: number;
  /** Guest image (PVH ELF) for loadGuest(). */
  guest?: string;
  cmdline?: string;
  /** Where serial output goes (default: discarded). */
  serial?: SerialSink;
  /** Back RAM with this file (MAP_SHARED, QEMU's memory-backend-file share=on). */
  memPath?: string;
  /** Back RAM with a memfd (MAP_SHARED) instead of private anonymous memory. */
  memfd?: boolean;
  /**
   * Offer CPUID leaf 0x40000010 (TSC and LAPIC timer kHz) so guests need not
   * calibrate their clocks at boot (default true).
   */
  timingLeaf?: boolean;
  /** Transparent huge pages for guest RAM (default true, as QEMU). */
  hugepages?: boolean;
  /** Triple fault or guest reset request: 'shutdown' (QEMU -no-reboot, default) or 'reset'. */
  rebootAction?: 'shutdown' | 'reset';
  /** Use KVM_DIRTY_LOG_INITIALLY_SET when the kernel has it (default true). */
  dirtyLogInitiallySet?: boolean;
  /** Device path of KVM (default /dev/kvm). */
  kvmPath?: string;
}

export interface ShutdownInfo {
  guest: boolean;
  reason: string;
}

/** Counters of the port/MMIO bus and exits. */
export interface MachineStats {
  ioExits: number;
  mmioExits: number;
  unhandledPortReads: number;
  unhandledPortWrites: number;
  unhandledMmio: number;
  /** Last few unhandled ports ('in 0x61', 'out 0x80'), for diagnostics. */
  lastUnhandled: string[];
}

export const KVM_TSS_ADDR = 0xfffbd000;
export const KVM_IDENTITY_MAP_ADDR = 0xfeffc000;
const COM1 = Uart16550.BASE;
const DEBUGCON_PORTS = [0xe9, 0x402];
/** Writes of SLP_EN (bit 13) here power the machine off, as QEMU's ACPI PM1a control register at 0x604 on q35. */
export const POWER_PORT = 0x604;
const SLP_EN = 1 << 13;
const POST_PORT = 0x80;
const KVM_CAP_MAX_VCPUS = 66;
const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168;
const KVM_SYSTEM_EVENT_SHUTDOWN = 1;
const KVM_SYSTEM_EVENT_RESET = 2;
const KVM_SYSTEM_EVENT_CRASH = 3;

/** MTRRdefType, the fixed-range MTRRs and 8 variable-range pairs (those KVM refuses are dropped by the probe). */
const MTRR_MSRS = [0x2ff, 0x250, 0x258, 0x259, ...Array.from({ length: 8 }, (_, i) => 0x268 + i), ...Array.from({ length: 16 }, (_, i) => 0x200 + i)];

/** Per-process cache: the readable MSR list depends only on the host and the CPUID we give. */
let msrCache: number[] | undefined;

export class Machine extends EventEmitter implements StateHost {
  readonly machineType: MachineType;
  readonly cpus: number;
  readonly config: Readonly<MachineConfig>;
  readonly kvm: Kvm;
  readonly vm: Vm;
  private probed: KvmProbe | undefined;
  readonly ramBlocks: RamBlock[] = [];
  readonly vcpus: Vcpu[] = [];
  readonly serialDevice: Uart16550 | undefined;
  readonly hasIrqchip: boolean;
  /** Dirty-log mode the VM runs with. */
  readonly dirtyLog: { manualProtect: boolean; initiallySet: boolean };
  readonly stats: MachineStats = {
    ioExits: 0,
    mmioExits: 0,
    unhandledPortReads: 0,
    unhandledPortWrites: 0,
    unhandledMmio: 0,
    lastUnhandled: [],
  };
  /** What loadGuest() placed, if it ran. */
  boot: PvhBoot | undefined;

  private state: RunState = 'prelaunch';
  private memory: GuestMemory;
  private readonly sink: SerialSink;
  private chain: Promise<void> = Promise.resolve();
  private resetState: { vcpus: VcpuState[]; irqchip: Buffer[]; pit: Buffer | undefined } | undefined;
  private closed = false;
  private vcpusRunning = false;
  private guestImage: Buffer | undefined;

  constructor(config: MachineConfig) {
    super();
    this.config = { ...config };
    const { machineType, ramSize } = config;
    if (machineType !== 'pvh' && machineType !== 'none') throw new FerryError('ERR_MACHINE_CONFIG', `unknown machine type '${machineType}'`);
    if (!Number.isSafeInteger(ramSize) || ramSize <= 0 || ramSize % 4096 !== 0) {
      throw new FerryError('ERR_MACHINE_CONFIG', `RAM size ${ramSize} is not a positive multiple of 4 KiB`);
    }
    if (machineType === 'pvh' && ramSize < 2 * 1024 * 1024) throw new FerryError('ERR_MACHINE_CONFIG', 'a pvh machine needs at least 2 MiB of RAM');
    this.machineType = machineType;
    this.cpus = machineType === 'none' ? 0 : config.cpus;
    if (!Number.isInteger(this.cpus) || this.cpus < 0 || (machineType === 'pvh' && this.cpus < 1)) {
      throw new FerryError('ERR_MACHINE_CONFIG', `bad vCPU count ${config.cpus}`);
    }
    this.sink = config.serial ?? new NullSink();
    const n = native();
    this.kvm = new n.Kvm(config.kvmPath);
    let vm: Vm | undefined;
    let memory: GuestMemory | undefined;
    try {
      // Two capabilities only: the full probe costs milliseconds of ioctls at every start.
      const maxVcpus = this.kvm.checkExtension(KVM_CAP_MAX_VCPUS);
      if (maxVcpus > 0 && this.cpus > maxVcpus) throw new FerryError('ERR_MACHINE_CONFIG', `${this.cpus} vCPUs exceed KVM's limit of ${maxVcpus}`);
      vm = this.kvm.createVm();
      this.vm = vm;
      // Manual protect before any slot exists: KVM_GET_DIRTY_LOG then no longer clears.
      let mode = this.kvm.checkExtension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & (DIRTY_LOG_MANUAL_PROTECT_ENABLE | DIRTY_LOG_INITIALLY_SET);
      if (config.dirtyLogInitiallySet === false) mode &= ~DIRTY_LOG_INITIALLY_SET;
      if (mode & DIRTY_LOG_MANUAL_PROTECT_ENABLE) vm.enableManualDirtyLogProtect(mode);
      else mode = 0;
      this.dirtyLog = { manualProtect: mode !== 0, initiallySet: (mode & DIRTY_LOG_INITIALLY_SET) !== 0 };

      this.hasIrqchip = machineType === 'pvh';
      if (this.hasIrqchip) {
        vm.setTssAddr(KVM_TSS_ADDR);
        try {
          vm.setIdentityMapAddr(KVM_IDENTITY_MAP_ADDR); // only VMX without unrestricted guest uses it
        } catch {
          /* not supported (AMD, kvm_pvm): harmless */
        }
        vm.createIrqchip();
        vm.createPit2(0);
      }

      const backing = config.memPath ? { path: config.memPath } : config.memfd ? { memfd: true } : {};
      memory = new n.GuestMemory(ramSize, { ...backing, hugepages: config.hugepages ?? true });
      this.memory = memory;
      const idstr = config.memPath ? 'mem0' : machineType === 'none' ? 'ram' : 'pc.ram';
      const block = new RamBlock(idstr, memory, planRamSlots(ramSize, machineType === 'pvh'), vm);
      block.setManualProtect(this.dirtyLog.manualProtect);
      this.ramBlocks.push(block);

      if (machineType === 'pvh') {
        this.serialDevice = new Uart16550({ sink: this.sink, setIrq: (level) => this.vm.irqLine(Uart16550.IRQ, level) });
        const supported = decodeCpuid(this.kvm.supportedCpuid());
        for (let i = 0; i < this.cpus; i++) {
          const vcpu = vm.createVcpu(i);
          this.vcpus.push(vcpu);
          const timing = config.timingLeaf === false ? undefined : { tscKhz: vcpu.getTscKhz(), apicKhz: KVM_APIC_TIMER_KHZ };
          vcpu.setCpuid(encodeCpuid(vcpuCpuid(supported, i, this.cpus, timing)));
          vcpu.setMsrs([MSR_IA32_MISC_ENABLE], [MISC_ENABLE_FAST_STRING]);
          const uart = this.serialDevice;
          vcpu.start((exit) => this.onExit(vcpu, exit), false, [...Uart16550.POSTED_PORTS], [...Uart16550.SHADOW_PORTS], uart.shadow);
        }
        this.resetState = {
          vcpus: this.vcpus.map((v) => captureVcpu(v, this.savedMsrs())),
          irqchip: [0, 1, 2].map((c) => vm!.getIrqchip(c)),
          pit: vm.getPit2(),
        };
      }
    } catch (err) {
      try {
        vm?.close();
        memory?.close();
        this.kvm.close();
      } finally {
        this.sink.close();
      }
      throw err;
    }
  }

  /** KVM's capabilities (probed on first use). */
  get probe(): KvmProbe {
    this.probed ??= this.kvm.probe();
    return this.probed;
  }

  // ---- run state -------------------------------------------------------

  get runState(): RunState {
    return this.state;
  }

  get isRunning(): boolean {
    return this.state === 'running';
  }

  /** True when no vCPU thread runs guest code (vCPU state may be accessed). */
  get vcpusPaused(): boolean {
    return !this.vcpusRunning;
  }

  /**
   * Change the run state (checked against QEMU's transition table). Emits
   * 'runstate'. Does not start or stop vCPUs: use stop()/cont().
   */
  setRunState(next: RunState): void {
    const prev = this.state;
    if (prev === next) return;
    checkTransition(prev, next);
    this.state = next;
    this.emit('runstate', next, prev);
  }

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.chain.then(fn);
    this.chain = p.then(
      () => undefined,
      () => undefined,
    );
    return p;
  }

  /**
   * QEMU's vm_stop(state): if running, pause every vCPU, enter `state` and
   * emit STOP; otherwise just move to `state` (no event) when it differs.
   */
  stop(state: RunState = 'paused'): Promise<void> {
    return this.serialize(async () => {
      if (this.closed) return;
      if (this.state === 'running') {
        await this.pauseVcpus();
        this.setRunState(state);
        this.qmpEvent('STOP');
      } else if (this.state !== state) {
        await this.pauseVcpus();
        this.setRunState(state);
      }
    });
  }

  /**
   * QEMU's vm_start: enter 'running', resume every vCPU, emit RESUME. No-op
   * when already running. Refused after shutdown/internal-error/panic.
   */
  cont(): Promise<void> {
    return this.serialize(async () => {
      if (this.closed) throw new FerryError('ERR_MACHINE_CLOSED', 'machine is closed');
      if (this.state === 'running') return;
      if (needsReset(this.state)) throw new FerryError('ERR_NEEDS_RESET', 'Resetting the Virtual Machine is required');
      this.setRunState('running');
      this.resumeVcpus();
      this.qmpEvent('RESUME');
    });
  }

  /** Pause every vCPU (resolves when all are parked); no run-state change. */
  async pauseVcpus(): Promise<void> {
    await Promise.all(this.vcpus.map((v) => v.pause()));
    this.vcpusRunning = false;
  }

  resumeVcpus(): void {
    if (this.closed) return;
    this.vcpusRunning = true;
    for (const v of this.vcpus) v.resume();
  }

  private qmpEvent(name: string, data?: Record<string, unknown>): void {
    this.emit('qmp-event', name, data);
  }

  /**
   * Stop for good: pause vCPUs, enter 'shutdown', emit SHUTDOWN (QEMU's data
   * shape) and 'shutdown'. Idempotent.
   */
  shutdown(info: ShutdownInfo): Promise<void> {
    return this.serialize(async () => {
      if (this.closed || this.state === 'shutdown') return;
      await this.pauseVcpus();
      // shutdown is reachable from running/paused/prelaunch/finish-migrate; from elsewhere force it
      try {
        this.setRunState('shutdown');
      } catch {
        const prev = this.state;
        this.state = 'shutdown';
        this.emit('runstate', 'shutdown', prev);
      }
      // QEMU sends no STOP on the way out (vm_shutdown stops without the event)
      this.qmpEvent('SHUTDOWN', { guest: info.guest, reason: info.reason });
      this.emit('shutdown', info);
    });
  }

  /**
   * system_reset: every vCPU and interrupt controller back to its power-on
   * state, the guest image reloaded (as firmware would), the serial port
   * reset; RAM is otherwise kept (as QEMU). Emits RESET. The run state is
   * kept (a running machine keeps running).
   */
  reset(info: ShutdownInfo = { guest: false, reason: 'host-qmp-system-reset' }): Promise<void> {
    return this.serialize(async () => {
      if (this.closed) return;
      const wasRunning = this.vcpusRunning;
      await this.pauseVcpus();
      if (this.resetState && this.vm) {
        for (const b of this.resetState.irqchip) this.vm.setIrqchip(b);
        if (this.resetState.pit) this.vm.setPit2(this.resetState.pit);
        const report: RestoreReport = { skippedMsrs: [] };
        this.resetState.vcpus.forEach((s, i) => restoreVcpu(this.vcpus[i]!, s, report, false));
      }
      this.serialDevice?.reset();
      if (this.boot) this.loadGuestNow();
      this.qmpEvent('RESET', { guest: info.guest, reason: info.reason });
      if (needsReset(this.state)) this.setRunState('prelaunch');
      if (wasRunning && this.state === 'running') this.resumeVcpus();
    });
  }

  // ---- guest loading ----------------------------------------------------

  /**
   * Load the PVH image (config.guest, or `image`) and set the BSP's entry
   * state. Only while the vCPUs are paused (prelaunch).
   */
  loadGuest(imagePath?: string, cmdline?: string): PvhBoot {
    if (this.machineType !== 'pvh') throw new FerryError('ERR_MACHINE_CONFIG', `machine '${this.machineType}' has no CPU to boot a guest`);
    if (!this.vcpusPaused) throw new FerryError('ERR_MACHINE_RUNNING', 'cannot load a guest while vCPUs run');
    const p = imagePath ?? this.config.guest;
    if (!p) throw new FerryError('ERR_MACHINE_CONFIG', 'no guest image given');
    let image: Buffer;
    try {
      image = fs.readFileSync(p);
    } catch (err) {
      throw new FerryError('ERR_GUEST_IMAGE', `cannot read guest image ${p}: ${(err as Error).message}`, { cause: err });
    }
    this.guestImage = image;
    if (cmdline !== undefined) (this.config as MachineConfig).cmdline = cmdline;
    return this.loadGuestNow();
  }

  private loadGuestNow(): PvhBoot {
    const block = this.ramBlocks[0]!;
    const mem: PhysMemory = {
      ram: block.slots.map((s) => ({ start: s.gpa, end: s.gpa + s.size })),
      write: (gpa, data) => this.writePhys(gpa, data),
      fill: (gpa, length, value) => this.fillPhys(gpa, length, value),
    };
    const boot = loadPvh(this.guestImage!, mem, this.config.cmdline ?? '', buildE820(mem.ram));
    const bsp = this.vcpus[0]!;
    const { regs, sregs } = pvhCpuState(boot, decodeSregs(bsp.getSregs()));
    bsp.setSregs(encodeSregs(sregs));
    bsp.setRegs(encodeRegs(regs));
    this.boot = boot;
    return boot;
  }

  // ---- guest-physical memory ------------------------------------------

  /** The RAM block and offset holding [gpa, gpa+length), or undefined if the range leaves RAM. */
  findRam(gpa: number, length: number): { block: RamBlock; offset: number } | undefined {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) return undefined;
    for (const block of this.ramBlocks) {
      for (const s of block.slots) {
        if (gpa >= s.gpa && gpa + length <= s.gpa + s.size) return { block, offset: s.offset + (gpa - s.gpa) };
      }
    }
    return undefined;
  }

  private ramOrThrow(gpa: number, length: number): { block: RamBlock; offset: number } {
    const r = this.findRam(gpa, length);
    if (!r) throw new FerryError('ERR_GPA_RANGE', `guest-physical range [0x${gpa.toString(16)}, +0x${length.toString(16)}) is not RAM`);
    return r;
  }

  readPhys(gpa: number, length: number): Buffer {
    const { block, offset } = this.ramOrThrow(gpa, length);
    return block.read(offset, length);
  }

  writePhys(gpa: number, data: Uint8Array): void {
    const { block, offset } = this.ramOrThrow(gpa, data.length);
    block.write(offset, data);
  }

  fillPhys(gpa: number, length: number, value: number): void {
    const { block, offset } = this.ramOrThrow(gpa, length);
    block.fill(offset, length, value);
  }

  // ---- state ------------------------------------------------------------

  /** MSR indices saved with each vCPU: the index list minus what KVM_GET_MSRS refuses (probed once). */
  savedMsrs(): number[] {
    if (!msrCache) {
      // KVM's list leaves out the MTRRs (VMMs save them by name, as QEMU does).
      const list = [...new Set([...this.kvm.msrIndexList(), ...MTRR_MSRS])];
      msrCache = probeReadableMsrs(this.vcpus[0]!, list);
    }
    return msrCache;
  }

  /** The complete CPU and device state; the vCPUs must be paused. */
  captureState(): MachineState {
    this.requirePaused();
    return captureState(this);
  }

  /** Restore a captured state into this (paused, fresh) machine. */
  restoreState(s: MachineState): RestoreReport {
    this.requirePaused();
    const report = restoreState(this, s);
    this.boot = undefined; // a reset now keeps RAM as it is (no image to reload)
    return report;
  }

  private requirePaused(): void {
    if (!this.vcpusPaused) throw new FerryError('ERR_MACHINE_RUNNING', 'vCPU state is only accessible while the machine is stopped');
  }

  /** Per-vCPU register summary for diagnostics (paused only). */
  describeVcpu(i: number): string {
    const v = this.vcpus[i]!;
    const r = decodeRegs(v.getRegs());
    const s = decodeSregs(v.getSregs());
    const h = (x: bigint) => '0x' + x.toString(16);
    return `vcpu${i} rip=${h(r.rip)} rsp=${h(r.rsp)} rflags=${h(r.rflags)} cs=${s.cs.selector.toString(16)} cr0=${h(s.cr0)} cr3=${h(s.cr3)} cr4=${h(s.cr4)} efer=${h(s.efer)}`;
  }

  // ---- exits ------------------------------------------------------------

  private onExit(vcpu: Vcpu, exit: VcpuExit): void {
    try {
      switch (exit.reason) {
        case 'io':
          this.stats.ioExits++;
          this.portIo(exit.direction, exit.port, exit.size, exit.count, exit.data);
          return;
        case 'mmio':
          this.stats.mmioExits++;
          this.stats.unhandledMmio++;
          if (!exit.isWrite) exit.data.fill(0xff, 0, exit.len);
          this.noteUnhandled(`mmio ${exit.isWrite ? 'write' : 'read'} 0x${exit.gpa.toString(16)}`);
          return;
        case 'hlt':
          return; // with the in-kernel LAPIC KVM handles HLT itself
        case 'shutdown':
          this.guestResetRequest(`vcpu${vcpu.id}: triple fault`);
          return;
        case 'system-event':
          if (exit.type === KVM_SYSTEM_EVENT_SHUTDOWN) void this.shutdown({ guest: true, reason: 'guest-shutdown' });
          else if (exit.type === KVM_SYSTEM_EVENT_RESET) this.guestResetRequest(`vcpu${vcpu.id}: reset request`);
          else if (exit.type === KVM_SYSTEM_EVENT_CRASH) void this.fail('guest-panicked', `vcpu${vcpu.id}: guest crash event`);
          else void this.fail('internal-error', `vcpu${vcpu.id}: unknown system event ${exit.type}`);
          return;
        case 'internal-error':
          void this.fail('internal-error', `vcpu${vcpu.id}: KVM internal error, suberror ${exit.suberror} data [${exit.data.map((d) => '0x' + d.toString(16)).join(' ')}]`);
          return;
        case 'fail-entry':
          void this.fail('internal-error', `vcpu${vcpu.id}: KVM entry failed, hardware reason 0x${exit.hardwareEntryFailureReason.toString(16)}`);
          return;
        case 'unknown':
          void this.fail('internal-error', `vcpu${vcpu.id}: unknown KVM exit ${exit.exitReason}`);
          return;
        case 'error':
          void this.fail('internal-error', `vcpu${vcpu.id}: KVM_RUN failed: ${exit.error.message}`);
          return;
      }
    } catch (err) {
      // Never let an exception escape into the native callback (it would be fatal).
      void this.fail('internal-error', `vcpu${vcpu.id}: exit handler failed: ${(err as Error).stack ?? err}`);
    }
  }

  private guestResetRequest(why: string): void {
    if (this.config.rebootAction === 'reset') {
      void this.reset({ guest: true, reason: 'guest-reset' });
    } else {
      this.emit('guest-error', `${why}: shutting down (reboot action 'shutdown')`);
      void this.shutdown({ guest: true, reason: 'guest-reset' });
    }
  }

  /** A vCPU failed: stop everything in `state` (QEMU: internal-error stops the VM, the process stays). */
  private fail(state: RunState, message: string): Promise<void> {
    return this.serialize(async () => {
      if (this.closed) return;
      const wasRunning = this.state === 'running';
      await this.pauseVcpus();
      let detail = message;
      try {
        detail += '\n' + this.vcpus.map((_, i) => this.describeVcpu(i)).join('\n');
      } catch {
        /* state not readable */
      }
      this.emit('guest-error', detail);
      if (this.state !== state) {
        try {
          this.setRunState(state);
        } catch {
          const prev = this.state;
          this.state = state;
          this.emit('runstate', state, prev);
        }
      }
      if (wasRunning) this.qmpEvent('STOP');
      if (state === 'guest-panicked') this.qmpEvent('GUEST_PANICKED', { action: 'pause' });
    });
  }

  private noteUnhandled(what: string): void {
    const l = this.stats.lastUnhandled;
    if (l.length >= 8) l.shift();
    l.push(what);
  }

  /** One port access: `data` holds count × size bytes (string I/O repeats). */
  private portIo(direction: 0 | 1, port: number, size: 1 | 2 | 4, count: number, data: Uint8Array): void {
    const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
    for (let i = 0; i < count; i++) {
      const off = i * size;
      if (off + size > data.length) return;
      if (direction === 0) {
        const v = this.portRead(port, size);
        if (size === 1) dv.setUint8(off, v & 0xff);
        else if (size === 2) dv.setUint16(off, v & 0xffff, true);
        else dv.setUint32(off, v >>> 0, true);
      } else {
        const v = size === 1 ? dv.getUint8(off) : size === 2 ? dv.getUint16(off, true) : dv.getUint32(off, true);
        this.portWrite(port, size, v);
      }
    }
  }

  private portRead(port: number, size: number): number {
    if (this.serialDevice && port >= COM1 && port < COM1 + 8) return this.serialDevice.read(port - COM1);
    if (DEBUGCON_PORTS.includes(port)) return 0xe9; // debugcon readback: "present"
    this.stats.unhandledPortReads++;
    this.noteUnhandled(`in 0x${port.toString(16)}`);
    return size === 1 ? 0xff : size === 2 ? 0xffff : 0xffffffff;
  }

  private portWrite(port: number, size: number, value: number): void {
    if (this.serialDevice && port >= COM1 && port < COM1 + 8) {
      this.serialDevice.write(port - COM1, value & 0xff);
      return;
    }
    if (DEBUGCON_PORTS.includes(port)) {
      this.sink.write(Uint8Array.of(value & 0xff));
      return;
    }
    if (port === POWER_PORT && size >= 2 && value & SLP_EN) {
      void this.shutdown({ guest: true, reason: 'guest-shutdown' });
      return;
    }
    if (port === POST_PORT) return; // POST codes / I/O delay
    this.stats.unhandledPortWrites++;
    this.noteUnhandled(`out 0x${port.toString(16)}`);
  }

  // ---- teardown ---------------------------------------------------------

  /**
   * Stop and join every vCPU thread, close the VM, unmap RAM, flush and
   * close the serial sink. Idempotent; the machine is unusable after.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.vcpusRunning = false;
    try {
      this.vm.close(); // joins vCPU threads, closes their fds, drops memory refs
    } finally {
      for (const b of this.ramBlocks) b.dropViews();
      this.memory.close();
      this.kvm.close();
      this.sink.close();
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }
}
