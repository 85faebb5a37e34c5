import assert from 'node:assert/strict';

import {
  buildE820,
  E820_RAM,
  E820_RESERVED,
  HVM_START_MAGIC,
  loadPvh,
  parseElf,
  pvhCpuState,
  PvhError,
  type PhysMemory,
} from '../../lib/machine/pvh';
import { decodeSregs, encodeSregs, type Sregs } from '../../lib/machine/x86';

interface Seg {
  paddr: number;
  data: Buffer;
  memsz?: number;
}

/** A minimal little-endian x86 ELF (ET_EXEC) with PT_LOAD segments and optionally a Xen PHYS32_ENTRY note. */
function makeElf(opts: { cls: 32 | 64; segs: Seg[]; entry?: number; noteDesc?: 4 | 8; extraNoteFirst?: boolean }): Buffer {
  const is64 = opts.cls === 64;
  const ehsize = is64 ? 64 : 52;
  const phentsize = is64 ? 56 : 32;
  const notes: Buffer[] = [];
  if (opts.extraNoteFirst) {
    const n = Buffer.alloc(12 + 4 + 4);
    n.writeUInt32LE(4, 0);
    n.writeUInt32LE(4, 4);
    n.writeUInt32LE(1, 8);
    n.write('GNU\0', 12, 'latin1');
    notes.push(n);
  }
  if (opts.entry !== undefined) {
    const d = opts.noteDesc ?? 4;
    const n = Buffer.alloc(12 + 4 + d);
    n.writeUInt32LE(4, 0);
    n.writeUInt32LE(d, 4);
    n.writeUInt32LE(18, 8);
    n.write('Xen\0', 12, 'latin1');
    if (d === 4) n.writeUInt32LE(opts.entry, 16);
    else n.writeBigUInt64LE(BigInt(opts.entry), 16);
    notes.push(n);
  }
  const note = Buffer.concat(notes);
  const phnum = opts.segs.length + (note.length ? 1 : 0);
  let off = ehsize + phnum * phentsize;
  const blobs: Buffer[] = [];
  const ph = Buffer.alloc(phnum * phentsize);
  const put = (i: number, type: number, offset: number, paddr: number, filesz: number, memsz: number, align: number) => {
    const h = i * phentsize;
    ph.writeUInt32LE(type, h);
    if (is64) {
      ph.writeUInt32LE(7, h + 4);
      ph.writeBigUInt64LE(BigInt(offset), h + 8);
      ph.writeBigUInt64LE(BigInt(paddr), h + 16);
      ph.writeBigUInt64LE(BigInt(paddr), h + 24);
      ph.writeBigUInt64LE(BigInt(filesz), h + 32);
      ph.writeBigUInt64LE(BigInt(memsz), h + 40);
      ph.writeBigUInt64LE(BigInt(align), h + 48);
    } else {
      ph.writeUInt32LE(offset, h + 4);
      ph.writeUInt32LE(paddr, h + 8);
      ph.writeUInt32LE(paddr, h + 12);
      ph.writeUInt32LE(filesz, h + 16);
      ph.writeUInt32LE(memsz, h + 20);
      ph.writeUInt32LE(7, h + 24);
      ph.writeUInt32LE(align, h + 28);
    }
  };
  opts.segs.forEach((s, i) => {
    put(i, 1, off, s.paddr, s.data.length, s.memsz ?? s.data.length, 4096);
    blobs.push(s.data);
    off += s.data.length;
  });
  if (note.length) {
    put(opts.segs.length, 4, off, 0, note.length, note.length, 4);
    blobs.push(note);
  }
  const eh = Buffer.alloc(ehsize);
  eh.writeUInt32BE(0x7f454c46, 0);
  eh[4] = is64 ? 2 : 1;
  eh[5] = 1;
  eh[6] = 1;
  eh.writeUInt16LE(2, 16);
  eh.writeUInt16LE(is64 ? 62 : 3, 18);
  eh.writeUInt32LE(1, 20);
  if (is64) {
    eh.writeBigUInt64LE(BigInt(ehsize), 32);
    eh.writeUInt16LE(ehsize, 52);
    eh.writeUInt16LE(phentsize, 54);
    eh.writeUInt16LE(phnum, 56);
  } else {
    eh.writeUInt32LE(ehsize, 28);
    eh.writeUInt16LE(ehsize, 40);
    eh.writeUInt16LE(phentsize, 42);
    eh.writeUInt16LE(phnum, 44);
  }
  return Buffer.concat([eh, ph, ...blobs]);
}

