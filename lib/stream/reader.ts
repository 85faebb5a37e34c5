/**
 * Pull parser over incoming chunks of a migration stream.
 *
 * Chunks are queued as they arrive (from a Node Readable or pushed by hand);
 * the parser pulls big-endian integers and byte runs from them regardless of
 * where the chunk boundaries fall. Two layers:
 *  - synchronous primitives (`peek*`, `skip`, `copyTo`, `try*`) for hot loops
 *    that first check `buffered` and then parse without a Promise per field;
 *  - async reads (`u8()`, `be32()`, `bytes(n)`, `readInto(view)`, ...) that
 *    wait for data and fail with a StreamError naming the byte position and
 *    what was being read when the stream ends early.
 *
 * Invariants: `position` is the absolute number of bytes consumed (plus the
 * base given at construction); `buffered` is the number of bytes queued and
 * not yet consumed; only one consumer awaits at a time (a parser is
 * sequential by nature).
 *
 * Backpressure: an attached Readable is paused while more than
 * `highWaterMark` bytes are queued and resumed when the queue drops under
 * `lowWaterMark`, or whenever a read waits for more than is queued.
 */
import type { Readable } from 'node:stream';
import { StreamError } from './errors';

export interface ReaderOptions {
  /** Pause the source above this many queued bytes (default 16 MiB). */
  highWaterMark?: number;
  /** Resume the source below this many queued bytes (default highWaterMark / 4). */
  lowWaterMark?: number;
  /** Absolute position of the first byte (for embedded streams). */
  basePosition?: number;
}

const EMPTY = Buffer.alloc(0);
const TWO32 = 0x1_0000_0000;
/** Largest single contiguous read `need()` may buffer; bigger reads stream through. */
const MAX_NEED = 1 << 20;

