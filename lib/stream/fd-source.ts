/**
 * Feeds a StreamReader from a socket fd through a fixed pool of reused
 * buffers, instead of the socket's own 'data' events.
 *
 * Why: Node allocates a fresh 64 KiB buffer for every socket read. At
 * gigabytes per second that was a third of the destination's CPU (allocation,
 * zeroing, garbage collection) and 10-15 MiB of resident memory waiting for
 * the collector. Here a read lands in a pooled buffer, the reader hands the
 * buffer back once its bytes are consumed (recycleChunks), and memory is
 * bounded by the pool: when every buffer is queued, polling stops until one
 * comes back (backpressure: the peer's writes then block in the kernel).
 *
 * The net.Socket must not read at the same time (created with
 * pauseOnConnect and never given a 'data' or 'readable' listener before
 * close()). Reads go to a dup of the fd (FdPoller), writes (the return path)
 * still go through the socket.
 */
import type { Binding, FdPoller } from '../native';
import type { StreamReader } from './reader';

export interface FdSourceOptions {
  /** Bytes per buffer (default 256 KiB: more than a unix socket's default send buffer). */
  chunkSize?: number;
  /** Buffers in the pool (default 8: at most 2 MiB read ahead). */
  chunks?: number;
}

export class FdSource {
  private readonly poller: FdPoller;
  private readonly fd: number;
  private readonly free: Buffer[] = [];
  private readonly pool = new Map<ArrayBufferLike, Buffer>();
  private polling = false;
  private done = false;

  constructor(
    private readonly b: Binding,
    fd: number,
    private readonly reader: StreamReader,
    opts: FdSourceOptions = {},
  ) {
    const size = opts.chunkSize ?? 256 << 10;
    for (let i = 0; i < (opts.chunks ?? 8); i++) {
      const buf = Buffer.allocUnsafeSlow(size);
      this.pool.set(buf.buffer, buf);
      this.free.push(buf);
    }
    this.poller = new b.FdPoller(fd);
    this.fd = this.poller.fd;
    reader.recycleChunks((chunk) => this.release(chunk));
    this.poll();
  }

  /**
   * Stops reading for good and ends the reader (with `err`: waiting reads
   * fail with it). The socket can then be read or closed normally; until
   * then the poller's dup keeps the connection open. Idempotent.
   */
  close(err?: Error): void {
    if (this.done) return;
    this.done = true;
    this.polling = false;
    this.poller.close();
    this.reader.end(err);
  }

  private poll(): void {
    if (this.polling || this.done) return;
    this.polling = true;
    this.poller.start(1, (status) => {
      if (status < 0) this.close(new Error(`poll on the migration socket failed (errno ${-status})`));
      else this.readSome();
    });
  }

  private readSome(): void {
    while (!this.done) {
      const buf = this.free.pop();
      if (!buf) {
        // Every buffer is queued in the reader: wait for one to come back.
        this.polling = false;
        this.poller.stop();
        return;
      }
      let n: number | null;
      try {
        n = this.b.readInto(this.fd, buf);
      } catch (err) {
        this.free.push(buf);
        this.close(err as Error); // Node-style: code ECONNRESET, errno, syscall 'read'
        return;
      }
      if (n === null) {
        this.free.push(buf);
        return; // EAGAIN: the next readiness callback continues
      }
      if (n === 0) {
        this.free.push(buf);
        this.close();
        return;
      }
      this.reader.push(buf.subarray(0, n));
    }
  }

  private release(chunk: Buffer): void {
    const buf = this.pool.get(chunk.buffer);
    if (!buf || this.free.includes(buf)) return;
    this.free.push(buf);
    // Not reading here: we are inside the reader's consume path. The poll
    // callback reads on the next loop turn.
    this.poll();
  }
}
