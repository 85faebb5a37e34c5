/**
 * QEMU's RAM section encoding ("ram", version 4): encoder and decoder of
 * page records. A codec only: the migration engine decides which pages to
 * send and where received pages go.
 *
 * Record: be64 (offset | flags); unless CONTINUE, u8 idstr length + idstr of
 * the RAMBlock; then per kind: ZERO u8 fill (must be 0), PAGE 4096 bytes,
 * MEM_SIZE the block list, EOS / MULTIFD_FLUSH nothing. Exactly one kind
 * flag per record (plus CONTINUE).
 *
 * Channel state: the "last block" for CONTINUE is per channel (main stream,
 * postcopy preempt channel), so each channel gets its own encoder/parser;
 * `resetChannel()` forgets it (new connection after recovery).
 *
 * Fast path: RamRecordParser.tryNext() parses a record synchronously when it
 * is fully buffered, so a burst of page records costs no Promise each; PAGE
 * payloads are copied once, straight from the incoming chunk into the view
 * the caller supplies (guest memory).
 */
import { RAM_FLAG, RAM_FLAGS_ALL, RAM_FLAGS_MASK, TARGET_PAGE_SIZE, MAX_IDSTR_LEN } from './constants';
import { native } from '../native';
import { printable } from './errors';
import type { StreamReader } from './reader';
import type { StreamWriter } from './writer';

/** A RAM block as the codec sees it. */
export interface RamBlockInfo {
  idstr: string;
  /** Bytes in use (pages at offsets >= usedLength are rejected). */
  usedLength: number;
  /** For resizable blocks: the most a MEM_SIZE record may resize it to. */
  maxLength?: number;
  /** Host page size backing the block (default 4096; huge pages: 2 MiB...). */
  pageSize?: number;
  /** Guest physical address (sent with x-ignore-shared). */
  addr?: number;
}

/** One entry of a MEM_SIZE block list as received. */
export interface RamBlockEntry {
  idstr: string;
  usedLength: number;
  /** Present when postcopy was advised and the block's page size is not the host page size. */
  pageSize?: number;
  /** Present with x-ignore-shared. */
  addr?: number;
}

/** Per-stream options that change the MEM_SIZE layout (both sides must agree). */
export interface MemSizeOptions {
  /** postcopy-ram negotiated: blocks whose page size differs from hostPageSize carry it. */
  postcopy?: boolean;
  /** Host page size (default 4096). */
  hostPageSize?: number;
  /** x-ignore-shared capability: every block carries its GPA. */
  ignoreShared?: boolean;
}

const TWO32 = 0x1_0000_0000;

/**
 * Writes a record header into `buf` at `pos` and returns the position after
 * it: be64 (offset | flags), then u8 length + `idstr` unless it is undefined
 * (then CONTINUE must be in `flags`).
 */
export function encodePageHeader(buf: Uint8Array, pos: number, offset: number, flags: number, idstr?: Uint8Array): number {
  const hi = Math.floor(offset / TWO32);
  const lo = ((offset >>> 0) | flags) >>> 0;
  buf[pos] = hi >>> 24;
  buf[pos + 1] = (hi >>> 16) & 0xff;
  buf[pos + 2] = (hi >>> 8) & 0xff;
  buf[pos + 3] = hi & 0xff;
  buf[pos + 4] = lo >>> 24;
  buf[pos + 5] = (lo >>> 16) & 0xff;
  buf[pos + 6] = (lo >>> 8) & 0xff;
  buf[pos + 7] = lo & 0xff;
  pos += 8;
  if (idstr) {
    buf[pos++] = idstr.length;
    buf.set(idstr, pos);
    pos += idstr.length;
  }
  return pos;
}

/** A ZERO record with CONTINUE: be64 header + fill byte. */
const ZERO_RECORD_BYTES = 9;

