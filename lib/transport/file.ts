/**
 * file: transport, with QEMU 8.2+ semantics (migration/file.c):
 * - source: open O_CREAT|O_TRUNC|O_WRONLY, mode 0600, write the stream from byte `offset`
 *   (the file is truncated first, so bytes before the offset read back as zeros);
 * - destination: open O_RDONLY and read from byte `offset` to the end of the file.
 * Reads are streamed in highWaterMark-sized chunks (2 MiB by default), never the whole file;
 * writes honour backpressure through fs.WriteStream.
 */
import fs from 'node:fs';
import type { Readable, Writable } from 'node:stream';
import type { FileAddress } from './address';
import { formatMigrationAddress } from './address';
import { DEFAULT_CLOSE_TIMEOUT_MS, DEFAULT_HIGH_WATER_MARK, PlainChannel } from './channel';
import { transportError } from './errors';
import type { TransportOptions } from './types';

function open(path: string, flags: number, mode?: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))));
}

export async function openFileOutgoing(addr: FileAddress, opts: TransportOptions): Promise<PlainChannel<Writable>> {
  const uri = formatMigrationAddress(addr);
  const { O_CREAT, O_TRUNC, O_WRONLY } = fs.constants;
  let fd: number;
  try {
    fd = await open(addr.filename, O_CREAT | O_TRUNC | O_WRONLY, 0o600);
  } catch (err) {
    throw transportError(uri, 'open', err);
  }
  const stream = fs.createWriteStream(addr.filename, {
    fd,
    start: addr.offset,
    highWaterMark: opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK,
    autoClose: true,
  });
  return new PlainChannel<Writable>(addr, stream, 'out', opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS, {
    // 'finish' means every write returned; wait for the close too, so a reader that opens the
    // file right after finish() sees a fully released file.
    afterFinish: () => new Promise<void>((resolve) => (stream.closed ? resolve() : stream.once('close', () => resolve()))),
  });
}

export async function openFileIncoming(addr: FileAddress, opts: TransportOptions): Promise<PlainChannel<Readable>> {
  const uri = formatMigrationAddress(addr);
  let fd: number;
  try {
    fd = await open(addr.filename, fs.constants.O_RDONLY);
  } catch (err) {
    throw transportError(uri, 'open', err);
  }
  const stream = fs.createReadStream(addr.filename, {
    fd,
    start: addr.offset,
    highWaterMark: opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK,
    autoClose: true,
  });
  return new PlainChannel<Readable>(addr, stream, 'in', opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS);
}
