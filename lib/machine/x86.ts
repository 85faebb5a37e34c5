/**
 * x86 KVM structure layouts (x86_64 linux/kvm.h) and architectural
 * constants: encoders/decoders for the few structs whose fields the VMM
 * reads or writes (kvm_regs, kvm_sregs, kvm_cpuid2), plus MSR and CPUID
 * helpers. Every other state struct crosses the native boundary as raw
 * bytes and is only carried (saved/restored) whole.
 *
 * Offsets are from the kernel UAPI headers (stable ABI); sizes are checked
 * before decoding so a short buffer throws instead of reading garbage.
 */

// ---- MSRs (Intel SDM vol. 4; KVM paravirtual range 0x4b564d00) ----
export const MSR_IA32_TSC = 0x10;
export const MSR_IA32_APICBASE = 0x1b;
export const MSR_IA32_FEATURE_CONTROL = 0x3a;
export const MSR_IA32_TSC_ADJUST = 0x3b;
export const MSR_IA32_MISC_ENABLE = 0x1a0;
export const MSR_IA32_TSC_DEADLINE = 0x6e0;
export const MSR_EFER = 0xc0000080;
export const MSR_KVM_SYSTEM_TIME_NEW = 0x4b564d01;
export const MSR_KVM_WALL_CLOCK_NEW = 0x4b564d00;
export const MSR_KVM_SYSTEM_TIME = 0x12;
export const MSR_KVM_WALL_CLOCK = 0x11;

/** IA32_MISC_ENABLE.FAST_STRINGS: what firmware and QEMU leave set at reset. */
export const MISC_ENABLE_FAST_STRING = 1n;

/** Bytes of each kernel struct the addon hands over (x86_64). */
export const SIZES = {
  regs: 144,
  segment: 24,
  dtable: 16,
  sregs: 312,
  fpu: 416,
  xcrs: 392,
  lapic: 1024,
  vcpuEvents: 64,
  debugregs: 128,
  irqchip: 520,
  pit2: 112,
  clock: 48,
  cpuidEntry: 40,
  cpuidHeader: 8,
} as const;

function need(b: Buffer, size: number, what: string): void {
  if (b.length < size) throw new RangeError(`${what}: expected ${size} bytes, got ${b.length}`);
}

// ---- struct kvm_regs ----

export const REG_NAMES = [
  'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp',
  'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags',
] as const;
export type RegName = (typeof REG_NAMES)[number];
export type Regs = Record<RegName, bigint>;

export function decodeRegs(b: Buffer): Regs {
  need(b, SIZES.regs, 'kvm_regs');
  const r = {} as Regs;
  REG_NAMES.forEach((n, i) => (r[n] = b.readBigUInt64LE(i * 8)));
  return r;
}

export function encodeRegs(r: Regs): Buffer {
  const b = Buffer.alloc(SIZES.regs);
  REG_NAMES.forEach((n, i) => b.writeBigUInt64LE(BigInt.asUintN(64, r[n]), i * 8));
  return b;
}

export function emptyRegs(): Regs {
  const r = {} as Regs;
  for (const n of REG_NAMES) r[n] = 0n;
  r.rflags = 2n; // bit 1 is reserved-one
  return r;
}

// ---- struct kvm_segment / kvm_dtable / kvm_sregs ----

export interface Segment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

export interface DTable {
  base: bigint;
  limit: number;
}

export const SEGMENT_NAMES = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
export type SegmentName = (typeof SEGMENT_NAMES)[number];

export interface Sregs extends Record<SegmentName, Segment> {
  gdt: DTable;
  idt: DTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
  /** Pending external interrupt bitmap (256 bits as 4 u64). */
  interruptBitmap: bigint[];
}

const SEG_BYTES = ['type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable'] as const;

function decodeSegment(b: Buffer, o: number): Segment {
  const s = { base: b.readBigUInt64LE(o), limit: b.readUInt32LE(o + 8), selector: b.readUInt16LE(o + 12) } as Segment;
  SEG_BYTES.forEach((k, i) => (s[k] = b[o + 14 + i]!));
  return s;
}

function encodeSegment(b: Buffer, o: number, s: Segment): void {
  b.writeBigUInt64LE(BigInt.asUintN(64, s.base), o);
  b.writeUInt32LE(s.limit >>> 0, o + 8);
  b.writeUInt16LE(s.selector & 0xffff, o + 12);
  SEG_BYTES.forEach((k, i) => (b[o + 14 + i] = s[k] & 0xff));
}

