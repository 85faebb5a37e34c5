/**
 * Tiny hand-assembled real-mode guests and a throwaway machine for native
 * tests. Real mode keeps them to a few instructions: kvm_pvm emulates guest
 * ring 0 instruction by instruction, so every guest here is a handful of
 * bytes and touches only the pages a test asserts about.
 *
 * Setup: one memory slot at GPA 0, code at CODE_GPA, cs.base = 0 and
 * cs.selector = 0, rip = CODE_GPA, TSS at 0xfffbd000 (Intel-style KVM needs
 * it before real mode runs).
 */
import fs from 'node:fs';
import { native, type Binding, type GuestMemory, type Kvm, type Vcpu, type VcpuExit, type Vm } from '../../../lib/native';

export const HAVE_KVM = fs.existsSync('/dev/kvm');
export const PAGE = 4096;
export const CODE_GPA = 0x1000;
export const TSS_GPA = 0xfffbd000;

/** Byte offsets in struct kvm_regs (u64 each). */
export const REG = { rax: 0, rbx: 8, rcx: 16, rdx: 24, rsi: 32, rdi: 40, rsp: 48, rbp: 56, rip: 128, rflags: 136 } as const;
/** struct kvm_segment is 24 bytes: base u64 @0, limit u32 @8, selector u16 @12. cs is first in kvm_sregs. */
export const SREG = { cs: 0, ds: 24, es: 48, fs: 72, gs: 96, ss: 120, cr0: 224, efer: 264, apicBase: 272 } as const;

/** The programs, each assembled by hand (16-bit real mode; offsets in comments). */
export const GUEST = {
  /** out 0x10 <- 0x42; in al <- 0x11; out 0x12 <- al (echo); out dx=0x3f8 <- ax=0x1234 (word); hlt; jmp $. */
  echo: Buffer.from([
    0xb0, 0x42, //             00 mov al, 0x42
    0xe6, 0x10, //             02 out 0x10, al
    0xe4, 0x11, //             04 in al, 0x11
    0xe6, 0x12, //             06 out 0x12, al
    0xba, 0xf8, 0x03, //       08 mov dx, 0x3f8
    0xb8, 0x34, 0x12, //       0b mov ax, 0x1234
    0xef, //                   0e out dx, ax
    0xf4, //                   0f hlt
    0xeb, 0xfe, //             10 jmp $
  ]),
  /** MMIO outside RAM: byte write 0x5a to 0xa0000, byte read from 0xa0001 echoed on port 0x12. */
  mmio: Buffer.from([
    0xb8, 0x00, 0xa0, //                   00 mov ax, 0xa000
    0x8e, 0xc0, //                         03 mov es, ax
    0x26, 0xc6, 0x06, 0x00, 0x00, 0x5a, // 05 mov byte es:[0x0000], 0x5a
    0x26, 0xa0, 0x01, 0x00, //             0b mov al, es:[0x0001]
    0xe6, 0x12, //                         0f out 0x12, al
    0xeb, 0xfe, //                         11 jmp $
  ]),
  /** Counts in ecx forever. */
  spin: Buffer.from([
    0x66, 0x41, //             00 inc ecx
    0xeb, 0xfc, //             02 jmp 00
  ]),
  /** Halts (with the in-kernel irqchip HLT does not exit: the thread blocks in KVM_RUN). */
  halt: Buffer.from([
    0xf4, //                   00 hlt
    0xeb, 0xfd, //             01 jmp 00
  ]),
  /**
   * Dirty-page driver: in al <- 0x11 gives page index k; writes 0xab at
   * GPA 0x20000 + k*4096 + 0x10; out 0x10 acknowledges; repeats.
   */
  dirty: Buffer.from([
    0xe4, 0x11, //                         00 in al, 0x11
    0x88, 0xc4, //                         02 mov ah, al
    0x30, 0xc0, //                         04 xor al, al      ; ax = k << 8
    0x05, 0x00, 0x20, //                   06 add ax, 0x2000  ; segment of page 0x20 + k
    0x8e, 0xc0, //                         09 mov es, ax
    0x26, 0xc6, 0x06, 0x10, 0x00, 0xab, // 0b mov byte es:[0x10], 0xab
    0xe6, 0x10, //                         11 out 0x10, al
    0xeb, 0xeb, //                         13 jmp 00
  ]),
  /** out 0x10 <- low byte of an incrementing ecx, forever (posted writes). */
  countOut: Buffer.from([
    0x66, 0x41, //             00 inc ecx
    0x88, 0xc8, //             02 mov al, cl
    0xe6, 0x10, //             04 out 0x10, al
    0xeb, 0xf8, //             06 jmp 00
  ]),
  /** in al <- 0x11 then out 0x12 <- al, forever (pause while exits keep coming). */
  ioLoop: Buffer.from([
    0xe4, 0x11, //             00 in al, 0x11
    0xe6, 0x12, //             02 out 0x12, al
    0xeb, 0xfa, //             04 jmp 00
  ]),
};
/** First page the dirty guest writes (GPA 0x20000). */
export const DIRTY_BASE_PAGE = 0x20;

