/**
 * A QMP client for ferry and for QEMU 7.2 alike: connect (unix:PATH or
 * tcp:HOST:PORT), read the greeting, negotiate, run commands, receive events,
 * hand fds to `getfd`.
 *
 * Replies are matched to commands by an id the client adds to every command
 * ("ferry-N"); a reply without an id (the server could not read a command)
 * fails the oldest pending command. Events are emitted as 'event' and kept in
 * a short history so waitEvent can also match one that already arrived.
 * After the connection closes every pending command rejects with
 * ERR_QMP_DISCONNECTED.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { FerryError } from '../errors';
import { JsonSplitter } from './json-stream';
import {
  ERR_QMP_DISCONNECTED,
  ERR_QMP_PROTOCOL,
  ERR_QMP_TIMEOUT,
  QmpError,
  formatQmpAddress,
  parseQmpAddress,
  type QmpAddress,
  type QmpEvent,
  type QmpGreeting,
} from './protocol';
import { socketFd } from '../util/socket-fd';
import { fdBinding } from './reader';

export interface QmpConnectOptions {
  /** Send qmp_capabilities after the greeting (default true). */
  negotiate?: boolean;
  /** Capabilities to enable while negotiating (e.g. ['oob']). */
  enable?: string[];
  /** Connect + greeting + negotiation deadline (default 10 s). */
  timeoutMs?: number;
  /** Events kept for waitEvent(..., { past: true }) (default 1000). */
  historySize?: number;
}

export interface ExecuteOptions {
  /** Reject with ERR_QMP_TIMEOUT after this long (the command keeps running on the server). */
  timeoutMs?: number;
  /** Send these fds with SCM_RIGHTS along with the command (unix sockets only). */
  fds?: number[];
  /** Use "exec-oob" (needs the oob capability). */
  oob?: boolean;
}

export interface WaitEventOptions {
  /** Also match events that arrived before the call (from the history). */
  past?: boolean;
}

interface Pending {
  id: string;
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer?: NodeJS.Timeout;
}

export interface QmpClientEvents {
  event: [QmpEvent];
  close: [Error | undefined];
}

