import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  RAM_FLAG,
  RamEncoder,
  RamRecordParser,
  StreamError,
  StreamReader,
  StreamWriter,
  encodePageHeader,
  type RamRecord,
} from '../../lib/stream';
import { feedChunked, qemuNone64m, randomBytes } from '../fixtures/stream-samples';

const PAGE = 4096;

function isStreamError(re: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof StreamError, `expected StreamError, got ${String(e)}`);
    assert.match(e.message, re);
    return true;
  };
}

/** Records for two blocks: memsize, pages and zero pages alternating blocks, flush, eos. */
function encodeSample(): { bytes: Buffer; ram: Buffer; mem1: Buffer } {
  const ram = randomBytes(16 * PAGE, 1);
  ram.fill(0, 3 * PAGE, 5 * PAGE);
  const mem1 = randomBytes(4 * PAGE, 2);
  const w = new StreamWriter({ chunkSize: 8192 });
  const e = new RamEncoder(w);
  e.memSize([
    { idstr: 'ram', usedLength: ram.length },
    { idstr: 'mem1', usedLength: mem1.length },
  ]);
  e.eos();
  for (let p = 0; p < 16; p++) {
    const page = ram.subarray(p * PAGE, (p + 1) * PAGE);
    if (p === 3 || p === 4) e.zero('ram', p * PAGE);
    else e.page('ram', p * PAGE, page, p % 2 === 0);
    if (p < 4) e.page('mem1', p * PAGE, mem1.subarray(p * PAGE, (p + 1) * PAGE));
  }
  e.multifdFlush();
  e.eos();
  return { bytes: w.toBuffer(), ram, mem1 };
}

async function decodeAll(r: StreamReader, blocks?: Array<{ idstr: string; usedLength: number; maxLength?: number }>) {
  const mem = new Map<string, Uint8Array>();
  for (const b of blocks ?? []) mem.set(b.idstr, new Uint8Array(b.usedLength));
  const p = new RamRecordParser(r, {
    blocks,
    pageTarget: blocks ? (b, off) => mem.get(b.idstr)!.subarray(off, off + PAGE) : undefined,
  });
  const kinds: string[] = [];
  const setup = await p.readUntilEos({ onRecord: (rec) => void kinds.push(rec.kind) });
  const iter = await p.readUntilEos({ onRecord: (rec) => void kinds.push(rec.kind === 'page' || rec.kind === 'zero' ? `${rec.kind}:${rec.block.idstr}:${rec.offset / PAGE}` : rec.kind) });
  return { kinds, setup, iter, mem, parser: p };
}

