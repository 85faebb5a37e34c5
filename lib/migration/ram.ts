/**
 * RAM migration, both halves: RamSender walks the migration bitmap of every
 * RAM block and encodes dirty pages in QEMU's RAM encoding; RamLoader places
 * received pages into destination guest memory.
 *
 * Invariants:
 *  - A page's bit is cleared when its record is encoded. A write by the guest
 *    after the dirty-log sync that set the bit sets it again at the next sync,
 *    so a page is never lost even though pages are copied while the guest
 *    runs (a torn copy is always followed by a fresh one).
 *  - Pages are copied into the writer's (recycled) output chunks rather than
 *    referenced: a reference costs two pieces and several short-lived objects
 *    per page through the Writable, which kept the garbage collector and the
 *    young generation busy (+12 MiB resident on a 2 GiB send); a 4 KiB copy
 *    costs less than that bookkeeping.
 *  - The loader writes only inside a block's used length: the codec checks
 *    every offset against the destination's own blocks before any copy.
 */
import type { GuestMemory } from '../native';
import { RAM_FLAG, TARGET_PAGE_SIZE } from '../stream/constants';
import type { StreamReader } from '../stream/reader';
import { RamEncoder, RamRecordParser, type RamBlockInfo, type RamRecord } from '../stream/ram-codec';
import type { FdSink } from '../stream/fd-sink';
import type { StreamWriter } from '../stream/writer';
import { PageBitmap } from './bitmap';

/** A RAM block as the migration engine sees it. */
export interface RamBlockRef {
  idstr: string;
  size: number;
  memory: GuestMemory;
  /** Offset of the block inside `memory` (0 unless several blocks share a mapping). */
  memOffset?: number;
  /** A view of [offset, offset + length) of the block (within one GiB), from views the owner keeps. */
  view?: (offset: number, length: number) => Uint8Array;
}

const VIEW_SPAN = 1 << 30; // one external ArrayBuffer per GiB of guest RAM
const RUN_MAX = 2048; // most pages per run of the bitmap (8 MiB)
const PAGE_RECORD_BYTES = 8 + TARGET_PAGE_SIZE; // be64 header + page, with CONTINUE
const PAGE_CONTINUE = RAM_FLAG.PAGE | RAM_FLAG.CONTINUE; // low byte of such a header
const ZERO_RECORD_BYTES = 9; // be64 header + fill byte, with CONTINUE
/** Pages write-protected at a time after a deferred dirty-log start (16 MiB). */
export const PROTECT_CHUNK_PAGES = 4096;

/**
 * Page views over one block: the block's own views when it offers them, else
 * one ArrayBuffer per GiB made on first use. Making a 1 GiB external buffer
 * costs V8 a full GC (it counts as external memory), ~5 ms that used to land
 * in every migration's setup; the machine's views live as long as it does
 * (and MigratableMachine.warmRam makes them ahead of time).
 */
class BlockViews {
  private readonly views: Uint8Array[] = [];
  constructor(readonly block: RamBlockRef) {}
  /** The page at `offset` (4 KiB aligned, inside the block). */
  page(offset: number): Uint8Array {
    const b = this.block;
    if (b.view) return b.view(offset, TARGET_PAGE_SIZE);
    const i = Math.floor(offset / VIEW_SPAN);
    let v = this.views[i];
    if (!v) {
      const len = Math.min(VIEW_SPAN, b.size - i * VIEW_SPAN);
      v = new Uint8Array(b.memory.view((b.memOffset ?? 0) + i * VIEW_SPAN, len));
      this.views[i] = v;
    }
    const at = offset % VIEW_SPAN;
    return v.subarray(at, at + TARGET_PAGE_SIZE);
  }
}

export interface RamSendStats {
  normal: number;
  duplicate: number;
}

interface SenderBlock {
  ref: RamBlockRef;
  views: BlockViews;
  bitmap: PageBitmap;
  cursor: number;
  /** One byte per PROTECT_CHUNK_PAGES chunk, 1 = not write-protected yet (deferred start). */
  unprotected?: Uint8Array;
}

/** Write-protects pages [first, first + count) of block `index` in the dirty log. */
export type ProtectPages = (index: number, first: number, count: number) => void;