export class QmpClient extends EventEmitter<QmpClientEvents> {
  /** The server's greeting (available once connect() resolved). */
  greeting!: QmpGreeting;
  readonly address: string;
  /** Events received, oldest first (bounded). */
  readonly history: QmpEvent[] = [];
  private readonly socket: net.Socket;
  private readonly splitter = new JsonSplitter();
  private readonly pending = new Map<string, Pending>();
  private readonly order: string[] = [];
  private nextId = 1;
  private closedError: Error | undefined;
  private isClosed = false;
  private readonly historySize: number;
  private greetingWaiter?: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void };
  /** Serialises writes so a command sent with fds never overtakes buffered bytes. */
  private writeChain: Promise<void> = Promise.resolve();

  private constructor(socket: net.Socket, address: string, historySize: number) {
    super();
    this.socket = socket;
    this.address = address;
    this.historySize = historySize;
    socket.setNoDelay?.(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.shutdown(err));
    socket.on('close', () => this.shutdown());
  }

  /** Connects, reads the greeting and (by default) negotiates capabilities. */
  static async connect(address: string | QmpAddress, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const addr = typeof address === 'string' ? parseQmpAddress(address) : address;
    const label = formatQmpAddress(addr);
    const timeoutMs = options.timeoutMs ?? 10_000;
    const socket = addr.type === 'unix' ? net.connect(addr.path) : net.connect(addr.port, addr.host === '' ? 'localhost' : addr.host);
    const client = new QmpClient(socket, label, options.historySize ?? 1000);
    const timer = setTimeout(() => {
      client.shutdown(new FerryError(ERR_QMP_TIMEOUT, `QMP ${label}: no greeting within ${timeoutMs} ms`));
    }, timeoutMs);
    try {
      await client.waitGreeting();
      if (options.negotiate !== false) {
        await client.execute('qmp_capabilities', options.enable ? { enable: options.enable } : undefined);
      }
      return client;
    } catch (e) {
      client.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Wraps an already connected socket (the greeting not yet read). */
  static async fromSocket(socket: net.Socket, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const client = new QmpClient(socket, 'socket', options.historySize ?? 1000);
    await client.waitGreeting();
    if (options.negotiate !== false) await client.execute('qmp_capabilities', options.enable ? { enable: options.enable } : undefined);
    return client;
  }

  get closed(): boolean {
    return this.isClosed;
  }

  private waitGreeting(): Promise<QmpGreeting> {
    if (this.greeting) return Promise.resolve(this.greeting);
    if (this.isClosed) return Promise.reject(this.disconnected());
    return new Promise((resolve, reject) => {
      this.greetingWaiter = { resolve, reject };
    });
  }

  /**
   * Runs a command; resolves with its "return" value, rejects with a QmpError
   * (errorClass, desc) when the server answers with an error.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: ExecuteOptions = {}): Promise<T> {
    if (this.isClosed) return Promise.reject(this.disconnected());
    const id = `ferry-${this.nextId++}`;
    const msg: Record<string, unknown> = options.oob ? { 'exec-oob': command } : { execute: command };
    if (args !== undefined) msg.arguments = args;
    msg.id = id;
    const line = Buffer.from(`${JSON.stringify(msg)}\r\n`);
    return new Promise<T>((resolve, reject) => {
      const p: Pending = { id, command, resolve: resolve as (v: unknown) => void, reject };
      if (options.timeoutMs !== undefined) {
        p.timer = setTimeout(() => {
          this.forget(id);
          reject(new FerryError(ERR_QMP_TIMEOUT, `QMP ${command}: no reply within ${options.timeoutMs} ms`));
        }, options.timeoutMs);
      }
      this.pending.set(id, p);
      this.order.push(id);
      const fds = options.fds ?? [];
      this.writeChain = this.writeChain
        .then(() => (fds.length > 0 ? this.writeWithFds(line, fds) : this.writePlain(line)))
        .catch((e: Error) => {
          this.forget(id);
          reject(e);
        });
    });
  }

  /** Hands `fd` to the server under `name` (QMP getfd with SCM_RIGHTS). The fd stays ours to close. */
  async sendFd(name: string, fd: number): Promise<void> {
    await this.execute('getfd', { fdname: name }, { fds: [fd] });
  }

  /**
   * Resolves with the next event called `name` that satisfies `predicate`
   * (rejects with ERR_QMP_TIMEOUT, or ERR_QMP_DISCONNECTED). Call it before
   * the command that triggers the event, or pass { past: true }.
   */
  waitEvent(
    name: string,
    predicate: (ev: QmpEvent) => boolean = () => true,
    timeoutMs = 30_000,
    options: WaitEventOptions = {},
  ): Promise<QmpEvent> {
    if (options.past) {
      const hit = this.history.find((ev) => ev.event === name && predicate(ev));
      if (hit) return Promise.resolve(hit);
    }
    if (this.isClosed) return Promise.reject(this.disconnected());
    return new Promise((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (ev: QmpEvent): void => {
        let ok = false;
        try {
          ok = ev.event === name && predicate(ev);
        } catch (e) {
          cleanup();
          reject(e as Error);
          return;
        }
        if (ok) {
          cleanup();
          resolve(ev);
        }
      };
      const onClose = (): void => {
        cleanup();
        reject(this.disconnected());
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new FerryError(ERR_QMP_TIMEOUT, `QMP ${this.address}: no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /** Ends the connection gracefully (pending commands reject). */
  async close(): Promise<void> {
    if (this.isClosed) return;
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 1000).unref();
    });
    this.shutdown();
  }

  /** Drops the connection at once. */
  destroy(): void {
    this.socket.destroy();
    this.shutdown();
  }

  private writePlain(data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.isClosed) {
        reject(this.disconnected());
        return;
      }
      this.socket.write(data, (err) => (err ? reject(err) : resolve()));
    });
  }

  /**
   * sendmsg with SCM_RIGHTS on the socket's fd. Waits until Node's own write
   * queue is empty so bytes stay in order; on a short write the rest goes
   * through the socket normally (the fds travelled with the first byte).
   */
  private async writeWithFds(data: Buffer, fds: number[]): Promise<void> {
    const b = fdBinding();
    if (!b) throw new FerryError(ERR_QMP_PROTOCOL, 'sending fds needs the native addon (fd passing unavailable)');
    const fd = socketFd(this.socket);
    if (fd < 0 || this.address.startsWith('tcp:')) {
      throw new FerryError(ERR_QMP_PROTOCOL, `QMP ${this.address}: fds can only be sent over a unix socket`);
    }
    // Every earlier write went through writeChain and completed: Node's queue is empty here.
    for (;;) {
      if (this.isClosed) throw this.disconnected();
      const sent = b.sendWithFds(fd, data, fds);
      if (sent === null) {
        await new Promise((r) => setTimeout(r, 1)); // EAGAIN: the socket buffer is full (rare for one command)
        continue;
      }
      if (sent < data.length) await this.writePlain(data.subarray(sent));
      return;
    }
  }

  private onData(chunk: Buffer): void {
    for (const unit of this.splitter.push(chunk)) {
      if (unit.kind !== 'value') {
        this.shutdown(new FerryError(ERR_QMP_PROTOCOL, `QMP ${this.address}: unreadable reply: ${unit.message}`));
        return;
      }
      this.onMessage(unit.value);
    }
  }

  private onMessage(value: unknown): void {
    if (typeof value !== 'object' || value === null) return;
    const msg = value as Record<string, unknown>;
    if (msg.QMP !== undefined) {
      this.greeting = msg as unknown as QmpGreeting;
      this.greetingWaiter?.resolve(this.greeting);
      this.greetingWaiter = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      const ev = msg as unknown as QmpEvent;
      this.history.push(ev);
      if (this.history.length > this.historySize) this.history.shift();
      this.emit('event', ev);
      return;
    }
    if (!('return' in msg) && !('error' in msg)) return;
    const id = typeof msg.id === 'string' && this.pending.has(msg.id) ? msg.id : this.order[0];
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p) return; // a reply to a command that timed out
    this.forget(p.id);
    if ('error' in msg) {
      const err = (msg.error ?? {}) as { class?: unknown; desc?: unknown };
      p.reject(new QmpError(String(err.class ?? 'GenericError'), String(err.desc ?? ''), { command: p.command }));
    } else {
      p.resolve(msg.return);
    }
  }

  private forget(id: string): void {
    const p = this.pending.get(id);
    if (p?.timer) clearTimeout(p.timer);
    this.pending.delete(id);
    const i = this.order.indexOf(id);
    if (i >= 0) this.order.splice(i, 1);
  }

  private disconnected(): FerryError {
    return new FerryError(ERR_QMP_DISCONNECTED, `QMP ${this.address}: connection closed`, { cause: this.closedError });
  }

  private shutdown(err?: Error): void {
    if (this.isClosed) return;
    this.isClosed = true;
    this.closedError = err;
    this.socket.destroy();
    const e = this.disconnected();
    this.greetingWaiter?.reject(err ?? e);
    this.greetingWaiter = undefined;
    for (const p of [...this.pending.values()]) {
      this.forget(p.id);
      p.reject(e);
    }
    this.emit('close', err);
  }
}
