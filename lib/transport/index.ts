/**
 * Migration transports: QEMU-compatible addresses turned into Node streams.
 *
 *   const addr = parseMigrationUri('tcp:127.0.0.1:4444');      // or parseChannels(channels)
 *   const out = await connectOutgoing(addr, { lookupFd });      // source
 *   const l = await listenIncoming(addr, { lookupFd });         // destination
 *   const inc = await l.accept();
 *
 * Source side: write the savevm stream to `out.stream` (backpressure), read return-path
 * messages from `out.returnPath` (sockets only), `await out.finish()` to end the stream and learn
 * whether it was delivered (exec: the exit status), then `await out.close()`.
 * Destination side: read `inc.stream`, write return-path messages to `inc.returnPath`.
 * Failures to connect/listen/open/spawn reject with MigrationTransportError
 * (code ERR_MIGRATION_TRANSPORT, `cause` the system error); bad URIs throw MigrationUriError
 * (code ERR_MIGRATION_URI). Errors while streaming arrive as the streams' 'error' events
 * (Node's system errors for sockets and files, MigrationTransportError for exec).
 */
import type { Readable, Writable } from 'node:stream';
import type { MigrationAddress } from './address';
import { formatMigrationAddress, parseMigrationUri } from './address';
import type { PlainChannel, SocketChannel } from './channel';
import { MigrationTransportError } from './errors';
import { openExecIncoming, openExecOutgoing } from './exec';
import { openFd } from './fd';
import { openFileIncoming, openFileOutgoing } from './file';
import { abortError, connectSocket, listenSocket } from './socket';
import type { IncomingChannel, IncomingListener, OutgoingChannel, TransportOptions } from './types';

export * from './address';
export * from './errors';
export type * from './types';

type AnyChannel = SocketChannel | PlainChannel<Readable> | PlainChannel<Writable>;

/** After setup, an abort destroys the channel; the listener is dropped once the channel closes. */
function bindSignal<T extends { destroy(err?: Error): void; onceClosed: Promise<void> }>(ch: T, signal: AbortSignal | undefined, uri: string): T {
  if (!signal) return ch;
  const onAbort = () => ch.destroy(abortError(uri, 'connect', signal));
  if (signal.aborted) {
    onAbort();
    return ch;
  }
  signal.addEventListener('abort', onAbort, { once: true });
  void ch.onceClosed.then(() => signal.removeEventListener('abort', onAbort));
  return ch;
}

function toAddress(addr: MigrationAddress | string): MigrationAddress {
  return typeof addr === 'string' ? parseMigrationUri(addr) : addr;
}

/**
 * Source side: connect (tcp, unix), adopt (fd), spawn (exec) or create (file).
 * `addr` may be a URI string (parsed with parseMigrationUri).
 */
export async function connectOutgoing(addr: MigrationAddress | string, opts: TransportOptions = {}): Promise<OutgoingChannel> {
  const a = toAddress(addr);
  const uri = formatMigrationAddress(a);
  if (opts.signal?.aborted) throw abortError(uri, 'connect', opts.signal);
  let ch: AnyChannel;
  switch (a.transport) {
    case 'socket':
      ch = a.type === 'fd' ? openFd(a, 'out', opts) : await connectSocket(a, opts);
      break;
    case 'exec':
      ch = await openExecOutgoing(a, opts);
      break;
    case 'file':
      ch = await openFileOutgoing(a, opts);
      break;
  }
  return bindSignal(ch as OutgoingChannel & AnyChannel, opts.signal, uri);
}

/** The listener of a transport that carries exactly one channel (fd, exec, file). */
class SingleListener implements IncomingListener {
  readonly multiChannel = false;
  private taken = false;
  private closed = false;
  private readonly uri: string;

  constructor(
    readonly address: MigrationAddress,
    private readonly channel: IncomingChannel,
  ) {
    this.uri = formatMigrationAddress(address);
  }

  describe(): string {
    return `reading from ${this.uri}`;
  }

  accept(): Promise<IncomingChannel> {
    if (this.closed && !this.taken) return Promise.reject(new MigrationTransportError(this.uri, 'accept', 'listener closed'));
    this.taken = true;
    return Promise.resolve(this.channel);
  }

  nextConnection(): Promise<IncomingChannel> {
    return Promise.reject(
      new MigrationTransportError(this.uri, 'accept', `the ${this.address.transport === 'socket' ? 'fd' : this.address.transport} transport carries a single channel`),
    );
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.taken) this.channel.destroy();
  }
}

/**
 * Destination side: listen (tcp, unix; port 0 picks one, see `listener.address`), or open the
 * source right away (fd, spawn exec, open file) and hand it out as the one channel.
 * `addr` may be a URI string.
 */
export async function listenIncoming(addr: MigrationAddress | string, opts: TransportOptions = {}): Promise<IncomingListener> {
  const a = toAddress(addr);
  const uri = formatMigrationAddress(a);
  if (opts.signal?.aborted) throw abortError(uri, 'listen', opts.signal);
  let ch: AnyChannel;
  switch (a.transport) {
    case 'socket': {
      if (a.type === 'fd') {
        ch = openFd(a, 'in', opts);
        break;
      }
      const l = await listenSocket(a, opts);
      const signal = opts.signal;
      if (signal) {
        const onAbort = () => l.abort(abortError(uri, 'accept', signal));
        if (signal.aborted) onAbort();
        else {
          signal.addEventListener('abort', onAbort, { once: true });
          l.onClose(() => signal.removeEventListener('abort', onAbort));
        }
      }
      return l;
    }
    case 'exec':
      ch = await openExecIncoming(a, opts);
      break;
    case 'file':
      ch = await openFileIncoming(a, opts);
      break;
  }
  return new SingleListener(a, bindSignal(ch as IncomingChannel & AnyChannel, opts.signal, uri));
}