/** Flat RAM [0, size) filled with 0xaa so zeroing is visible. */
function ram(size: number): PhysMemory & { bytes: Buffer } {
  const bytes = Buffer.alloc(size, 0xaa);
  return {
    bytes,
    ram: [{ start: 0, end: size }],
    write(gpa, data) {
      assert.ok(gpa + data.length <= size);
      bytes.set(data, gpa);
    },
    fill(gpa, length, value) {
      assert.ok(gpa + length <= size);
      bytes.fill(value, gpa, gpa + length);
    },
  };
}

const MB = 1024 * 1024;
const code = Buffer.from([0xfa, 0xf4, 0xeb, 0xfd, 1, 2, 3, 4]);

describe('machine/pvh: ELF loader and start_info', () => {
  for (const cls of [32, 64] as const) {
    it(`loads an ELF${cls}: segments at p_paddr, bss zeroed, entry from the Xen note`, () => {
      const img = makeElf({ cls, segs: [{ paddr: MB, data: code, memsz: 4096 }], entry: MB + 2 });
      const mem = ram(4 * MB);
      const boot = loadPvh(img, mem, 'ws=1M rate=0', buildE820(mem.ram));
      assert.equal(boot.entry, MB + 2);
      assert.deepEqual(mem.bytes.subarray(MB, MB + code.length), code);
      assert.ok(mem.bytes.subarray(MB + code.length, MB + 4096).every((b) => b === 0), 'bss zeroed');
      assert.equal(mem.bytes[MB + 4096], 0xaa, 'nothing written past p_memsz');
      const si = boot.startInfoGpa;
      assert.equal(mem.bytes.readUInt32LE(si), HVM_START_MAGIC);
      assert.equal(mem.bytes.readUInt32LE(si + 4), 1);
      const cmdAt = Number(mem.bytes.readBigUInt64LE(si + 24));
      assert.equal(cmdAt, boot.cmdlineGpa);
      assert.equal(mem.bytes.toString('latin1', cmdAt, cmdAt + 13), 'ws=1M rate=0\0');
      const mm = Number(mem.bytes.readBigUInt64LE(si + 40));
      const n = mem.bytes.readUInt32LE(si + 48);
      assert.equal(mm, boot.memmapGpa);
      const entries = Array.from({ length: n }, (_, i) => ({
        addr: Number(mem.bytes.readBigUInt64LE(mm + i * 24)),
        size: Number(mem.bytes.readBigUInt64LE(mm + i * 24 + 8)),
        type: mem.bytes.readUInt32LE(mm + i * 24 + 16),
      }));
      assert.deepEqual(entries.slice(0, 3), [
        { addr: 0, size: 0xa0000, type: E820_RAM },
        { addr: 0xa0000, size: 0x60000, type: E820_RESERVED },
        { addr: MB, size: 3 * MB, type: E820_RAM },
      ]);
      assert.ok(boot.startInfoGpa < 0xa0000 && boot.cmdlineGpa < 0xa0000);
    });
  }

  it('accepts an 8-byte PHYS32_ENTRY descriptor and skips other notes', () => {
    const img = makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: MB, noteDesc: 8, extraNoteFirst: true });
    assert.equal(parseElf(img).pvhEntry, MB);
  });

  it('places the boot area clear of a segment in low memory', () => {
    const img = makeElf({ cls: 64, segs: [{ paddr: 0x1000, data: Buffer.alloc(0x8000, 1) }, { paddr: MB, data: code }], entry: MB });
    const mem = ram(4 * MB);
    const boot = loadPvh(img, mem, '', buildE820(mem.ram));
    assert.ok(boot.gdtGpa >= 0x9000, `boot area at 0x${boot.gdtGpa.toString(16)} overlaps the segment`);
    assert.ok(mem.bytes.subarray(0x1000, 0x9000).every((b) => b === 1), 'segment intact');
  });

  const bad: [string, () => Buffer, string][] = [
    ['not ELF', () => Buffer.from('MZ'.padEnd(64, '\0')), 'ERR_PVH_BAD_ELF'],
    ['big-endian', () => { const b = makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: MB }); b[5] = 2; return b; }, 'ERR_PVH_BAD_ELF'],
    ['wrong machine', () => { const b = makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: MB }); b.writeUInt16LE(40, 18); return b; }, 'ERR_PVH_BAD_ELF'],
    ['truncated program headers', () => makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: MB }).subarray(0, 80), 'ERR_PVH_BAD_ELF'],
    ['segment past end of file', () => makeElf({ cls: 32, segs: [{ paddr: MB, data: code }], entry: MB }).subarray(0, 52 + 64 + 4), 'ERR_PVH_BAD_ELF'],
    ['filesz > memsz', () => makeElf({ cls: 64, segs: [{ paddr: MB, data: code, memsz: 2 }], entry: MB }), 'ERR_PVH_BAD_ELF'],
    ['no PVH note', () => makeElf({ cls: 64, segs: [{ paddr: MB, data: code }] }), 'ERR_PVH_NO_ENTRY'],
    ['segment outside RAM', () => makeElf({ cls: 64, segs: [{ paddr: 4 * MB - 4, data: code }], entry: 4 * MB - 4 }), 'ERR_PVH_LAYOUT'],
    ['entry outside the image', () => makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: 2 * MB }), 'ERR_PVH_LAYOUT'],
  ];
  for (const [name, make, codeName] of bad) {
    it(`rejects a bad image: ${name} (${codeName})`, () => {
      const mem = ram(4 * MB);
      assert.throws(() => loadPvh(make(), mem, '', buildE820(mem.ram)), (e: unknown) => e instanceof PvhError && e.code === codeName);
      assert.ok(mem.bytes.subarray(MB, MB + 16).every((b) => b === 0xaa), 'nothing loaded on failure');
    });
  }

  it('rejects an over-long command line', () => {
    const mem = ram(4 * MB);
    const img = makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: MB });
    assert.throws(() => loadPvh(img, mem, 'x'.repeat(9000), buildE820(mem.ram)), { code: 'ERR_PVH_CMDLINE' });
  });

  it('builds an E820 map with RAM above 4 GiB and the KVM TSS reserved', () => {
    const G = 1024 * MB;
    const m = buildE820([
      { start: 0, end: 3 * G },
      { start: 4 * G, end: 5 * G },
    ]);
    assert.deepEqual(m, [
      { addr: 0, size: 0xa0000, type: 1 },
      { addr: 0xa0000, size: 0x60000, type: 2 },
      { addr: MB, size: 3 * G - MB, type: 1 },
      { addr: 0xfeffc000, size: 0x1004000, type: 2 },
      { addr: 4 * G, size: G, type: 1 },
    ]);
  });

  it('gives the BSP the PVH entry state (32-bit flat, paging off, ebx = start_info)', () => {
    const img = makeElf({ cls: 64, segs: [{ paddr: MB, data: code }], entry: MB + 1 });
    const mem = ram(4 * MB);
    const boot = loadPvh(img, mem, '', buildE820(mem.ram));
    const base = decodeSregs(Buffer.alloc(312));
    base.apicBase = 0xfee00900n;
    const { regs, sregs } = pvhCpuState(boot, base);
    assert.equal(regs.rip, BigInt(MB + 1));
    assert.equal(regs.rbx, BigInt(boot.startInfoGpa));
    assert.equal(regs.rflags, 2n);
    assert.equal(sregs.cr0, 0x11n);
    assert.equal(sregs.cr4, 0n);
    assert.equal(sregs.efer, 0n);
    assert.equal(sregs.apicBase, 0xfee00900n, 'keeps KVM reset fields');
    assert.equal(sregs.cs.selector, 0x10);
    assert.equal(sregs.cs.db, 1);
    assert.equal(sregs.cs.limit, 0xffffffff);
    for (const s of ['ds', 'es', 'ss'] as const) assert.equal(sregs[s].selector, 0x18);
    // round trip through the kernel layout
    const rt: Sregs = decodeSregs(encodeSregs(sregs));
    assert.deepEqual(rt, sregs);
    // the GDT in memory has flat code at 0x10 and data at 0x18
    assert.equal(mem.bytes.readBigUInt64LE(boot.gdtGpa + 0x10), 0x00cf9b000000ffffn);
    assert.equal(mem.bytes.readBigUInt64LE(boot.gdtGpa + 0x18), 0x00cf93000000ffffn);
  });
});
