/**
 * PVH boot: load an ELF image (32- or 64-bit) the way a PVH-aware VMM does
 * and describe the BSP's initial state.
 *
 * - PT_LOAD segments go to p_paddr (file bytes, then zeros up to p_memsz).
 * - The entry point is the XEN_ELFNOTE_PHYS32_ENTRY note (owner "Xen",
 *   type 18), a 32-bit physical address; e_entry is ignored.
 * - A boot area in low memory holds a small GDT, the hvm_start_info
 *   (magic 0x336ec578, version 1), the memory map and the command line; it
 *   is placed below 640 KiB where it overlaps no segment.
 * - The BSP starts in 32-bit protected mode with flat segments, paging off,
 *   interrupts off, ebx = start_info address (the PVH ABI).
 *
 * Everything read from the image is bounds-checked (offsets, sizes, counts)
 * before use: a malformed image throws PvhError, never reads out of range.
 * No KVM here: the loader writes through PhysMemory and returns plain data.
 */
import { CR0_ET, CR0_PE, flatSegment32, RFLAGS_RESERVED, type Regs, type Sregs } from './x86';

export class PvhError extends Error {
  readonly code: string;
  constructor(code: 'ERR_PVH_BAD_ELF' | 'ERR_PVH_NO_ENTRY' | 'ERR_PVH_LAYOUT' | 'ERR_PVH_CMDLINE', message: string) {
    super(message);
    this.name = 'PvhError';
    this.code = code;
  }
}

/** Guest-physical memory as the loader sees it. */
export interface PhysMemory {
  /** RAM ranges in guest-physical space, [start, end). */
  readonly ram: readonly { start: number; end: number }[];
  write(gpa: number, data: Uint8Array): void;
  fill(gpa: number, length: number, value: number): void;
}

export interface E820Entry {
  addr: number;
  size: number;
  /** 1 = RAM, 2 = reserved. */
  type: number;
}

export interface ElfSegment {
  paddr: number;
  offset: number;
  filesz: number;
  memsz: number;
}

export interface ElfImage {
  elfClass: 32 | 64;
  machine: number;
  segments: ElfSegment[];
  /** XEN_ELFNOTE_PHYS32_ENTRY, or undefined when the image has none. */
  pvhEntry?: number;
}

export interface PvhBoot {
  entry: number;
  startInfoGpa: number;
  memmapGpa: number;
  memmapEntries: number;
  cmdlineGpa: number;
  gdtGpa: number;
  /** Guest-physical ranges the image occupies, [start, end). */
  image: { start: number; end: number }[];
}

export const HVM_START_MAGIC = 0x336ec578;
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;
export const E820_RAM = 1;
export const E820_RESERVED = 2;
/** Longest command line accepted (the boot area reserves this much). */
export const MAX_CMDLINE = 8191;

const PT_LOAD = 1;
const PT_NOTE = 4;
const EM_386 = 3;
const EM_X86_64 = 62;
const MAX_PHNUM = 4096;

/** Read an unsigned field of `size` bytes, refusing values past 2^53. */
function rdU(b: Buffer, off: number, size: 2 | 4 | 8, what: string): number {
  if (off < 0 || off + size > b.length) throw new PvhError('ERR_PVH_BAD_ELF', `ELF truncated reading ${what} at ${off}`);
  if (size === 2) return b.readUInt16LE(off);
  if (size === 4) return b.readUInt32LE(off);
  const v = b.readBigUInt64LE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new PvhError('ERR_PVH_BAD_ELF', `ELF ${what} too large: 0x${v.toString(16)}`);
  return Number(v);
}

