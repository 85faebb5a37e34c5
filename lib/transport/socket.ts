/**
 * tcp: and unix: transports (connect and listen), and the listener that keeps accepting after
 * the main channel (postcopy preempt, recovery and multifd connect to the same address).
 *
 * Throughput: TCP_NODELAY on every TCP socket (the stream is written in large chunks; small
 * return-path messages must not wait for Nagle), 2 MiB stream high-water marks. Node exposes no
 * SO_SNDBUF/SO_RCVBUF for stream sockets; TCP buffers autotune, unix socket buffers keep the
 * kernel default (net.core.wmem_default).
 *
 * Unix sockets: a stale socket file (nothing accepts on it) is removed before listening; a live
 * one or a non-socket file makes listen fail with EADDRINUSE. The file is removed on close if it
 * is still ours (same inode).
 */
import fs from 'node:fs';
import net from 'node:net';
import { native } from '../native';
import { socketFd } from '../util/socket-fd';
import type { InetAddress, MigrationAddress, UnixAddress } from './address';
import { formatMigrationAddress } from './address';
import { DEFAULT_CLOSE_TIMEOUT_MS, DEFAULT_HIGH_WATER_MARK, SocketChannel } from './channel';
import { MigrationTransportError, transportError } from './errors';
import type { IncomingListener, TransportOptions } from './types';

function sysError(code: string, message: string): NodeJS.ErrnoException {
  const e: NodeJS.ErrnoException = new Error(`${code}: ${message}`);
  e.code = code;
  return e;
}

/** net.Socket passes these through to stream.Duplex; @types/node 20 does not list them. */
export function socketOptions(
  o: net.SocketConstructorOpts & { readableHighWaterMark?: number; writableHighWaterMark?: number },
): net.SocketConstructorOpts {
  return o;
}

function unixPath(addr: UnixAddress): string {
  return addr.abstract ? `\0${addr.path}` : addr.path;
}

/** Socket options for the migration stream (both ends). */
export function tuneSocket(socket: net.Socket, addr: MigrationAddress): void {
  if (addr.transport === 'socket' && addr.type === 'unix') growSendBuffer(socket);
  if (addr.transport === 'socket' && addr.type === 'inet') {
    socket.setNoDelay(true);
    if (addr['keep-alive']) socket.setKeepAlive(true);
  } else {
    // Also right for a TCP socket arriving as an fd; a no-op on unix sockets and pipes.
    socket.setNoDelay(true);
  }
}

/**
 * A unix stream socket queues at most the sender's SO_SNDBUF (208 KiB by
 * default): at 2 GB/s that is 100 us of data, so sender and receiver took
 * turns waking each other instead of running in parallel. 4 MiB (or the
 * host's net.core.wmem_max if lower) measured 1840 -> 2290 MB/s on the 2G
 * precopy bench. TCP keeps the kernel's autotuning (setting a size turns it off).
 */
const UNIX_SEND_BUFFER = 4 << 20;

function growSendBuffer(socket: net.Socket): void {
  const fd = socketFd(socket);
  if (fd < 0) return;
  try {
    native().setSocketBuffer(fd, true, UNIX_SEND_BUFFER);
  } catch {
    // Only a speed-up: the socket works with the default size.
  }
}

function describeRemote(s: net.Socket): string | undefined {
  if (s.remoteAddress === undefined) return undefined;
  return s.remoteFamily === 'IPv6' ? `[${s.remoteAddress}]:${s.remotePort}` : `${s.remoteAddress}:${s.remotePort}`;
}

/** The error an aborted signal turns into. */
export function abortError(uri: string, op: 'connect' | 'listen' | 'accept', signal: AbortSignal): MigrationTransportError {
  const reason: unknown = signal.reason;
  const cause = reason instanceof Error ? reason : Object.assign(new Error('The operation was aborted'), { name: 'AbortError', code: 'ABORT_ERR' });
  return new MigrationTransportError(uri, op, 'aborted', cause);
}