export class RamSender {
  private readonly blocks: SenderBlock[];
  private readonly zeroScan = new Uint8Array(1); // encodeNamed's one page
  private blockIndex = 0;
  /** Dirty pages not yet sent (kept in step with the bitmaps). */
  private dirty = 0;
  private protect: ProtectPages | undefined;
  readonly counts: RamSendStats = { normal: 0, duplicate: 0 };

  constructor(
    blocks: readonly RamBlockRef[],
    private readonly enc: RamEncoder,
    /** A socket sink: page runs then go from guest memory to the socket directly while it is idle. */
    private readonly direct?: FdSink,
  ) {
    this.blocks = blocks.map((ref) => ({ ref, views: new BlockViews(ref), bitmap: new PageBitmap(ref.size / TARGET_PAGE_SIZE), cursor: 0 }));
  }

  get writer(): StreamWriter {
    return this.enc.w;
  }

  /** Total bytes of RAM being migrated. */
  get totalBytes(): number {
    return this.blocks.reduce((n, b) => n + b.ref.size, 0);
  }

  /** Pages still to send in the current bitmap. */
  get dirtyPages(): number {
    return this.dirty;
  }

  bitmapOf(index: number): PageBitmap {
    return this.blocks[index]!.bitmap;
  }

  /** The setup payload of the RAM START section: block list, EOS. */
  writeSetup(): void {
    this.enc.memSize(this.blocks.map((b) => ({ idstr: b.ref.idstr, usedLength: b.ref.size })));
    this.enc.eos();
  }

  /** First pass: every page is to be sent. */
  markAllDirty(): void {
    this.dirty = 0;
    for (const b of this.blocks) {
      b.bitmap.setAll();
      b.cursor = 0;
      this.dirty += b.bitmap.pages;
    }
  }

  /**
   * The dirty log started without protecting anything (INITIALLY_SET): each
   * chunk is protected right before its first page is read, as QEMU clears
   * its dirty bitmap chunk by chunk. Writes before that are in the read;
   * writes after it are logged.
   */
  deferProtection(protect: ProtectPages): void {
    this.protect = protect;
    for (const b of this.blocks) b.unprotected = new Uint8Array(Math.ceil(b.bitmap.pages / PROTECT_CHUNK_PAGES)).fill(1);
  }

  /** A dirty-log sync protected every page: nothing is left to protect. */
  allProtected(): void {
    this.protect = undefined;
    for (const b of this.blocks) b.unprotected = undefined;
  }

  private protectRun(b: SenderBlock, page: number, run: number): void {
    const unprotected = b.unprotected!;
    for (let c = Math.floor(page / PROTECT_CHUNK_PAGES); c * PROTECT_CHUNK_PAGES < page + run; c++) {
      if (!unprotected[c]) continue;
      unprotected[c] = 0;
      const first = c * PROTECT_CHUNK_PAGES;
      this.protect!(this.blockIndex, first, Math.min(PROTECT_CHUNK_PAGES, b.bitmap.pages - first));
    }
  }

  /**
   * Merges dirty pages reported by the dirty log (a bitmap per block, KVM
   * layout, in block order) and counts what is pending once. The scan position stays where it is, as QEMU's does: the walk
   * finishes the current round before it wraps around to pages dirtied
   * behind it. Restarting at page 0 after every sync resent the (hot, low)
   * working set again and again while the never-sent rest of the first pass
   * waited, and was then sent during the downtime into destination memory
   * not yet populated: several times slower than a page the destination
   * already holds.
   */
  mergeDirty(kvmBitmaps: readonly (Uint8Array | PageBitmap)[]): void {
    for (let i = 0; i < this.blocks.length; i++) this.blocks[i]!.bitmap.or(kvmBitmaps[i]!);
    this.dirty = this.blocks.reduce((n, b) => n + b.bitmap.count(), 0);
  }

