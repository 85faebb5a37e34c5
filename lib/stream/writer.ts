/**
 * Encoder for the savevm stream, and a backpressure-aware sink for it.
 *
 * StreamWriter appends big-endian fields into large preallocated chunks
 * (1 MiB by default) and keeps an ordered list of finished pieces (an iovec).
 * Page payloads can be appended by reference (`putRef`) so guest memory is
 * written straight from its own view, never copied into the output buffer:
 * 1 GiB of pages costs one copy (the kernel's), not two. The caller owns the
 * timing of referenced memory: a referenced page must not change until the
 * pieces are written (or the change must be caught by dirty tracking).
 *
 * Errors latch: after the first error (bad argument, sink failure) every put
 * is a no-op and flush()/take() report that error, so page loops need not
 * check each put.
 *
 * Chunk recycling: flush() through a sink whose Writable copies what it is
 * given (sockets, pipes, files) hands full chunks back to a small free list
 * once the Writable has completed the writes that carried their bytes, so a
 * long migration reuses a few chunks instead of leaving a trail of buffers
 * for the garbage collector (the resident set stays flat). Completion is
 * read from the Writable's own accounting (bytes accepted minus
 * writableLength), not from write callbacks: those arrive on process.nextTick
 * and a sender whose awaits all resolve at once would not see them until it
 * yields. Chunks handed out by take() directly are never reused.
 *
 * StreamSink wraps a Node Writable: writes a list of pieces under cork/uncork
 * (one writev on sockets), awaits 'drain' when write() returns false (or,
 * with `maxQueued`, only while more than that is queued in user space), and
 * is released by 'close'/'error' too so a dead peer never hangs the sender.
 */
import fs from 'node:fs';
import net from 'node:net';
import type { Writable } from 'node:stream';
import {
  MAX_IDSTR_LEN,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  SectionType,
  COMMANDS,
  lookupSpec,
} from './constants';
import { StreamWriteError } from './errors';

/** Where flush() sends pieces: StreamSink (a Node Writable) or FdSink (a socket fd). */
export interface PieceSink {
  /** Writes the pieces in order; resolves when the sink can take more. */
  write(pieces: readonly Uint8Array[]): Promise<void>;
  /** The sink is done with a piece once `completed` has passed it (so its memory may be reused). */
  readonly copies: boolean;
  /** Bytes accepted so far. */
  readonly written: number;
  /** Bytes handed on (to the kernel) so far. */
  readonly completed: number;
}

export interface WriterOptions {
  /** Size of each output chunk (default 1 MiB). */
  chunkSize?: number;
  /** putRef() copies payloads shorter than this instead of referencing them (default 512). */
  minRefSize?: number;
  /** Optional sink for flush(). */
  sink?: PieceSink;
  /** Most free chunks kept for reuse (default 4). */
  maxFreeChunks?: number;
}

/** Machine configuration sent right after the header (QEMU_VM_CONFIGURATION). */
export interface ConfigurationSection {
  /** Machine type name, e.g. 'none' or 'pc-i440fx-7.2'. */
  machine: string;
  /** configuration/target-page-bits subsection (not sent on x86). */
  targetPageBits?: number;
  /** configuration/capabilities subsection: validated capability names. */
  capabilities?: string[];
  /** configuration/uuid subsection: 16 bytes. */
  uuid?: Uint8Array;
}

export const CONFIG_SUBSECTION = {
  TARGET_PAGE_BITS: 'configuration/target-page-bits',
  CAPABILITIES: 'configuration/capabilities',
  UUID: 'configuration/uuid',
} as const;

const TWO32 = 0x1_0000_0000;

export class StreamWriter {
  private readonly chunkSize: number;
  private readonly minRefSize: number;
  private chunk: Buffer;
  private pos = 0;
  private segStart = 0;
  private pieces: Uint8Array[] = [];
  private piecesBytes = 0;
  private _total = 0;
  private _error: Error | undefined;
  /** Full chunks whose last bytes are in `pieces` (reusable once those are written). */
  private retired: Buffer[] = [];
  /** Retired chunks flushed through `recycleSink`, reusable once it completed `end` bytes. */
  private pending: { end: number; chunks: Buffer[] }[] = [];
  private recycleSink: PieceSink | undefined;
  /** Chunks free for reuse (their bytes have been written out). */
  private readonly free: Buffer[] = [];
  private readonly maxFree: number;
  private _chunksAllocated = 1;
  sink: PieceSink | undefined;

