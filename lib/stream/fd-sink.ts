/**
 * The outgoing savevm stream written straight to a socket fd: the pieces of a
 * StreamWriter through sendmsg, and runs of RAM pages from guest memory
 * without a copy (GuestMemory.sendPageRecords), instead of through the
 * net.Socket's Writable.
 *
 * Why: on the 2G precopy bench the source spent a quarter of its time
 * copying pages into output chunks and more in the Writable's per-write
 * bookkeeping; QEMU's source copies each page once (the kernel's copy).
 *
 * Writes are non-blocking: what the socket does not take is queued (chunks
 * by reference) and sent when an FdPoller says the socket is writable;
 * write() resolves once the queue is empty. Pages go out directly only while
 * nothing is queued (`idle`), and what of them is not sent goes back to the
 * caller's writer, so the stream's order is kept. The sink writes to its own dup of the fd (the
 * poller's), so a socket Node closes meanwhile can never be confused with
 * another file; close() releases it.
 *
 * On a unix socket the pages are spliced (native PageSplicer): the peer
 * reads them from guest memory, so a page is sent without any copy in this
 * process. The engine waits for drained() before it reports `completed`.
 */
import type { Binding, FdPoller, GuestMemory, PageSplicer } from '../native';
import type { PieceSink } from './writer';

export class FdSink implements PieceSink {
  readonly copies = true;
  private readonly poller: FdPoller;
  private readonly fd: number;
  private queue: Uint8Array[] = [];
  private offset = 0; // into queue[0]
  private queued = 0;
  private _written = 0;
  private _error: Error | undefined;
  private closed = false;
  private waiting = false;
  private waiters: Array<() => void> = [];
  /** Where sendPages() copies what the socket did not take. */
  private spill: Buffer;
  private readonly splicer: PageSplicer | undefined;
  /** `written` just after the last bytes sendPages() spliced; -1 before any. */
  private splicedEnd = -1;

  constructor(
    private readonly b: Binding,
    socketFd: number,
    maxPageBytes = (256 << 10) + 4104,
    /** splice: false sends pages with sendmsg; spliceSegmentBytes: the splicer's header ring segments (tests). */
    opts: { splice?: boolean; spliceSegmentBytes?: number } = {},
  ) {
    this.poller = new b.FdPoller(socketFd); // makes the fd O_NONBLOCK, as the splicer needs
    this.fd = this.poller.fd;
    this.spill = Buffer.allocUnsafe(maxPageBytes);
    this.splicer = opts.splice === false ? undefined : trySplicer(b, this.fd, opts.spliceSegmentBytes);
  }

  /** Whether pages go by splice (a unix socket). */
  get splicing(): boolean {
    return this.splicer !== undefined;
  }

  get written(): number {
    return this._written;
  }

  get completed(): number {
    return this._written - this.queued;
  }

  get error(): Error | undefined {
    return this._error;
  }

  /** Nothing queued: the next bytes may go to the socket directly. */
  get idle(): boolean {
    return this.queued === 0 && !this._error && !this.closed;
  }

  /** Bytes sendPages() may be given at most. */
  get maxPageBytes(): number {
    return this.spill.length;
  }