/** Encoder of RAM records for one channel, on top of a StreamWriter. */
export class RamEncoder {
  readonly w: StreamWriter;
  /** Block of the last record with a block id on this channel (for CONTINUE). */
  lastBlock: string | undefined;
  private readonly names = new Map<string, Buffer>();

  constructor(w: StreamWriter) {
    this.w = w;
  }

  /** Forget the last block (a new channel starts without CONTINUE state). */
  resetChannel(): void {
    this.lastBlock = undefined;
  }

  /** Setup record: be64 (total | MEM_SIZE), then per block idstr, be64 used length [, page size] [, GPA]. */
  memSize(blocks: readonly RamBlockInfo[], opts: MemSizeOptions = {}): void {
    const w = this.w;
    let total = 0;
    for (const b of blocks) total += b.usedLength;
    if (total % TARGET_PAGE_SIZE !== 0) {
      w.setError(new RangeError(`RAM total ${total} is not a multiple of the target page size`));
      return;
    }
    w.put64(total + RAM_FLAG.MEM_SIZE);
    const host = opts.hostPageSize ?? TARGET_PAGE_SIZE;
    for (const b of blocks) {
      w.putCountedString(b.idstr);
      w.put64(b.usedLength);
      if (opts.postcopy && (b.pageSize ?? TARGET_PAGE_SIZE) !== host) w.put64(b.pageSize ?? TARGET_PAGE_SIZE);
      if (opts.ignoreShared) w.put64(b.addr ?? 0);
    }
  }

  /** Record header for `block`/`offset` with `flags`; adds CONTINUE or the block id. */
  header(block: string, offset: number, flags: number): void {
    const w = this.w;
    if (offset % TARGET_PAGE_SIZE !== 0 || offset < 0 || !Number.isSafeInteger(offset)) {
      w.setError(new RangeError(`RAM offset ${offset} is not a page-aligned safe integer`));
      return;
    }
    if (block === this.lastBlock) {
      w.put64(offset + (flags | RAM_FLAG.CONTINUE));
      return;
    }
    let name = this.names.get(block);
    if (!name) {
      name = Buffer.from(block, 'latin1');
      if (name.length > MAX_IDSTR_LEN) {
        w.setError(new RangeError(`RAM block name '${block.slice(0, 40)}...' too long`));
        return;
      }
      this.names.set(block, name);
    }
    w.put64(offset + flags);
    w.put8(name.length);
    w.putBytes(name);
    this.lastBlock = block;
  }

  /**
   * A PAGE record. By default `data` (4096 bytes) is referenced, not copied:
   * it must stay unchanged until the writer's pieces are written, or be
   * re-sent if dirtied. `copy` copies it into the output chunk instead.
   */
  page(block: string, offset: number, data: Uint8Array, copy = false): void {
    if (data.byteLength !== TARGET_PAGE_SIZE) {
      this.w.setError(new RangeError(`page of ${data.byteLength} bytes, expected ${TARGET_PAGE_SIZE}`));
      return;
    }
    this.header(block, offset, RAM_FLAG.PAGE);
    if (copy) this.w.putBytes(data);
    else this.w.putRef(data);
  }

  /** A ZERO record (fill byte 0). */
  zero(block: string, offset: number): void {
    this.header(block, offset, RAM_FLAG.ZERO);
    this.w.put8(0);
  }

  /**
   * `count` ZERO records for consecutive pages from `offset` (what `count`
   * zero() calls would write; the records after the first carry CONTINUE),
   * encoded in one pass into reserved output.
   */
  zeroRun(block: string, offset: number, count: number): void {
    if (count <= 0) return;
    this.zero(block, offset);
    const w = this.w;
    const end = offset + count * TARGET_PAGE_SIZE;
    if (!Number.isSafeInteger(end)) {
      w.setError(new RangeError(`RAM offset ${end} is not a safe integer`));
      return;
    }
    const flags = RAM_FLAG.ZERO | RAM_FLAG.CONTINUE;
    const perReserve = Math.max(1, Math.min(4096, Math.floor(w.maxReserve / ZERO_RECORD_BYTES))); // records per reservation
    for (let off = offset + TARGET_PAGE_SIZE; off < end; ) {
      const n = Math.min(perReserve, (end - off) / TARGET_PAGE_SIZE);
      const { buf, at } = w.reserve(n * ZERO_RECORD_BYTES);
      let pos = at;
      for (let i = 0; i < n; i++, off += TARGET_PAGE_SIZE) {
        pos = encodePageHeader(buf, pos, off, flags);
        buf[pos++] = 0;
      }
    }
  }

