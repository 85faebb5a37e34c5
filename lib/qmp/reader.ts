/**
 * Reading a QMP connection, with or without file descriptors.
 *
 * Node cannot receive SCM_RIGHTS fds, so on a unix socket the server reads
 * through the native addon instead: the net.Socket is created paused
 * (`pauseOnConnect`) and never reads itself; an FdPoller (uv_poll on a dup of
 * the socket's fd) signals readability and recvWithFds (recvmsg with
 * MSG_CMSG_CLOEXEC) returns the bytes plus any fds. Writes still go through
 * socket.write. A tcp socket (or a unix one when the addon is unavailable)
 * uses the socket's own 'data' events and never carries fds.
 *
 * The chunk passed to onData is only valid during the call (the native reader
 * reuses its buffer). Received fds become the caller's to close.
 */
import type net from 'node:net';
import { native, type Binding, type FdPoller } from '../native';
import { socketFd } from '../util/socket-fd';

export interface ReaderCallbacks {
  onData(chunk: Buffer, fds: number[]): void;
  /** The peer closed its side (or the connection broke: `err`). Called once. */
  onEnd(err?: Error): void;
}

export interface ConnectionReader {
  /** True when this reader can receive fds. */
  readonly fdCapable: boolean;
  /** Stop delivering data until resume() (backpressure). */
  pause(): void;
  resume(): void;
  /** Stop for good; releases the poller. Does not destroy the socket. */
  close(): void;
}

let binding: Binding | null | undefined;

/** The native addon when it offers fd passing, else null (probed once). */
export function fdBinding(): Binding | null {
  if (binding === undefined) {
    try {
      const b = native();
      binding =
        typeof b.FdPoller === 'function' && typeof b.recvWithFds === 'function' && typeof b.sendWithFds === 'function' ? b : null;
    } catch {
      binding = null;
    }
  }
  return binding;
}

/** Reads through the socket's own stream (no fds). Works for paused-on-connect sockets too. */
class StreamReader implements ConnectionReader {
  readonly fdCapable = false;
  private ended = false;
  constructor(
    private readonly socket: net.Socket,
    private readonly cb: ReaderCallbacks,
  ) {
    socket.on('data', (chunk: Buffer) => {
      if (!this.ended) cb.onData(chunk, []);
    });
    socket.on('end', () => this.end());
    socket.on('close', () => this.end());
    socket.on('error', (err) => this.end(err));
    socket.resume();
  }
  private end(err?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.cb.onEnd(err);
  }
  pause(): void {
    this.socket.pause();
  }
  resume(): void {
    if (!this.ended) this.socket.resume();
  }
  close(): void {
    this.ended = true;
    this.socket.pause();
  }
}

/** How many recvmsg calls one readiness callback may make (fairness between clients). */
const READS_PER_WAKEUP = 16;
const READ_BUFFER = 64 * 1024;

class FdReader implements ConnectionReader {
  readonly fdCapable = true;
  private readonly poller: FdPoller;
  private readonly buf = Buffer.allocUnsafe(READ_BUFFER);
  private readonly fd: number;
  private paused = false;
  private done = false;

  constructor(
    private readonly b: Binding,
    socket: net.Socket,
    private readonly cb: ReaderCallbacks,
  ) {
    this.fd = socketFd(socket);
    this.poller = new b.FdPoller(this.fd);
    // The socket never reads, but errors/close from writes still arrive here.
    socket.on('error', (err) => this.end(err));
    socket.on('close', () => this.end());
    this.start();
  }

  private start(): void {
    this.poller.start(this.b.constants.UV_READABLE ?? 1, (status) => {
      if (this.done) return;
      if (status < 0) {
        this.end(Object.assign(new Error(`poll failed (errno ${status})`), { errno: status }));
        return;
      }
      this.drain();
    });
  }

  private drain(): void {
    for (let n = 0; n < READS_PER_WAKEUP && !this.done && !this.paused; n++) {
      let r: ReturnType<Binding['recvWithFds']>;
      try {
        r = this.b.recvWithFds(this.fd, this.buf);
      } catch (e) {
        this.end(e as Error);
        return;
      }
      if (r === null) return; // EAGAIN: wait for the next readiness callback
      if (r.bytes === 0 && r.fds.length === 0) {
        this.end();
        return;
      }
      this.cb.onData(this.buf.subarray(0, r.bytes), r.fds);
    }
  }

  private end(err?: Error): void {
    if (this.done) return;
    this.done = true;
    this.poller.close();
    this.cb.onEnd(err);
  }

  pause(): void {
    if (this.paused || this.done) return;
    this.paused = true;
    this.poller.stop();
  }
  resume(): void {
    if (!this.paused || this.done) return;
    this.paused = false;
    this.start();
  }
  close(): void {
    if (this.done) return;
    this.done = true;
    this.poller.close();
  }
}

/**
 * Starts reading `socket`. `wantFds`: use the native fd-receiving path when
 * the addon provides it (the socket must have been accepted with
 * pauseOnConnect and must be a unix socket).
 */
export function startReader(socket: net.Socket, wantFds: boolean, cb: ReaderCallbacks): ConnectionReader {
  const b = wantFds ? fdBinding() : null;
  if (b && socketFd(socket) >= 0) return new FdReader(b, socket, cb);
  return new StreamReader(socket, cb);
}
