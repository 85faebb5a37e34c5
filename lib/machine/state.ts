/**
 * The machine's complete CPU and device state as plain, JSON-serialisable
 * data (kernel structs as base64 of their exact bytes, 64-bit values as hex
 * strings), captured from a paused machine and restored into a fresh one,
 * possibly in another process.
 *
 * Captured per vCPU: regs, sregs, xsave (or fpu without XSAVE), xcrs, every
 * MSR of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS accepts (probed once per
 * machine: the list holds MSRs the vCPU's CPUID does not enable, which fail),
 * LAPIC, vCPU events, MP state, debug registers. Per VM: PIC master/slave,
 * IOAPIC, PIT, KVM clock; and the serial port's registers.
 *
 * Restore order (each step depends on the ones before):
 *   VM: irqchips, PIT                      (routing targets exist before vCPU state)
 *   vCPU: sregs                            (mode, EFER, CR*, APIC base)
 *         regs, xcrs, xsave/fpu
 *         MSRs except TSC_DEADLINE         (after sregs: EFER/APIC base are set;
 *                                           IA32_TSC makes the guest TSC continue)
 *         LAPIC                            (after the APIC base MSR, which can reset it)
 *         TSC_DEADLINE                     (KVM ignores it unless the LAPIC timer is in deadline mode)
 *         MP state, vCPU events, debugregs (events last: they re-inject what was pending)
 *   VM: KVM clock                          (flags cleared: no host-time catch-up)
 *
 * Everything here requires every vCPU to be paused (native vcpu.pause()
 * completes a pending I/O instruction before parking, so the registers
 * read are those after the instruction).
 */
import type { Vcpu } from '../native';
import { FerryError } from '../errors';
import type { SerialState } from './serial';
import { clockForRestore, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE } from './x86';

export const STATE_FORMAT = 'ferry-machine-state';
export const STATE_VERSION = 1;

export interface VcpuState {
  id: number;
  regs: string;
  sregs: string;
  /** struct kvm_xsave (KVM_GET_XSAVE2 size); absent without XSAVE support. */
  xsave?: string;
  /** struct kvm_fpu, only when xsave could not be read. */
  fpu?: string;
  xcrs?: string;
  /** [index, value as 0x-hex] */
  msrs: [number, string][];
  lapic: string;
  events: string;
  mpState: number;
  debugregs: string;
}

export interface MachineState {
  format: typeof STATE_FORMAT;
  version: number;
  machineType: 'pvh' | 'none';
  cpus: number;
  ram: { idstr: string; size: number }[];
  vcpus: VcpuState[];
  irqchip?: { picMaster: string; picSlave: string; ioapic: string };
  pit?: string;
  clock?: string;
  serial?: SerialState;
}

/** What capture/restore need from a machine (Machine implements it). */
export interface StateHost {
  readonly machineType: 'pvh' | 'none';
  readonly cpus: number;
  readonly ramBlocks: readonly { idstr: string; size: number }[];
  readonly vcpus: readonly Vcpu[];
  readonly vm: import('../native').Vm | undefined;
  readonly hasIrqchip: boolean;
  readonly serialDevice: { getState(): SerialState; setState(s: SerialState): void } | undefined;
  /** MSR indices to save (probed once). */
  savedMsrs(): number[];
}

export interface RestoreReport {
  /** MSRs the kernel refused on restore (index, vCPU), skipped. */
  skippedMsrs: { vcpu: number; index: number }[];
}

const b64 = (b: Buffer): string => b.toString('base64');
const unb64 = (s: string, what: string): Buffer => {
  if (typeof s !== 'string') throw new FerryError('ERR_STATE_INVALID', `state: ${what} missing`);
  return Buffer.from(s, 'base64');
};

/**
 * The MSRs of `list` that KVM_GET_MSRS reads on `vcpu`, one probe each.
 * vcpu must be paused.
 */
export function probeReadableMsrs(vcpu: Vcpu, list: number[]): number[] {
  const ok: number[] = [];
  for (const idx of list) {
    try {
      vcpu.getMsrs([idx]);
      ok.push(idx);
    } catch {
      // not enabled for this vCPU (feature absent from CPUID, Hyper-V MSRs, ...)
    }
  }
  return ok;
}

export function captureVcpu(vcpu: Vcpu, msrs: number[]): VcpuState {
  let xsave: string | undefined;
  let fpu: string | undefined;
  try {
    xsave = b64(vcpu.getXsave());
  } catch {
    fpu = b64(vcpu.getFpu());
  }
  let xcrs: string | undefined;
  try {
    xcrs = b64(vcpu.getXcrs());
  } catch {
    xcrs = undefined; // no XSAVE: no XCRs
  }
  const values = msrs.length ? vcpu.getMsrs(msrs) : [];
  return {
    id: vcpu.id,
    regs: b64(vcpu.getRegs()),
    sregs: b64(vcpu.getSregs()),
    xsave,
    fpu,
    xcrs,
    msrs: msrs.map((m, i) => [m, '0x' + values[i]!.toString(16)]),
    lapic: b64(vcpu.getLapic()),
    events: b64(vcpu.getVcpuEvents()),
    mpState: vcpu.getMpState(),
    debugregs: b64(vcpu.getDebugRegs()),
  };
}