export interface MachineOptions {
  memSize?: number;
  irqchip?: boolean;
  pit?: boolean;
  /** Memory slot flags (1 = KVM_MEM_LOG_DIRTY_PAGES). */
  slotFlags?: number;
  /** KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits to enable before the slot is set. */
  manualProtect?: number;
  vcpus?: number;
  code?: Buffer;
}

export interface TestMachine {
  b: Binding;
  kvm: Kvm;
  vm: Vm;
  mem: GuestMemory;
  vcpus: Vcpu[];
  close(): void;
}

export function createMachine(opts: MachineOptions = {}): TestMachine {
  const b = native();
  const kvm = new b.Kvm();
  const vm = kvm.createVm();
  const memSize = opts.memSize ?? 1 << 20;
  const mem = new b.GuestMemory(memSize);
  try {
    vm.setTssAddr(TSS_GPA);
    if (opts.irqchip) vm.createIrqchip();
    if (opts.pit) vm.createPit2(0);
    if (opts.manualProtect) vm.enableManualDirtyLogProtect(opts.manualProtect);
    vm.setMemorySlot(0, 0, mem, 0, memSize, opts.slotFlags ?? 0);
    if (opts.code) new Uint8Array(mem.view(CODE_GPA, opts.code.length)).set(opts.code);
    const vcpus: Vcpu[] = [];
    for (let i = 0; i < (opts.vcpus ?? 1); i++) {
      const v = vm.createVcpu(i);
      setRealMode(v, CODE_GPA);
      vcpus.push(v);
    }
    return {
      b,
      kvm,
      vm,
      mem,
      vcpus,
      close() {
        vm.close();
        mem.close();
        kvm.close();
      },
    };
  } catch (e) {
    vm.close();
    mem.close();
    kvm.close();
    throw e;
  }
}

/** Real mode at 0:rip (cs.base 0, selector 0), flags = 2 (reserved bit). */
export function setRealMode(v: Vcpu, rip: number): void {
  const s = v.getSregs();
  s.writeBigUInt64LE(0n, SREG.cs);
  s.writeUInt16LE(0, SREG.cs + 12);
  v.setSregs(s);
  const r = v.getRegs();
  r.fill(0);
  r.writeBigUInt64LE(BigInt(rip), REG.rip);
  r.writeBigUInt64LE(2n, REG.rflags);
  v.setRegs(r);
}

export function reg(v: Vcpu, name: keyof typeof REG): bigint {
  return v.getRegs().readBigUInt64LE(REG[name]);
}

/** A plain copy of an exit, safe to keep after the callback returned. */
export type SeenExit = Omit<VcpuExit, 'data'> & { bytes?: number[] };
export function snapshot(e: VcpuExit): SeenExit {
  const copy: Record<string, unknown> = { ...e };
  if ('data' in e && e.data instanceof Uint8Array) {
    copy.bytes = Array.from(e.data);
    delete copy.data;
  }
  return copy as SeenExit;
}

/** Resolves when pred() holds, polling every ms (rejects after timeoutMs). */
export async function until(pred: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Set bits of a dirty bitmap (little-endian bit order within bytes). */
export function setBits(bitmap: Uint8Array): number[] {
  const out: number[] = [];
  for (let i = 0; i < bitmap.length; i++) {
    for (let bit = 0; bit < 8; bit++) if (bitmap[i] & (1 << bit)) out.push(i * 8 + bit);
  }
  return out;
}