const SREGS_DT = 8 * SIZES.segment; // 192: gdt, idt
const SREGS_CR = SREGS_DT + 2 * SIZES.dtable; // 224: cr0 cr2 cr3 cr4 cr8 efer apic_base
const SREGS_IRQ = SREGS_CR + 7 * 8; // 280: interrupt_bitmap[4]

export function decodeSregs(b: Buffer): Sregs {
  need(b, SIZES.sregs, 'kvm_sregs');
  const s = {} as Sregs;
  SEGMENT_NAMES.forEach((n, i) => (s[n] = decodeSegment(b, i * SIZES.segment)));
  s.gdt = { base: b.readBigUInt64LE(SREGS_DT), limit: b.readUInt16LE(SREGS_DT + 8) };
  s.idt = { base: b.readBigUInt64LE(SREGS_DT + 16), limit: b.readUInt16LE(SREGS_DT + 24) };
  const cr = (i: number) => b.readBigUInt64LE(SREGS_CR + i * 8);
  [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apicBase] = [cr(0), cr(1), cr(2), cr(3), cr(4), cr(5), cr(6)];
  s.interruptBitmap = [0, 1, 2, 3].map((i) => b.readBigUInt64LE(SREGS_IRQ + i * 8));
  return s;
}

export function encodeSregs(s: Sregs): Buffer {
  const b = Buffer.alloc(SIZES.sregs);
  SEGMENT_NAMES.forEach((n, i) => encodeSegment(b, i * SIZES.segment, s[n]));
  b.writeBigUInt64LE(BigInt.asUintN(64, s.gdt.base), SREGS_DT);
  b.writeUInt16LE(s.gdt.limit & 0xffff, SREGS_DT + 8);
  b.writeBigUInt64LE(BigInt.asUintN(64, s.idt.base), SREGS_DT + 16);
  b.writeUInt16LE(s.idt.limit & 0xffff, SREGS_DT + 24);
  [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apicBase].forEach((v, i) =>
    b.writeBigUInt64LE(BigInt.asUintN(64, v), SREGS_CR + i * 8),
  );
  for (let i = 0; i < 4; i++) b.writeBigUInt64LE(BigInt.asUintN(64, s.interruptBitmap[i] ?? 0n), SREGS_IRQ + i * 8);
  return b;
}

// ---- CR0 / EFLAGS bits used by loaders ----
export const CR0_PE = 0x1n;
export const CR0_ET = 0x10n;
export const RFLAGS_RESERVED = 0x2n;

/** A flat 32-bit segment (base 0, limit 4 GiB, granular). type: 0xb code (exec/read/accessed), 0x3 data (rw/accessed). */
export function flatSegment32(selector: number, code: boolean): Segment {
  return {
    base: 0n,
    limit: 0xffffffff,
    selector,
    type: code ? 0xb : 0x3,
    present: 1,
    dpl: 0,
    db: 1,
    s: 1,
    l: 0,
    g: 1,
    avl: 0,
    unusable: 0,
  };
}

// ---- struct kvm_cpuid2 / kvm_cpuid_entry2 ----

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

/** kvm_cpuid_entry2.flags: the entry depends on ECX (index). */
export const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

export function decodeCpuid(b: Buffer): CpuidEntry[] {
  need(b, SIZES.cpuidHeader, 'kvm_cpuid2');
  const n = b.readUInt32LE(0);
  need(b, SIZES.cpuidHeader + n * SIZES.cpuidEntry, 'kvm_cpuid2 entries');
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = SIZES.cpuidHeader + i * SIZES.cpuidEntry;
    out.push({
      function: b.readUInt32LE(o),
      index: b.readUInt32LE(o + 4),
      flags: b.readUInt32LE(o + 8),
      eax: b.readUInt32LE(o + 12),
      ebx: b.readUInt32LE(o + 16),
      ecx: b.readUInt32LE(o + 20),
      edx: b.readUInt32LE(o + 24),
    });
  }
  return out;
}

export function encodeCpuid(entries: CpuidEntry[]): Buffer {
  const b = Buffer.alloc(SIZES.cpuidHeader + entries.length * SIZES.cpuidEntry);
  b.writeUInt32LE(entries.length, 0);
  entries.forEach((e, i) => {
    const o = SIZES.cpuidHeader + i * SIZES.cpuidEntry;
    b.writeUInt32LE(e.function >>> 0, o);
    b.writeUInt32LE(e.index >>> 0, o + 4);
    b.writeUInt32LE(e.flags >>> 0, o + 8);
    b.writeUInt32LE(e.eax >>> 0, o + 12);
    b.writeUInt32LE(e.ebx >>> 0, o + 16);
    b.writeUInt32LE(e.ecx >>> 0, o + 20);
    b.writeUInt32LE(e.edx >>> 0, o + 24);
  });
  return b;
}

