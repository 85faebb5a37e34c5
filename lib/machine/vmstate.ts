/**
 * The machine's device state as savevm FULL sections: vmstate descriptions
 * for ferry's PVH machine, and conversion between MachineState (the plain
 * capture of state.ts) and sections.
 *
 * Sections (one concern each, QEMU-like names):
 *   cpu         instance = vCPU index: KVM structs as sized buffers, MSRs as
 *               index/value arrays, MP state
 *   kvm-i8259   instance 0 master, 1 slave: struct kvm_irqchip
 *   kvm-ioapic  struct kvm_irqchip (IOAPIC)
 *   kvm-pit     struct kvm_pit_state2
 *   kvmclock    struct kvm_clock_data
 *   serial      16550 registers and unread input
 * Every buffer carries its length in a preceding uint32 (vbuffer), bounded
 * on load, so the vmdesc describes each field with its real size.
 */
import type { VmState, VmStateDescription, VmField } from '../stream/vmstate';
import type { DeviceStateSection } from '../migration/machine-port';
import { FerryError } from '../errors';
import type { MachineState, VcpuState } from './state';
import type { SerialState } from './serial';

const MAX_KVM_STRUCT = 64 << 10; // xsave2 is the largest: a few KiB
const MAX_MSRS = 4096;

function blob(name: string, maxSize = MAX_KVM_STRUCT): VmField[] {
  return [
    { name: `${name}_size`, type: 'uint32' },
    { name, type: 'vbuffer', sizeField: `${name}_size`, maxSize },
  ];
}

export const CPU_VMSD: VmStateDescription = {
  name: 'cpu',
  version: 1,
  fields: [
    ...blob('regs'),
    ...blob('sregs'),
    ...blob('xsave'),
    ...blob('fpu'),
    ...blob('xcrs'),
    { name: 'msr_count', type: 'uint32' },
    { name: 'msr_index', type: 'uint32', countField: 'msr_count', maxCount: MAX_MSRS },
    { name: 'msr_value', type: 'uint64', countField: 'msr_count', maxCount: MAX_MSRS },
    ...blob('lapic'),
    ...blob('events'),
    { name: 'mp_state', type: 'uint32' },
    ...blob('debugregs'),
  ],
};

const single = (name: string, field: string): VmStateDescription => ({ name, version: 1, fields: blob(field) });
export const PIC_VMSD = single('kvm-i8259', 'chip');
export const IOAPIC_VMSD = single('kvm-ioapic', 'chip');
export const PIT_VMSD = single('kvm-pit', 'pit');
export const KVMCLOCK_VMSD = single('kvmclock', 'clock');

const SERIAL_REGS = ['dll', 'dlm', 'ier', 'lcr', 'mcr', 'lsr', 'msr', 'scr', 'fcr'] as const;
export const SERIAL_VMSD: VmStateDescription = {
  name: 'serial',
  version: 1,
  fields: [...SERIAL_REGS.map((name): VmField => ({ name, type: 'uint8' })), { name: 'thri_pending', type: 'bool' }, ...blob('rx', 1 << 16)],
};

const bytes = (b64: string | undefined): Uint8Array => (b64 ? Buffer.from(b64, 'base64') : new Uint8Array(0));
const b64 = (v: unknown): string | undefined => (v instanceof Uint8Array && v.length > 0 ? Buffer.from(v.buffer, v.byteOffset, v.length).toString('base64') : undefined);

function withSize(state: VmState, name: string, value: Uint8Array): void {
  state[name] = value;
  state[`${name}_size`] = value.length;
}

function cpuState(v: VcpuState): VmState {
  const s: VmState = {};
  for (const k of ['regs', 'sregs', 'xsave', 'fpu', 'xcrs', 'lapic', 'events', 'debugregs'] as const) withSize(s, k, bytes(v[k]));
  s.msr_count = v.msrs.length;
  s.msr_index = v.msrs.map(([i]) => i);
  s.msr_value = v.msrs.map(([, val]) => BigInt(val));
  s.mp_state = v.mpState;
  return s;
}

function vcpuFrom(id: number, s: VmState): VcpuState {
  const idx = (s.msr_index as number[]) ?? [];
  const val = (s.msr_value as bigint[]) ?? [];
  const need = (k: string): string => {
    const v = b64(s[k]);
    if (v === undefined) throw new FerryError('ERR_MIGRATION_STREAM', `section 'cpu' ${id}: ${k} is empty`);
    return v;
  };
  return {
    id,
    regs: need('regs'),
    sregs: need('sregs'),
    xsave: b64(s.xsave),
    fpu: b64(s.fpu),
    xcrs: b64(s.xcrs),
    msrs: idx.map((i, n) => [Number(i), '0x' + BigInt(val[n] ?? 0n).toString(16)]),
    lapic: need('lapic'),
    events: need('events'),
    mpState: Number(s.mp_state),
    debugregs: need('debugregs'),
  };
}

