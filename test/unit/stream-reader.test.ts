import assert from 'node:assert/strict';
import { PassThrough, Readable } from 'node:stream';
import fc from 'fast-check';
import { StreamError, StreamReader } from '../../lib/stream';
import { feedChunked, randomBytes, withTimeout } from '../fixtures/stream-samples';

/** Bytes of a known layout: u8, be16, be32, be64, 300 raw bytes, counted string. */
function layout(): Buffer {
  return Buffer.concat([
    Buffer.from([0xab]),
    Buffer.from([0x12, 0x34]),
    Buffer.from([0xde, 0xad, 0xbe, 0xef]),
    Buffer.from([0x00, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
    randomBytes(300, 7),
    Buffer.from([3]),
    Buffer.from('ram'),
  ]);
}

async function readLayout(r: StreamReader): Promise<unknown[]> {
  const out: unknown[] = [];
  out.push(await r.u8());
  out.push(await r.be16());
  out.push(await r.be32());
  out.push(await r.be64n());
  const raw = new Uint8Array(300);
  await r.readInto(raw);
  out.push(Buffer.from(raw).toString('hex'));
  out.push(await r.countedString());
  out.push(await r.atEnd());
  return out;
}

describe('stream reader', () => {
  const expected = [0xab, 0x1234, 0xdeadbeef, 2 ** 53 - 1, randomBytes(300, 7).toString('hex'), 'ram', true];

  it('reads big-endian fields and byte runs from one buffer', async () => {
    assert.deepEqual(await readLayout(StreamReader.fromBuffer(layout())), expected);
  });

  it('reads the same at any chunk boundaries (random chunk sizes, async arrival)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 20 }), async (sizes) => {
        const r = feedChunked(layout(), sizes);
        assert.deepEqual(await readLayout(r), expected);
        assert.equal(r.position, layout().length);
      }),
      { numRuns: 100 },
    );
  });

  it('peeks without consuming and counts positions from a base', async () => {
    const r = StreamReader.fromBuffer(Buffer.from([1, 2, 3, 4, 5]), 1000);
    assert.deepEqual([...(await r.peek(3))], [1, 2, 3]);
    assert.equal(r.position, 1000);
    assert.deepEqual([...(await r.peek(10))], [1, 2, 3, 4, 5]); // short at end of stream
    await r.skipBytes(2);
    assert.equal(r.position, 1002);
    assert.equal(r.peekBe16(0), 0x0304);
  });

  it('be64 above 2^53 is a StreamError for be64n and exact for be64', async () => {
    const b = Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
    assert.equal(await StreamReader.fromBuffer(b).be64(), 0xfffffffffffffffen);
    await assert.rejects(StreamReader.fromBuffer(b).be64n('offset'), (e: unknown) => e instanceof StreamError && /offset 0xfffffffffffffffe out of range/.test(e.message));
  });

  it('reports truncation with the byte position and what was being read', async () => {
    const r = StreamReader.fromBuffer(Buffer.from([1, 2, 3]), 10);
    await r.u8();
    await assert.rejects(r.be32('section id'), (e: unknown) => {
      assert.ok(e instanceof StreamError);
      assert.equal(e.code, 'ERR_MIGRATION_STREAM');
      assert.equal(e.message, 'stream ended at byte 13 while reading section id');
      assert.equal(e.position, 13);
      return true;
    });
    const r2 = StreamReader.fromBuffer(Buffer.alloc(10));
    await assert.rejects(r2.readInto(new Uint8Array(4096), 'RAM page data'), /stream ended at byte 10 while reading RAM page data \(4086 bytes missing\)/);
  });

  it('a source error propagates as that error', async () => {
    const src = new PassThrough();
    const r = StreamReader.fromReadable(src);
    const p = r.be32();
    src.write(Buffer.from([1]));
    const err = Object.assign(new Error('connection reset'), { code: 'ECONNRESET' });
    src.destroy(err);
    await assert.rejects(p, (e: unknown) => (e as { code?: string }).code === 'ECONNRESET');
  });

  it('a source closed early is a truncation, not a hang', async () => {
    const src = new PassThrough();
    const r = StreamReader.fromReadable(src);
    src.write(Buffer.from([1, 2]));
    src.end();
    await assert.rejects(withTimeout(r.be32('x'), 2000, 'be32'), /stream ended at byte 2 while reading x/);
  });

  it('pauses a fast source above the high-water mark and resumes it as data is consumed', async () => {
    const total = 8 << 20;
    let produced = 0;
    const src = new Readable({
      highWaterMark: 64 << 10,
      read() {
        if (produced >= total) return this.push(null);
        produced += 64 << 10;
        this.push(Buffer.alloc(64 << 10, 1));
      },
    });
    const r = StreamReader.fromReadable(src, { highWaterMark: 1 << 20 });
    await new Promise((res) => setTimeout(res, 50));
    // Not consumed yet: the reader must not have swallowed the whole source.
    assert.ok(r.buffered <= (1 << 20) + (64 << 10), `buffered ${r.buffered}`);
    assert.ok(produced < total, `produced ${produced}`);
    await r.skipBytes(total);
    assert.equal(await r.atEnd(), true);
  });

  it('readInto streams a payload larger than the high-water mark', async () => {
    const data = randomBytes(3 << 20, 3);
    const src = Readable.from((function* () {
      for (let i = 0; i < data.length; i += 65536) yield data.subarray(i, i + 65536);
    })());
    const r = StreamReader.fromReadable(src, { highWaterMark: 256 << 10 });
    const target = new Uint8Array(data.length);
    await r.readInto(target);
    assert.ok(Buffer.from(target).equals(data));
  });

  it('synchronous try* paths return -1 when data is missing and consume nothing', () => {
    const r = new StreamReader();
    r.push(Buffer.from([0, 0, 1]));
    assert.equal(r.tryBe32(), -1);
    assert.equal(r.buffered, 3);
    r.push(Buffer.from([2]));
    assert.equal(r.tryBe32(), 0x102);
    assert.equal(r.tryU8(), -1);
  });

  it('detach() hands back unconsumed bytes', async () => {
    const src = new PassThrough();
    const r = StreamReader.fromReadable(src);
    src.write(Buffer.from([1, 2, 3, 4]));
    await r.u8();
    const rest = r.detach();
    assert.deepEqual([...rest], [2, 3, 4]);
  });
});
