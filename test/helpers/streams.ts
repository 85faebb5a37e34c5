/**
 * Migration streams for robustness tests: a valid savevm stream written with
 * the stream writer (or produced by the real source engine into a file), an
 * index of where every structural field of a valid stream sits, seeded
 * mutations of it, and a way to feed bytes to IncomingMigration as an
 * IncomingChannel in arbitrary chunks.
 *
 * Everything random here comes from a seeded PRNG, so a failing case is
 * reproduced from (seed, case number) alone.
 */
import fs from 'node:fs';
import path from 'node:path';
import { Readable, Writable } from 'node:stream';
import { RamStats } from '../../lib/migration/info';
import { MigrationOptions } from '../../lib/migration/options';
import { OutgoingMigration } from '../../lib/migration/source';
import { MigrationStateMachine } from '../../lib/migration/state';
import { MIG_CMD, RAM_FLAG, SectionType, TARGET_PAGE_SIZE } from '../../lib/stream/constants';
import { GLOBALSTATE_VMSD, TIMER_VMSD, globalState, timerState } from '../../lib/stream/devices';
import { RamEncoder, RamRecordParser } from '../../lib/stream/ram-codec';
import { StreamReader } from '../../lib/stream/reader';
import { SectionParser } from '../../lib/stream/sections';
import { buildVmdesc, formatVmdescJson, loadVmState, writeDeviceSection, type VmdescDevice } from '../../lib/stream/vmstate';
import { StreamWriter } from '../../lib/stream/writer';
import { PlainChannel } from '../../lib/transport/channel';
import { connectOutgoing, parseMigrationUri } from '../../lib/transport';
import type { GuestMemory } from '../../lib/native';
import { MemoryMachine } from './memory-machine';

const PAGE = TARGET_PAGE_SIZE;

// ---- seeded PRNG ----