/** Parse and validate the ELF header, program headers and PVH note. */
export function parseElf(image: Buffer): ElfImage {
  if (image.length < 52 || image.readUInt32BE(0) !== 0x7f454c46) throw new PvhError('ERR_PVH_BAD_ELF', 'not an ELF image');
  const cls = image[4];
  if (cls !== 1 && cls !== 2) throw new PvhError('ERR_PVH_BAD_ELF', `bad ELF class ${cls}`);
  if (image[5] !== 1) throw new PvhError('ERR_PVH_BAD_ELF', 'ELF image is not little-endian');
  if (image[6] !== 1) throw new PvhError('ERR_PVH_BAD_ELF', `bad ELF version ${image[6]}`);
  const is64 = cls === 2;
  const W = (is64 ? 8 : 4) as 4 | 8;
  const machine = rdU(image, 18, 2, 'e_machine');
  if (machine !== EM_386 && machine !== EM_X86_64) throw new PvhError('ERR_PVH_BAD_ELF', `ELF machine ${machine} is not x86`);
  const type = rdU(image, 16, 2, 'e_type');
  if (type !== 2) throw new PvhError('ERR_PVH_BAD_ELF', `ELF type ${type} is not ET_EXEC`);
  const phoff = rdU(image, is64 ? 32 : 28, W, 'e_phoff');
  const phentsize = rdU(image, is64 ? 54 : 42, 2, 'e_phentsize');
  const phnum = rdU(image, is64 ? 56 : 44, 2, 'e_phnum');
  const minEnt = is64 ? 56 : 32;
  if (phnum === 0 || phnum > MAX_PHNUM) throw new PvhError('ERR_PVH_BAD_ELF', `bad program header count ${phnum}`);
  if (phentsize < minEnt) throw new PvhError('ERR_PVH_BAD_ELF', `bad program header size ${phentsize}`);
  if (phoff + phnum * phentsize > image.length) throw new PvhError('ERR_PVH_BAD_ELF', 'program headers past end of image');

  const segments: ElfSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const h = phoff + i * phentsize;
    const ptype = rdU(image, h, 4, 'p_type');
    // ELF64: type flags offset vaddr paddr filesz memsz align; ELF32: type offset vaddr paddr filesz memsz flags align
    const offset = rdU(image, h + (is64 ? 8 : 4), W, 'p_offset');
    const paddr = rdU(image, h + (is64 ? 24 : 12), W, 'p_paddr');
    const filesz = rdU(image, h + (is64 ? 32 : 16), W, 'p_filesz');
    const memsz = rdU(image, h + (is64 ? 40 : 20), W, 'p_memsz');
    const align = rdU(image, h + (is64 ? 48 : 28), W, 'p_align');
    if (ptype !== PT_LOAD && ptype !== PT_NOTE) continue;
    if (offset + filesz > image.length) throw new PvhError('ERR_PVH_BAD_ELF', `segment ${i} file range past end of image`);
    if (ptype === PT_LOAD) {
      if (filesz > memsz) throw new PvhError('ERR_PVH_BAD_ELF', `segment ${i}: p_filesz > p_memsz`);
      if (memsz > 0) segments.push({ paddr, offset, filesz, memsz });
    } else {
      const e = findPhys32Entry(image.subarray(offset, offset + filesz), align === 8 ? 8 : 4);
      if (e !== undefined && pvhEntry === undefined) pvhEntry = e;
    }
  }
  if (segments.length === 0) throw new PvhError('ERR_PVH_BAD_ELF', 'ELF image has no loadable segment');
  return { elfClass: is64 ? 64 : 32, machine, segments, pvhEntry };
}

/** Walk ELF notes (namesz, descsz, type, name, desc; padded to `align`) for Xen's PHYS32_ENTRY. */
function findPhys32Entry(notes: Buffer, align: 4 | 8): number | undefined {
  const pad = (n: number) => Math.ceil(n / align) * align;
  let o = 0;
  while (o + 12 <= notes.length) {
    const namesz = notes.readUInt32LE(o);
    const descsz = notes.readUInt32LE(o + 4);
    const ntype = notes.readUInt32LE(o + 8);
    const nameOff = o + 12;
    const descOff = nameOff + pad(namesz);
    const next = descOff + pad(descsz);
    if (descOff + descsz > notes.length || next > notes.length + align) throw new PvhError('ERR_PVH_BAD_ELF', 'ELF note past end of segment');
    const name = notes.subarray(nameOff, nameOff + namesz).toString('latin1').replace(/\0+$/, '');
    if (name === 'Xen' && ntype === XEN_ELFNOTE_PHYS32_ENTRY) {
      if (descsz !== 4 && descsz !== 8) throw new PvhError('ERR_PVH_BAD_ELF', `PHYS32_ENTRY note of ${descsz} bytes`);
      const v = descsz === 4 ? notes.readUInt32LE(descOff) : notes.readBigUInt64LE(descOff);
      if (BigInt(v) > 0xffffffffn) throw new PvhError('ERR_PVH_BAD_ELF', 'PHYS32_ENTRY above 4 GiB');
      return Number(v);
    }
    if (next <= o) break;
    o = next;
  }
  return undefined;
}

