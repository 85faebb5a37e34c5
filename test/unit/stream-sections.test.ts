import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  MIG_CMD,
  SectionParser,
  SectionType,
  StreamError,
  StreamReader,
  StreamWriter,
  decodeDiscard,
  decodePostcopyAdvise,
  decodeRecvBitmapCommand,
  encodeDiscard,
  encodePostcopyAdvise,
  encodeRecvBitmapCommand,
  readRecvBitmapBody,
  readRpMessage,
  writeRecvBitmapBody,
  writeRpMessage,
  type RpMessage,
} from '../../lib/stream';
import { buildSample, feedChunked, parseWholeStream, prng, qemuNone64m, randomBytes, withTimeout, type Sample } from '../fixtures/stream-samples';

const PAGE = 4096;

function isStreamError(re: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof StreamError, `expected StreamError, got ${(e as Error)?.stack ?? String(e)}`);
    assert.equal(e.code, 'ERR_MIGRATION_STREAM');
    assert.match(e.message, re);
    return true;
  };
}

/** Small stream: two blocks with random and zero pages, devices, commands. */
function smallSample(extra: Partial<Parameters<typeof buildSample>[0]> = {}): { sample: Sample; ram: Buffer; mem1: Buffer } {
  const ram = randomBytes(4 * PAGE, 11);
  ram.fill(0, PAGE, 3 * PAGE);
  const mem1 = randomBytes(2 * PAGE, 12);
  mem1.fill(0, PAGE);
  const sample = buildSample({ blocks: [{ idstr: 'ram', data: ram }, { idstr: 'mem1', data: mem1 }], commands: true, ...extra });
  return { sample, ram, mem1 };
}
const SMALL_BLOCKS = [
  { idstr: 'ram', size: 4 * PAGE },
  { idstr: 'mem1', size: 2 * PAGE },
];