/** mulberry32: small, fast, good enough to pick mutations reproducibly. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  u32(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return n <= 0 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }
  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }
  pick<T>(a: readonly T[]): T {
    return a[this.int(a.length)]!;
  }
  fill(b: Uint8Array): void {
    for (let i = 0; i < b.length; i += 4) {
      const v = this.u32();
      b[i] = v & 0xff;
      if (i + 1 < b.length) b[i + 1] = (v >>> 8) & 0xff;
      if (i + 2 < b.length) b[i + 2] = (v >>> 16) & 0xff;
      if (i + 3 < b.length) b[i + 3] = v >>> 24;
    }
  }
}

/** A per-case seed derived from the run seed (independent streams per case). */
export function caseSeed(seed: number, i: number): number {
  return (seed ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0;
}

// ---- valid streams ----

export interface BuildOptions {
  /** RAM block size (default 256 KiB). */
  ramSize?: number;
  seed?: number;
  idstr?: string;
  machine?: string;
  /** Send OPEN_RETURN_PATH and PING(1) after the configuration (default false). */
  returnPath?: boolean;
  /** Run state in globalstate (default 'running'). */
  runstate?: string;
  /** PART sections carrying the first copy of RAM (default 2). */
  parts?: number;
  /** Pages sent stale in a PART and again, final, in END (default 3). */
  resend?: number;
  /** Bytes at the start of RAM with random content; the rest is zero pages (default: all). */
  randomBytes?: number;
}

export interface BuiltStream {
  buf: Buffer;
  /** The RAM block content the destination must end up with. */
  ram: Buffer;
}

/**
 * A valid stream shaped like ferry's (and QEMU 7.2's) precopy output for a
 * `-M none` machine: header, configuration, [return path], RAM START with
 * MEM_SIZE, PARTs of PAGE and ZERO records, END with re-sent pages, timer and
 * globalstate FULL sections, EOF, VM description.
 */
export function buildStream(o: BuildOptions = {}): BuiltStream {
  const size = o.ramSize ?? 256 << 10;
  const idstr = o.idstr ?? 'ram';
  const rng = new Rng(o.seed ?? 1);
  const pages = size / PAGE;
  const randomPages = Math.ceil((o.randomBytes ?? size) / PAGE);
  const ram = Buffer.alloc(size);
  for (let p = 0; p < Math.min(pages, randomPages); p++) {
    if (p % 5 === 3) continue; // zero pages among the random ones
    const page = ram.subarray(p * PAGE, (p + 1) * PAGE);
    if (p % 7 === 6) page[rng.int(PAGE)] = 1 + rng.int(255); // nearly zero: must go as PAGE
    else rng.fill(page);
  }
  const resend = new Set<number>();
  for (let i = 0; i < (o.resend ?? 3) && i < pages; i++) resend.add(rng.int(pages));

  const w = new StreamWriter({ chunkSize: 1 << 16 });
  const enc = new RamEncoder(w);
  const RAM_ID = 2;
  w.header();
  w.configuration({ machine: o.machine ?? 'none' });
  if (o.returnPath) {
    w.command(MIG_CMD.OPEN_RETURN_PATH);
    w.command(MIG_CMD.PING, be32(1));
  }
  w.sectionStart(SectionType.START, RAM_ID, 'ram', 0, 4);
  enc.memSize([{ idstr, usedLength: size }]);
  enc.eos();
  w.footer(RAM_ID);

  const isZero = (b: Uint8Array) => b.every((x) => x === 0);
  const parts = Math.max(1, o.parts ?? 2);
  const per = Math.ceil(pages / parts);
  for (let part = 0; part < parts; part++) {
    w.sectionPart(SectionType.PART, RAM_ID);
    for (let p = part * per; p < Math.min(pages, (part + 1) * per); p++) {
      let data: Uint8Array = ram.subarray(p * PAGE, (p + 1) * PAGE);
      if (resend.has(p)) {
        data = Buffer.alloc(PAGE);
        rng.fill(data); // stale copy, replaced in END
      }
      if (isZero(data)) enc.zero(idstr, p * PAGE);
      else enc.page(idstr, p * PAGE, data, true);
    }
    enc.eos();
    w.footer(RAM_ID);
  }
  w.sectionPart(SectionType.END, RAM_ID);
  for (const p of [...resend].sort((a, b) => a - b)) {
    const data = ram.subarray(p * PAGE, (p + 1) * PAGE);
    if (isZero(data)) enc.zero(idstr, p * PAGE);
    else enc.page(idstr, p * PAGE, data, true);
  }
  enc.eos();
  w.footer(RAM_ID);

  const descs: VmdescDevice[] = [
    writeDeviceSection(w, { sectionId: 0, idstr: 'timer', instanceId: 0, vmsd: TIMER_VMSD, state: timerState(123456789n, 987654321n) }),
    writeDeviceSection(w, { sectionId: 1, idstr: 'globalstate', instanceId: 0, vmsd: GLOBALSTATE_VMSD, state: globalState(o.runstate ?? 'running') }),
  ];
  w.eof();
  w.vmdescription(formatVmdescJson(buildVmdesc(descs)));
  return { buf: w.toBuffer(), ram };
}

/**
 * The real source engine's stream: OutgoingMigration of a MemoryMachine
 * whose RAM is `content` (paused, so the stream is deterministic apart from
 * pass timing) into `file:<file>`. Returns the file's bytes.
 */
export async function engineStream(memory: GuestMemory, content: Uint8Array, file: string): Promise<Buffer> {
  new Uint8Array(memory.view(0, memory.size)).set(content);
  const src = new MemoryMachine(memory, 'running', { size: content.length });
  const st = new MigrationStateMachine({ side: 'source' });
  const options = new MigrationOptions();
  options.setParameters({ 'max-bandwidth': 0 } as never);
  const out = new OutgoingMigration(src, options, st, new RamStats());
  st.setState('none', 'setup');
  await out.run((signal) => connectOutgoing(`file:${file}`, { signal }));
  if (st.status !== 'completed') throw new Error(`engine stream to ${file}: ${st.status}: ${st.error}`);
  return fs.readFileSync(file);
}

function be32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

// ---- index of a valid stream ----

export type IndexItem =
  | { kind: 'header'; pos: number }
  | { kind: 'configuration'; pos: number }
  | { kind: 'command'; pos: number; cmd: number }
  | { kind: 'section'; pos: number; type: number; idstr: string; sectionId: number; payloadPos: number }
  | { kind: 'footer'; pos: number; sectionId: number }
  | { kind: 'ram'; pos: number; rec: 'page' | 'zero' | 'memsize' | 'eos' | 'flush'; named: boolean; nameLen: number; offset: number }
  | { kind: 'eof'; pos: number }
  | { kind: 'vmdesc'; pos: number; len: number };

/** A fixed-size big-endian field of the stream (what mutations aim at). */
export interface FieldRef {
  pos: number;
  size: 1 | 2 | 4 | 8;
  what: string;
}

export interface StreamIndex {
  items: IndexItem[];
  fields: FieldRef[];
  /** Position of the EOF byte. */
  eofPos: number;
  length: number;
}

/**
 * Walks a valid stream with lib/stream's own parsers and records the
 * position of every item and fixed-size field. Throws if the stream is not
 * valid (the index is only meaningful for a valid base).
 */
export async function indexStream(buf: Buffer): Promise<StreamIndex> {
  const reader = StreamReader.fromBuffer(buf);
  const parser = new SectionParser(reader);
  const ram = new RamRecordParser(reader);
  const items: IndexItem[] = [];
  const fields: FieldRef[] = [];
  const f = (pos: number, size: FieldRef['size'], what: string) => fields.push({ pos, size, what });
  let footer: number | undefined;
  let eofPos = -1;
  for (;;) {
    if (footer !== undefined) {
      const pos = reader.position;
      items.push({ kind: 'footer', pos, sectionId: footer });
      f(pos, 1, 'footer marker');
      f(pos + 1, 4, `footer id of section ${footer}`);
      footer = undefined;
    }
    const item = await parser.next();
    if (!item) break;
    const pos = item.position;
    switch (item.kind) {
      case 'header':
        items.push({ kind: 'header', pos });
        f(pos, 4, 'magic');
        f(pos + 4, 4, 'version');
        break;
      case 'configuration':
        items.push({ kind: 'configuration', pos });
        f(pos, 1, 'configuration marker');
        f(pos + 1, 4, 'machine name length');
        break;
      case 'command':
        items.push({ kind: 'command', pos, cmd: item.cmd });
        f(pos, 1, 'command marker');
        f(pos + 1, 2, `command ${item.name} id`);
        f(pos + 3, 2, `command ${item.name} length`);
        if (item.payload.length === 4) f(pos + 5, 4, `command ${item.name} payload`);
        break;
      case 'section': {
        const full = item.type === SectionType.START || item.type === SectionType.FULL;
        const L = full ? buf[pos + 5]! : 0;
        const payloadPos = full ? pos + 14 + L : pos + 5;
        items.push({ kind: 'section', pos, type: item.type, idstr: item.idstr, sectionId: item.sectionId, payloadPos });
        f(pos, 1, `${item.typeName} ${item.idstr} type`);
        f(pos + 1, 4, `${item.typeName} ${item.idstr} section id`);
        if (full) {
          f(pos + 5, 1, `${item.typeName} ${item.idstr} idstr length`);
          f(pos + 6 + L, 4, `${item.typeName} ${item.idstr} instance id`);
          f(pos + 10 + L, 4, `${item.typeName} ${item.idstr} version`);
        }
        if (item.idstr === 'ram') {
          for (;;) {
            const rec = await ram.next();
            const p = rec.position;
            const named = (buf.readUInt32BE(p + 4) & RAM_FLAG.CONTINUE) === 0 && (rec.kind === 'page' || rec.kind === 'zero' || rec.kind === 'memsize');
            const nameLen = named ? buf[p + 8]! : 0;
            const offset = rec.kind === 'page' || rec.kind === 'zero' ? rec.offset : 0;
            items.push({ kind: 'ram', pos: p, rec: rec.kind, named, nameLen, offset });
            f(p, 8, `RAM ${rec.kind} record header`);
            if (named) f(p + 8, 1, `RAM ${rec.kind} block name length`);
            if (rec.kind === 'zero') f(p + 8 + (named ? 1 + nameLen : 0), 1, 'RAM zero fill byte');
            if (rec.kind === 'memsize') f(p + 9 + nameLen, 8, 'RAM MEM_SIZE block length');
            if (rec.kind === 'eos') break;
          }
        } else {
          const vmsd = item.idstr === 'timer' ? TIMER_VMSD : item.idstr === 'globalstate' ? GLOBALSTATE_VMSD : undefined;
          if (!vmsd) throw new Error(`indexStream: no vmsd for section '${item.idstr}'`);
          if (item.idstr === 'timer') {
            f(payloadPos, 8, 'timer cpu_ticks_offset');
            f(payloadPos + 16, 8, 'timer cpu_clock_offset');
          } else {
            f(payloadPos, 4, 'globalstate size');
          }
          await loadVmState(reader, vmsd, item.version);
        }
        footer = item.sectionId;
        break;
      }
      case 'eof':
        items.push({ kind: 'eof', pos });
        f(pos, 1, 'EOF marker');
        eofPos = pos;
        break;
      case 'vmdesc':
        items.push({ kind: 'vmdesc', pos, len: Buffer.byteLength(item.json) });
        f(pos, 1, 'VM description marker');
        f(pos + 1, 4, 'VM description length');
        break;
    }
  }
  if (eofPos < 0) throw new Error('indexStream: no EOF');
  return { items, fields, eofPos, length: buf.length };
}

// ---- mutations ----

export interface Mutated {
  buf: Buffer;
  /** What was done, precise enough to redo it by hand. */
  desc: string;
}

const TWO64 = 1n << 64n;

function extreme(rng: Rng, size: FieldRef['size'], orig: bigint, index: StreamIndex): bigint {
  const bits = BigInt(size * 8);
  const max = (1n << bits) - 1n;
  const candidates: bigint[] = [0n, 1n, max, max >> 1n, (max >> 1n) + 1n, orig + 1n, orig - 1n, orig ^ (1n << BigInt(rng.int(size * 8)))];
  if (size === 8) {
    const low = orig & 0xfffn; // keep the RAM flags: aim at the offset checks
    candidates.push(
      1n << 63n,
      1n << 53n,
      (1n << 53n) - 4096n + low,
      BigInt(index.length) * 4096n + low,
      0xfffff000n + low,
      (orig & ~0xfffn) + 0x1000n * BigInt(rng.range(1, 256)) + low,
      0x7ffffffffffff000n + low,
      BigInt(rng.u32()) * 0x1_0000_0000n + BigInt(rng.u32()),
    );
  } else if (size === 4) {
    candidates.push(0xfffffffen, 0x10000n, 0x1000n, 256n, BigInt(rng.u32()), 0x5145564dn);
  } else {
    candidates.push(BigInt(rng.int(1 << (size * 8))));
  }
  return ((rng.pick(candidates) % TWO64) + TWO64) & max;
}

function readField(buf: Buffer, pos: number, size: FieldRef['size']): bigint {
  switch (size) {
    case 1:
      return BigInt(buf[pos]!);
    case 2:
      return BigInt(buf.readUInt16BE(pos));
    case 4:
      return BigInt(buf.readUInt32BE(pos));
    case 8:
      return buf.readBigUInt64BE(pos);
  }
}

function writeField(buf: Buffer, pos: number, size: FieldRef['size'], v: bigint): void {
  switch (size) {
    case 1:
      buf[pos] = Number(v & 0xffn);
      return;
    case 2:
      buf.writeUInt16BE(Number(v & 0xffffn), pos);
      return;
    case 4:
      buf.writeUInt32BE(Number(v & 0xffffffffn), pos);
      return;
    case 8:
      buf.writeBigUInt64BE(v & (TWO64 - 1n), pos);
      return;
  }
}

/** A position, biased towards structure (most bytes of a stream are page data). */
function pickPos(rng: Rng, buf: Buffer, index: StreamIndex): number {
  if (buf.length === 0) return 0;
  if (rng.chance(0.6) && index.fields.length > 0) {
    const fr = rng.pick(index.fields);
    return Math.max(0, Math.min(buf.length - 1, fr.pos + rng.range(-3, fr.size + 8)));
  }
  return rng.int(buf.length);
}

const INTERESTING_BYTES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7e, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x40];