  constructor(opts: WriterOptions = {}) {
    this.chunkSize = opts.chunkSize ?? 1 << 20;
    this.minRefSize = opts.minRefSize ?? 512;
    this.maxFree = opts.maxFreeChunks ?? 4;
    this.chunk = Buffer.allocUnsafe(this.chunkSize);
    this.sink = opts.sink;
  }

  /** The first error, if any; once set, puts are ignored. */
  get error(): Error | undefined {
    return this._error;
  }

  /** Latches `err` unless an error is already latched. */
  setError(err: Error): void {
    if (!this._error) this._error = err;
  }

  /** Bytes encoded and not yet taken. */
  get pendingBytes(): number {
    return this.piecesBytes + (this.pos - this.segStart);
  }

  /** Output chunks allocated so far (the rest were reused). */
  get chunksAllocated(): number {
    return this._chunksAllocated;
  }

  /** Bytes encoded since construction (QEMU's qemu_file_transferred()). */
  get totalBytes(): number {
    return this._total;
  }

  // ---- primitive puts ----

  put8(v: number): void {
    if (this._error) return;
    this.ensure(1);
    this.chunk[this.pos++] = v & 0xff;
    this._total += 1;
  }

  put16(v: number): void {
    if (this._error) return;
    this.ensure(2);
    const c = this.chunk;
    const p = this.pos;
    c[p] = (v >>> 8) & 0xff;
    c[p + 1] = v & 0xff;
    this.pos = p + 2;
    this._total += 2;
  }

  put32(v: number): void {
    if (this._error) return;
    this.ensure(4);
    const c = this.chunk;
    const p = this.pos;
    c[p] = (v >>> 24) & 0xff;
    c[p + 1] = (v >>> 16) & 0xff;
    c[p + 2] = (v >>> 8) & 0xff;
    c[p + 3] = v & 0xff;
    this.pos = p + 4;
    this._total += 4;
  }