describe('stream RAM codec', () => {
  it('encodePageHeader writes offset|flags and an optional block id', () => {
    const b = Buffer.alloc(32);
    let n = encodePageHeader(b, 0, 0x123456789000, RAM_FLAG.PAGE, Buffer.from('ram'));
    assert.equal(b.subarray(0, n).toString('hex'), '0000123456789008' + '03' + '72616d');
    n = encodePageHeader(b, 0, 0x1000, RAM_FLAG.ZERO | RAM_FLAG.CONTINUE);
    assert.equal(b.subarray(0, n).toString('hex'), '0000000000001022');
  });

  it('round trips memsize, pages (copied and referenced), zero pages, CONTINUE, flush and eos', async () => {
    const { bytes, ram, mem1 } = encodeSample();
    const blocks = [
      { idstr: 'ram', usedLength: ram.length },
      { idstr: 'mem1', usedLength: mem1.length },
    ];
    const { kinds, setup, iter, mem } = await decodeAll(StreamReader.fromBuffer(bytes), blocks);
    assert.deepEqual(kinds.slice(0, 2), ['memsize', 'eos']);
    assert.deepEqual(kinds.slice(2, 6), ['page:ram:0', 'page:mem1:0', 'page:ram:1', 'page:mem1:1']);
    assert.deepEqual(kinds.slice(-2), ['flush', 'eos']);
    assert.deepEqual(setup, { pages: 0, zero: 0, records: 2 });
    assert.deepEqual(iter, { pages: 18, zero: 2, records: 22 });
    assert.ok(Buffer.from(mem.get('ram')!).equals(ram));
    assert.ok(Buffer.from(mem.get('mem1')!).equals(mem1));
  });

  it('uses CONTINUE for consecutive records of one block', () => {
    const w = new StreamWriter();
    const e = new RamEncoder(w);
    e.zero('ram', 0);
    e.zero('ram', PAGE);
    e.zero('mem1', 0);
    e.zero('ram', 2 * PAGE);
    e.resetChannel();
    e.zero('ram', 3 * PAGE);
    assert.equal(
      w.toBuffer().toString('hex'),
      '0000000000000002' + '0372616d' + '00' + '0000000000001022' + '00' + '0000000000000002' + '046d656d31' + '00' +
        '0000000000002002' + '0372616d' + '00' + '0000000000003002' + '0372616d' + '00',
    );
  });

  it('parses identically at any chunk boundaries', async () => {
    const { bytes, ram, mem1 } = encodeSample();
    const blocks = [
      { idstr: 'ram', usedLength: ram.length },
      { idstr: 'mem1', usedLength: mem1.length },
    ];
    const ref = (await decodeAll(StreamReader.fromBuffer(bytes), blocks)).kinds;
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 9000 }), { minLength: 1, maxLength: 16 }), async (sizes) => {
        const { kinds, mem } = await decodeAll(feedChunked(bytes, sizes), blocks);
        assert.deepEqual(kinds, ref);
        assert.ok(Buffer.from(mem.get('ram')!).equals(ram));
        assert.ok(Buffer.from(mem.get('mem1')!).equals(mem1));
      }),
      { numRuns: 60 },
    );
  });

  it('learns blocks from MEM_SIZE without local blocks (dump mode) and returns page views', async () => {
    const { bytes, ram } = encodeSample();
    const r = StreamReader.fromBuffer(bytes);
    const p = new RamRecordParser(r);
    const first = await p.next();
    assert.equal(first.kind, 'memsize');
    assert.deepEqual((first as Extract<RamRecord, { kind: 'memsize' }>).blocks, [
      { idstr: 'ram', usedLength: 16 * PAGE },
      { idstr: 'mem1', usedLength: 4 * PAGE },
    ]);
    assert.equal((await p.next()).kind, 'eos');
    const page = await p.next();
    assert.ok(page.kind === 'page');
    assert.ok(Buffer.from(page.data).equals(ram.subarray(0, PAGE)));
  });

  it('parses every record of the QEMU 7.2 stream RAM sections', async () => {
    const q = qemuNone64m();
    // START payload at 0x22 (after header, configuration and START header), PART payload at 0x48.
    const r = StreamReader.fromBuffer(q.subarray(0x22), 0x22);
    const p = new RamRecordParser(r, { blocks: [{ idstr: 'ram', usedLength: 64 << 20 }] });
    assert.deepEqual(await p.readUntilEos(), { pages: 0, zero: 0, records: 2 });
    await r.skipBytes(5 + 5); // footer, PART header
    assert.deepEqual(await p.readUntilEos(), { pages: 0, zero: 16384, records: 16385 });
  });

  describe('rejects malformed records with a StreamError', () => {
    const blocks = [{ idstr: 'ram', usedLength: 4 * PAGE }];
    const run = (build: (w: StreamWriter, e: RamEncoder) => void, opts: { blocks?: typeof blocks } = { blocks }) => {
      const w = new StreamWriter();
      build(w, new RamEncoder(w));
      return new RamRecordParser(StreamReader.fromBuffer(w.toBuffer()), opts).readUntilEos();
    };

    it('out-of-range page offset', () =>
      assert.rejects(run((_w, e) => e.page('ram', 4 * PAGE, Buffer.alloc(PAGE, 1))), isStreamError(/RAM offset 0x4000 outside block 'ram' \(16384 bytes\) at byte 0/)));
    it('offset above 2^53', () =>
      assert.rejects(run((w) => { w.put64(0xffff_ffff_ffff_f000n | 0x22n); w.put8(0); }), isStreamError(/offset out of range/)));
    it('unknown block', () => assert.rejects(run((_w, e) => e.zero('rom', 0)), isStreamError(/unknown block 'rom'/)));
    it('CONTINUE without a previous block', () =>
      assert.rejects(run((w) => { w.put64(RAM_FLAG.ZERO | RAM_FLAG.CONTINUE); w.put8(0); }), isStreamError(/CONTINUE flag but no previous block/)));
    it('non-zero fill byte', () =>
      assert.rejects(run((w) => { w.put64(RAM_FLAG.ZERO); w.putCountedString('ram'); w.put8(1); }), isStreamError(/fill byte 0x1 \(must be 0\)/)));
    it('unknown flags and flag combinations', async () => {
      await assert.rejects(run((w) => w.put64(0x400)), isStreamError(/unknown combination of RAM record flags 0x400/));
      await assert.rejects(run((w) => w.put64(RAM_FLAG.PAGE | RAM_FLAG.ZERO)), isStreamError(/unknown combination of RAM record flags 0xa/));
    });
    it('XBZRLE, compressed pages, RDMA hook', async () => {
      await assert.rejects(run((w) => { w.put64(RAM_FLAG.XBZRLE); w.putCountedString('ram'); }), isStreamError(/XBZRLE not supported/));
      await assert.rejects(run((w) => w.put64(RAM_FLAG.COMPRESS_PAGE)), isStreamError(/compressed RAM pages not supported/));
      await assert.rejects(run((w) => w.put64(RAM_FLAG.HOOK)), isStreamError(/RDMA RAM hook not supported/));
    });
    it('MEM_SIZE: unknown block, length mismatch, total overrun, unaligned length', async () => {
      await assert.rejects(run((_w, e) => e.memSize([{ idstr: 'rom', usedLength: PAGE }])), isStreamError(/unknown RAM block 'rom', cannot accept migration/));
      await assert.rejects(run((_w, e) => e.memSize([{ idstr: 'ram', usedLength: 8 * PAGE }])), isStreamError(/length mismatch, received 32768, local 16384/));
      await assert.rejects(
        run((w) => { w.put64(PAGE | RAM_FLAG.MEM_SIZE); w.putCountedString('ram'); w.put64(4 * PAGE); }),
        isStreamError(/length 16384 exceeds the announced total 4096/),
      );
      await assert.rejects(
        run((w) => { w.put64(PAGE | RAM_FLAG.MEM_SIZE); w.putCountedString('ram'); w.put64(100); }, {}),
        isStreamError(/length 100 is not page aligned/),
      );
    });
    it('MEM_SIZE resizes a resizable block within its maximum', async () => {
      const b = [{ idstr: 'ram', usedLength: 4 * PAGE, maxLength: 8 * PAGE }];
      const w = new StreamWriter();
      const e = new RamEncoder(w);
      e.memSize([{ idstr: 'ram', usedLength: 6 * PAGE }]);
      e.page('ram', 5 * PAGE, Buffer.alloc(PAGE, 1));
      e.eos();
      const counts = await new RamRecordParser(StreamReader.fromBuffer(w.toBuffer()), { blocks: b }).readUntilEos();
      assert.equal(counts.pages, 1);
      assert.equal(b[0]!.usedLength, 6 * PAGE);
    });
    it('MEM_SIZE with postcopy page sizes and x-ignore-shared addresses', async () => {
      const w = new StreamWriter();
      const e = new RamEncoder(w);
      const opts = { postcopy: true, ignoreShared: true };
      e.memSize([{ idstr: 'huge', usedLength: 2 << 20, pageSize: 2 << 20, addr: 1 << 30 }, { idstr: 'ram', usedLength: 4 * PAGE }], opts);
      e.eos();
      const p = new RamRecordParser(StreamReader.fromBuffer(w.toBuffer()), {
        blocks: [{ idstr: 'huge', usedLength: 2 << 20, pageSize: 2 << 20 }, { idstr: 'ram', usedLength: 4 * PAGE }],
        memSize: opts,
      });
      const rec = await p.next();
      assert.ok(rec.kind === 'memsize');
      assert.deepEqual(rec.blocks, [
        { idstr: 'huge', usedLength: 2 << 20, pageSize: 2 << 20, addr: 1 << 30 },
        { idstr: 'ram', usedLength: 4 * PAGE, addr: 0 },
      ]);
    });
    it('truncation inside a page', async () => {
      const w = new StreamWriter();
      new RamEncoder(w).page('ram', 0, Buffer.alloc(PAGE, 1));
      const b = w.toBuffer().subarray(0, 100);
      await assert.rejects(new RamRecordParser(StreamReader.fromBuffer(b), { blocks }).readUntilEos(), isStreamError(/stream ended at byte 100 while reading RAM page data/));
    });
  });

  it('performance: 256 MiB of page records (prints MB/s)', async function () {
    this.timeout(120000);
    const pages = 65536;
    const guest = randomBytes(pages * PAGE, 9);
    // Encoder, zero-copy references.
    let t = process.hrtime.bigint();
    const w = new StreamWriter({ chunkSize: 1 << 20 });
    const e = new RamEncoder(w);
    for (let p = 0; p < pages; p++) e.page('pc.ram', p * PAGE, guest.subarray(p * PAGE, (p + 1) * PAGE));
    e.eos();
    const pieces = w.take();
    const encRef = Number(process.hrtime.bigint() - t) / 1e9;
    // Encoder, copying into chunks.
    t = process.hrtime.bigint();
    const w2 = new StreamWriter({ chunkSize: 4 << 20 });
    const e2 = new RamEncoder(w2);
    for (let p = 0; p < pages; p++) e2.page('pc.ram', p * PAGE, guest.subarray(p * PAGE, (p + 1) * PAGE), true);
    e2.eos();
    const stream = Buffer.concat(w2.take());
    const encCopy = Number(process.hrtime.bigint() - t) / 1e9;
    assert.equal(Buffer.concat(pieces).length, stream.length);

    const mb = (pages * PAGE) / 1e6;
    const results: string[] = [`encode ref ${(mb / encRef).toFixed(0)} MB/s (${pieces.length} pieces)`, `encode copy ${(mb / encCopy).toFixed(0)} MB/s`];
    // Guest memory already mapped (first-touch page faults are not the parser's cost).
    const target = new Uint8Array(pages * PAGE).fill(0);
    for (const chunk of [64 << 10, 1 << 20]) {
      let best = 0;
      for (let round = 0; round < 2; round++) {
        const r = new StreamReader({ highWaterMark: 1 << 30 });
        for (let i = 0; i < stream.length; i += chunk) r.push(stream.subarray(i, i + chunk));
        r.end();
        const parser = new RamRecordParser(r, { blocks: [{ idstr: 'pc.ram', usedLength: pages * PAGE }], pageTarget: (_b, off) => target.subarray(off, off + PAGE) });
        t = process.hrtime.bigint();
        const counts = await parser.readUntilEos();
        const s = Number(process.hrtime.bigint() - t) / 1e9;
        assert.equal(counts.pages, pages);
        best = Math.max(best, mb / s);
      }
      assert.ok(Buffer.from(target.buffer, 0, PAGE * 4).equals(guest.subarray(0, PAGE * 4)));
      assert.ok(Buffer.from(target.buffer, (pages - 4) * PAGE, PAGE * 4).equals(guest.subarray((pages - 4) * PAGE)));
      results.push(`decode into guest view, ${chunk >> 10} KiB chunks: ${best.toFixed(0)} MB/s`);
      assert.ok(best > 100, `decode ${best} MB/s is implausibly slow`);
    }
    console.log(`      RAM codec: ${results.join('; ')}`);
  });
});