/** One mutation of `buf` (fields positions refer to the unmutated base). */
function mutateOnce(rng: Rng, buf: Buffer, index: StreamIndex): Mutated {
  const op = rng.pick(['flip', 'flip', 'byte', 'insert', 'delete', 'truncate', 'field', 'field', 'field', 'word', 'dup'] as const);
  switch (op) {
    case 'flip': {
      const out = Buffer.from(buf);
      const n = rng.range(1, 8);
      const at: string[] = [];
      for (let i = 0; i < n && out.length > 0; i++) {
        const p = pickPos(rng, out, index);
        const bit = rng.int(8);
        out[p] = out[p]! ^ (1 << bit);
        at.push(`${p}.${bit}`);
      }
      return { buf: out, desc: `flip bits ${at.join(',')}` };
    }
    case 'byte': {
      const out = Buffer.from(buf);
      if (out.length === 0) return { buf: out, desc: 'noop' };
      const p = pickPos(rng, out, index);
      const v = rng.chance(0.5) ? rng.pick(INTERESTING_BYTES) : rng.int(256);
      out[p] = v;
      return { buf: out, desc: `byte ${p}=0x${v.toString(16)}` };
    }
    case 'insert': {
      const p = pickPos(rng, buf, index);
      const ins = Buffer.alloc(rng.chance(0.8) ? rng.range(1, 16) : rng.range(17, 5000));
      if (rng.chance(0.5)) rng.fill(ins);
      else for (let i = 0; i < ins.length; i++) ins[i] = rng.pick(INTERESTING_BYTES);
      return { buf: Buffer.concat([buf.subarray(0, p), ins, buf.subarray(p)]), desc: `insert ${ins.length} bytes at ${p}` };
    }
    case 'delete': {
      const p = pickPos(rng, buf, index);
      const n = rng.chance(0.8) ? rng.range(1, 16) : rng.pick([PAGE, PAGE + 8, rng.range(17, 9000)]);
      return { buf: Buffer.concat([buf.subarray(0, p), buf.subarray(Math.min(buf.length, p + n))]), desc: `delete ${n} bytes at ${p}` };
    }
    case 'truncate': {
      const p = rng.chance(0.5) ? pickPos(rng, buf, index) : rng.int(buf.length);
      return { buf: Buffer.from(buf.subarray(0, p)), desc: `truncate at ${p}` };
    }
    case 'field': {
      const fr = rng.pick(index.fields);
      const out = Buffer.from(buf);
      if (fr.pos + fr.size > out.length) return { buf: out, desc: 'noop' };
      const orig = readField(out, fr.pos, fr.size);
      const v = extreme(rng, fr.size, orig, index);
      writeField(out, fr.pos, fr.size, v);
      return { buf: out, desc: `field ${fr.what} @${fr.pos} 0x${orig.toString(16)} -> 0x${v.toString(16)}` };
    }
    case 'word': {
      const size = rng.pick([4, 8] as const);
      const out = Buffer.from(buf);
      const p = Math.min(pickPos(rng, out, index), Math.max(0, out.length - size));
      if (p + size > out.length) return { buf: out, desc: 'noop' };
      const orig = readField(out, p, size);
      const v = extreme(rng, size, orig, index);
      writeField(out, p, size, v);
      return { buf: out, desc: `be${size * 8} @${p} 0x${orig.toString(16)} -> 0x${v.toString(16)}` };
    }
    case 'dup': {
      const from = pickPos(rng, buf, index);
      const n = rng.range(1, 64);
      const to = pickPos(rng, buf, index);
      const piece = buf.subarray(from, Math.min(buf.length, from + n));
      return { buf: Buffer.concat([buf.subarray(0, to), piece, buf.subarray(to)]), desc: `dup ${piece.length} bytes from ${from} to ${to}` };
    }
  }
}