  /** be64 from a bigint (any 64-bit pattern) or a non-negative safe integer. */
  put64(v: bigint | number): void {
    if (this._error) return;
    let hi: number;
    let lo: number;
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v) || v < 0) {
        this.setError(new StreamWriteError(`put64: ${v} is not a non-negative safe integer`, 'ERR_INVALID_ARG_VALUE'));
        return;
      }
      hi = Math.floor(v / TWO32);
      lo = v >>> 0;
    } else {
      const u = BigInt.asUintN(64, v);
      hi = Number(u >> 32n);
      lo = Number(u & 0xffffffffn);
    }
    this.put32(hi);
    this.put32(lo);
  }

  /** Copies `data` into the output. */
  putBytes(data: Uint8Array): void {
    if (this._error) return;
    let off = 0;
    const n = data.byteLength;
    while (off < n) {
      if (this.pos === this.chunk.length) this.newChunk();
      const k = Math.min(n - off, this.chunk.length - this.pos);
      this.chunk.set(off === 0 && k === n ? data : data.subarray(off, off + k), this.pos);
      this.pos += k;
      off += k;
    }
    this._total += n;
  }

  /**
   * Appends `data` by reference (zero copy): the view goes into the piece
   * list as is. Short payloads are copied (a piece per tiny write costs more
   * than the copy).
   */
  putRef(data: Uint8Array): void {
    if (this._error) return;
    const n = data.byteLength;
    if (n < this.minRefSize) {
      this.putBytes(data);
      return;
    }
    this.sealSegment();
    this.pieces.push(data);
    this.piecesBytes += n;
    this._total += n;
  }

  /**
   * Reserves `n` contiguous bytes (n <= chunk size) for the caller to fill
   * right away, before any other put: returns the buffer and the index of
   * the first reserved byte. For tight encoders of many small records.
   */
  /** The most reserve() may ask for. */
  get maxReserve(): number {
    return this.chunkSize;
  }

  /** Bytes reserve() can take without starting a new chunk. */
  get room(): number {
    return this.chunk.length - this.pos;
  }

  /** Gives back the last `n` bytes of the latest reserve() (the encoder needed fewer). */
  unreserve(n: number): void {
    if (this._error) return;
    if (n < 0 || n > this.pos - this.segStart) throw new RangeError(`unreserve(${n}) beyond the last reservation`);
    this.pos -= n;
    this._total -= n;
  }

  reserve(n: number): { buf: Buffer; at: number } {
    if (this._error || n > this.chunkSize) {
      if (!this._error) this.setError(new StreamWriteError(`reserve(${n}) exceeds the chunk size ${this.chunkSize}`, 'ERR_INVALID_ARG_VALUE'));
      return { buf: Buffer.allocUnsafe(n), at: 0 }; // scratch: the writer is failed anyway
    }
    this.ensure(n);
    const at = this.pos;
    this.pos += n;
    this._total += n;
    return { buf: this.chunk, at };
  }

  /** u8 length + bytes (idstr, block names); names over 255 bytes latch an error. */
  putCountedString(s: string): void {
    const b = Buffer.from(s, 'latin1');
    if (b.length > MAX_IDSTR_LEN) {
      this.setError(new StreamWriteError(`string '${s.slice(0, 40)}...' longer than ${MAX_IDSTR_LEN} bytes`, 'ERR_INVALID_ARG_VALUE'));
      return;
    }
    this.put8(b.length);
    this.putBytes(b);
  }

  // ---- stream framing ----

  /** File header: magic, version 3. */
  header(): void {
    this.put32(QEMU_VM_FILE_MAGIC);
    this.put32(QEMU_VM_FILE_VERSION);
  }

  /** QEMU_VM_CONFIGURATION: be32 name length, name, optional subsections (QEMU's order). */
  configuration(cfg: ConfigurationSection): void {
    const name = Buffer.from(cfg.machine, 'latin1');
    this.put8(SectionType.CONFIGURATION);
    this.put32(name.length);
    this.putBytes(name);
    if (cfg.targetPageBits !== undefined) {
      this.subsectionHeader(CONFIG_SUBSECTION.TARGET_PAGE_BITS, 1);
      this.put32(cfg.targetPageBits);
    }
    if (cfg.capabilities && cfg.capabilities.length > 0) {
      this.subsectionHeader(CONFIG_SUBSECTION.CAPABILITIES, 1);
      this.put32(cfg.capabilities.length);
      for (const c of cfg.capabilities) this.putCountedString(c);
    }
    if (cfg.uuid) {
      if (cfg.uuid.byteLength !== 16) {
        this.setError(new StreamWriteError('configuration uuid must be 16 bytes', 'ERR_INVALID_ARG_VALUE'));
        return;
      }
      this.subsectionHeader(CONFIG_SUBSECTION.UUID, 1);
      this.putBytes(cfg.uuid);
    }
  }

  /** vmstate subsection framing: 0x05, counted name, be32 version. */
  subsectionHeader(name: string, version: number): void {
    this.put8(SectionType.SUBSECTION);
    this.putCountedString(name);
    this.put32(version);
  }

  /** START or FULL section header. */
  sectionStart(type: number, sectionId: number, idstr: string, instanceId: number, version: number): void {
    if (type !== SectionType.START && type !== SectionType.FULL) {
      this.setError(new StreamWriteError(`sectionStart: type ${type} is not START or FULL`, 'ERR_INVALID_ARG_VALUE'));
      return;
    }
    this.put8(type);
    this.put32(sectionId);
    this.putCountedString(idstr);
    this.put32(instanceId);
    this.put32(version);
  }

  /** PART or END section header. */
  sectionPart(type: number, sectionId: number): void {
    if (type !== SectionType.PART && type !== SectionType.END) {
      this.setError(new StreamWriteError(`sectionPart: type ${type} is not PART or END`, 'ERR_INVALID_ARG_VALUE'));
      return;
    }
    this.put8(type);
    this.put32(sectionId);
  }

  /** Section footer: 0x7e + the section id it closes. */
  footer(sectionId: number): void {
    this.put8(SectionType.FOOTER);
    this.put32(sectionId);
  }

  /**
   * QEMU_VM_COMMAND: be16 cmd, be16 len, payload. Fixed-length commands must
   * carry exactly their table length. PACKAGED's embedded stream follows the
   * command separately (put it with putBytes/putRef).
   */
  command(cmd: number, payload: Uint8Array = new Uint8Array(0)): void {
    const spec = lookupSpec(COMMANDS, cmd);
    if (!spec || cmd === 0) {
      this.setError(new StreamWriteError(`unknown migration command ${cmd}`, 'ERR_INVALID_ARG_VALUE'));
      return;
    }
    if ((spec.len >= 0 && payload.byteLength !== spec.len) || payload.byteLength > 0xffff) {
      this.setError(
        new StreamWriteError(`command ${spec.name}: payload of ${payload.byteLength} bytes, expected ${spec.len}`, 'ERR_INVALID_ARG_VALUE'),
      );
      return;
    }
    this.put8(SectionType.COMMAND);
    this.put16(cmd);
    this.put16(payload.byteLength);
    this.putBytes(payload);
  }

  /** End of the device/RAM state (QEMU_VM_EOF). */
  eof(): void {
    this.put8(SectionType.EOF);
  }

  /** VM description trailer: 0x06, be32 length, JSON text. */
  vmdescription(json: string | Uint8Array): void {
    const b = typeof json === 'string' ? Buffer.from(json, 'utf8') : json;
    this.put8(SectionType.VMDESCRIPTION);
    this.put32(b.byteLength);
    this.putBytes(b);
  }

  // ---- output ----

  /**
   * Hands out everything encoded so far as an ordered list of pieces and
   * starts a new list. Pieces are never reused by the writer. Throws the
   * latched error.
   */
  take(): Uint8Array[] {
    const out = this.takePieces();
    this.retired = []; // the caller may keep the pieces: never reuse their chunks
    return out;
  }

  private takePieces(): Uint8Array[] {
    if (this._error) throw this._error;
    this.sealSegment();
    const out = this.pieces;
    this.pieces = [];
    this.piecesBytes = 0;
    // The rest of the current chunk stays ours; a fresh chunk avoids handing
    // out memory we would later overwrite.
    if (this.pos > this.chunk.length - 64) this.newChunk();
    return out;
  }

  /** Everything encoded so far as one Buffer (tests, small streams). */
  toBuffer(): Buffer {
    return Buffer.concat(this.take());
  }

  /** Writes all pending pieces to the sink, honouring backpressure. */
  async flush(sink: PieceSink | undefined = this.sink): Promise<void> {
    if (!sink) throw new StreamWriteError('StreamWriter.flush: no sink', 'ERR_INVALID_ARG_VALUE');
    const pieces = this.takePieces();
    const retired = this.retired;
    this.retired = [];
    if (pieces.length === 0) return;
    try {
      const p = sink.write(pieces);
      // Reuse the retired chunks once the Writable completed every byte up to
      // here (never for a Writable that only queues references, like a PassThrough).
      if (sink.copies && retired.length > 0) {
        if (this.recycleSink !== sink) this.pending = [];
        this.recycleSink = sink;
        this.pending.push({ end: sink.written, chunks: retired });
      }
      await p;
    } catch (err) {
      this.setError(err as Error);
      throw err;
    }
  }

  /**
   * Starts flush() without waiting for it: the sink takes the pieces now
   * (an FdSink sends what the socket accepts at once). An error latches as
   * in flush().
   */
  flushNow(sink: PieceSink | undefined = this.sink): void {
    if (this.pendingBytes === 0) return;
    this.flush(sink).catch(() => undefined);
  }

  /** Counts `n` bytes of the stream that went out around the writer (FdSink.sendPages). */
  countSent(n: number): void {
    this._total += n;
  }

  // ---- internals ----

  private ensure(n: number): void {
    if (this.pos + n > this.chunk.length) this.newChunk();
  }

  private sealSegment(): void {
    if (this.pos > this.segStart) {
      this.pieces.push(this.chunk.subarray(this.segStart, this.pos));
      this.piecesBytes += this.pos - this.segStart;
      this.segStart = this.pos;
    }
  }

  private newChunk(): void {
    this.sealSegment();
    this.retired.push(this.chunk);
    if (this.free.length === 0) this.reclaim();
    const reused = this.free.pop();
    if (!reused) this._chunksAllocated++;
    this.chunk = reused ?? Buffer.allocUnsafe(this.chunkSize);
    this.pos = 0;
    this.segStart = 0;
  }

  /** Moves chunks whose bytes the sink has completed to the free list. */
  private reclaim(): void {
    const sink = this.recycleSink;
    if (!sink || this.pending.length === 0) return;
    const completed = sink.completed;
    while (this.pending.length > 0 && this.pending[0]!.end <= completed) {
      for (const c of this.pending.shift()!.chunks) if (this.free.length < this.maxFree) this.free.push(c);
    }
  }
}

