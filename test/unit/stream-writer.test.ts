import assert from 'node:assert/strict';
import { PassThrough, Writable } from 'node:stream';
import { MIG_CMD, SectionType, StreamSink, StreamWriter, encodeBe32Payload } from '../../lib/stream';
import { qemuNone64m, randomBytes, withTimeout } from '../fixtures/stream-samples';

describe('stream writer', () => {
  it('encodes big-endian puts and the framing bytes', () => {
    const w = new StreamWriter();
    w.put8(0x1ff);
    w.put16(0xbeef);
    w.put32(0xdeadbeef);
    w.put64(2 ** 53 - 1);
    w.put64(-2n); // two's complement
    assert.equal(w.toBuffer().toString('hex'), 'ff' + 'beef' + 'deadbeef' + '001fffffffffffff' + 'fffffffffffffffe');

    w.header();
    w.configuration({ machine: 'none' });
    w.sectionStart(SectionType.START, 2, 'ram', 0, 4);
    w.footer(2);
    w.sectionPart(SectionType.PART, 2);
    w.command(MIG_CMD.PING, encodeBe32Payload(1));
    w.eof();
    w.vmdescription('{}');
    assert.equal(
      w.toBuffer().toString('hex'),
      '5145564d00000003' + '07' + '00000004' + Buffer.from('none').toString('hex') +
        '01' + '00000002' + '03' + Buffer.from('ram').toString('hex') + '00000000' + '00000004' +
        '7e00000002' + '0200000002' + '08' + '0002' + '0004' + '00000001' + '00' + '06' + '00000002' + '7b7d',
    );
  });

  it('matches the first 0x43 bytes QEMU 7.2 wrote (header, configuration, RAM START)', () => {
    const w = new StreamWriter();
    w.header();
    w.configuration({ machine: 'none' });
    w.sectionStart(SectionType.START, 2, 'ram', 0, 4);
    w.put64(64 * 1024 * 1024 + 4);
    w.putCountedString('ram');
    w.put64(64 * 1024 * 1024);
    w.put64(0x10);
    w.footer(2);
    assert.equal(w.toBuffer().toString('hex'), qemuNone64m().subarray(0, 0x43).toString('hex'));
  });

  it('spans chunk boundaries and keeps order between copied and referenced pieces', () => {
    const w = new StreamWriter({ chunkSize: 64, minRefSize: 16 });
    const ref = randomBytes(100, 1);
    const expected: Buffer[] = [];
    for (let i = 0; i < 50; i++) {
      w.put32(i);
      expected.push(Buffer.from([0, 0, 0, i]));
      if (i % 7 === 0) {
        w.putRef(ref);
        expected.push(ref);
      }
      if (i % 5 === 0) {
        w.putBytes(ref.subarray(0, 70));
        expected.push(ref.subarray(0, 70));
      }
    }
    const pieces = w.take();
    assert.ok(pieces.includes(ref), 'referenced payload is passed through without a copy');
    assert.ok(Buffer.concat(pieces).equals(Buffer.concat(expected)));
    assert.equal(w.totalBytes, Buffer.concat(expected).length);
    assert.equal(w.pendingBytes, 0);
  });

  it('handed-out pieces are not overwritten by later puts', () => {
    const w = new StreamWriter({ chunkSize: 1024 });
    w.put32(0x11111111);
    const first = w.take();
    for (let i = 0; i < 1000; i++) w.put32(0x22222222);
    assert.equal(Buffer.concat(first).toString('hex'), '11111111');
  });

  it('latches the first error: later puts are no-ops and take() throws it', () => {
    const w = new StreamWriter();
    w.put8(1);
    w.putCountedString('x'.repeat(300));
    const err = w.error;
    assert.ok(err);
    w.command(12345);
    assert.equal(w.error, err, 'first error stays');
    w.put32(5);
    assert.throws(() => w.take(), (e: unknown) => e === err);
  });

  it('rejects commands with the wrong fixed length or unknown ids', () => {
    const w = new StreamWriter();
    w.command(MIG_CMD.PING, Buffer.alloc(3));
    assert.match(String(w.error), /PING: payload of 3 bytes, expected 4/);
    const w2 = new StreamWriter();
    w2.command(0);
    assert.match(String(w2.error), /unknown migration command 0/);
  });

  it('StreamSink waits for drain when the Writable is full', async () => {
    const chunks: Buffer[] = [];
    let release: (() => void) | undefined;
    const slow = new Writable({
      highWaterMark: 1024,
      write(chunk: Buffer, _enc, cb) {
        chunks.push(chunk);
        release = cb;
      },
    });
    const sink = new StreamSink(slow);
    let done = false;
    const p = sink.write([Buffer.alloc(4096, 1)]).then(() => (done = true));
    await new Promise((res) => setImmediate(res));
    assert.equal(done, false, 'write must wait for drain');
    release!();
    await p;
    assert.equal(done, true);
    assert.equal(sink.written, 4096);
  });

  it('StreamSink is released with an error when the stream is destroyed while waiting', async () => {
    const stuck = new Writable({ highWaterMark: 16, write() {} });
    const sink = new StreamSink(stuck);
    const p = sink.write([Buffer.alloc(64)]);
    setImmediate(() => stuck.destroy(new Error('peer gone')));
    await assert.rejects(withTimeout(p, 2000, 'write'), /peer gone/);
    await assert.rejects(sink.write([Buffer.alloc(1)]), /peer gone/);
  });

  it('StreamSink rejects after close without error', async () => {
    const pt = new PassThrough({ highWaterMark: 16 });
    const sink = new StreamSink(pt);
    const p = sink.write([Buffer.alloc(64)]);
    setImmediate(() => pt.destroy());
    await assert.rejects(withTimeout(p, 2000, 'write'), /closed/);
  });

  it('flush() writes corked pieces in order and end() waits for finish', async () => {
    const got: Buffer[] = [];
    let writevCalls = 0;
    const target = new Writable({
      writev(chunks, cb) {
        writevCalls++;
        for (const c of chunks) got.push(c.chunk as Buffer);
        cb();
      },
    });
    const sink = new StreamSink(target);
    const w = new StreamWriter({ sink, minRefSize: 1 });
    const pages = [randomBytes(4096, 1), randomBytes(4096, 2)];
    w.put32(1);
    w.putRef(pages[0]!);
    w.put32(2);
    w.putRef(pages[1]!);
    await w.flush();
    await sink.end();
    assert.ok(Buffer.concat(got).equals(Buffer.concat([Buffer.from([0, 0, 0, 1]), pages[0]!, Buffer.from([0, 0, 0, 2]), pages[1]!])));
    assert.ok(writevCalls >= 1 && writevCalls <= 2, `writev calls ${writevCalls}`);
  });
});