/** One to three stacked mutations of a valid stream. */
export function mutate(rng: Rng, base: Buffer, index: StreamIndex): Mutated {
  const n = rng.chance(0.7) ? 1 : rng.chance(0.66) ? 2 : 3;
  let buf = base;
  const descs: string[] = [];
  for (let i = 0; i < n; i++) {
    const m = mutateOnce(rng, buf, index);
    buf = m.buf;
    descs.push(m.desc);
  }
  return { buf, desc: descs.join('; ') };
}

// ---- edits used by named cases ----

/** A copy of `buf` with `v` written at `pos` as a big-endian field of `size` bytes. */
export function withField(buf: Buffer, pos: number, size: FieldRef['size'], v: bigint | number): Buffer {
  const out = Buffer.from(buf);
  writeField(out, pos, size, BigInt(v));
  return out;
}

/** A copy of `buf` with [pos, pos+del) replaced by `ins`. */
export function splice(buf: Buffer, pos: number, del: number, ins: Uint8Array = Buffer.alloc(0)): Buffer {
  return Buffer.concat([buf.subarray(0, pos), ins, buf.subarray(pos + del)]);
}

// ---- feeding a destination ----

/** An incoming channel over bytes in memory (a Readable of chunks), optionally with a return path. */
export class BufferChannel extends PlainChannel<Readable> {
  readonly returnPath?: Writable;
  /** Bytes the destination wrote to the return path. */
  readonly rpBytes: Buffer[] = [];

