/**
 * The return path (destination -> source): QEMU's framing be16 type, be16
 * len, payload, validated against the RP_MESSAGES table. The destination
 * writes with RpWriter; the source reads with RpReader, which fails on an
 * unknown type, a fixed-length type with the wrong length, or a message
 * longer than the source's 512-byte buffer.
 */
import { EventEmitter } from 'node:events';
import type { Readable, Writable } from 'node:stream';
import { MAX_RP_MESSAGE_LEN, MIG_RP_MSG, RP_MESSAGES, lookupSpec } from '../stream/constants';
import { StreamReader } from '../stream/reader';

export type RpMessage =
  | { type: 'SHUT'; status: number }
  | { type: 'PONG'; value: number }
  | { type: 'REQ_PAGES'; start: number; len: number; block?: string }
  | { type: 'RECV_BITMAP'; block: string }
  | { type: 'RESUME_ACK'; value: number }
  | { type: 'SWITCHOVER_ACK' };

function frame(type: number, payload: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(4 + payload.length);
  b.writeUInt16BE(type, 0);
  b.writeUInt16BE(payload.length, 2);
  b.set(payload, 4);
  return b;
}

function be32(v: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

/** Destination side. Writes are fire-and-forget; the socket orders them. */
export class RpWriter {
  constructor(private readonly out: Writable) {}

  private send(type: number, payload: Uint8Array): void {
    if (!this.out.writableEnded && !this.out.destroyed) this.out.write(frame(type, payload));
  }

  shut(failed: boolean): void {
    this.send(MIG_RP_MSG.SHUT, be32(failed ? 1 : 0));
  }

  pong(value: number): void {
    this.send(MIG_RP_MSG.PONG, be32(value));
  }

  switchoverAck(): void {
    this.send(MIG_RP_MSG.SWITCHOVER_ACK, new Uint8Array(0));
  }

  /** REQ_PAGES(_ID): `block` given when it differs from the previous request's. */
  reqPages(start: number, len: number, block?: string): void {
    const name = block === undefined ? undefined : Buffer.from(block, 'latin1');
    const p = Buffer.allocUnsafe(12 + (name ? 1 + name.length : 0));
    p.writeBigUInt64BE(BigInt(start), 0);
    p.writeUInt32BE(len, 8);
    if (name) {
      p[12] = name.length;
      p.set(name, 13);
    }
    this.send(name ? MIG_RP_MSG.REQ_PAGES_ID : MIG_RP_MSG.REQ_PAGES, p);
  }

  /** Raw bytes on the return path (RECV_BITMAP bodies follow their message). */
  raw(data: Uint8Array): void {
    if (!this.out.writableEnded && !this.out.destroyed) this.out.write(data);
  }

  recvBitmapHeader(block: string): void {
    const name = Buffer.from(block, 'latin1');
    this.send(MIG_RP_MSG.RECV_BITMAP, Buffer.concat([Buffer.from([name.length]), name]));
  }

  resumeAck(value = 1): void {
    this.send(MIG_RP_MSG.RESUME_ACK, be32(value));
  }
}

/**
 * Source side: emits 'message' (RpMessage), 'error' (a malformed message:
 * the caller fails the migration) and 'end' (the peer closed the path).
 */
export class RpReader extends EventEmitter {
  readonly reader: StreamReader;
  private lastBlock: string | undefined;

  constructor(source: Readable) {
    super();
    this.reader = StreamReader.fromReadable(source, { highWaterMark: 1 << 20 });
    void this.loop();
  }

  private async loop(): Promise<void> {
    const r = this.reader;
    try {
      for (;;) {
        if (await r.atEnd()) {
          this.emit('end');
          return;
        }
        const msg = await this.readOne();
        if (msg) this.emit('message', msg);
      }
    } catch (err) {
      this.emit('error', err);
    }
  }

  private async readOne(): Promise<RpMessage | undefined> {
    const r = this.reader;
    const at = r.position;
    const type = await r.be16('return-path message type');
    const len = await r.be16('return-path message length');
    const spec = lookupSpec(RP_MESSAGES, type);
    if (!spec || type === MIG_RP_MSG.INVALID) throw r.error(`invalid return-path message type ${type}`, at);
    if (len > MAX_RP_MESSAGE_LEN) throw r.error(`return-path message ${spec.name} of ${len} bytes exceeds ${MAX_RP_MESSAGE_LEN}`, at);
    if (spec.len >= 0 && len !== spec.len) throw r.error(`return-path message ${spec.name} has length ${len}, expected ${spec.len}`, at);
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
        if (len < 12) throw r.error(`return-path ${spec.name} payload of ${len} bytes is too short`, at);
        const start = Number(p.readBigUInt64BE(0));
        const plen = p.readUInt32BE(8);
        if (type === MIG_RP_MSG.REQ_PAGES_ID) {
          const n = p[12];
          if (n === undefined || len !== 13 + n) throw r.error(`return-path REQ_PAGES_ID block name length does not match payload`, at);
          this.lastBlock = p.subarray(13, 13 + n).toString('latin1');
        } else if (this.lastBlock === undefined) {
          throw r.error('return-path REQ_PAGES without a previous block', at);
        }
        return { type: 'REQ_PAGES', start, len: plen, block: this.lastBlock };
      }
      case MIG_RP_MSG.RECV_BITMAP: {
        const n = p[0];
        if (n === undefined || len !== 1 + n) throw r.error('return-path RECV_BITMAP block name length does not match payload', at);
        return { type: 'RECV_BITMAP', block: p.subarray(1).toString('latin1') };
      }
    }
    return undefined;
  }
}