/** MachineState -> FULL sections (the order the destination applies them in does not matter). */
export function sectionsFromState(st: MachineState): DeviceStateSection[] {
  const out: DeviceStateSection[] = [];
  for (const v of st.vcpus) out.push({ idstr: 'cpu', instanceId: v.id, vmsd: CPU_VMSD, state: cpuState(v) });
  if (st.irqchip) {
    const chip = (b: string): VmState => {
      const s: VmState = {};
      withSize(s, 'chip', bytes(b));
      return s;
    };
    out.push({ idstr: 'kvm-i8259', instanceId: 0, vmsd: PIC_VMSD, state: chip(st.irqchip.picMaster) });
    out.push({ idstr: 'kvm-i8259', instanceId: 1, vmsd: PIC_VMSD, state: chip(st.irqchip.picSlave) });
    out.push({ idstr: 'kvm-ioapic', instanceId: 0, vmsd: IOAPIC_VMSD, state: chip(st.irqchip.ioapic) });
  }
  if (st.pit) {
    const s: VmState = {};
    withSize(s, 'pit', bytes(st.pit));
    out.push({ idstr: 'kvm-pit', instanceId: 0, vmsd: PIT_VMSD, state: s });
  }
  if (st.clock) {
    const s: VmState = {};
    withSize(s, 'clock', bytes(st.clock));
    out.push({ idstr: 'kvmclock', instanceId: 0, vmsd: KVMCLOCK_VMSD, state: s });
  }
  if (st.serial) {
    const s: VmState = {};
    for (const r of SERIAL_REGS) s[r] = st.serial[r];
    s.thri_pending = st.serial.thrIpending;
    withSize(s, 'rx', bytes(st.serial.rx));
    out.push({ idstr: 'serial', instanceId: 0, vmsd: SERIAL_VMSD, state: s });
  }
  return out;
}

/** The vmsd this machine loads for a section, or undefined (unknown section). */
export function vmsdFor(idstr: string, instanceId: number, cpus: number, pvh: boolean): VmStateDescription | undefined {
  if (!pvh) return undefined;
  switch (idstr) {
    case 'cpu':
      return instanceId >= 0 && instanceId < cpus ? CPU_VMSD : undefined;
    case 'kvm-i8259':
      return instanceId === 0 || instanceId === 1 ? PIC_VMSD : undefined;
    case 'kvm-ioapic':
      return instanceId === 0 ? IOAPIC_VMSD : undefined;
    case 'kvm-pit':
      return instanceId === 0 ? PIT_VMSD : undefined;
    case 'kvmclock':
      return instanceId === 0 ? KVMCLOCK_VMSD : undefined;
    case 'serial':
      return instanceId === 0 ? SERIAL_VMSD : undefined;
  }
  return undefined;
}

/**
 * Loaded sections -> MachineState for `base` (this machine's identity: type,
 * cpus, RAM). Every vCPU and chip of the machine must be present: a stream
 * that leaves one out is rejected instead of running a half-restored guest.
 */
export function stateFromSections(base: Pick<MachineState, 'machineType' | 'cpus' | 'ram'>, sections: DeviceStateSection[], expectChips: boolean): MachineState {
  const find = (idstr: string, inst: number) => sections.find((s) => s.idstr === idstr && s.instanceId === inst)?.state;
  const missing = (what: string) => new FerryError('ERR_MIGRATION_STREAM', `migration stream has no '${what}' section for this machine`);
  const vcpus: VcpuState[] = [];
  for (let i = 0; i < base.cpus; i++) {
    const s = find('cpu', i);
    if (!s) throw missing(`cpu ${i}`);
    vcpus.push(vcpuFrom(i, s));
  }
  const st: MachineState = { format: 'ferry-machine-state', version: 1, machineType: base.machineType, cpus: base.cpus, ram: base.ram, vcpus };
  if (expectChips) {
    const m = find('kvm-i8259', 0);
    const sl = find('kvm-i8259', 1);
    const io = find('kvm-ioapic', 0);
    const pit = find('kvm-pit', 0);
    const clock = find('kvmclock', 0);
    if (!m || !sl) throw missing('kvm-i8259');
    if (!io) throw missing('kvm-ioapic');
    if (!pit) throw missing('kvm-pit');
    if (!clock) throw missing('kvmclock');
    st.irqchip = { picMaster: b64(m.chip)!, picSlave: b64(sl.chip)!, ioapic: b64(io.chip)! };
    st.pit = b64(pit.pit);
    st.clock = b64(clock.clock);
  }
  const ser = find('serial', 0);
  if (ser) {
    const serial = {} as SerialState;
    for (const r of SERIAL_REGS) serial[r] = Number(ser[r]);
    serial.thrIpending = Boolean(ser.thri_pending);
    serial.rx = b64(ser.rx) ?? '';
    st.serial = serial;
  }
  return st;
}