  /** End of this RAM section payload. */
  eos(): void {
    this.w.put64(RAM_FLAG.EOS);
  }

  /** Multifd sync point on the main channel. */
  multifdFlush(): void {
    this.w.put64(RAM_FLAG.MULTIFD_FLUSH);
  }
}

// ---- decoding ----

export type RamRecord =
  | { kind: 'memsize'; total: number; blocks: RamBlockEntry[]; position: number }
  | { kind: 'page'; block: RamBlockInfo; offset: number; data: Uint8Array; position: number }
  | { kind: 'zero'; block: RamBlockInfo; offset: number; position: number }
  | { kind: 'eos'; position: number }
  | { kind: 'flush'; position: number };

export interface RamParserOptions {
  /**
   * The destination's blocks. With them, unknown block names and length
   * mismatches are errors (resizable blocks grow up to maxLength). Without
   * them (dump tools) the parser learns blocks from MEM_SIZE records.
   */
  blocks?: Iterable<RamBlockInfo>;
  /** Where a PAGE's 4096 bytes go; undefined = into a view returned as `data`. */
  pageTarget?: (block: RamBlockInfo, offset: number) => Uint8Array | undefined;
  /** MEM_SIZE layout options (must match the source). */
  memSize?: MemSizeOptions;
  /** At most this many blocks in one MEM_SIZE list (default 4096). */
  maxBlocks?: number;
}

export interface RamSectionCounts {
  pages: number;
  zero: number;
  records: number;
}

/** Handler callbacks for readUntilEos(); all optional. */
export interface RamRecordHandler {
  onRecord?(rec: RamRecord): void | Promise<void>;
}

/**
 * Decoder of RAM records on one channel. `next()` returns the next record;
 * `tryNext()` returns it only if it is entirely buffered (synchronous, no
 * Promise); `readUntilEos()` runs a whole section payload.
 */
export class RamRecordParser {
  readonly reader: StreamReader;
  readonly blocks = new Map<string, RamBlockInfo>();
  /** Last block named on this channel (for CONTINUE). */
  lastBlock: RamBlockInfo | undefined;
  private readonly learn: boolean;
  private readonly pageTarget: RamParserOptions['pageTarget'];
  private readonly memOpts: MemSizeOptions;
  private readonly maxBlocks: number;
  private lastName: Buffer | undefined;

  constructor(reader: StreamReader, opts: RamParserOptions = {}) {
    this.reader = reader;
    this.learn = opts.blocks === undefined;
    for (const b of opts.blocks ?? []) this.blocks.set(b.idstr, b);
    this.pageTarget = opts.pageTarget;
    this.memOpts = opts.memSize ?? {};
    this.maxBlocks = opts.maxBlocks ?? 4096;
  }

  /** Forget the last block (new channel). */
  resetChannel(): void {
    this.lastBlock = undefined;
    this.lastName = undefined;
  }