  /**
   * Encodes dirty pages until `maxBytes` have been added to the writer or no
   * dirty page is left. Returns true when the bitmaps are empty.
   *
   * Runs of dirty pages go to the native encoder straight from guest memory
   * into the writer's chunk (zero check, header, copy); JS only walks the
   * bitmap and names the block where CONTINUE cannot be used.
   */
  encodeSome(maxBytes: number): boolean {
    const enc = this.enc;
    const w = enc.w;
    const start = w.totalBytes;
    while (this.dirty > 0 && (w.totalBytes === start || w.totalBytes - start + PAGE_RECORD_BYTES <= maxBytes) && !w.error) {
      const b = this.blocks[this.blockIndex]!;
      const page = b.bitmap.next(b.cursor);
      if (page < 0) {
        b.cursor = 0;
        this.blockIndex = (this.blockIndex + 1) % this.blocks.length;
        continue;
      }
      const run = b.bitmap.runLength(page, RUN_MAX);
      if (b.unprotected) this.protectRun(b, page, run);
      const memBase = b.ref.memOffset ?? 0;
      let i = 0;
      if (enc.lastBlock !== b.ref.idstr) {
        this.encodeNamed(b, page);
        i = 1;
      }
      // The native encoder stops when its window is full: the window is the
      // chunk's room (a fresh chunk when not even one page record fits),
      // capped by what the batch may still add (zero pages take 9 bytes, so a
      // batch holds up to 29,000 of them but only 64 pages of data).
      while (i < run && !w.error) {
        // Full once another page record might not fit (else the end of a batch of
        // 9-byte zero records would go one page per call); the first always fits.
        const left = maxBytes - (w.totalBytes - start);
        if (left < PAGE_RECORD_BYTES && w.totalBytes > start) break;
        const offset = (page + i) * TARGET_PAGE_SIZE;
        if (this.direct) {
          const r = this.sendDirect(this.direct, b.ref.memory, memBase + offset, offset, run - i, Math.max(PAGE_RECORD_BYTES, left));
          if (r > 0) {
            i += r;
            continue;
          }
        }
        const size = Math.min(w.room >= PAGE_RECORD_BYTES ? w.room : w.maxReserve, Math.max(PAGE_RECORD_BYTES, left));
        const { buf, at } = w.reserve(size);
        const r = b.ref.memory.encodePageRecords(memBase + offset, offset, run - i, buf.subarray(at, at + size), 0);
        w.unreserve(size - r.bytes);
        this.count(r.pages, r.bytes);
        i += r.pages;
      }
      b.bitmap.clearRange(page, i);
      this.dirty -= i;
      b.cursor = page + i;
    }
    return this.dirty === 0;
  }

  /** Counts `pages` page records that took `bytes` (ZERO records 9 bytes, PAGE records 4104). */
  private count(pages: number, bytes: number): void {
    const zeros = (pages * PAGE_RECORD_BYTES - bytes) / (PAGE_RECORD_BYTES - ZERO_RECORD_BYTES);
    this.counts.duplicate += zeros;
    this.counts.normal += pages - zeros;
  }

  /**
   * A run straight from guest memory to the socket (FdSink.sendPages).
   * Records the socket did not take, and all-ZERO runs (a few KiB, not worth
   * a syscall), come back and go into the writer; when the writer holds
   * bytes and the run has page data, those bytes are flushed first. Returns
   * the pages done, 0 when the run must go through the writer instead.
   */
  private sendDirect(sink: FdSink, mem: GuestMemory, memOffset: number, blockOffset: number, pages: number, maxBytes: number): number {
    const w = this.enc.w;
    let r = sink.sendPages(mem, memOffset, blockOffset, pages, maxBytes, w.pendingBytes > 0);
    if (r.pages === 0 && w.pendingBytes > 0) {
      w.flushNow(sink); // the socket usually takes it at once; else the run goes through the writer
      if (w.pendingBytes === 0) r = sink.sendPages(mem, memOffset, blockOffset, pages, maxBytes, false);
    }
    if (r.pages === 0) return 0;
    w.countSent(r.bytes - r.rest.byteLength);
    w.putBytes(r.rest);
    this.count(r.pages, r.bytes);
    return r.pages;
  }

  /** One page as a record that names its block (the first after another block, or on a new channel). */
  private encodeNamed(b: SenderBlock, page: number): void {
    const offset = page * TARGET_PAGE_SIZE;
    b.ref.memory.scanZeroPages((b.ref.memOffset ?? 0) + offset, 1, this.zeroScan);
    if (this.zeroScan[0]) {
      this.enc.zero(b.ref.idstr, offset);
      this.counts.duplicate++;
    } else {
      this.enc.page(b.ref.idstr, offset, b.views.page(offset), true);
      this.counts.normal++;
    }
  }
}

/**
 * Destination half: validates the block list and places pages.
 *
 * ZERO records are applied in runs: consecutive zero pages of one block are
 * collected and checked with one findNonZero() over the whole run (pages of
 * a fresh destination are already zero, so usually nothing is written), one
 * native call per run instead of one per page. A pending run is applied
 * before any other record is placed, so record order is preserved.
 */