describe('stream sections', () => {
  it('parses a complete stream written by the encoder', async () => {
    const { sample, ram, mem1 } = smallSample({ config: { capabilities: ['x-ignore-shared'], uuid: Buffer.alloc(16, 0xab) } });
    const res = await parseWholeStream(StreamReader.fromBuffer(sample.bytes), SMALL_BLOCKS);
    assert.equal(res.machine, 'none');
    assert.deepEqual(res.config?.capabilities, ['x-ignore-shared']);
    assert.ok(Buffer.from(res.config!.uuid!).equals(Buffer.alloc(16, 0xab)));
    assert.deepEqual(res.commands, ['OPEN_RETURN_PATH', 'PING']);
    assert.ok(Buffer.from(res.blocks.get('ram')!).equals(ram));
    assert.ok(Buffer.from(res.blocks.get('mem1')!).equals(mem1));
    assert.equal(res.pages, 3);
    assert.equal(res.zero, 3);
    assert.equal(res.runstate, 'paused');
    assert.equal(res.devices.get('timer')!.cpu_ticks_offset, 123456789n);
    assert.ok(res.sawEof);
    assert.deepEqual(res.vmdesc, sample.vmdesc);
  });

  it('parses the QEMU 7.2 stream completely', async () => {
    const res = await parseWholeStream(StreamReader.fromBuffer(qemuNone64m()), [{ idstr: 'ram', size: 64 << 20 }], { expectMachine: 'none' });
    assert.equal(res.machine, 'none');
    assert.equal(res.zero, 16384);
    assert.equal(res.pages, 0);
    assert.equal(res.touched.get('ram')!.size, 16384);
    assert.equal(res.runstate, 'running');
    assert.deepEqual([...res.devices.keys()], ['timer', 'globalstate']);
    assert.deepEqual(res.vmdesc?.devices.map((d) => [d.name, d.version]), [['timer', 2], ['globalstate', 1]]);
  });

  it('descends into PACKAGED commands (postcopy package)', async () => {
    const { sample } = smallSample({ packaged: true });
    const res = await parseWholeStream(StreamReader.fromBuffer(sample.bytes), SMALL_BLOCKS);
    assert.deepEqual(res.commands, ['OPEN_RETURN_PATH', 'PING', 'PACKAGED', 'POSTCOPY_LISTEN', 'PING', 'POSTCOPY_RUN']);
    assert.equal(res.runstate, 'paused');
  });

  it('a PACKAGED payload may continue sections started outside it (shared section table)', async () => {
    const w = new StreamWriter();
    w.header();
    w.configuration({ machine: 'none' });
    w.sectionStart(SectionType.START, 3, 'ram', 0, 4);
    w.put64(0x10);
    w.footer(3);
    const inner = new StreamWriter();
    inner.sectionPart(SectionType.END, 3);
    inner.put64(0x10);
    inner.footer(3);
    const body = inner.toBuffer();
    w.command(MIG_CMD.PACKAGED, Buffer.from([0, 0, 0, body.length]));
    const pkgAt = w.totalBytes;
    w.putBytes(body);
    w.eof();
    const parser = new SectionParser(StreamReader.fromBuffer(w.toBuffer()));
    const seen: string[] = [];
    for (let item = await parser.next(); item; item = await parser.next()) {
      seen.push(item.kind === 'section' ? `${item.typeName}:${item.idstr}` : item.kind);
      if (item.kind === 'section') await parser.reader.skipBytes(8);
      if (item.kind === 'command') {
        const sub = await parser.readPackaged();
        for (let it = await sub.next(); it; it = await sub.next()) {
          assert.ok(it.kind === 'section');
          assert.equal(it.position, pkgAt, 'absolute position inside the package');
          seen.push(`pkg ${it.typeName}:${it.idstr}`);
          await sub.reader.skipBytes(8);
        }
      }
    }
    assert.deepEqual(seen, ['header', 'configuration', 'START:ram', 'command', 'pkg END:ram', 'eof']);
  });

  it('gives the same result at any chunk boundaries', async () => {
    const { sample, ram } = smallSample({ packaged: true });
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 1, max: 5000 }), { minLength: 1, maxLength: 30 }), async (sizes) => {
        const res = await withTimeout(parseWholeStream(feedChunked(sample.bytes, sizes), SMALL_BLOCKS), 10000, 'parse');
        assert.ok(Buffer.from(res.blocks.get('ram')!).equals(ram));
        assert.equal(res.runstate, 'paused');
        assert.deepEqual(res.vmdesc, sample.vmdesc);
      }),
      { numRuns: 60 },
    );
  });

  it('a stream truncated at any byte fails with a clear StreamError (complete only from EOF on)', async function () {
    this.timeout(120000);
    const { sample } = smallSample({ packaged: true });
    const b = sample.bytes;
    for (let n = 0; n < b.length; n++) {
      const p = parseWholeStream(StreamReader.fromBuffer(b.subarray(0, n)), SMALL_BLOCKS);
      if (n === sample.eofAt + 1) {
        const res = await p; // EOF without the (optional) VM description
        assert.ok(res.sawEof && !res.vmdesc);
        continue;
      }
      await assert.rejects(p, isStreamError(new RegExp(`stream ended at byte ${n} while reading `)), `cut at ${n}`);
    }
  });

  describe('header and framing errors', () => {
    const base = () => smallSample().sample.bytes;
    const parse = (b: Buffer, opts = {}) => parseWholeStream(StreamReader.fromBuffer(b), SMALL_BLOCKS, opts);

    it('wrong magic names both values', async () => {
      const b = base();
      b.write('QEMU', 0, 'latin1');
      await assert.rejects(parse(b), isStreamError(/magic 0x51454d55, expected 0x5145564d \("QEVM"\) at byte 0/));
    });
    it('version 2 is the obsolete format; other versions unsupported', async () => {
      const b = base();
      b.writeUInt32BE(2, 4);
      await assert.rejects(parse(b), isStreamError(/version 2 is the obsolete SaveVM v2 format/));
      b.writeUInt32BE(4, 4);
      await assert.rejects(parse(b), isStreamError(/unsupported stream version 4 \(expected 3\) at byte 4/));
    });
    it('missing configuration, wrong machine type, oversized machine name', async () => {
      const w = new StreamWriter();
      w.header();
      w.eof();
      await assert.rejects(parse(w.toBuffer()), isStreamError(/configuration section missing: got section type EOF at byte 8/));
      await assert.rejects(parse(base(), { expectMachine: 'pc-i440fx-7.2' }), isStreamError(/machine type received is 'none' and local is 'pc-i440fx-7.2'/));
      const b = base();
      b.writeUInt32BE(0x7fffffff, 9);
      await assert.rejects(parse(b), isStreamError(/configuration.name: size 2147483647 out of range \(max 256\)/));
    });
    it('unknown section type names the byte and its position', async () => {
      const w = new StreamWriter();
      w.header();
      w.configuration({ machine: 'none' });
      w.put8(0x42);
      await assert.rejects(parse(w.toBuffer()), isStreamError(/unknown section type 0x42 at byte 17/));
    });
    it('bad footer: wrong marker and mismatched section id', async () => {
      const { sample } = smallSample();
      const b = sample.bytes;
      const first = b.indexOf(Buffer.from([0x7e, 0, 0, 0, 2]));
      const bad1 = Buffer.from(b);
      bad1[first] = 0x7f;
      await assert.rejects(parse(bad1), isStreamError(new RegExp(`missing footer of section 2: got byte 0x7f at byte ${first}`)));
      const bad2 = Buffer.from(b);
      bad2[first + 4] = 9;
      await assert.rejects(parse(bad2), isStreamError(new RegExp(`footer for section 9 does not match section 2 at byte ${first}`)));
    });
    it('PART for a section never started', async () => {
      const w = new StreamWriter();
      w.header();
      w.configuration({ machine: 'none' });
      w.sectionPart(SectionType.PART, 7);
      await assert.rejects(parse(w.toBuffer()), isStreamError(/PART for unknown section id 7 at byte 17/));
    });
    it('commands: unknown id, INVALID, wrong fixed length, oversized PACKAGED', async () => {
      const mk = (cmd: number, len: number) => {
        const w = new StreamWriter();
        w.header();
        w.configuration({ machine: 'none' });
        w.put8(SectionType.COMMAND);
        w.put16(cmd);
        w.put16(len);
        w.putBytes(Buffer.alloc(len, 0xff));
        return w.toBuffer();
      };
      await assert.rejects(parse(mk(99, 0)), isStreamError(/unknown or invalid migration command 99 at byte 17/));
      await assert.rejects(parse(mk(0, 0)), isStreamError(/unknown or invalid migration command 0/));
      await assert.rejects(parse(mk(MIG_CMD.PING, 3)), isStreamError(/command PING has length 3, expected 4/));
      await assert.rejects(parse(mk(MIG_CMD.PACKAGED, 4)), isStreamError(/PACKAGED payload of 4294967295 bytes exceeds the limit/));
      await assert.rejects(parse(mk(MIG_CMD.POSTCOPY_ADVISE, 5)), isStreamError(/POSTCOPY_ADVISE payload of 5 bytes, expected 0 or 16/));
    });
    it('oversized VM description length', async () => {
      const { sample } = smallSample();
      const b = Buffer.from(sample.bytes);
      b.writeUInt32BE(0xfffffff0, sample.eofAt + 2);
      await assert.rejects(parse(b), isStreamError(/VM description of 4294967280 bytes exceeds the limit/));
      const c = Buffer.from(sample.bytes);
      c[sample.eofAt + 6] = 0x5b; // '[' instead of '{'
      await assert.rejects(parse(c), isStreamError(/VM description/));
    });
    it('RAM block length mismatch and out-of-range page offset in a stream', async () => {
      await assert.rejects(
        parseWholeStream(StreamReader.fromBuffer(smallSample().sample.bytes), [{ idstr: 'ram', size: 4 * PAGE }, { idstr: 'mem1', size: PAGE }]),
        isStreamError(/length mismatch, received 8192, local 4096/),
      );
      const w = new StreamWriter();
      w.header();
      w.configuration({ machine: 'none' });
      w.sectionStart(SectionType.START, 1, 'ram', 0, 4);
      w.put64(PAGE | 4);
      w.putCountedString('ram');
      w.put64(PAGE);
      w.put64(0x10);
      w.footer(1);
      w.sectionPart(SectionType.PART, 1);
      const at = w.totalBytes;
      w.put64(PAGE | 0x08);
      w.putCountedString('ram');
      w.putBytes(Buffer.alloc(PAGE));
      await assert.rejects(
        parseWholeStream(StreamReader.fromBuffer(w.toBuffer()), [{ idstr: 'ram', size: PAGE }]),
        isStreamError(new RegExp(`RAM offset 0x1000 outside block 'ram' \\(4096 bytes\\) at byte ${at}`)),
      );
    });
  });

  it('after EOF, something other than a VM description is tolerated (as QEMU does) and reported', async () => {
    const { sample } = smallSample({ vmdesc: false });
    const parser = new SectionParser(StreamReader.fromBuffer(Buffer.concat([sample.bytes, Buffer.from([0x42])])));
    const kinds: string[] = [];
    for (;;) {
      const item = await parser.next();
      if (!item) break;
      kinds.push(item.kind);
      if (item.kind === 'section') {
        // Skip payload up to the footer: this test only looks at the framing.
        while (!(parser.reader.peekU8(0) === 0x7e && parser.reader.peekBe32(1) === item.sectionId)) parser.reader.skip(1);
      }
    }
    assert.equal(kinds.at(-1), 'eof');
    assert.match(parser.trailerWarning ?? '', /expected VM description after EOF, got section type 0x42 at byte \d+/);
  });

  it('vmdesc: false stops at EOF without reading further (postcopy: connection stays open)', async () => {
    const { sample } = smallSample({ vmdesc: false });
    const r = new StreamReader();
    r.push(sample.bytes); // never ended
    const res = await withTimeout(parseWholeStream(r, SMALL_BLOCKS, { vmdesc: false }), 2000, 'parse');
    assert.ok(res.sawEof);
  });

  it('1000+ randomly mutated streams end in success or StreamError, never another error or a hang', async function () {
    this.timeout(300000);
    // Mostly framing: one data page, the rest zero pages, devices in a PACKAGED command.
    const ram = Buffer.alloc(4 * PAGE);
    ram.fill(0x5a, 2 * PAGE, 3 * PAGE);
    const orig = buildSample({ blocks: [{ idstr: 'ram', data: ram }, { idstr: 'mem1', data: Buffer.alloc(2 * PAGE) }], commands: true, packaged: true }).bytes;
    const rnd = prng(0xfeed);
    const outcomes = { ok: 0, streamError: 0 };
    const messages = new Map<string, number>();
    for (let i = 0; i < 1500; i++) {
      const b = Buffer.from(orig);
      let m: Buffer = b;
      const kind = i % 4;
      const nmut = 1 + (rnd() % 4);
      for (let k = 0; k < nmut; k++) {
        const at = rnd() % m.length;
        if (kind === 0) m[at] = rnd() & 0xff; // byte replaced
        else if (kind === 1) m[at] ^= 1 << (rnd() % 8); // bit flip
        else if (kind === 2) m = Buffer.concat([m.subarray(0, at), Buffer.from([rnd() & 0xff, rnd() & 0xff]), m.subarray(at)]); // insertion
        else m = Buffer.concat([m.subarray(0, at), m.subarray(Math.min(m.length, at + 1 + (rnd() % 8)))]); // deletion
      }
      // Some runs arrive in small chunks to cover the async paths too.
      const reader = i % 3 === 0 ? feedChunked(m, [1 + (rnd() % 700), 1 + (rnd() % 3000)]) : StreamReader.fromBuffer(m);
      try {
        await withTimeout(parseWholeStream(reader, SMALL_BLOCKS), 5000, `mutation ${i}`);
        outcomes.ok++;
      } catch (err) {
        if (!(err instanceof StreamError)) {
          assert.fail(`mutation ${i} (kind ${kind}) threw ${(err as Error)?.stack ?? String(err)}`);
        }
        outcomes.streamError++;
        const key = err.message.replace(/\d+/g, 'N').replace(/'[^']*'/g, "'X'").slice(0, 60);
        messages.set(key, (messages.get(key) ?? 0) + 1);
      }
    }
    assert.equal(outcomes.ok + outcomes.streamError, 1500);
    assert.ok(outcomes.streamError > 700, `only ${outcomes.streamError} mutations were detected`);
    console.log(`      mutations: ${outcomes.ok} parsed, ${outcomes.streamError} StreamErrors, ${messages.size} distinct messages`);
  });

  describe('command payloads and return path', () => {
    it('POSTCOPY_ADVISE, POSTCOPY_RAM_DISCARD, RECV_BITMAP payloads round trip and validate', () => {
      const a = { ramPagesizeSummary: 4096n | (2n << 20n), targetPageSize: 4096n };
      assert.deepEqual(decodePostcopyAdvise(encodePostcopyAdvise(a)), a);
      assert.equal(decodePostcopyAdvise(encodePostcopyAdvise(undefined)), undefined);
      const d = { block: 'pc.ram', ranges: [[0, 4096], [1 << 20, 2 << 20]] as Array<[number, number]> };
      const enc = encodeDiscard(d);
      assert.equal(enc.subarray(0, 9).toString('hex'), '0006' + Buffer.from('pc.ram').toString('hex') + '00');
      assert.deepEqual(decodeDiscard(enc), d);
      assert.throws(() => decodeDiscard(enc.subarray(0, enc.length - 1)), isStreamError(/not a multiple of 16/));
      const v1 = Buffer.from(enc);
      v1[0] = 1;
      assert.throws(() => decodeDiscard(v1), isStreamError(/version 1, expected 0/));
      assert.equal(decodeRecvBitmapCommand(encodeRecvBitmapCommand('pc.ram')), 'pc.ram');
      assert.throws(() => decodeRecvBitmapCommand(Buffer.from([5, 1])), isStreamError(/malformed/));
    });

    it('return-path messages round trip through the table and are validated', async () => {
      const msgs: RpMessage[] = [
        { type: 'SHUT', status: 0 },
        { type: 'PONG', value: 1 },
        { type: 'REQ_PAGES', start: 0x200000, len: 0x200000, block: 'pc.ram' },
        { type: 'REQ_PAGES', start: 0x1000, len: 0x1000 },
        { type: 'RECV_BITMAP', block: 'pc.ram' },
        { type: 'RESUME_ACK', value: 1 },
        { type: 'SWITCHOVER_ACK' },
      ];
      const w = new StreamWriter();
      for (const m of msgs) writeRpMessage(w, m);
      const bytes = w.toBuffer();
      assert.equal(bytes.subarray(0, 8).toString('hex'), '0001000400000000');
      const r = feedChunked(bytes, [3, 1, 7]);
      for (const m of msgs) assert.deepEqual(await readRpMessage(r), m);
      const bad = (hex: string, re: RegExp) => assert.rejects(readRpMessage(StreamReader.fromBuffer(Buffer.from(hex, 'hex'))), isStreamError(re));
      await bad('00000000', /unknown return-path message type 0/);
      await bad('00090000', /unknown return-path message type 9/);
      await bad('0002000300000000', /PONG has length 3, expected 4/);
      await bad('00030400', /REQ_PAGES_ID of 1024 bytes is too long/);
      await bad('0003000d' + '0000000000000000' + '00001000' + '05', /REQ_PAGES_ID block name is malformed/);
    });

    it('RECV_BITMAP body: size, little-endian bitmap, end mark', async () => {
      const bitmap = Buffer.alloc(16);
      bitmap[0] = 0b101;
      bitmap[9] = 0x80;
      const w = new StreamWriter();
      writeRecvBitmapBody(w, bitmap);
      const bytes = w.toBuffer();
      assert.equal(bytes.subarray(0, 8).toString('hex'), '0000000000000010');
      assert.equal(bytes.subarray(24).toString('hex'), '0123456789abcdef');
      assert.ok(Buffer.from(await readRecvBitmapBody(StreamReader.fromBuffer(bytes), 100)).equals(bitmap));
      await assert.rejects(readRecvBitmapBody(StreamReader.fromBuffer(bytes), 200), isStreamError(/size 16, expected 32 for 200 pages/));
      const badEnd = Buffer.from(bytes);
      badEnd[31] ^= 1;
      await assert.rejects(readRecvBitmapBody(StreamReader.fromBuffer(badEnd), 100), isStreamError(/end mark 0x123456789abcdee is wrong/));
    });
  });
});