  /**
   * The next record if it is completely buffered, else undefined (nothing
   * consumed). MEM_SIZE records always take the async path.
   */
  tryNext(): RamRecord | undefined {
    const r = this.reader;
    const avail = r.buffered;
    if (avail < 8) return undefined;
    const hi = r.peekBe32(0);
    const lo = r.peekBe32(4);
    const flags = lo & RAM_FLAGS_MASK;
    const kind = flags & ~RAM_FLAG.CONTINUE;
    let need = 8;
    let nameLen = -1;
    if (kind === RAM_FLAG.PAGE || kind === RAM_FLAG.ZERO) {
      if ((flags & RAM_FLAG.CONTINUE) === 0) {
        if (avail < 9) return undefined;
        nameLen = r.peekU8(8);
        need += 1 + nameLen;
      }
      need += kind === RAM_FLAG.PAGE ? TARGET_PAGE_SIZE : 1;
    } else if (kind !== RAM_FLAG.EOS && kind !== RAM_FLAG.MULTIFD_FLUSH) {
      return undefined; // MEM_SIZE and errors: slow path
    }
    if (avail < need) return undefined;
    const position = r.position;
    if (hi >= 0x200000) throw r.error(`RAM record offset out of range (0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')})`);
    const offset = hi * TWO32 + (lo - flags);
    if (kind === RAM_FLAG.EOS) {
      r.skip(8);
      return { kind: 'eos', position };
    }
    if (kind === RAM_FLAG.MULTIFD_FLUSH) {
      r.skip(8);
      return { kind: 'flush', position };
    }
    const block = nameLen < 0 ? this.continueBlock(position) : this.namedBlock(r.peekView(9 + nameLen).subarray(9), position);
    this.checkOffset(block, offset, position);
    if (kind === RAM_FLAG.ZERO) {
      const fill = r.peekU8(need - 1);
      if (fill !== 0) throw r.error(`zero page record with fill byte 0x${fill.toString(16)} (must be 0)`, position);
      r.skip(need);
      return { kind: 'zero', block, offset, position };
    }
    r.skip(need - TARGET_PAGE_SIZE);
    const target = this.pageTarget?.(block, offset);
    let data: Uint8Array;
    if (target) {
      if (target.byteLength < TARGET_PAGE_SIZE) throw new RangeError('pageTarget returned a view shorter than a page');
      r.copyTo(target, TARGET_PAGE_SIZE);
      data = target;
    } else {
      data = r.peekView(TARGET_PAGE_SIZE);
      r.skip(TARGET_PAGE_SIZE);
    }
    return { kind: 'page', block, offset, data, position };
  }

  /**
   * Fast path for the common run of ZERO records with CONTINUE on
   * consecutive pages: consumes as many as lie complete in the reader's
   * current chunk (at most `max`) and returns the first offset and the count,
   * or undefined (nothing consumed) when the next record is not such a
   * record. Anything unusual (another kind, a gap, a non-zero fill byte, an
   * offset outside the block) ends the run and is left to tryNext(), which
   * reports errors with their position.
   */
  tryZeroRun(max = 1 << 16): { block: RamBlockInfo; offset: number; count: number } | undefined {
    const block = this.lastBlock;
    if (!block) return undefined;
    const buf = this.reader.currentView();
    const want = RAM_FLAG.ZERO | RAM_FLAG.CONTINUE;
    if (buf.length < ZERO_RECORD_BYTES || buf[7] !== want || buf[6]! & 0x0f) return undefined;
    const count = native().zeroRecordRun(buf, block.usedLength, max); // a million per idle 4 GiB
    if (count === 0) return undefined;
    const hi = ((buf[0]! << 24) | (buf[1]! << 16) | (buf[2]! << 8) | buf[3]!) >>> 0;
    const lo = ((buf[4]! << 24) | (buf[5]! << 16) | (buf[6]! << 8) | buf[7]!) >>> 0;
    this.reader.skip(count * ZERO_RECORD_BYTES);
    return { block, offset: hi * TWO32 + (lo - want), count };
  }

  /** The next record, waiting for data as needed. */
  async next(): Promise<RamRecord> {
    return this.tryNext() ?? this.nextSlow();
  }