/** Bits needed to number `n` things (ceil(log2 n)). */
function bitsFor(n: number): number {
  let b = 0;
  while (1 << b < n) b++;
  return b;
}

/**
 * The CPUID table for vCPU `apicId` of `cpus`, from KVM_GET_SUPPORTED_CPUID:
 * one socket of `cpus` single-thread cores, APIC id = vCPU index.
 * - leaf 1: EBX[31:24] initial APIC id, EBX[23:16] logical processors;
 * - leaves 0xB/0x1F: x2APIC id in EDX of every subleaf, SMT and core levels;
 * - leaf 4: cores per package in EAX[31:26];
 * - 0x40000001 (KVM features) cleared: the guest is told of no paravirtual
 *   feature, so nothing (kvmclock, steal time, PV EOI) makes KVM write
 *   guest memory behind the guest's back;
 * - with `timing`: leaf 0x40000010 (TSC and LAPIC timer kHz), the hypervisor
 *   range extended to include it.
 */
export function vcpuCpuid(supported: CpuidEntry[], apicId: number, cpus: number, timing?: { tscKhz: number; apicKhz: number }): CpuidEntry[] {
  const coreBits = bitsFor(cpus);
  const out = supported.map((src) => {
    const e = { ...src };
    switch (e.function) {
      case 0x1:
        e.ebx = ((e.ebx & 0x0000ffff) | ((cpus & 0xff) << 16) | ((apicId & 0xff) << 24)) >>> 0;
        if (cpus > 1) e.edx = (e.edx | (1 << 28)) >>> 0; // HTT: EBX[23:16] is valid
        break;
      case 0x4:
        if ((e.eax & 0x1f) !== 0) e.eax = ((e.eax & 0x03ffffff) | (((cpus - 1) & 0x3f) << 26)) >>> 0;
        break;
      case 0xb:
      case 0x1f:
        e.edx = apicId >>> 0;
        if (e.index === 0) {
          e.eax = 0; // SMT level: 1 thread per core
          e.ebx = 1;
          e.ecx = (1 << 8) | 0;
        } else if (e.index === 1) {
          e.eax = coreBits;
          e.ebx = cpus;
          e.ecx = (2 << 8) | 1;
        } else {
          e.eax = 0;
          e.ebx = 0;
          e.ecx = e.index & 0xff; // invalid level terminates enumeration
        }
        break;
      case 0x40000000:
        if (timing && e.eax < TIMING_LEAF) e.eax = TIMING_LEAF;
        break;
      case 0x40000001:
        e.eax = 0;
        e.ebx = 0;
        e.ecx = 0;
        e.edx = 0;
        break;
    }
    return e;
  });
  if (timing && out.some((e) => e.function === 0x40000000)) {
    const leaf = { function: TIMING_LEAF, index: 0, flags: 0, eax: timing.tscKhz >>> 0, ebx: timing.apicKhz >>> 0, ecx: 0, edx: 0 };
    const i = out.findIndex((e) => e.function === TIMING_LEAF);
    if (i >= 0) out[i] = leaf;
    else out.push(leaf);
  }
  return out;
}

/**
 * The hypervisor timing leaf (VMware's, also offered by QEMU with
 * vmware-cpuid-freq): EAX = TSC kHz, EBX = LAPIC timer kHz. A guest that
 * knows it skips calibrating both against the PIT (tens of ms at boot).
 */
export const TIMING_LEAF = 0x40000010;
/** KVM's LAPIC timer runs at 1 GHz (APIC_BUS_CYCLE_NS = 1) unless a VMM changes it. */
export const KVM_APIC_TIMER_KHZ = 1_000_000;

/** KVM_GET_MP_STATE values. */
export const MP_STATE = {
  RUNNABLE: 0,
  UNINITIALIZED: 1,
  INIT_RECEIVED: 2,
  HALTED: 3,
  SIPI_RECEIVED: 4,
} as const;

/** struct kvm_clock_data: set `clock`, clear flags so KVM does not add host time elapsed since capture. */
export function clockForRestore(raw: Buffer): Buffer {
  need(raw, SIZES.clock, 'kvm_clock_data');
  const b = Buffer.alloc(SIZES.clock);
  b.writeBigUInt64LE(raw.readBigUInt64LE(0), 0);
  return b;
}

/** kvm_clock_data.clock (ns). */
export function clockNs(raw: Buffer): bigint {
  need(raw, 8, 'kvm_clock_data');
  return raw.readBigUInt64LE(0);
}