export interface SinkOptions {
  /**
   * Resolve write() at once while at most this many bytes wait in the
   * Writable's user-space queue (Node's writableLength), and otherwise wait
   * until a write completes below it. Lets the encoder prepare the next batch
   * while the previous ones are still going out. Default: wait for 'drain'
   * whenever write() returns false (the Writable's own highWaterMark).
   */
  maxQueued?: number;
}

/**
 * A Node Writable seen as an async sink of piece lists, with backpressure.
 * The first error (from 'error' or a closed stream) latches and every later
 * write rejects with it.
 */
export class StreamSink implements PieceSink {
  private readonly w: Writable;
  private _error: Error | undefined;
  private closed = false;
  private waiters: Array<() => void> = [];
  private _written = 0;
  private readonly maxQueued: number | undefined;
  /**
   * Whether the Writable is done with a piece once its write callback ran
   * (sockets and files copy into the kernel): only then may a writer reuse
   * the memory of written pieces.
   */
  readonly copies: boolean;

  constructor(w: Writable, opts: SinkOptions = {}) {
    this.w = w;
    this.maxQueued = opts.maxQueued;
    this.copies = w instanceof net.Socket || w instanceof fs.WriteStream;
    w.on('drain', () => this.release());
    w.on('error', (err: Error) => {
      if (!this._error) this._error = err;
      this.release();
    });
    w.on('close', () => {
      this.closed = true;
      this.release();
    });
  }

