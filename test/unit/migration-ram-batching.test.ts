/**
 * The throughput and memory mechanics of the precopy RAM path (see
 * bench/precopy.ts for the numbers): output chunk recycling and bounded
 * queueing in StreamWriter/StreamSink, and ZERO records applied in runs by
 * RamLoader. Each test asserts the bytes, since a recycled chunk reused too
 * early or a zero run applied out of order corrupts data silently.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Writable } from 'node:stream';

import { RamLoader } from '../../lib/migration/ram';
import { native, type GuestMemory } from '../../lib/native';
import { RamEncoder } from '../../lib/stream/ram-codec';
import { StreamReader } from '../../lib/stream/reader';
import { StreamSink, StreamWriter } from '../../lib/stream/writer';

const PAGE = 4096;

/** Writes `rounds` flushes of pseudo-random records; returns the expected bytes. */
async function writeRounds(w: StreamWriter, rounds: number): Promise<Buffer> {
  const expected: Buffer[] = [];
  for (let r = 0; r < rounds; r++) {
    const data = crypto.randomBytes(1000 + ((r * 7919) % 9000));
    w.put32(r);
    w.putBytes(data);
    const b = Buffer.alloc(4);
    b.writeUInt32BE(r);
    expected.push(b, data);
    await w.flush();
  }
  return Buffer.concat(expected);
}

describe('precopy RAM path: chunk recycling, bounded queueing, zero runs', function () {
  this.timeout(20000);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-batching-'));
  const mems: GuestMemory[] = [];
  after(() => {
    for (const m of mems) m.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('reuses written chunks through a unix socket and the peer receives every byte in order', async () => {
    const sock = path.join(dir, 'r.sock');
    const received: Buffer[] = [];
    const server = net.createServer();
    const got = new Promise<Buffer>((resolve) => {
      server.on('connection', (c) => {
        c.on('data', (d: Buffer) => received.push(d));
        c.on('end', () => resolve(Buffer.concat(received)));
      });
    });
    await new Promise<void>((r) => server.listen(sock, r));
    const client = net.connect(sock);
    await new Promise<void>((r) => client.once('connect', () => r()));
    const sink = new StreamSink(client, { maxQueued: 16 << 10 });
    assert.equal(sink.copies, true);
    const w = new StreamWriter({ sink, chunkSize: 8192, maxFreeChunks: 4 });
    const expected = await writeRounds(w, 400);
    await sink.end();
    const bytes = await got;
    server.close();
    assert.equal(bytes.length, expected.length);
    assert.ok(bytes.equals(expected), 'stream differs: a chunk was reused before its bytes were written');
    // ~2.2 MB through 8 KiB chunks: without reuse that is ~270 chunks.
    assert.ok(w.chunksAllocated < 40, `allocated ${w.chunksAllocated} chunks; recycling did not happen`);
  });

  it('never reuses chunks behind a Writable that keeps references (PassThrough read late)', async () => {
    const pt = new PassThrough({ highWaterMark: 1 << 30 });
    const sink = new StreamSink(pt);
    assert.equal(sink.copies, false);
    const w = new StreamWriter({ sink, chunkSize: 4096 });
    const expected = await writeRounds(w, 100);
    pt.end();
    const parts: Buffer[] = [];
    for await (const c of pt) parts.push(c as Buffer);
    assert.ok(Buffer.concat(parts).equals(expected));
    assert.ok(w.chunksAllocated > 100, 'a PassThrough must not get recycled chunks');
  });

  it('with maxQueued, write() resolves while the queue is short and waits once it is longer', async () => {
    const callbacks: Array<() => void> = [];
    const slow = new Writable({
      highWaterMark: 1024,
      write(_chunk, _enc, cb) {
        callbacks.push(() => cb());
      },
    });
    const sink = new StreamSink(slow, { maxQueued: 10_000 });
    // 4 KiB queued: under maxQueued although above the Writable's highWaterMark.
    await sink.write([Buffer.alloc(4096)]);
    let resolved = false;
    const p = sink.write([Buffer.alloc(8192)]).then(() => (resolved = true));
    await new Promise((r) => setImmediate(r));
    assert.equal(resolved, false, 'write() must wait while 12 KiB are queued (> maxQueued)');
    callbacks.shift()!(); // 4 KiB done: 8 KiB queued, under the limit
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setImmediate(r));
    assert.equal(resolved, true);
    await p;
  });

  function memory(pages: number): GuestMemory {
    const m = new (native().GuestMemory)(pages * PAGE);
    mems.push(m);
    return m;
  }

  it('applies ZERO runs before later records: non-zero destination pages become zero, a PAGE inside a pending run wins', async () => {
    const mem = memory(64);
    const view = new Uint8Array(mem.view(0, 64 * PAGE));
    // Destination garbage where ZERO records will land.
    for (const p of [0, 3, 9, 15, 20, 30, 42, 44]) view.fill(0xa0 + p, p * PAGE, (p + 1) * PAGE);
    const page10 = crypto.randomBytes(PAGE);
    const page42 = crypto.randomBytes(PAGE);

    const w = new StreamWriter({ chunkSize: 1 << 16 });
    const enc = new RamEncoder(w);
    for (let p = 0; p < 10; p++) enc.zero('ram', p * PAGE);
    enc.page('ram', 10 * PAGE, page10);
    for (let p = 11; p <= 20; p++) enc.zero('ram', p * PAGE);
    enc.zero('ram', 30 * PAGE); // not contiguous: a run of its own
    for (let p = 40; p <= 45; p++) enc.zero('ram', p * PAGE);
    enc.page('ram', 42 * PAGE, page42); // resent after its ZERO record in the same pass
    enc.eos();

    const reader = StreamReader.fromBuffer(w.toBuffer());
    const loader = new RamLoader(reader, [{ idstr: 'ram', size: 64 * PAGE, memory: mem }]);
    await loader.loadSection();
    assert.equal(loader.zeroPages, 27);
    assert.equal(loader.pages, 2);
    const pageAt = (p: number) => Buffer.from(view.subarray(p * PAGE, (p + 1) * PAGE));
    for (const p of [0, 3, 9, 15, 20, 30, 44]) assert.ok(pageAt(p).every((b) => b === 0), `page ${p} not zeroed`);
    assert.ok(pageAt(10).equals(page10));
    assert.ok(pageAt(42).equals(page42), 'the PAGE record after a ZERO record of the same page must win');
    // Pages no record named keep their contents.
    assert.ok(pageAt(50).every((b) => b === 0));
  });
});