function asBuffer(chunk: Uint8Array): Buffer {
  return Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

export class StreamReader {
  private queue: Buffer[] = [];
  private qi = 0; // index of the current chunk in queue
  private cur: Buffer = EMPTY;
  private curPos = 0;
  private _buffered = 0;
  private consumedBase: number;
  private consumed = 0;
  private ended = false;
  private endError: Error | undefined;
  private waiter: (() => void) | undefined;
  private source: Readable | undefined;
  private sourcePaused = false;
  private detachSource: (() => void) | undefined;
  private readonly highWater: number;
  private readonly lowWater: number;
  private recycle: ((chunk: Buffer) => void) | undefined;

  constructor(opts: ReaderOptions = {}) {
    this.highWater = opts.highWaterMark ?? 16 << 20;
    this.lowWater = opts.lowWaterMark ?? Math.floor(this.highWater / 4);
    this.consumedBase = opts.basePosition ?? 0;
  }

  /** A reader over bytes already in memory (ended: reading past them is truncation). */
  static fromBuffer(buf: Uint8Array, basePosition = 0): StreamReader {
    const r = new StreamReader({ basePosition });
    r.push(buf);
    r.end();
    return r;
  }

  /** A reader fed by a Node Readable (file stream, socket, child stdout). */
  static fromReadable(source: Readable, opts: ReaderOptions = {}): StreamReader {
    const r = new StreamReader(opts);
    r.attach(source);
    return r;
  }

  /** Feeds from `source` via 'data' events, pausing it for backpressure. */
  attach(source: Readable): void {
    if (this.source) throw new Error('StreamReader already has a source');
    this.source = source;
    const onData = (chunk: Buffer | string) => {
      this.push(typeof chunk === 'string' ? Buffer.from(chunk, 'latin1') : chunk);
      if (this._buffered > this.highWater && !this.sourcePaused) {
        this.sourcePaused = true;
        source.pause();
      }
    };
    const onEnd = () => this.end();
    const onError = (err: Error) => this.end(err);
    const onClose = () => this.end();
    source.on('data', onData);
    source.on('end', onEnd);
    source.on('error', onError);
    source.on('close', onClose);
    this.detachSource = () => {
      source.off('data', onData);
      source.off('end', onEnd);
      source.off('error', onError);
      source.off('close', onClose);
    };
  }

  /**
   * Stops listening to the attached source and returns any bytes queued but
   * not consumed (e.g. to hand the socket over to another parser).
   */
  detach(): Buffer {
    this.detachSource?.();
    this.detachSource = undefined;
    if (this.source && this.sourcePaused) this.source.resume();
    this.source = undefined;
    const rest = this._buffered > 0 ? this.takeBuffered() : EMPTY;
    return rest;
  }

  /**
   * Hands every pushed chunk back to `fn` once it is consumed, so a source can
   * reuse its buffers. Views returned by peek()/peekView()/currentView() are
   * valid only until the reader moves past their chunk.
   */
  recycleChunks(fn: (chunk: Buffer) => void): void {
    this.recycle = fn;
  }

  /** Queues a chunk (not copied: the caller must not modify it afterwards). */
  push(chunk: Uint8Array): void {
    if (this.ended || chunk.byteLength === 0) return;
    const b = asBuffer(chunk);
    if (this._buffered === 0) {
      this.queue.length = 0;
      this.qi = 0;
      this.queue.push(b);
      this.cur = b;
      this.curPos = 0;
    } else {
      this.queue.push(b);
    }
    this._buffered += b.length;
    this.wake();
  }

  /** No more data will come; with `err`, waiting reads fail with it. */
  end(err?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.endError = err;
    this.detachSource?.();
    this.detachSource = undefined;
    this.wake();
  }

  /** Absolute position of the next byte to be consumed. */
  get position(): number {
    return this.consumedBase + this.consumed;
  }

  /** Bytes queued and not yet consumed. */
  get buffered(): number {
    return this._buffered;
  }

  /** True once the source has ended (queued bytes may remain). */
  get sourceEnded(): boolean {
    return this.ended;
  }

  /** A StreamError at `pos` (default: the current position). */
  error(message: string, pos = this.position): StreamError {
    return new StreamError(`${message} at byte ${pos}`, pos);
  }

  // ---- synchronous primitives: caller guarantees `off + size <= buffered` ----

  /** Byte at `off` past the current position. */
  peekU8(off = 0): number {
    const p = this.curPos + off;
    if (p < this.cur.length) return this.cur[p]!;
    let rest = p - this.cur.length;
    for (let i = this.qi + 1; i < this.queue.length; i++) {
      const c = this.queue[i]!;
      if (rest < c.length) return c[rest]!;
      rest -= c.length;
    }
    throw new RangeError(`peekU8(${off}) beyond ${this._buffered} buffered bytes`);
  }

  peekBe16(off = 0): number {
    const c = this.cur;
    const p = this.curPos + off;
    if (p + 2 <= c.length) return (c[p]! << 8) | c[p + 1]!;
    return (this.peekU8(off) << 8) | this.peekU8(off + 1);
  }

  peekBe32(off = 0): number {
    const c = this.cur;
    const p = this.curPos + off;
    if (p + 4 <= c.length) return ((c[p]! << 24) | (c[p + 1]! << 16) | (c[p + 2]! << 8) | c[p + 3]!) >>> 0;
    return (
      ((this.peekU8(off) << 24) | (this.peekU8(off + 1) << 16) | (this.peekU8(off + 2) << 8) | this.peekU8(off + 3)) >>> 0
    );
  }

  /** High and low 32-bit halves of the be64 at `off`, as a number if it is safe. */
  peekBe64n(off = 0): number {
    const hi = this.peekBe32(off);
    const lo = this.peekBe32(off + 4);
    if (hi >= 0x200000) return Number.NaN; // > 2^53: caller decides (see be64n)
    return hi * TWO32 + lo;
  }

  peekBe64(off = 0): bigint {
    return (BigInt(this.peekBe32(off)) << 32n) | BigInt(this.peekBe32(off + 4));
  }

  /** The unconsumed rest of the current chunk (no copy; empty when nothing is buffered). */
  currentView(): Buffer {
    return this.cur.subarray(this.curPos);
  }

  /** Consumes `n` buffered bytes. */
  skip(n: number): void {
    if (n > this._buffered) throw new RangeError(`skip(${n}) beyond ${this._buffered} buffered bytes`);
    this._buffered -= n;
    this.consumed += n;
    let left = n;
    while (left > 0) {
      const inCur = this.cur.length - this.curPos;
      if (left < inCur) {
        this.curPos += left;
        break;
      }
      left -= inCur;
      this.nextChunk();
    }
    this.maybeResume();
  }

  /** Copies `n` buffered bytes into `target` at `targetOffset` and consumes them. */
  copyTo(target: Uint8Array, n: number, targetOffset = 0): void {
    if (n > this._buffered) throw new RangeError(`copyTo(${n}) beyond ${this._buffered} buffered bytes`);
    let t = targetOffset;
    let left = n;
    while (left > 0) {
      const c = this.cur;
      const k = Math.min(left, c.length - this.curPos);
      if (k === 0) {
        this.nextChunk();
        continue;
      }
      target.set(k === c.length ? c : c.subarray(this.curPos, this.curPos + k), t);
      t += k;
      left -= k;
      this.curPos += k;
      if (this.curPos === c.length) this.nextChunk();
    }
    this._buffered -= n;
    this.consumed += n;
    this.maybeResume();
  }

  /**
   * A view of the next `n` buffered bytes without consuming them: a subarray
   * of the current chunk when contiguous, else a copy. A subarray stays
   * valid unless the source recycles chunks (recycleChunks): then only until
   * the reader moves past the chunk.
   */
  peekView(n: number): Uint8Array {
    const c = this.cur;
    if (this.curPos + n <= c.length) return c.subarray(this.curPos, this.curPos + n);
    const out = Buffer.allocUnsafe(n);
    let t = 0;
    let p = this.curPos;
    for (let i = this.qi; t < n; i++) {
      const src = this.queue[i]!;
      const k = Math.min(n - t, src.length - p);
      src.copy(out, t, p, p + k);
      t += k;
      p = 0;
    }
    return out;
  }

  /** Bytes contiguous in the current chunk (for batch parsers). */
  get contiguous(): number {
    return this.cur.length - this.curPos;
  }

  /** Synchronous u8: -1 when nothing is buffered. */
  tryU8(): number {
    if (this._buffered < 1) return -1;
    const v = this.peekU8(0);
    this.skip(1);
    return v;
  }

  /** Synchronous be32: -1 when fewer than 4 bytes are buffered. */
  tryBe32(): number {
    if (this._buffered < 4) return -1;
    const v = this.peekBe32(0);
    this.skip(4);
    return v;
  }

  // ---- async reads ----

  /**
   * Waits until at least `n` bytes are buffered (n <= 1 MiB), or fails with a
   * truncation StreamError naming `what`.
   */
  async need(n: number, what: string): Promise<void> {
    if (n > MAX_NEED) throw new RangeError(`need(${n}) larger than ${MAX_NEED}`);
    while (this._buffered < n) {
      if (this.ended) throw this.truncated(what);
      await this.waitMore();
    }
  }

  /** Resolves true if the stream ended with nothing left, false once a byte is available. */
  async atEnd(): Promise<boolean> {
    while (this._buffered === 0) {
      if (this.ended) {
        if (this.endError) throw this.endError;
        return true;
      }
      await this.waitMore();
    }
    return false;
  }

  async u8(what = 'u8'): Promise<number> {
    if (this._buffered < 1) await this.need(1, what);
    const v = this.peekU8(0);
    this.skip(1);
    return v;
  }

  async be16(what = 'be16'): Promise<number> {
    if (this._buffered < 2) await this.need(2, what);
    const v = this.peekBe16(0);
    this.skip(2);
    return v;
  }

  async be32(what = 'be32'): Promise<number> {
    if (this._buffered < 4) await this.need(4, what);
    const v = this.peekBe32(0);
    this.skip(4);
    return v;
  }

  async be64(what = 'be64'): Promise<bigint> {
    if (this._buffered < 8) await this.need(8, what);
    const v = this.peekBe64(0);
    this.skip(8);
    return v;
  }

  /** be64 as a number; a value above 2^53 is a StreamError (offsets and lengths only). */
  async be64n(what = 'be64'): Promise<number> {
    if (this._buffered < 8) await this.need(8, what);
    const pos = this.position;
    const v = this.peekBe64n(0);
    if (Number.isNaN(v)) throw this.error(`${what} 0x${this.peekBe64(0).toString(16)} out of range`, pos);
    this.skip(8);
    return v;
  }

  /** Up to `n` bytes without consuming them (fewer only if the stream ends). */
  async peek(n: number): Promise<Uint8Array> {
    while (this._buffered < n && !this.ended) await this.waitMore();
    if (this._buffered === 0 && this.endError) throw this.endError;
    return this.peekView(Math.min(n, this._buffered));
  }

  /** Exactly `n` bytes as a new Buffer (the caller bounds `n` before calling). */
  async bytes(n: number, what = 'bytes'): Promise<Buffer> {
    if (n <= this.contiguous) {
      const out = Buffer.from(this.cur.subarray(this.curPos, this.curPos + n));
      this.skip(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    await this.readInto(out, what);
    return out;
  }

  /** Fills `target` completely from the stream (no intermediate copy). */
  async readInto(target: Uint8Array, what = 'bytes'): Promise<void> {
    const n = target.byteLength;
    let done = 0;
    while (done < n) {
      if (this._buffered === 0) {
        if (this.ended) throw this.truncated(what, n - done);
        await this.waitMore();
        continue;
      }
      const k = Math.min(n - done, this._buffered);
      this.copyTo(target, k, done);
      done += k;
    }
  }

  /** Consumes and discards `n` bytes, streaming (no size limit). */
  async skipBytes(n: number, what = 'bytes'): Promise<void> {
    let left = n;
    while (left > 0) {
      if (this._buffered === 0) {
        if (this.ended) throw this.truncated(what, left);
        await this.waitMore();
        continue;
      }
      const k = Math.min(left, this._buffered);
      this.skip(k);
      left -= k;
    }
  }

  /** A u8-length-prefixed string (idstr, block name). */
  async countedString(what = 'string'): Promise<string> {
    const len = await this.u8(`${what} length`);
    if (this._buffered < len) await this.need(len, what);
    const s = this.peekView(len);
    const str = Buffer.from(s.buffer, s.byteOffset, len).toString('latin1');
    this.skip(len);
    return str;
  }

  // ---- internals ----

  private truncated(what: string, missing?: number): Error {
    if (this.endError) return this.endError;
    const at = this.position + this._buffered;
    const m = missing !== undefined ? ` (${missing} bytes missing)` : '';
    return new StreamError(`stream ended at byte ${at} while reading ${what}${m}`, at);
  }

  private nextChunk(): void {
    if (this.recycle && this.cur !== EMPTY) this.recycle(this.cur);
    this.qi++;
    if (this.qi < this.queue.length) {
      this.cur = this.queue[this.qi]!;
    } else {
      this.queue.length = 0;
      this.qi = 0;
      this.cur = EMPTY;
    }
    this.curPos = 0;
    if (this.qi > 1024) {
      this.queue.splice(0, this.qi);
      this.qi = 0;
    }
  }

  private takeBuffered(): Buffer {
    const parts: Buffer[] = [this.cur.subarray(this.curPos)];
    for (let i = this.qi + 1; i < this.queue.length; i++) parts.push(this.queue[i]!);
    const out = Buffer.concat(parts);
    if (this.recycle) {
      for (let i = this.qi; i < this.queue.length; i++) this.recycle(this.queue[i]!);
    }
    this.consumed += this._buffered;
    this._buffered = 0;
    this.queue.length = 0;
    this.qi = 0;
    this.cur = EMPTY;
    this.curPos = 0;
    return out;
  }

  private wake(): void {
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w();
    }
  }

  private maybeResume(): void {
    if (this.sourcePaused && this._buffered < this.lowWater) this.resumeSource();
  }

  private resumeSource(): void {
    if (this.sourcePaused && this.source) {
      this.sourcePaused = false;
      this.source.resume();
    }
  }

  private waitMore(): Promise<void> {
    if (this.waiter) throw new Error('StreamReader: concurrent reads are not supported');
    this.resumeSource();
    return new Promise<void>((resolve) => {
      this.waiter = resolve;
    });
  }
}