export async function connectSocket(addr: InetAddress | UnixAddress, opts: TransportOptions): Promise<SocketChannel> {
  const uri = formatMigrationAddress(addr);
  const hwm = opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
  const signal = opts.signal;
  if (signal?.aborted) throw abortError(uri, 'connect', signal);
  let target: net.NetConnectOpts;
  if (addr.type === 'inet') {
    const port = Number(addr.port);
    if (port === 0) throw new MigrationTransportError(uri, 'connect', 'port 0 is only meaningful when listening');
    const o: net.TcpNetConnectOpts = { host: addr.host === '' ? 'localhost' : addr.host, port, noDelay: true };
    if (addr.ipv4 && !addr.ipv6) o.family = 4;
    else if (addr.ipv6 && !addr.ipv4) o.family = 6;
    else if (addr.ipv4 === false) o.family = 6;
    else if (addr.ipv6 === false) o.family = 4;
    target = o;
  } else {
    target = { path: unixPath(addr) };
  }
  const socket = new net.Socket(socketOptions({ allowHalfOpen: true, readableHighWaterMark: hwm, writableHighWaterMark: hwm }));
  try {
    await new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        socket.destroy();
        reject(abortError(uri, 'connect', signal!));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      socket.once('connect', () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      });
      socket.once('error', (err) => {
        signal?.removeEventListener('abort', onAbort);
        reject(transportError(uri, 'connect', err));
      });
      socket.connect(target);
    });
  } catch (err) {
    socket.destroy();
    throw err;
  }
  tuneSocket(socket, addr);
  return new SocketChannel(addr, socket, describeRemote(socket), opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS);
}

/** Whether something accepts connections on a unix socket path. */
function unixIsLive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect({ path });
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

async function prepareUnixPath(uri: string, path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw transportError(uri, 'listen', err);
  }
  if (!st.isSocket()) {
    throw transportError(uri, 'listen', sysError('EADDRINUSE', `${path} exists and is not a socket`));
  }
  if (await unixIsLive(path)) {
    throw transportError(uri, 'listen', sysError('EADDRINUSE', `another process is listening on ${path}`));
  }
  try {
    await fs.promises.unlink(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw transportError(uri, 'listen', err);
  }
}

function listenOnce(server: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (err: Error) => {
      server.off('listening', onListening);
      reject(err);
    };
    const onListening = () => {
      server.off('error', onError);
      resolve();
    };
    server.once('error', onError);
    server.once('listening', onListening);
    server.listen(options);
  });
}

interface Waiter {
  resolve: (c: SocketChannel) => void;
  reject: (e: Error) => void;
}

export class SocketListener implements IncomingListener {
  readonly multiChannel = true;
  private readonly queue: SocketChannel[] = [];
  private readonly waiters: Waiter[] = [];
  private readonly handedOut = new Set<SocketChannel>();
  private first: Promise<SocketChannel> | undefined;
  private closedError: Error | undefined;
  private closing: Promise<void> | undefined;
  private unixInode: number | undefined;
  private readonly uri: string;
  private readonly closeHooks: Array<() => void> = [];

  constructor(
    private readonly server: net.Server,
    readonly address: MigrationAddress,
    private readonly opts: TransportOptions,
  ) {
    this.uri = formatMigrationAddress(address);
    server.on('connection', (socket) => this.onConnection(socket));
    server.on('error', (err) => this.fail(transportError(this.uri, 'accept', err)));
  }

  /** Remember the inode of our socket file so close() never unlinks someone else's. */
  async noteUnixInode(path: string): Promise<void> {
    try {
      this.unixInode = (await fs.promises.lstat(path)).ino;
    } catch {
      this.unixInode = undefined;
    }
  }

  describe(): string {
    return `listening on ${this.uri}`;
  }

  /** Runs `fn` once when the listener closes (used to drop an AbortSignal listener). */
  onClose(fn: () => void): void {
    if (this.closing) fn();
    else this.closeHooks.push(fn);
  }