  /**
   * Reads records up to and including EOS (one RAM section payload), handing
   * each to `handler.onRecord`. Returns counts.
   */
  async readUntilEos(handler: RamRecordHandler = {}): Promise<RamSectionCounts> {
    const counts: RamSectionCounts = { pages: 0, zero: 0, records: 0 };
    const on = handler.onRecord;
    for (;;) {
      const rec = this.tryNext() ?? (await this.nextSlow());
      counts.records++;
      if (rec.kind === 'page') counts.pages++;
      else if (rec.kind === 'zero') counts.zero++;
      if (on) {
        const p = on(rec);
        if (p) await p;
      }
      if (rec.kind === 'eos') return counts;
    }
  }

  private async nextSlow(): Promise<RamRecord> {
    const r = this.reader;
    await r.need(8, 'RAM record header');
    const position = r.position;
    const hi = r.peekBe32(0);
    const lo = r.peekBe32(4);
    const flags = lo & RAM_FLAGS_MASK;
    const kind = flags & ~RAM_FLAG.CONTINUE;
    if (flags & ~RAM_FLAGS_ALL || !KNOWN_KINDS.has(kind)) {
      throw r.error(`unknown combination of RAM record flags 0x${flags.toString(16)}`, position);
    }
    if (kind === RAM_FLAG.XBZRLE) throw r.error('XBZRLE not supported', position);
    if (kind === RAM_FLAG.COMPRESS_PAGE) throw r.error('compressed RAM pages not supported', position);
    if (kind === RAM_FLAG.HOOK) throw r.error('RDMA RAM hook not supported', position);
    if (kind === RAM_FLAG.FULL) throw r.error('obsolete RAM_SAVE_FLAG_FULL record', position);
    if (hi >= 0x200000) throw r.error(`RAM record offset out of range (0x${hi.toString(16)}...)`, position);
    if (kind === RAM_FLAG.MEM_SIZE) {
      r.skip(8);
      return this.readMemSize(hi * TWO32 + (lo - flags), position);
    }
    if (kind === RAM_FLAG.PAGE || kind === RAM_FLAG.ZERO) {
      let need = 8;
      if ((flags & RAM_FLAG.CONTINUE) === 0) {
        await r.need(9, 'RAM block name length');
        need += 1 + r.peekU8(8);
        await r.need(need, 'RAM block name');
      }
      need += kind === RAM_FLAG.ZERO ? 1 : 0;
      await r.need(need, kind === RAM_FLAG.ZERO ? 'zero page fill byte' : 'RAM page header');
      if (kind === RAM_FLAG.PAGE) {
        const rec = this.tryPageHeaderThenData(need, position);
        if (rec) return rec;
        // Header consumed; the 4096 bytes stream in.
        const { block, offset } = this.pending!;
        this.pending = undefined;
        const target = this.pageTarget?.(block, offset);
        const data = target ?? Buffer.allocUnsafe(TARGET_PAGE_SIZE);
        if (data.byteLength < TARGET_PAGE_SIZE) throw new RangeError('pageTarget returned a view shorter than a page');
        await r.readInto(data.byteLength === TARGET_PAGE_SIZE ? data : data.subarray(0, TARGET_PAGE_SIZE), 'RAM page data');
        return { kind: 'page', block, offset, data, position };
      }
    }
    // Everything else is complete once buffered: EOS, FLUSH, ZERO.
    const rec = this.tryNext();
    if (!rec) throw new Error('RamRecordParser: internal error, record not parsed');
    return rec;
  }

  private pending: { block: RamBlockInfo; offset: number } | undefined;

  /** Parses and consumes a PAGE header (sans data); returns the record if the data is also buffered. */
  private tryPageHeaderThenData(headerLen: number, position: number): RamRecord | undefined {
    const r = this.reader;
    if (r.buffered >= headerLen + TARGET_PAGE_SIZE) return this.tryNext();
    const hi = r.peekBe32(0);
    const lo = r.peekBe32(4);
    const flags = lo & RAM_FLAGS_MASK;
    const offset = hi * TWO32 + (lo - flags);
    const block = flags & RAM_FLAG.CONTINUE ? this.continueBlock(position) : this.namedBlock(r.peekView(headerLen).subarray(9), position);
    this.checkOffset(block, offset, position);
    r.skip(headerLen);
    this.pending = { block, offset };
    return undefined;
  }