  async write(pieces: readonly Uint8Array[]): Promise<void> {
    this.check();
    for (const p of pieces) {
      if (p.byteLength === 0) continue;
      this.queue.push(p);
      this.queued += p.byteLength;
      this._written += p.byteLength;
    }
    this.send();
    while (this.queued > 0 && !this._error && !this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve));
    this.check();
  }

  /**
   * Up to `pages` pages from `memOffset` as RAM records (in at most
   * `maxBytes`, capped at maxPageBytes), sent straight from guest memory.
   * Returns the pages encoded, their bytes, and the bytes not sent (`rest`, a
   * view valid until the next call) that the caller must send next
   * (StreamWriter.putBytes keeps the order). `before`: bytes the caller holds
   * that must go out first; then only all-ZERO runs are encoded (into rest)
   * and a run with page data returns pages 0, as it does when not idle.
   */
  sendPages(
    mem: GuestMemory, memOffset: number, blockOffset: number, pages: number, maxBytes: number, before: boolean,
  ): { pages: number; bytes: number; rest: Uint8Array } {
    const none = { pages: 0, bytes: 0, rest: this.spill.subarray(0, 0) };
    if (this.queued > 0 || this._error || this.closed) return none;
    let r: { pages: number; bytes: number; sent: number; spliced?: boolean };
    try {
      r = mem.sendPageRecords(this.fd, memOffset, blockOffset, pages, Math.min(maxBytes, this.spill.length), this.spill, !before, this.splicer);
    } catch (err) {
      this.fail(err as Error);
      return none;
    }
    this._written += r.sent;
    if (r.spliced) this.splicedEnd = this._written;
    return { pages: r.pages, bytes: r.bytes, rest: this.spill.subarray(0, r.bytes - r.sent) };
  }

  /**
   * Resolves true once the peer has read every spliced byte (until then it
   * reads those pages from guest memory), at once without splicing; false
   * when `signal` aborts first. The socket's unread count (SIOCOUTQ, never
   * less than the unread bytes) at most the bytes in the socket after the
   * last splice means the reader is past it. Rejects if the sink fails or
   * closes first.
   */
  async drained(signal?: AbortSignal): Promise<boolean> {
    const sp = this.splicer;
    if (!sp || this.splicedEnd < 0) return true;
    for (;;) {
      this.check();
      if (signal?.aborted) return false;
      let unsent: number;
      try {
        unsent = sp.unsent();
      } catch (err) {
        this.fail(err as Error);
        continue;
      }
      if (unsent <= this.completed - this.splicedEnd) return true;
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }

  /** Stops for good; queued bytes are dropped and waiting writes fail. Idempotent. */
  close(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    if (err) this._error ??= err;
    this.splicer?.close();
    this.poller.close();
    this.release();
  }

  private send(): void {
    while (this.queued > 0 && !this._error && !this.closed) {
      let n: number | null;
      try {
        n = this.b.sendPieces(this.fd, this.queue, this.offset);
      } catch (err) {
        this.fail(err as Error);
        return;
      }
      if (n === null) {
        this.waitWritable();
        return;
      }
      this.queued -= n;
      let k = this.offset + n;
      while (this.queue.length > 0 && k >= this.queue[0]!.byteLength) k -= this.queue.shift()!.byteLength;
      this.offset = k;
    }
    if (this.queued === 0) {
      this.offset = 0;
      this.release();
    }
  }

  private waitWritable(): void {
    if (this.waiting || this.closed) return;
    this.waiting = true;
    this.poller.start(2, (status) => {
      if (status < 0) {
        this.fail(new Error(`poll on the migration socket failed (errno ${-status})`));
        return;
      }
      this.send();
      if (this.queued === 0 || this._error) this.stopWaiting();
    });
  }

  private stopWaiting(): void {
    if (!this.waiting) return;
    this.waiting = false;
    if (!this.closed) this.poller.stop();
  }

  private fail(err: Error): void {
    this._error ??= err;
    this.stopWaiting();
    this.release();
  }

  private check(): void {
    if (this._error) throw this._error;
    if (this.closed) throw Object.assign(new Error('migration stream closed'), { code: 'ERR_STREAM_DESTROYED' });
  }

  private release(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const r of ws) r();
  }
}

/**
 * A PageSplicer for a unix stream socket; undefined for any other fd, and
 * when making one fails (no pipe or memory left): pages then go by sendmsg,
 * which works everywhere.
 */
function trySplicer(b: Binding, fd: number, segmentBytes?: number): PageSplicer | undefined {
  try {
    return new b.PageSplicer(fd, segmentBytes);
  } catch {
    return undefined;
  }
}