  get error(): Error | undefined {
    return this._error;
  }

  /** Bytes accepted by the Writable so far. */
  get written(): number {
    return this._written;
  }

  /**
   * Bytes whose write the Writable has completed (accepted minus still
   * queued): for a socket or file, bytes the kernel has taken. The write()
   * call counts its pieces as accepted before it first awaits.
   */
  get completed(): number {
    return this._written - this.w.writableLength;
  }

  /** Writes the pieces in order (corked: sockets get one writev); resolves when the Writable can take more. */
  async write(pieces: readonly Uint8Array[]): Promise<void> {
    this.check();
    const w = this.w;
    let ok = true;
    if (pieces.length > 1) w.cork();
    const last = pieces.length - 1;
    for (let i = 0; i <= last; i++) {
      const p = pieces[i]!;
      ok = i === last && this.maxQueued !== undefined ? w.write(p, () => this.release()) : w.write(p);
      this._written += p.byteLength;
    }
    if (pieces.length > 1) w.uncork();
    if (this.maxQueued !== undefined) {
      while (w.writableLength > this.maxQueued && !this._error && !this.closed && !w.destroyed) await this.waitDrain();
    } else if (!ok || w.writableNeedDrain) {
      await this.waitDrain();
    }
    this.check();
  }


  /** Ends the Writable and waits until everything is flushed ('finish'). */
  async end(): Promise<void> {
    this.check();
    const w = this.w;
    await new Promise<void>((resolve, reject) => {
      const onFinish = () => {
        cleanup();
        resolve();
      };
      const onError = (err: Error) => {
        cleanup();
        reject(err);
      };
      const onClose = () => {
        cleanup();
        if (w.writableFinished) resolve();
        else reject(this._error ?? closedError());
      };
      const cleanup = () => {
        w.off('finish', onFinish);
        w.off('error', onError);
        w.off('close', onClose);
      };
      w.on('finish', onFinish);
      w.on('error', onError);
      w.on('close', onClose);
      w.end();
    });
  }

  private check(): void {
    if (this._error) throw this._error;
    if (this.closed || this.w.destroyed) throw closedError();
  }

  private waitDrain(): Promise<void> {
    if (this._error || this.closed) return Promise.resolve();
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  private release(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const r of ws) r();
  }
}

function closedError(): Error {
  return new StreamWriteError('migration stream closed', 'ERR_STREAM_DESTROYED');
}
