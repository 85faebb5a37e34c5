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

import { PROTECT_CHUNK_PAGES, RamLoader, RamSender } from '../../lib/migration/ram';
import { FdSink } from '../../lib/stream/fd-sink';
import { socketFd } from '../../lib/util/socket-fd';
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

  /** A unix socket pair: the client end and a promise of every byte the server end receives (read from `readAfterMs`). */
  async function socketPair(
    name: string, readAfterMs: number, pauseOnConnect = false,
  ): Promise<{ client: net.Socket; peer: Promise<net.Socket>; got: Promise<Buffer>; close(): void }> {
    const sock = path.join(dir, name);
    // pauseOnConnect: not a byte read before resume() (pause() alone still fills Node's buffer).
    const server = net.createServer({ pauseOnConnect });
    let gotPeer!: (s: net.Socket) => void;
    const peer = new Promise<net.Socket>((r) => (gotPeer = r));
    const got = new Promise<Buffer>((resolve) => {
      server.on('connection', (c) => {
        gotPeer(c);
        const parts: Buffer[] = [];
        c.pause();
        setTimeout(() => c.resume(), readAfterMs);
        c.on('data', (d: Buffer) => parts.push(d));
        c.on('end', () => resolve(Buffer.concat(parts)));
      });
    });
    await new Promise<void>((r) => server.listen(sock, r));
    const client = net.connect(sock);
    await new Promise<void>((r) => client.once('connect', () => r()));
    return { client, peer, got, close: () => server.close() };
  }

  /** RAM of `pages` pages: zero runs, data runs and lone pages, different on every page. */
  function mixedRam(pages: number): GuestMemory {
    const mem = new (native().GuestMemory)(pages * PAGE);
    mems.push(mem);
    const v = new Uint8Array(mem.view(0, pages * PAGE));
    for (let p = 0; p < pages; p++) {
      if (p % 97 < 40 || p % 13 === 0) continue; // zero
      v.set(crypto.createHash('sha256').update(String(p)).digest(), p * PAGE + (p % 64) * 8);
    }
    return mem;
  }

  async function sendAll(mem: GuestMemory, pages: number, sink: FdSink | StreamSink): Promise<void> {
    const w = new StreamWriter({ sink, chunkSize: 64 << 10 });
    const enc = new RamEncoder(w);
    const sender = new RamSender([{ idstr: 'pc.ram', size: pages * PAGE, memory: mem }], enc, sink instanceof FdSink ? sink : undefined);
    w.put32(0xfeedf00d);
    sender.markAllDirty();
    for (let batch = 1; ; batch++) {
      const done = sender.encodeSome(batch % 3 === 0 ? 5000 : 200 << 10); // small batches too
      w.put32(batch); // interleaved non-page bytes must keep their place
      await w.flush();
      if (done) break;
    }
    enc.eos();
    await w.flush();
    assert.equal(sender.counts.normal + sender.counts.duplicate, pages);
  }

  it('deferred dirty-log protection: each chunk is protected once, before any of its pages is read; none after a sync', async () => {
    const pages = 2 * PROTECT_CHUNK_PAGES + 100;
    const mem = mixedRam(pages);
    const out = new PassThrough();
    out.resume();
    const w = new StreamWriter({ sink: new StreamSink(out), chunkSize: 64 << 10 });
    const sender = new RamSender([{ idstr: 'pc.ram', size: pages * PAGE, memory: mem }], new RamEncoder(w));
    const calls: { block: number; first: number; count: number; readBefore: number }[] = [];
    const read = () => sender.counts.normal + sender.counts.duplicate;
    sender.deferProtection((block, first, count) => calls.push({ block, first, count, readBefore: read() }));
    sender.markAllDirty();
    while (!sender.encodeSome(300 << 10)) await w.flush();
    assert.equal(read(), pages);
    assert.deepEqual(
      calls.map(({ block, first, count }) => [block, first, count]),
      [0, 1, 2].map((c) => [0, c * PROTECT_CHUNK_PAGES, Math.min(PROTECT_CHUNK_PAGES, pages - c * PROTECT_CHUNK_PAGES)]),
    );
    for (const c of calls) assert.ok(c.readBefore <= c.first, `chunk at page ${c.first} protected after ${c.readBefore} pages were read`);
    sender.allProtected();
    sender.markAllDirty();
    while (!sender.encodeSome(300 << 10)) await w.flush();
    assert.equal(calls.length, 3);
    await w.flush();
  });

  for (const v of [
    { name: 'sendmsg', opts: { splice: false }, pages: 3000 },
    { name: 'splice', opts: {}, pages: 3000 },
    { name: 'splice, header ring wrapping', opts: { spliceSegmentBytes: 4096 }, pages: 12000 },
  ]) {
    it(`FdSink (${v.name}): page runs sent straight from guest memory make the same byte stream as the writer path, under backpressure`, async () => {
      const pages = v.pages; // 12-48 MiB, far more than the 4 KiB send buffer and the late reader hold
      const mem = mixedRam(pages);
      const viaWriter = await socketPair('w.sock', 0);
      await sendAll(mem, pages, new StreamSink(viaWriter.client));
      viaWriter.client.end();
      const expected = await viaWriter.got;
      viaWriter.close();

      const direct = await socketPair('d.sock', 150);
      const b = native();
      b.setSocketBuffer(socketFd(direct.client), true, 4096);
      const sink = new FdSink(b, socketFd(direct.client), undefined, v.opts);
      assert.equal(sink.splicing, v.opts.splice !== false);
      await sendAll(mem, pages, sink);
      assert.ok(sink.idle && sink.completed === sink.written, 'everything handed to the kernel');
      await sink.drained();
      sink.close();
      direct.client.end();
      const bytes = await direct.got;
      direct.close();
      assert.equal(bytes.length, expected.length);
      assert.ok(bytes.equals(expected), 'the direct path reordered, lost or duplicated bytes');
    });
  }

  it('FdSink splice: the peer reads pages from guest memory, so drained() waits until it has read everything', async () => {
    const mem = mixedRam(64);
    const v = new Uint8Array(mem.view(0, 64 * PAGE));
    v.fill(0x11, 5 * PAGE, 6 * PAGE);
    const pair = await socketPair('s.sock', 1e9, true); // reads nothing until resumed below
    const sink = new FdSink(native(), socketFd(pair.client));
    assert.equal(sink.splicing, true);
    const r = sink.sendPages(mem, 0, 0, 64, 1 << 20, false);
    assert.equal(r.pages, 64);
    assert.equal(r.rest.length, 0, 'the socket took every record');
    let drained = false;
    const done = sink.drained().then(() => (drained = true));
    await new Promise((res) => setTimeout(res, 30));
    assert.equal(drained, false, 'nothing has been read yet');
    v.fill(0x22, 5 * PAGE, 6 * PAGE); // after the send, before the read
    (await pair.peer).resume();
    await done;
    sink.close();
    pair.client.end();
    const bytes = await pair.got;
    pair.close();
    // Records: page 0 is zero (9 bytes) ... find page 5's data by its header.
    const hdr = Buffer.alloc(8);
    hdr.writeBigUInt64BE(BigInt(5 * PAGE) | 0x28n);
    const at = bytes.indexOf(hdr);
    assert.ok(at >= 0, 'page 5 was sent as a PAGE record');
    assert.ok(bytes.subarray(at + 8, at + 8 + PAGE).every((x) => x === 0x22), 'the peer read the page as it is now: no copy was made at send time');
  });

  it('FdSink splice: a run with few data pages goes by copy, so drained() does not wait for the peer to read it', async () => {
    const mem = mixedRam(40); // pages 0-39 are zero but for the three set below
    new Uint8Array(mem.view(PAGE, 3 * PAGE)).fill(0x33);
    const pair = await socketPair('c.sock', 1e9, true); // reads nothing
    const sink = new FdSink(native(), socketFd(pair.client));
    const r = sink.sendPages(mem, 0, 0, 40, 1 << 20, false);
    assert.equal(r.pages, 40);
    assert.equal(r.rest.length, 0);
    const waited = await Promise.race([sink.drained().then(() => 'drained'), new Promise((res) => setTimeout(() => res('timeout'), 500))]);
    assert.equal(waited, 'drained', 'copied bytes need not be read first');
    sink.close();
    pair.client.destroy();
    pair.close();
  });

  it('FdSink: a peer that goes away fails the write with a Node-style error, and close() releases a waiting write', async () => {
    const pair = await socketPair('x.sock', 1e9); // never reads
    const b = native();
    b.setSocketBuffer(socketFd(pair.client), true, 4096);
    const sink = new FdSink(b, socketFd(pair.client));
    const pending = sink.write([Buffer.alloc(1 << 20)]);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(sink.idle, false, 'a full socket leaves bytes queued');
    sink.close(new Error('cancelled'));
    await assert.rejects(pending, /cancelled/);
    pair.client.destroy();
    pair.close();

    const gone = await socketPair('y.sock', 0);
    gone.client.on('error', () => undefined); // Node's own read side sees the reset too
    const sink2 = new FdSink(b, socketFd(gone.client));
    await sink2.write([Buffer.from('hello')]);
    (await gone.peer).destroy(); // writes then fail with EPIPE or ECONNRESET
    gone.close();
    let err: NodeJS.ErrnoException | undefined;
    for (let i = 0; i < 50 && !err; i++) {
      await sink2.write([Buffer.alloc(64 << 10)]).catch((e: NodeJS.ErrnoException) => (err = e));
      await new Promise((r) => setTimeout(r, 5));
    }
    sink2.close();
    gone.client.destroy();
    assert.ok(err, 'writing to a closed peer fails');
    assert.match(String(err!.code), /^(EPIPE|ECONNRESET)$/);
    assert.equal(err!.syscall, 'sendmsg');
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

  it('zeroRun() writes exactly what zero() per page writes (first record named, the rest CONTINUE)', () => {
    const a = new StreamWriter({ chunkSize: 4096 }); // small chunks: reservations cross chunk ends
    const b = new StreamWriter({ chunkSize: 4096 });
    const ea = new RamEncoder(a);
    const eb = new RamEncoder(b);
    for (const [off, n] of [[0, 1], [8 * PAGE, 5000], [0x1_0000_0000, 700]] as const) {
      ea.zeroRun('pc.ram', off, n);
      for (let i = 0; i < n; i++) eb.zero('pc.ram', off + i * PAGE);
    }
    ea.page('other', 0, Buffer.alloc(PAGE, 7));
    eb.page('other', 0, Buffer.alloc(PAGE, 7));
    ea.zeroRun('pc.ram', 3 * PAGE, 3);
    for (let i = 0; i < 3; i++) eb.zero('pc.ram', (3 + i) * PAGE);
    assert.ok(a.toBuffer().equals(b.toBuffer()));
  });

  it('native zeroRecordRun() counts exactly the records the JavaScript rule takes (random mutations)', () => {
    const zeroRecordRun = native().zeroRecordRun;
    const ref = (buf: Buffer, blockLength: number, max: number): number => {
      let n = 0;
      let first = 0;
      for (let at = 0; at + 9 <= buf.length && n < max; at += 9, n++) {
        const word = buf.readBigUInt64BE(at);
        const offset = word & ~0xfffn;
        if ((word & 0xfffn) !== 0x22n || buf[at + 8] !== 0 || offset + 4096n > BigInt(blockLength)) break;
        if (n === 0) first = Number(offset);
        else if (Number(offset) !== first + n * PAGE) break;
      }
      return n;
    };
    let seed = 7;
    const rnd = (k: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % k;
    };
    for (let trial = 0; trial < 500; trial++) {
      const count = 1 + rnd(60);
      const start = rnd(100) * PAGE;
      const buf = Buffer.alloc(count * 9 + rnd(9)); // a torn record at the end, sometimes
      for (let i = 0; i < count; i++) buf.writeBigUInt64BE(BigInt(start + i * PAGE) | 0x22n, i * 9);
      const at = rnd(count) * 9;
      switch (rnd(6)) {
        case 0: buf[at + 7] = 0x02; break; // ZERO without CONTINUE
        case 1: buf[at + 8] = 1 + rnd(255); break; // fill byte
        case 2: buf.writeBigUInt64BE(BigInt(start + (rnd(200) + 1) * PAGE) | 0x22n, at); break; // offset jump
        case 3: buf[at] = 0xff; break; // offset far outside
        case 4: buf[at + 6] |= 1 + rnd(15); break; // flags above the low byte
        default: break; // intact
      }
      const blockLength = (50 + rnd(120)) * PAGE;
      const max = 1 + rnd(80);
      assert.equal(zeroRecordRun(buf, blockLength, max), ref(buf, blockLength, max), `trial ${trial}`);
    }
  });

  it('tryZeroRun() parses runs at any chunk boundary and hands gaps, pages and bad fill bytes to tryNext()', async () => {
    const pages = 6000;
    const w = new StreamWriter();
    const enc = new RamEncoder(w);
    enc.zeroRun('ram', 0, 2500);
    enc.page('ram', 2500 * PAGE, Buffer.alloc(PAGE, 0x5a));
    enc.zeroRun('ram', 2501 * PAGE, 1000);
    enc.zeroRun('ram', 4000 * PAGE, 1999); // a gap before it
    enc.eos();
    const stream = w.toBuffer();
    for (const seed of [1, 2, 3]) {
      const mem = memory(pages);
      const view = new Uint8Array(mem.view(0, pages * PAGE));
      view.fill(0xee); // every page non-zero: each ZERO record must zero its page
      const reader = new StreamReader();
      let rnd = seed;
      for (let at = 0; at < stream.length; ) {
        rnd = (rnd * 1103515245 + 12345) & 0x7fffffff;
        const n = 1 + (rnd % 5000);
        reader.push(stream.subarray(at, at + n));
        at += n;
      }
      reader.end();
      const loader = new RamLoader(reader, [{ idstr: 'ram', size: pages * PAGE, memory: mem }]);
      await loader.loadSection();
      assert.equal(loader.zeroPages, 2500 + 1000 + 1999);
      assert.equal(loader.pages, 1);
      const isFill = (p: number, v: number) => view.subarray(p * PAGE, (p + 1) * PAGE).every((b) => b === v);
      for (const p of [0, 1, 2499, 2501, 3500, 4000, 5998]) assert.ok(isFill(p, 0), `page ${p} not zeroed (seed ${seed})`);
      assert.ok(isFill(2500, 0x5a));
      for (const p of [3501, 3999, 5999]) assert.ok(isFill(p, 0xee), `page ${p} was never named but changed (seed ${seed})`);
    }

    // A non-zero fill byte inside a run is still an error, with its position.
    const bad = Buffer.from(stream);
    bad[9 * 100 + 8 + 1 + 3] = 1; // first record carries 'ram' (1 + 3 bytes): record 100's fill byte
    const mem = memory(pages);
    const loader = new RamLoader(StreamReader.fromBuffer(bad), [{ idstr: 'ram', size: pages * PAGE, memory: mem }]);
    await assert.rejects(loader.loadSection(), /fill byte 0x1/);
  });

  function memory(pages: number): GuestMemory {
    const m = new (native().GuestMemory)(pages * PAGE);
    mems.push(m);
    return m;
  }

  it('zero scans skip never-touched pages but see every written one (anonymous and memfd RAM)', () => {
    for (const opts of [{}, { hugepages: true }, { memfd: true }]) {
      const pages = 600;
      const mem = new (native().GuestMemory)(pages * PAGE, opts);
      mems.push(mem);
      const view = new Uint8Array(mem.view(0, pages * PAGE));
      const out = new Uint8Array(pages);
      mem.scanZeroPages(0, pages, out);
      assert.ok(out.every((b) => b === 1), `fresh RAM must scan as zero (${JSON.stringify(opts)})`);
      assert.equal(mem.findNonZero(0, pages * PAGE), -1);
      view[17 * PAGE + 4095] = 1; // last byte of page 17
      view[300 * PAGE] = 2;
      view.fill(0, 301 * PAGE, 302 * PAGE); // written, but with zeros: present and zero
      view.fill(9, 500 * PAGE, 501 * PAGE);
      mem.discard(500 * PAGE, PAGE); // discarded: zero again
      void view[450 * PAGE]; // read only (maps the zero page): still zero
      mem.scanZeroPages(0, pages, out);
      const nonZero = [...out].flatMap((b, i) => (b === 0 ? [i] : []));
      assert.deepEqual(nonZero, [17, 300], JSON.stringify(opts));
      assert.equal(mem.findNonZero(0, pages * PAGE), 17 * PAGE + 4095);
      assert.equal(mem.findNonZero(18 * PAGE, 282 * PAGE), -1);
      assert.equal(mem.findNonZero(18 * PAGE, 283 * PAGE), 300 * PAGE);
      assert.equal(mem.findNonZero(301 * PAGE, 299 * PAGE), -1);
      // Unaligned ranges still work (the slow path).
      assert.equal(mem.findNonZero(17 * PAGE + 100, 4000), 17 * PAGE + 4095);
    }
  });

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