function inRam(mem: PhysMemory, start: number, end: number): boolean {
  return mem.ram.some((r) => start >= r.start && end <= r.end);
}

function overlaps(a: { start: number; end: number }, b: { start: number; end: number }): boolean {
  return a.start < b.end && b.start < a.end;
}

/** E820 map of a PVH machine from its RAM ranges (low RAM split around the legacy 640K-1M hole). */
export function buildE820(ram: readonly { start: number; end: number }[]): E820Entry[] {
  const out: E820Entry[] = [];
  for (const r of ram) {
    if (r.start < 0xa0000 && r.end > 0x100000) {
      out.push({ addr: r.start, size: 0xa0000 - r.start, type: E820_RAM });
      out.push({ addr: 0xa0000, size: 0x100000 - 0xa0000, type: E820_RESERVED });
      out.push({ addr: 0x100000, size: r.end - 0x100000, type: E820_RAM });
    } else {
      out.push({ addr: r.start, size: r.end - r.start, type: E820_RAM });
    }
  }
  // KVM's TSS (KVM_SET_TSS_ADDR 0xfffbd000) and identity map page live in the hole.
  out.push({ addr: 0xfeffc000, size: 0x100000000 - 0xfeffc000, type: E820_RESERVED });
  return out.sort((a, b) => a.addr - b.addr);
}

// Boot area layout, relative to its base (all inside one 16 KiB window).
const BOOT_GDT = 0x0;
const BOOT_START_INFO = 0x100;
const BOOT_MEMMAP = 0x200; // up to 64 entries of 24 bytes (0x600)
const BOOT_CMDLINE = 0x1000; // MAX_CMDLINE + NUL
const BOOT_SIZE = BOOT_CMDLINE + MAX_CMDLINE + 1;
const MAX_MEMMAP = 64;

/** GDT entries: 0x10 flat code, 0x18 flat data, 0x20 32-bit TSS (busy), as the PVH ABI selectors suggest. */
const GDT = [0n, 0n, 0x00cf9b000000ffffn, 0x00cf93000000ffffn, 0x00008b0000000067n];

/**
 * Load `image` into `mem` for PVH boot with `cmdline` and memory map `e820`.
 * Throws PvhError on a malformed image, a segment outside RAM, or no room.
 */
