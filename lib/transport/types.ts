/**
 * The shapes the migration engine sees. Every transport (tcp, unix, fd, exec, file) is reduced
 * to these: an outgoing channel (source side) and a listener handing out incoming channels
 * (destination side).
 */
import type { Readable, Writable } from 'node:stream';
import type { MigrationAddress } from './address';

export interface TransportOptions {
  /**
   * Resolves a name given to QMP `getfd` to an fd number (fd:NAME). Numeric fds (fd:3) do not
   * go through it. The transport takes ownership of the fd: it is closed when the channel is.
   */
  lookupFd?: (name: string) => number | undefined;
  /**
   * Aborting cancels a connect/listen in progress and afterwards destroys every channel and
   * listener the call produced (one signal can cancel a whole migration).
   */
  signal?: AbortSignal;
  /** Stream buffer size in bytes (socket high-water marks, file read chunks). Default 2 MiB. */
  highWaterMark?: number;
  /** close(): how long to wait for the peer to finish before destroying. Default 10 s. */
  closeTimeoutMs?: number;
}

interface ChannelCommon {
  /** The address this channel came from (for a listener: the bound address). */
  readonly address: MigrationAddress;
  /**
   * Graceful end of our sending side, resolved once everything we wrote has been handed on:
   * a socket flushed to the kernel, a file written and closed, an exec child exited with
   * status 0 (non-zero status or a signal rejects with ERR_MIGRATION_TRANSPORT).
   * For an incoming channel it ends the return path (if any) and, for exec, waits for the child.
   */
  finish(): Promise<void>;
  /**
   * Graceful close: finish() (errors ignored), wait up to closeTimeoutMs for the peer to end its
   * side (draining unread input), then release everything. Never rejects. Idempotent.
   */
  close(): Promise<void>;
  /**
   * Abort now. TCP sends a reset (the peer sees ECONNRESET rather than a clean EOF); an exec
   * child gets SIGTERM, then SIGKILL after 2 s. No 'error' event is emitted on our own streams.
   */
  destroy(err?: Error): void;
  /** Resolves (never rejects) once the fd/socket/child is fully released. */
  readonly onceClosed: Promise<void>;
  /** The first error seen on this channel's streams or process, if any. */
  readonly error: Error | undefined;
  /** Human-readable: the URI, plus the peer for accepted sockets. */
  describe(): string;
}

export interface OutgoingChannel extends ChannelCommon {
  /**
   * Where the savevm stream is written, with backpressure (write() false -> wait 'drain').
   * A net.Socket (a Duplex) for tcp, unix and socket fds; a plain Writable for exec, file, pipes.
   */
  readonly stream: Writable;
  /** The destination's return path: for sockets the same net.Socket as `stream`. */
  readonly returnPath?: Readable;
  /**
   * For a tcp/unix/socket-fd connection nothing has been written to yet: the
   * socket's fd, for a writer that sends natively (lib/stream/fd-sink). The
   * caller must then not write to `stream` itself. Undefined otherwise.
   */
  writeFd?(): number | undefined;
}

export interface IncomingChannel extends ChannelCommon {
  /** Where the savevm stream is read from. A net.Socket for tcp, unix and socket fds. */
  readonly stream: Readable;
  /** For sockets the same net.Socket as `stream`; absent for exec, file and pipes. */
  readonly returnPath?: Writable;
  /**
   * For an accepted tcp/unix connection that nothing has read yet: the
   * socket's fd, for a reader that reads it natively (lib/stream/fd-source).
   * The caller then must not read `stream` until it has stopped reading the
   * fd. Undefined when unavailable (read `stream` instead).
   */
  readFd?(): number | undefined;
}

export interface IncomingListener {
  /** The address actually bound: a tcp port 0 is replaced by the port the kernel picked. */
  readonly address: MigrationAddress;
  /**
   * The main channel: the first connection (or, for fd/exec/file, the opened source).
   * Memoised: every call returns the same promise.
   */
  accept(): Promise<IncomingChannel>;
  /**
   * The next connection after the main one (postcopy preempt, recovery, multifd), in arrival
   * order. Rejects for fd/exec/file, which carry a single channel, and once the listener is closed.
   */
  nextConnection(): Promise<IncomingChannel>;
  /** True for tcp/unix listeners (they can accept more connections). */
  readonly multiChannel: boolean;
  /**
   * Stop listening (and unlink a unix socket file). Channels already handed out stay open;
   * connections queued but not yet handed out are destroyed; waiting accepts reject.
   */
  close(): Promise<void>;
  describe(): string;
}