  constructor(chunks: Buffer[], opts: { returnPath?: boolean; name?: string } = {}) {
    super(parseMigrationUri(`file:${opts.name ?? '/dev/null'}`), Readable.from(chunks, { objectMode: false }), 'in', 1000);
    if (opts.returnPath) {
      const sink = this.rpBytes;
      this.returnPath = new Writable({
        write(chunk: Buffer, _enc, cb) {
          sink.push(Buffer.from(chunk));
          cb();
        },
      });
    }
  }

  /** The return-path messages as [type, payload] (be16 type, be16 len framing). */
  rpMessages(): Array<{ type: number; payload: Buffer }> {
    const all = Buffer.concat(this.rpBytes);
    const out: Array<{ type: number; payload: Buffer }> = [];
    for (let p = 0; p + 4 <= all.length; ) {
      const len = all.readUInt16BE(p + 2);
      out.push({ type: all.readUInt16BE(p), payload: all.subarray(p + 4, p + 4 + len) });
      p += 4 + len;
    }
    return out;
  }
}

/** Splits `buf` into chunks of a size drawn from `rng` (all boundaries matter to a pull parser). */
export function chunked(buf: Buffer, rng: Rng): { chunks: Buffer[]; desc: string } {
  const mode = rng.pick(['whole', '64k', 'page', 'page+1', 'odd', 'random'] as const);
  const size = { whole: Math.max(1, buf.length), '64k': 65536, page: 4096, 'page+1': 4097, odd: 1000 + rng.int(64), random: 0 }[mode];
  const chunks: Buffer[] = [];
  for (let p = 0; p < buf.length; ) {
    const n = mode === 'random' ? rng.range(1, 9000) : size;
    chunks.push(buf.subarray(p, p + n));
    p += n;
  }
  return { chunks, desc: `chunks:${mode}` };
}

/** Writes `buf` to a file named after the case, for reproducing a failure by hand. */
export function saveCase(dir: string, name: string, buf: Buffer): string {
  const file = path.join(dir, `${name.replace(/[^A-Za-z0-9_.-]+/g, '_')}.bin`);
  fs.writeFileSync(file, buf);
  return file;
}
