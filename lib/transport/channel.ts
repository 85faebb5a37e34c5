/**
 * Channel objects shared by the transports:
 * - SocketChannel: a connected net.Socket (tcp, unix, socket fds). The socket is both the
 *   stream and the return path; it is half-open capable, so ending the savevm stream (FIN)
 *   leaves the return path readable, as QEMU's shutdown(SHUT_WR)-free protocol expects.
 * - PlainChannel: one-way streams (file, pipe fds, exec children) with optional hooks for a
 *   child process (exit status, kill).
 */
import type net from 'node:net';
import type { Readable, Writable } from 'node:stream';
import { finished } from 'node:stream/promises';

import { socketFd } from '../util/socket-fd';
import type { MigrationAddress } from './address';
import { formatMigrationAddress } from './address';
import { transportError } from './errors';

export const DEFAULT_HIGH_WATER_MARK = 2 * 1024 * 1024;
export const DEFAULT_CLOSE_TIMEOUT_MS = 10_000;

/** Resolves after ms, or when `p` settles; the timer does not keep the process alive. */
export function within(p: Promise<unknown>, ms: number): Promise<void> {
  return new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    t.unref();
    p.then(
      () => (clearTimeout(t), resolve()),
      () => (clearTimeout(t), resolve()),
    );
  });
}

function closedPromise(s: Readable | Writable): Promise<void> {
  if (s.destroyed && (s as { closed?: boolean }).closed) return Promise.resolve();
  return new Promise<void>((resolve) => s.once('close', () => resolve()));
}

export class SocketChannel {
  readonly stream: net.Socket;
  readonly returnPath: net.Socket;
  readonly onceClosed: Promise<void>;
  private readonly uri: string;
  private firstError: Error | undefined;
  private finishing: Promise<void> | undefined;
  private closing: Promise<void> | undefined;

  constructor(
    readonly address: MigrationAddress,
    socket: net.Socket,
    private readonly peer: string | undefined,
    private readonly closeTimeoutMs: number,
    /** Accepted paused (pauseOnConnect): Node has not read from it. */
    private readonly unread = false,
  ) {
    this.uri = formatMigrationAddress(address);
    this.stream = socket;
    this.returnPath = socket;
    // Latch the first error; the engine adds its own listeners for the live path.
    socket.on('error', (err) => {
      this.firstError ??= err;
    });
    this.onceClosed = closedPromise(socket);
  }

  get error(): Error | undefined {
    return this.firstError;
  }

  writeFd(): number | undefined {
    const s = this.stream;
    if (s.destroyed || s.writableLength > 0 || s.writableEnded) return undefined;
    const fd = socketFd(s);
    return fd >= 0 ? fd : undefined;
  }

  readFd(): number | undefined {
    const s = this.stream;
    // Only while Node has neither read nor been asked to (no flowing, no 'readable' consumer).
    if (!this.unread || s.destroyed || s.readableFlowing !== null || s.readableLength > 0 || s.listenerCount('readable') > 0) return undefined;
    const fd = socketFd(s);
    return fd >= 0 ? fd : undefined;
  }

  describe(): string {
    return this.peer ? `${this.uri} (peer ${this.peer})` : this.uri;
  }

  finish(): Promise<void> {
    this.finishing ??= (async () => {
      const s = this.stream;
      if (s.writableFinished) return;
      if (s.destroyed) {
        throw transportError(this.uri, 'write', this.firstError ?? new Error('socket closed before the stream was finished'));
      }
      s.end();
      try {
        await finished(s, { readable: false });
      } catch (err) {
        throw transportError(this.uri, 'write', this.firstError ?? err);
      }
    })();
    return this.finishing;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      const s = this.stream;
      await within(this.finish(), this.closeTimeoutMs);
      if (!s.destroyed && !s.readableEnded) {
        // Let the peer finish its side: closing with unread input would send a reset and could
        // cost the peer the tail of what we sent.
        // Discard what is left. resume() does nothing while 'readable' listeners exist
        // (paused-mode consumers), so read those dry as well.
        if (s.listenerCount('readable') > 0) {
          const drain = () => {
            while (s.read() !== null);
          };
          s.on('readable', drain);
          drain();
        } else {
          s.resume();
        }
        await within(
          new Promise<void>((resolve) => {
            s.once('end', resolve);
            s.once('close', resolve);
          }),
          this.closeTimeoutMs,
        );
      }
      s.destroy();
      await this.onceClosed;
    })();
    return this.closing;
  }

  destroy(err?: Error): void {
    if (err) this.firstError ??= err;
    const s = this.stream;
    if (s.destroyed) return;
    try {
      // TCP only: RST, so the peer gets ECONNRESET instead of a clean-looking EOF.
      s.resetAndDestroy();
    } catch {
      s.destroy();
    }
  }
}

export interface PlainHooks {
  /** Extra work after the stream finished (exec: wait for the exit status). */
  afterFinish?: () => Promise<void>;
  /** Abort extra resources (exec: kill the child). */
  abort?: () => void;
  /** close(): called after the stream is done, to release the rest within the timeout. */
  release?: (timeoutMs: number) => Promise<void>;
  /** Resolves when extra resources are released (exec: the child's 'close'). */
  extraClosed?: Promise<void>;
}

/** A one-way channel: `stream` is a Writable (outgoing) or a Readable (incoming). */
export class PlainChannel<S extends Readable | Writable> {
  readonly onceClosed: Promise<void>;
  private firstError: Error | undefined;
  private finishing: Promise<void> | undefined;
  private closing: Promise<void> | undefined;
  private readonly uri: string;

  constructor(
    readonly address: MigrationAddress,
    readonly stream: S,
    private readonly direction: 'out' | 'in',
    private readonly closeTimeoutMs: number,
    private readonly hooks: PlainHooks = {},
  ) {
    this.uri = formatMigrationAddress(address);
    stream.on('error', (err: Error) => {
      this.firstError ??= err;
    });
    this.onceClosed = Promise.all([closedPromise(stream), hooks.extraClosed ?? Promise.resolve()]).then(() => undefined);
  }

  get error(): Error | undefined {
    return this.firstError;
  }

  describe(): string {
    return this.uri;
  }

  /** Records an error that did not come through the stream (exec exit status). */
  noteError(err: Error): void {
    this.firstError ??= err;
  }

  finish(): Promise<void> {
    this.finishing ??= (async () => {
      if (this.direction === 'out') {
        const w = this.stream as Writable;
        if (!w.writableFinished) {
          if (w.destroyed) {
            throw transportError(this.uri, 'write', this.firstError ?? new Error('stream closed before it was finished'));
          }
          w.end();
          try {
            await finished(w, { readable: false });
          } catch (err) {
            throw transportError(this.uri, 'write', this.firstError ?? err);
          }
        }
      }
      if (this.hooks.afterFinish) await this.hooks.afterFinish();
    })();
    return this.finishing;
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      if (this.direction === 'out') await within(this.finish(), this.closeTimeoutMs);
      if (this.hooks.release) await this.hooks.release(this.closeTimeoutMs);
      this.stream.destroy();
      await this.onceClosed;
    })();
    return this.closing;
  }

  destroy(err?: Error): void {
    if (err) this.firstError ??= err;
    if (!this.stream.destroyed) this.stream.destroy();
    this.hooks.abort?.();
  }
}
