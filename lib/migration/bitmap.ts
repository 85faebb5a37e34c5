/**
 * Page bitmaps for migration: one bit per 4 KiB target page of a RAM block,
 * stored as little-endian 64-bit words (the layout KVM_GET_DIRTY_LOG fills
 * and QEMU's RECV_BITMAP carries), accessed here as 32-bit words because
 * JavaScript bit operations are 32-bit.
 *
 * Invariant: bits past `pages` in the last word are always zero, so counts
 * and scans never report pages outside the block.
 */
import { native } from '../native';

export class PageBitmap {
  readonly pages: number;
  /** Backing bytes, a multiple of 8 long (KVM and RECV_BITMAP word size). */
  readonly bytes: Uint8Array;
  private readonly words: Uint32Array;

  constructor(pages: number, bytes?: Uint8Array) {
    if (!Number.isSafeInteger(pages) || pages < 0) throw new RangeError(`invalid page count ${pages}`);
    this.pages = pages;
    const size = PageBitmap.byteLength(pages);
    if (bytes && (bytes.byteLength < size || bytes.byteOffset % 4 !== 0)) {
      throw new RangeError(`bitmap buffer of ${bytes.byteLength} bytes is too small or unaligned for ${pages} pages`);
    }
    this.bytes = bytes ? bytes.subarray(0, size) : new Uint8Array(size);
    this.words = new Uint32Array(this.bytes.buffer, this.bytes.byteOffset, size / 4);
  }

  /** Bytes needed for `pages` bits, rounded up to whole 64-bit words. */
  static byteLength(pages: number): number {
    return Math.ceil(pages / 64) * 8;
  }

  get(page: number): boolean {
    return (this.words[page >>> 5]! & (1 << (page & 31))) !== 0;
  }

  set(page: number): void {
    this.words[page >>> 5]! |= 1 << (page & 31);
  }

  clear(page: number): void {
    this.words[page >>> 5]! &= ~(1 << (page & 31));
  }

  setAll(): void {
    this.words.fill(0xffffffff);
    this.trimTail();
  }

  clearAll(): void {
    this.words.fill(0);
  }

  /** Sets [first, first+count) (whole words at a time; nothing past `pages`). */
  setRange(first: number, count: number): void {
    const w = this.words;
    this.forWords(first, count, (i, mask) => (w[i]! |= mask));
  }

  /** this |= other (other must cover the same pages). Native: a sync runs it over whole blocks. */
  or(other: PageBitmap | Uint8Array): void {
    const src = other instanceof PageBitmap ? other.bytes : other;
    if (src.byteLength < this.bytes.byteLength) throw new RangeError(`bitmap of ${src.byteLength} bytes OR-ed into one of ${this.bytes.byteLength}`);
    native().bitmapOr(this.bytes, src);
    this.trimTail();
  }

  /** this = ~this (used to turn a received bitmap into a to-send bitmap). */
  invert(): void {
    const w = this.words;
    for (let i = 0; i < w.length; i++) w[i] = ~w[i]! >>> 0;
    this.trimTail();
  }

  /** Number of set bits (native: a sync counts whole blocks). */
  count(): number {
    return native().bitmapCount(this.bytes);
  }

  /** First set page at or after `from`, or -1. */
  next(from: number): number {
    if (from >= this.pages) return -1;
    const w = this.words;
    let i = from >>> 5;
    let v = w[i]! & (0xffffffff << (from & 31));
    while (v === 0) {
      if (++i >= w.length) return -1;
      v = w[i]!;
    }
    const page = (i << 5) + (31 - Math.clz32(v & -v));
    return page < this.pages ? page : -1;
  }

  /** Clears `n` pages from `page` (whole words at a time). */
  clearRange(page: number, n: number): void {
    const w = this.words;
    this.forWords(page, n, (i, mask) => (w[i]! &= ~mask));
  }

  /** f(word index, mask of its bits in [first, first+count)) for each word the range touches. */
  private forWords(first: number, count: number, f: (i: number, mask: number) => void): void {
    let p = first;
    const end = Math.min(first + count, this.pages);
    while (p < end) {
      const bit = p & 31;
      const k = Math.min(32 - bit, end - p);
      f(p >>> 5, k === 32 ? 0xffffffff : ((1 << k) - 1) << bit);
      p += k;
    }
  }

  /** Length of the run of set pages starting at `page`, at most `max`. */
  runLength(page: number, max: number): number {
    const end = Math.min(page + max, this.pages);
    const w = this.words;
    let p = page;
    while (p < end) {
      const bit = p & 31;
      // Trailing ones of the word from `bit`: the first zero of its complement.
      const x = ~(w[p >>> 5]! >>> bit);
      const ones = x === 0 ? 32 : 31 - Math.clz32(x & -x);
      p += ones;
      if (ones < 32 - bit) break;
    }
    return Math.max(0, Math.min(p, end) - page);
  }

  private trimTail(): void {
    const extra = this.words.length * 32 - this.pages;
    if (extra <= 0) return;
    // Zero bits past `pages` in the last words (may span two 32-bit words).
    for (let p = this.pages; p < this.words.length * 32; p++) this.words[p >>> 5]! &= ~(1 << (p & 31));
  }
}
