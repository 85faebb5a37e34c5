/**
 * Payload codecs of QEMU_VM_COMMAND sub-commands (the framing is in
 * writer.command() / SectionParser). Every decoder bounds what it reads by
 * the payload length and throws StreamError on malformed payloads.
 */
import { MAX_IDSTR_LEN, POSTCOPY_RAM_DISCARD_VERSION } from './constants';
import { StreamError } from './errors';

function fail(msg: string, position: number): StreamError {
  return new StreamError(position >= 0 ? `${msg} at byte ${position}` : msg, position);
}

/** PING / PACKAGED: one be32. */
export function encodeBe32Payload(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

export function decodeBe32Payload(p: Uint8Array, what: string, position = -1): number {
  if (p.byteLength !== 4) throw fail(`${what} payload of ${p.byteLength} bytes, expected 4`, position);
  return Buffer.from(p.buffer, p.byteOffset, 4).readUInt32BE(0);
}

/** POSTCOPY_ADVISE with postcopy-ram: OR of all block page sizes, and the target page size. */
export interface PostcopyAdvise {
  ramPagesizeSummary: bigint;
  targetPageSize: bigint;
}

/** 16 bytes for postcopy-ram, empty when only dirty-bitmap postcopy is advised. */
export function encodePostcopyAdvise(a: PostcopyAdvise | undefined): Buffer {
  if (!a) return Buffer.alloc(0);
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(BigInt.asUintN(64, a.ramPagesizeSummary), 0);
  b.writeBigUInt64BE(BigInt.asUintN(64, a.targetPageSize), 8);
  return b;
}

export function decodePostcopyAdvise(p: Uint8Array, position = -1): PostcopyAdvise | undefined {
  if (p.byteLength === 0) return undefined;
  if (p.byteLength !== 16) throw fail(`POSTCOPY_ADVISE payload of ${p.byteLength} bytes, expected 0 or 16`, position);
  const b = Buffer.from(p.buffer, p.byteOffset, 16);
  return { ramPagesizeSummary: b.readBigUInt64BE(0), targetPageSize: b.readBigUInt64BE(8) };
}

/** POSTCOPY_RAM_DISCARD: byte ranges of one block to drop on the destination. */
export interface DiscardCommand {
  block: string;
  /** [start, length] in bytes within the block. */
  ranges: Array<[number, number]>;
}

/** u8 version 0, u8 name length, name, u8 0, then be64 start + be64 length per range. */
export function encodeDiscard(cmd: DiscardCommand): Buffer {
  const name = Buffer.from(cmd.block, 'latin1');
  if (name.length > MAX_IDSTR_LEN) throw new RangeError('block name too long');
  const b = Buffer.alloc(3 + name.length + cmd.ranges.length * 16);
  let p = 0;
  b[p++] = POSTCOPY_RAM_DISCARD_VERSION;
  b[p++] = name.length;
  name.copy(b, p);
  p += name.length;
  b[p++] = 0;
  for (const [start, len] of cmd.ranges) {
    b.writeBigUInt64BE(BigInt(start), p);
    b.writeBigUInt64BE(BigInt(len), p + 8);
    p += 16;
  }
  if (b.length > 0xffff) throw new RangeError('discard command too long');
  return b;
}

export function decodeDiscard(p: Uint8Array, position = -1): DiscardCommand {
  const b = Buffer.from(p.buffer, p.byteOffset, p.byteLength);
  if (b.length < 3) throw fail(`POSTCOPY_RAM_DISCARD payload of ${b.length} bytes is too short`, position);
  if (b[0] !== POSTCOPY_RAM_DISCARD_VERSION) throw fail(`POSTCOPY_RAM_DISCARD version ${b[0]}, expected 0`, position);
  const nameLen = b[1]!;
  const head = 2 + nameLen + 1;
  if (b.length < head) throw fail('POSTCOPY_RAM_DISCARD payload shorter than its block name', position);
  if (b[2 + nameLen] !== 0) throw fail('POSTCOPY_RAM_DISCARD block name not terminated by 0', position);
  if ((b.length - head) % 16 !== 0) throw fail(`POSTCOPY_RAM_DISCARD range list of ${b.length - head} bytes is not a multiple of 16`, position);
  const block = b.toString('latin1', 2, 2 + nameLen);
  const ranges: Array<[number, number]> = [];
  for (let q = head; q < b.length; q += 16) {
    const start = b.readBigUInt64BE(q);
    const len = b.readBigUInt64BE(q + 8);
    if (start > BigInt(Number.MAX_SAFE_INTEGER) || len > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw fail('POSTCOPY_RAM_DISCARD range out of range', position);
    }
    ranges.push([Number(start), Number(len)]);
  }
  return { block, ranges };
}

/** RECV_BITMAP command: u8 name length + block name. */
export function encodeRecvBitmapCommand(block: string): Buffer {
  const name = Buffer.from(block, 'latin1');
  if (name.length > MAX_IDSTR_LEN) throw new RangeError('block name too long');
  return Buffer.concat([Buffer.from([name.length]), name]);
}

export function decodeRecvBitmapCommand(p: Uint8Array, position = -1): string {
  if (p.byteLength < 1 || p[0]! + 1 !== p.byteLength) throw fail(`RECV_BITMAP command payload of ${p.byteLength} bytes is malformed`, position);
  return Buffer.from(p.buffer, p.byteOffset + 1, p[0]!).toString('latin1');
}