  private async readMemSize(total: number, position: number): Promise<RamRecord> {
    const r = this.reader;
    const blocks: RamBlockEntry[] = [];
    const host = this.memOpts.hostPageSize ?? TARGET_PAGE_SIZE;
    let left = total;
    while (left > 0) {
      if (blocks.length >= this.maxBlocks) throw r.error(`more than ${this.maxBlocks} RAM blocks in MEM_SIZE list`, position);
      const at = r.position;
      const idstr = await r.countedString('RAM block name');
      const usedLength = await r.be64n('RAM block length');
      const entry: RamBlockEntry = { idstr, usedLength };
      let local = this.blocks.get(idstr);
      if (!local && !this.learn) throw r.error(`unknown RAM block '${printable(idstr)}', cannot accept migration`, at);
      if (this.memOpts.postcopy && (local?.pageSize ?? TARGET_PAGE_SIZE) !== host) {
        entry.pageSize = await r.be64n('RAM block page size');
        if (local && entry.pageSize !== (local.pageSize ?? TARGET_PAGE_SIZE)) {
          throw r.error(`RAM block '${printable(idstr)}': page size ${entry.pageSize} differs from local ${local.pageSize}`, at);
        }
      }
      if (this.memOpts.ignoreShared) entry.addr = await r.be64n('RAM block address');
      if (usedLength % TARGET_PAGE_SIZE !== 0) throw r.error(`RAM block '${printable(idstr)}': length ${usedLength} is not page aligned`, at);
      if (usedLength > left) throw r.error(`RAM block '${printable(idstr)}': length ${usedLength} exceeds the announced total ${total}`, at);
      if (local) {
        if (local.usedLength !== usedLength) {
          if (this.learn || (local.maxLength !== undefined && usedLength <= local.maxLength)) local.usedLength = usedLength;
          else throw r.error(`RAM block '${printable(idstr)}': length mismatch, received ${usedLength}, local ${local.usedLength}`, at);
        }
      } else {
        local = { idstr, usedLength };
        this.blocks.set(idstr, local);
      }
      left -= usedLength;
      blocks.push(entry);
    }
    return { kind: 'memsize', total, blocks, position };
  }

  private continueBlock(position: number): RamBlockInfo {
    const b = this.lastBlock;
    if (!b) throw this.reader.error('RAM record with CONTINUE flag but no previous block', position);
    return b;
  }

  private namedBlock(nameBytes: Uint8Array, position: number): RamBlockInfo {
    const last = this.lastName;
    if (last && this.lastBlock && last.equals(nameBytes)) return this.lastBlock;
    const name = Buffer.from(nameBytes.buffer, nameBytes.byteOffset, nameBytes.byteLength).toString('latin1');
    const b = this.blocks.get(name);
    if (!b) throw this.reader.error(`RAM record for unknown block '${printable(name)}'`, position);
    this.lastBlock = b;
    this.lastName = Buffer.from(nameBytes);
    return b;
  }

  private checkOffset(block: RamBlockInfo, offset: number, position: number): void {
    if (offset + TARGET_PAGE_SIZE > block.usedLength) {
      throw this.reader.error(`RAM offset 0x${offset.toString(16)} outside block '${block.idstr}' (${block.usedLength} bytes)`, position);
    }
  }
}

const KNOWN_KINDS = new Set<number>([
  RAM_FLAG.FULL,
  RAM_FLAG.ZERO,
  RAM_FLAG.MEM_SIZE,
  RAM_FLAG.PAGE,
  RAM_FLAG.EOS,
  RAM_FLAG.XBZRLE,
  RAM_FLAG.HOOK,
  RAM_FLAG.COMPRESS_PAGE,
  RAM_FLAG.MULTIFD_FLUSH,
]);
