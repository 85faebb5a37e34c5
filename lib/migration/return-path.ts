/**
 * The return path as the engines use it, on top of the codec in
 * lib/stream/return-path.ts: RpWriter (destination) sends messages on the
 * channel's writable side; RpReader (source) reads them and emits
 * 'message', 'error' (a malformed message: the caller fails the migration)
 * and 'end' (the peer closed the path).
 */
import { EventEmitter } from 'node:events';
import type { Readable, Writable } from 'node:stream';
import { StreamReader } from '../stream/reader';
import { readRpMessage, writeRpMessage, type RpMessage } from '../stream/return-path';
import { StreamWriter } from '../stream/writer';

export type { RpMessage };

/** Destination side. Writes are ordered by the socket; a closed path drops them. */
export class RpWriter {
  constructor(private readonly out: Writable) {}

  send(m: RpMessage): void {
    if (this.out.writableEnded || this.out.destroyed) return;
    const w = new StreamWriter({ chunkSize: 4096 });
    writeRpMessage(w, m);
    this.out.write(w.toBuffer());
  }

  shut(failed: boolean): void {
    this.send({ type: 'SHUT', status: failed ? 1 : 0 });
  }

  pong(value: number): void {
    this.send({ type: 'PONG', value });
  }

  switchoverAck(): void {
    this.send({ type: 'SWITCHOVER_ACK' });
  }
}

/** Source side. */
export class RpReader extends EventEmitter {
  readonly reader: StreamReader;

  constructor(source: Readable) {
    super();
    this.reader = StreamReader.fromReadable(source, { highWaterMark: 1 << 20 });
    void this.loop();
  }

  private async loop(): Promise<void> {
    const r = this.reader;
    try {
      while (!(await r.atEnd())) this.emit('message', await readRpMessage(r));
      this.emit('end');
    } catch (err) {
      this.emit('error', err);
    }
  }
}