/** KVM_SET_MSRS, skipping (and reporting) any MSR the kernel refuses. */
function setMsrsTolerant(vcpu: Vcpu, msrs: [number, bigint][], skipped: RestoreReport['skippedMsrs']): void {
  let rest = msrs;
  while (rest.length) {
    const n = vcpu.setMsrs(
      rest.map((m) => m[0]),
      rest.map((m) => m[1]),
    );
    if (n >= rest.length) return;
    skipped.push({ vcpu: vcpu.id, index: rest[n]![0] });
    rest = rest.slice(n + 1);
  }
}

/**
 * Restore one vCPU. `includeTsc` false leaves IA32_TSC alone (system_reset:
 * the TSC keeps counting through a reset).
 */
export function restoreVcpu(vcpu: Vcpu, s: VcpuState, report: RestoreReport, includeTsc = true): void {
  vcpu.setSregs(unb64(s.sregs, 'sregs'));
  vcpu.setRegs(unb64(s.regs, 'regs'));
  if (s.xcrs) vcpu.setXcrs(unb64(s.xcrs, 'xcrs'));
  if (s.xsave) vcpu.setXsave(unb64(s.xsave, 'xsave'));
  else if (s.fpu) vcpu.setFpu(unb64(s.fpu, 'fpu'));
  const all: [number, bigint][] = s.msrs.map(([i, v]) => [i, BigInt(v)]);
  const early = all.filter(([i]) => i !== MSR_IA32_TSC_DEADLINE && (includeTsc || i !== MSR_IA32_TSC));
  const deadline = all.filter(([i]) => i === MSR_IA32_TSC_DEADLINE);
  setMsrsTolerant(vcpu, early, report.skippedMsrs);
  vcpu.setLapic(unb64(s.lapic, 'lapic'));
  setMsrsTolerant(vcpu, deadline, report.skippedMsrs);
  vcpu.setMpState(s.mpState);
  vcpu.setVcpuEvents(unb64(s.events, 'events'));
  vcpu.setDebugRegs(unb64(s.debugregs, 'debugregs'));
}

/** Capture the whole machine. Every vCPU must be paused. */
export function captureState(m: StateHost): MachineState {
  const msrs = m.vcpus.length ? m.savedMsrs() : [];
  const st: MachineState = {
    format: STATE_FORMAT,
    version: STATE_VERSION,
    machineType: m.machineType,
    cpus: m.cpus,
    ram: m.ramBlocks.map((b) => ({ idstr: b.idstr, size: b.size })),
    vcpus: m.vcpus.map((v) => captureVcpu(v, msrs)),
  };
  if (m.vm && m.hasIrqchip) {
    st.irqchip = { picMaster: b64(m.vm.getIrqchip(0)), picSlave: b64(m.vm.getIrqchip(1)), ioapic: b64(m.vm.getIrqchip(2)) };
    st.pit = b64(m.vm.getPit2());
  }
  if (m.vm && m.vcpus.length) st.clock = b64(m.vm.getClock());
  if (m.serialDevice) st.serial = m.serialDevice.getState();
  return st;
}

/** Throws ERR_STATE_MISMATCH when `s` was not captured from a machine shaped like `m`. */
export function checkCompatible(m: StateHost, s: MachineState): void {
  const bad = (msg: string) => new FerryError('ERR_STATE_MISMATCH', `saved state does not fit this machine: ${msg}`);
  if (s?.format !== STATE_FORMAT) throw new FerryError('ERR_STATE_INVALID', 'not a ferry machine state');
  if (s.version !== STATE_VERSION) throw new FerryError('ERR_STATE_INVALID', `unsupported machine state version ${s.version}`);
  if (s.machineType !== m.machineType) throw bad(`machine type ${s.machineType}, this is ${m.machineType}`);
  if (s.vcpus.length !== m.vcpus.length) throw bad(`${s.vcpus.length} vCPUs, this machine has ${m.vcpus.length}`);
  const want = m.ramBlocks.map((b) => `${b.idstr}:${b.size}`).join(',');
  const got = s.ram.map((b) => `${b.idstr}:${b.size}`).join(',');
  if (want !== got) throw bad(`RAM blocks ${got}, this machine has ${want}`);
}

/** Restore `s` into `m` (every vCPU paused). */
export function restoreState(m: StateHost, s: MachineState): RestoreReport {
  checkCompatible(m, s);
  const report: RestoreReport = { skippedMsrs: [] };
  if (m.vm && m.hasIrqchip && s.irqchip) {
    m.vm.setIrqchip(unb64(s.irqchip.picMaster, 'irqchip'));
    m.vm.setIrqchip(unb64(s.irqchip.picSlave, 'irqchip'));
    m.vm.setIrqchip(unb64(s.irqchip.ioapic, 'irqchip'));
  }
  if (m.vm && m.hasIrqchip && s.pit) m.vm.setPit2(unb64(s.pit, 'pit'));
  s.vcpus.forEach((vs, i) => restoreVcpu(m.vcpus[i]!, vs, report));
  if (m.vm && s.clock) m.vm.setClock(clockForRestore(unb64(s.clock, 'clock')));
  if (m.serialDevice && s.serial) m.serialDevice.setState(s.serial);
  return report;
}
