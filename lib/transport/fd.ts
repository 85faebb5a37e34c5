/**
 * fd: transport. The fd is an inherited number (fd:3) or a name given to QMP `getfd`, resolved
 * through the caller's lookupFd (QEMU's monitor_fd_param: a leading digit means a number).
 *
 * What the fd is decides the channel:
 * - a socket: a net.Socket used both ways (the return path works, as with QEMU's socket fds);
 * - a pipe (FIFO): a one-way net.Socket, no return path;
 * - anything else (regular file, character device): fs streams at the current file position.
 * The channel owns the fd and closes it when it closes (QEMU also closes a migration fd).
 */
import fs from 'node:fs';
import net from 'node:net';
import type { Readable, Writable } from 'node:stream';
import type { FdAddress } from './address';
import { formatMigrationAddress } from './address';
import { DEFAULT_CLOSE_TIMEOUT_MS, DEFAULT_HIGH_WATER_MARK, PlainChannel, SocketChannel } from './channel';
import { MigrationTransportError, transportError } from './errors';
import { socketOptions, tuneSocket } from './socket';
import type { TransportOptions } from './types';

/** The fd number an fd: address names; throws ERR_MIGRATION_TRANSPORT when there is none. */
export function resolveFd(addr: FdAddress, opts: TransportOptions): number {
  const uri = formatMigrationAddress(addr);
  let fd: number | undefined;
  if (/^[0-9]+$/.test(addr.str)) {
    fd = Number(addr.str);
  } else {
    if (!opts.lookupFd) throw new MigrationTransportError(uri, 'open', `File descriptor named '${addr.str}' has not been found (no getfd table)`);
    fd = opts.lookupFd(addr.str);
    if (fd === undefined) throw new MigrationTransportError(uri, 'open', `File descriptor named '${addr.str}' has not been found`);
  }
  if (!Number.isInteger(fd) || fd < 0) throw new MigrationTransportError(uri, 'open', `invalid file descriptor number ${fd}`);
  return fd;
}

type FdKind = 'socket' | 'fifo' | 'file';

function classify(uri: string, fd: number): FdKind {
  let st: fs.Stats;
  try {
    st = fs.fstatSync(fd);
  } catch (err) {
    throw transportError(uri, 'open', err);
  }
  if (st.isSocket()) return 'socket';
  if (st.isFIFO()) return 'fifo';
  return 'file';
}

export type FdChannel = SocketChannel | PlainChannel<Readable> | PlainChannel<Writable>;

/** Opens an fd: address for one direction ('out' = source, 'in' = destination). */
export function openFd(addr: FdAddress, direction: 'out' | 'in', opts: TransportOptions): FdChannel {
  const uri = formatMigrationAddress(addr);
  const fd = resolveFd(addr, opts);
  const kind = classify(uri, fd);
  const hwm = opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
  const closeTimeoutMs = opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS;
  try {
    if (kind === 'socket') {
      const s = new net.Socket(socketOptions({ fd, allowHalfOpen: true, readable: true, writable: true, readableHighWaterMark: hwm, writableHighWaterMark: hwm }));
      tuneSocket(s, addr);
      return new SocketChannel(addr, s, undefined, closeTimeoutMs);
    }
    if (kind === 'fifo') {
      const s = new net.Socket(
        socketOptions({ fd, readable: direction === 'in', writable: direction === 'out', readableHighWaterMark: hwm, writableHighWaterMark: hwm }),
      );
      return direction === 'out'
        ? new PlainChannel<Writable>(addr, s, 'out', closeTimeoutMs)
        : new PlainChannel<Readable>(addr, s, 'in', closeTimeoutMs);
    }
    if (direction === 'out') {
      const w = fs.createWriteStream('', { fd, highWaterMark: hwm, autoClose: true });
      return new PlainChannel<Writable>(addr, w, 'out', closeTimeoutMs);
    }
    const r = fs.createReadStream('', { fd, highWaterMark: hwm, autoClose: true });
    return new PlainChannel<Readable>(addr, r, 'in', closeTimeoutMs);
  } catch (err) {
    throw transportError(uri, 'open', err);
  }
}