export class RamLoader {
  private readonly byName = new Map<string, BlockViews>();
  readonly parser: RamRecordParser;
  pages = 0;
  zeroPages = 0;
  /** Pending run of ZERO records: [zeroStart, zeroEnd) of zeroViews' block. */
  private zeroViews: BlockViews | undefined;
  private zeroStart = 0;
  private zeroEnd = 0;

  constructor(reader: StreamReader, blocks: readonly RamBlockRef[]) {
    const infos: RamBlockInfo[] = [];
    for (const b of blocks) {
      this.byName.set(b.idstr, new BlockViews(b));
      infos.push({ idstr: b.idstr, usedLength: b.size });
    }
    this.parser = new RamRecordParser(reader, {
      blocks: infos,
      pageTarget: (block, offset) => {
        if (this.zeroViews) this.applyZeros();
        return this.byName.get(block.idstr)!.page(offset);
      },
    });
  }

  /** Reads one RAM section payload (up to EOS). */
  async loadSection(): Promise<void> {
    const parser = this.parser;
    for (;;) {
      if (this.tryPageRun()) continue;
      const run = parser.tryZeroRun();
      if (run) {
        this.addZeros(this.byName.get(run.block.idstr)!, run.offset, run.count);
        continue;
      }
      const rec: RamRecord = parser.tryNext() ?? (await parser.next());
      switch (rec.kind) {
        case 'page':
          this.pages++;
          break;
        case 'zero':
          this.addZeros(this.byName.get(rec.block.idstr)!, rec.offset, 1);
          break;
        case 'memsize':
          this.applyZeros();
          this.checkBlockList(rec);
          break;
        case 'flush':
          this.applyZeros();
          break;
        case 'eos':
          this.applyZeros();
          return;
      }
    }
  }

  /**
   * Fast path for the common run of PAGE records with CONTINUE: the native
   * loop copies every complete one in the current chunk into the last named
   * block (it stops at anything else, which the parser then handles).
   */
  private tryPageRun(): boolean {
    const block = this.parser.lastBlock;
    if (!block) return false;
    const src = this.parser.reader.currentView();
    if (src.length < PAGE_RECORD_BYTES || src[7] !== PAGE_CONTINUE || (src[6]! & 0x0f) !== 0) return false;
    if (this.zeroViews) this.applyZeros();
    const ref = this.byName.get(block.idstr)!.block;
    const n = ref.memory.loadPageRecords(src, ref.memOffset ?? 0, ref.size);
    if (n === 0) return false;
    this.parser.reader.skip(n);
    this.pages += n / PAGE_RECORD_BYTES;
    return true;
  }

  /** Adds `count` ZERO records from `offset` to the pending run (applying the old run if not adjacent). */
  private addZeros(views: BlockViews, offset: number, count: number): void {
    if (views !== this.zeroViews || offset !== this.zeroEnd) {
      if (this.zeroViews) this.applyZeros();
      this.zeroViews = views;
      this.zeroStart = offset;
    }
    this.zeroEnd = offset + count * TARGET_PAGE_SIZE;
    this.zeroPages += count;
  }

  /** Zeroes the pages of the pending ZERO run that are not zero already. */
  private applyZeros(): void {
    const views = this.zeroViews;
    if (!views) return;
    this.zeroViews = undefined;
    const base = views.block.memOffset ?? 0;
    const mem = views.block.memory;
    const end = this.zeroEnd;
    let at = this.zeroStart;
    while (at < end) {
      const nz = mem.findNonZero(base + at, end - at);
      if (nz < 0) break;
      const page = Math.floor((nz - base) / TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE;
      views.page(page).fill(0);
      at = page + TARGET_PAGE_SIZE;
    }
  }

  private checkBlockList(rec: Extract<RamRecord, { kind: 'memsize' }>): void {
    // The codec already rejects unknown names and length mismatches; every
    // local block must also be present so no RAM is left unmigrated.
    const seen = new Set(rec.blocks.map((b) => b.idstr));
    for (const name of this.byName.keys()) {
      if (!seen.has(name)) {
        throw Object.assign(new Error(`RAM block '${name}' of this machine is missing from the incoming block list`), { code: 'ERR_MIGRATION_STREAM' });
      }
    }
  }
}