export function loadPvh(image: Buffer, mem: PhysMemory, cmdline: string, e820: E820Entry[]): PvhBoot {
  const elf = parseElf(image);
  if (elf.pvhEntry === undefined) throw new PvhError('ERR_PVH_NO_ENTRY', 'not a PVH image: no XEN_ELFNOTE_PHYS32_ENTRY note');
  const cmd = Buffer.from(cmdline, 'utf8');
  if (cmd.length > MAX_CMDLINE) throw new PvhError('ERR_PVH_CMDLINE', `command line longer than ${MAX_CMDLINE} bytes`);
  if (cmd.includes(0)) throw new PvhError('ERR_PVH_CMDLINE', 'command line contains a NUL byte');
  if (e820.length > MAX_MEMMAP) throw new PvhError('ERR_PVH_LAYOUT', `memory map of ${e820.length} entries`);

  const ranges = elf.segments.map((s) => ({ start: s.paddr, end: s.paddr + s.memsz }));
  for (const r of ranges) {
    if (!inRam(mem, r.start, r.end)) {
      throw new PvhError('ERR_PVH_LAYOUT', `segment [0x${r.start.toString(16)}, 0x${r.end.toString(16)}) is outside guest RAM`);
    }
  }
  if (!ranges.some((r) => elf.pvhEntry! >= r.start && elf.pvhEntry! < r.end)) {
    throw new PvhError('ERR_PVH_LAYOUT', `entry 0x${elf.pvhEntry.toString(16)} is outside the loaded image`);
  }
  // First 4 KiB-aligned spot from 0x1000 below 640 KiB that is RAM and clear of the image.
  let base = -1;
  for (let b = 0x1000; b + BOOT_SIZE <= 0xa0000; b += 0x1000) {
    const area = { start: b, end: b + BOOT_SIZE };
    if (inRam(mem, area.start, area.end) && !ranges.some((r) => overlaps(r, area))) {
      base = b;
      break;
    }
  }
  if (base < 0) throw new PvhError('ERR_PVH_LAYOUT', 'no room below 640 KiB for the PVH boot area');

  for (const s of elf.segments) {
    if (s.filesz > 0) mem.write(s.paddr, image.subarray(s.offset, s.offset + s.filesz));
    if (s.memsz > s.filesz) mem.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0);
  }

  const area = Buffer.alloc(BOOT_SIZE);
  GDT.forEach((d, i) => area.writeBigUInt64LE(d, BOOT_GDT + i * 8));
  const si = BOOT_START_INFO;
  area.writeUInt32LE(HVM_START_MAGIC, si + 0);
  area.writeUInt32LE(1, si + 4); // version 1: memmap fields valid
  area.writeUInt32LE(0, si + 8); // flags
  area.writeUInt32LE(0, si + 12); // nr_modules
  area.writeBigUInt64LE(0n, si + 16); // modlist_paddr
  area.writeBigUInt64LE(BigInt(base + BOOT_CMDLINE), si + 24);
  area.writeBigUInt64LE(0n, si + 32); // rsdp_paddr: no ACPI
  area.writeBigUInt64LE(BigInt(base + BOOT_MEMMAP), si + 40);
  area.writeUInt32LE(e820.length, si + 48);
  e820.forEach((e, i) => {
    const o = BOOT_MEMMAP + i * 24;
    area.writeBigUInt64LE(BigInt(e.addr), o);
    area.writeBigUInt64LE(BigInt(e.size), o + 8);
    area.writeUInt32LE(e.type, o + 16);
  });
  cmd.copy(area, BOOT_CMDLINE);
  mem.write(base, area);

  return {
    entry: elf.pvhEntry,
    startInfoGpa: base + BOOT_START_INFO,
    memmapGpa: base + BOOT_MEMMAP,
    memmapEntries: e820.length,
    cmdlineGpa: base + BOOT_CMDLINE,
    gdtGpa: base + BOOT_GDT,
    image: ranges,
  };
}

/**
 * The BSP's PVH entry state on top of `base` (the vCPU's reset sregs from
 * KVM, which keep apic_base and the rest): 32-bit protected mode, flat
 * cs 0x10 / ds,es,ss 0x18, CR0 = PE|ET, paging off, CR4 = 0, EFER = 0,
 * EFLAGS 0x2, eip = entry, ebx = start_info.
 */
export function pvhCpuState(boot: PvhBoot, base: Sregs): { regs: Regs; sregs: Sregs } {
  const code = flatSegment32(0x10, true);
  const data = flatSegment32(0x18, false);
  const sregs: Sregs = {
    ...base,
    cs: code,
    ds: data,
    es: data,
    ss: data,
    fs: data,
    gs: data,
    tr: { base: 0n, limit: 0x67, selector: 0x20, type: 0xb, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 },
    gdt: { base: BigInt(boot.gdtGpa), limit: GDT.length * 8 - 1 },
    idt: { base: 0n, limit: 0 },
    cr0: CR0_PE | CR0_ET,
    cr2: 0n,
    cr3: 0n,
    cr4: 0n,
    efer: 0n,
  };
  const regs: Regs = {
    rax: 0n, rbx: BigInt(boot.startInfoGpa), rcx: 0n, rdx: 0n, rsi: 0n, rdi: 0n, rsp: 0n, rbp: 0n,
    r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n,
    rip: BigInt(boot.entry), rflags: RFLAGS_RESERVED,
  };
  return { regs, sregs };
}
