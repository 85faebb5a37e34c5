/**
 * Return-path messages (destination -> source): be16 type, be16 len,
 * payload, driven by the RP_MESSAGES table; and the RECV_BITMAP reply body
 * that follows a RECV_BITMAP message on the return-path byte stream
 * (be64 size, bitmap in little-endian 64-bit words, be64 end mark).
 */
import {
  MAX_IDSTR_LEN,
  MAX_RP_MESSAGE_LEN,
  MIG_RP_MSG,
  RAMBLOCK_RECV_BITMAP_ENDING,
  RP_MESSAGES,
  lookupSpec,
} from './constants';
import type { StreamReader } from './reader';
import type { StreamWriter } from './writer';

export type RpMessage =
  | { type: 'SHUT'; status: number }
  | { type: 'PONG'; value: number }
  /** REQ_PAGES_ID when `block` is set (block changed), REQ_PAGES otherwise. */
  | { type: 'REQ_PAGES'; start: number; len: number; block?: string }
  | { type: 'RECV_BITMAP'; block: string }
  | { type: 'RESUME_ACK'; value: number }
  | { type: 'SWITCHOVER_ACK' };

function nameBytes(block: string): Buffer {
  const b = Buffer.from(block, 'latin1');
  if (b.length > MAX_IDSTR_LEN) throw new RangeError('block name too long');
  return b;
}

/** Encodes one return-path message onto `w`. */
export function writeRpMessage(w: StreamWriter, m: RpMessage): void {
  const put = (type: number, payload: Uint8Array) => {
    w.put16(type);
    w.put16(payload.byteLength);
    w.putBytes(payload);
  };
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    return b;
  };
  switch (m.type) {
    case 'SHUT':
      return put(MIG_RP_MSG.SHUT, u32(m.status));
    case 'PONG':
      return put(MIG_RP_MSG.PONG, u32(m.value));
    case 'RESUME_ACK':
      return put(MIG_RP_MSG.RESUME_ACK, u32(m.value));
    case 'SWITCHOVER_ACK':
      return put(MIG_RP_MSG.SWITCHOVER_ACK, Buffer.alloc(0));
    case 'RECV_BITMAP': {
      const n = nameBytes(m.block);
      return put(MIG_RP_MSG.RECV_BITMAP, Buffer.concat([Buffer.from([n.length]), n]));
    }
    case 'REQ_PAGES': {
      const n = m.block !== undefined ? nameBytes(m.block) : undefined;
      const b = Buffer.alloc(12 + (n ? 1 + n.length : 0));
      b.writeBigUInt64BE(BigInt(m.start), 0);
      b.writeUInt32BE(m.len >>> 0, 8);
      if (n) {
        b[12] = n.length;
        n.copy(b, 13);
      }
      return put(n ? MIG_RP_MSG.REQ_PAGES_ID : MIG_RP_MSG.REQ_PAGES, b);
    }
  }
}

/** Reads one return-path message, validating type and length against the table. */
export async function readRpMessage(r: StreamReader): Promise<RpMessage> {
  const position = r.position;
  const type = await r.be16('return-path message type');
  const len = await r.be16('return-path message length');
  const spec = lookupSpec(RP_MESSAGES, type);
  if (!spec || type === MIG_RP_MSG.INVALID) throw r.error(`unknown return-path message type ${type}`, position);
  if (len > MAX_RP_MESSAGE_LEN) throw r.error(`return-path message ${spec.name} of ${len} bytes is too long`, position);
  if (spec.len >= 0 && len !== spec.len) throw r.error(`return-path message ${spec.name} has length ${len}, expected ${spec.len}`, position);
  const p = await r.bytes(len, `return-path ${spec.name} payload`);
  switch (type) {
    case MIG_RP_MSG.SHUT:
      return { type: 'SHUT', status: p.readUInt32BE(0) };
    case MIG_RP_MSG.PONG:
      return { type: 'PONG', value: p.readUInt32BE(0) };
    case MIG_RP_MSG.RESUME_ACK:
      return { type: 'RESUME_ACK', value: p.readUInt32BE(0) };
    case MIG_RP_MSG.SWITCHOVER_ACK:
      return { type: 'SWITCHOVER_ACK' };
    case MIG_RP_MSG.REQ_PAGES:
    case MIG_RP_MSG.REQ_PAGES_ID: {
      if (p.length < 12) throw r.error(`${spec.name} payload of ${len} bytes is too short`, position);
      const start = p.readBigUInt64BE(0);
      if (start > BigInt(Number.MAX_SAFE_INTEGER)) throw r.error(`${spec.name} start out of range`, position);
      const msg: RpMessage = { type: 'REQ_PAGES', start: Number(start), len: p.readUInt32BE(8) };
      if (type === MIG_RP_MSG.REQ_PAGES_ID) {
        if (p.length < 13 || 13 + p[12]! !== p.length) throw r.error('REQ_PAGES_ID block name is malformed', position);
        msg.block = p.toString('latin1', 13, 13 + p[12]!);
      }
      return msg;
    }
    default: {
      // RECV_BITMAP
      if (p.length < 1 || 1 + p[0]! !== p.length) throw r.error('RECV_BITMAP block name is malformed', position);
      return { type: 'RECV_BITMAP', block: p.toString('latin1', 1, 1 + p[0]!) };
    }
  }
}

/** Bytes of a RECV_BITMAP body for `pages` bits: whole 64-bit words. */
export function recvBitmapSize(pages: number): number {
  return Math.ceil(pages / 64) * 8;
}

/** Writes the bitmap body (bitmap already little-endian 64-bit words, length a multiple of 8). */
export function writeRecvBitmapBody(w: StreamWriter, bitmap: Uint8Array): void {
  if (bitmap.byteLength % 8 !== 0) {
    w.setError(new RangeError('RECV_BITMAP bitmap must be a multiple of 8 bytes'));
    return;
  }
  w.put64(bitmap.byteLength);
  w.putBytes(bitmap);
  w.put64(RAMBLOCK_RECV_BITMAP_ENDING);
}

/** Reads a bitmap body for a block of `pages` pages; checks size and end mark. */
export async function readRecvBitmapBody(r: StreamReader, pages: number): Promise<Uint8Array> {
  const position = r.position;
  const size = await r.be64n('RECV_BITMAP size');
  const expected = recvBitmapSize(pages);
  if (size !== expected) throw r.error(`RECV_BITMAP size ${size}, expected ${expected} for ${pages} pages`, position);
  const bitmap = await r.bytes(size, 'RECV_BITMAP bitmap');
  const end = await r.be64('RECV_BITMAP end mark');
  if (end !== RAMBLOCK_RECV_BITMAP_ENDING) throw r.error(`RECV_BITMAP end mark 0x${end.toString(16)} is wrong`, r.position - 8);
  return bitmap;
}