  private onConnection(socket: net.Socket): void {
    if (this.closedError) {
      socket.destroy();
      return;
    }
    tuneSocket(socket, this.address);
    // pauseOnConnect left the stream explicitly paused; back to "no consumer
    // yet", so a 'data' listener starts the flow as on any socket.
    // (Readable has the setter; @types/node declares it read-only.)
    (socket as { readableFlowing: boolean | null }).readableFlowing = null;
    const ch = new SocketChannel(this.address, socket, describeRemote(socket), this.opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS, true);
    const w = this.waiters.shift();
    if (w) {
      this.handedOut.add(ch);
      w.resolve(ch);
    } else {
      this.queue.push(ch);
    }
  }

  private take(): Promise<SocketChannel> {
    const ch = this.queue.shift();
    if (ch) {
      this.handedOut.add(ch);
      return Promise.resolve(ch);
    }
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  accept(): Promise<SocketChannel> {
    this.first ??= this.take();
    return this.first;
  }

  nextConnection(): Promise<SocketChannel> {
    if (!this.first) void this.accept().catch(() => undefined);
    return this.take();
  }

  private fail(err: Error): void {
    this.closedError ??= err;
    for (const w of this.waiters.splice(0)) w.reject(this.closedError);
  }

  /** Listener closed, and (when aborted) every channel it handed out destroyed. */
  abort(err: Error): void {
    void this.close(err);
    for (const ch of this.handedOut) ch.destroy(err);
  }

  close(reason?: Error): Promise<void> {
    this.closing ??= (async () => {
      for (const fn of this.closeHooks.splice(0)) fn();
      this.fail(reason ?? new MigrationTransportError(this.uri, 'accept', 'listener closed'));
      for (const ch of this.queue.splice(0)) ch.destroy();
      // Not waiting for server.close()'s callback: it fires only once every accepted connection
      // has ended, and the channels handed out are meant to outlive the listener.
      this.server.close();
      const a = this.address;
      if (a.transport === 'socket' && a.type === 'unix' && !a.abstract && this.unixInode !== undefined) {
        try {
          if ((await fs.promises.lstat(a.path)).ino === this.unixInode) await fs.promises.unlink(a.path);
        } catch {
          // already gone
        }
      }
    })();
    return this.closing;
  }
}

export async function listenSocket(addr: InetAddress | UnixAddress, opts: TransportOptions): Promise<SocketListener> {
  const uri = formatMigrationAddress(addr);
  const hwm = opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
  if (opts.signal?.aborted) throw abortError(uri, 'listen', opts.signal);
  // Paused: Node must not read ahead on its own, so a native reader can take
  // the fd (IncomingChannel.readFd).
  const server = net.createServer({ allowHalfOpen: true, highWaterMark: hwm, pauseOnConnect: true });
  let bound: MigrationAddress;
  try {
    if (addr.type === 'unix') {
      if (!addr.abstract) await prepareUnixPath(uri, addr.path);
      await listenOnce(server, { path: unixPath(addr) });
      bound = addr;
    } else {
      let host: string | undefined = addr.host === '' ? undefined : addr.host;
      let ipv6Only = false;
      if (host === undefined && addr.ipv4 && !addr.ipv6) host = '0.0.0.0';
      if (host === undefined && addr.ipv6 && !addr.ipv4) {
        host = '::';
        ipv6Only = true;
      }
      const first = Number(addr.port);
      const last = addr.to ?? first;
      for (let port = first; ; port++) {
        try {
          await listenOnce(server, { host, port, ipv6Only, exclusive: true });
          break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || port >= last) throw err;
        }
      }
      const a = server.address() as net.AddressInfo;
      bound = { transport: 'socket', type: 'inet', host: a.address, port: String(a.port) };
      if (addr.ipv4 !== undefined) bound.ipv4 = addr.ipv4;
      if (addr.ipv6 !== undefined) bound.ipv6 = addr.ipv6;
      if (addr['keep-alive'] !== undefined) bound['keep-alive'] = addr['keep-alive'];
    }
  } catch (err) {
    server.close();
    throw transportError(uri, 'listen', err);
  }
  const listener = new SocketListener(server, bound, opts);
  if (addr.type === 'unix' && !addr.abstract) await listener.noteUnixInode(addr.path);
  return listener;
}
