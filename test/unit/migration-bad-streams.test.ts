/**
 * The destination against bad streams, in process: truncated, wrong magic
 * or version, unknown sections, bad offsets, oversized lengths, and seeded
 * random mutations of valid streams (hand-written and engine-produced).
 *
 * Every case must end with the destination either `completed` (a mutation
 * the format cannot detect, e.g. inside page data) or `failed` with a
 * StreamError (code ERR_MIGRATION_STREAM) whose message says what was
 * wrong; never a hang, never an uncaught exception, never a guest that ran
 * on a failed load, and never a byte written outside the RAM block: the
 * block is a sub-range of one native mapping framed by canary guards that
 * are checked after every case.
 *
 * Reproduce a fuzz failure with FERRY_FUZZ_SEED=<seed> (and
 * FERRY_FUZZ_CASES=<n>); the failing input is also saved to a file named in
 * the assertion message.
 */
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native, type GuestMemory } from '../../lib/native';
import { IncomingMigration } from '../../lib/migration/destination';
import { MigrationStateMachine } from '../../lib/migration/state';
import { MIG_CMD, MIG_RP_MSG, RAM_FLAG, SectionType } from '../../lib/stream/constants';
import { listenIncoming } from '../../lib/transport';
import { GuardedMemory, type MemoryMachine } from '../helpers/memory-machine';
import {
  BufferChannel,
  Rng,
  buildStream,
  caseSeed,
  chunked,
  engineStream,
  indexStream,
  mutate,
  saveCase,
  splice,
  withField,
  type IndexItem,
  type StreamIndex,
} from '../helpers/streams';

const RAM = 256 << 10;
const PAGE = 4096;
const CASE_TIMEOUT_MS = 5000;
const SEED = process.env.FERRY_FUZZ_SEED ? Number(process.env.FERRY_FUZZ_SEED) >>> 0 : 0x5eed0001;
const FUZZ_CASES = Math.max(1, Number(process.env.FERRY_FUZZ_CASES ?? 5000));
const FUZZ_BATCH = 500;

interface Outcome {
  status: string;
  error: string | undefined;
  err: (Error & { code?: string }) | undefined;
  machine: MemoryMachine;
  guard: string | undefined;
  channel: BufferChannel | undefined;
  ms: number;
}

interface Base {
  name: string;
  buf: Buffer;
  index: StreamIndex;
  returnPath: boolean;
}

describe('bad migration streams (destination, in-process)', function () {
  this.timeout(60000);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-bad-streams-'));
  const mems: GuestMemory[] = [];
  let guarded: GuardedMemory;
  let plain: Base;
  let withRp: Base;
  let engine: Base;
  let plainRam: Buffer;
  let engineRam: Buffer;
  let keepDir = false;
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);

  const memory = (size: number): GuestMemory => {
    const m = new (native().GuestMemory)(size);
    mems.push(m);
    return m;
  };

  before(async () => {
    process.on('unhandledRejection', onUnhandled);
    guarded = new GuardedMemory(memory, RAM);
    const p = buildStream({ ramSize: RAM, seed: 7 });
    plainRam = p.ram;
    plain = { name: 'plain', buf: p.buf, index: await indexStream(p.buf), returnPath: false };
    const r = buildStream({ ramSize: RAM, seed: 7, returnPath: true });
    withRp = { name: 'return-path', buf: r.buf, index: await indexStream(r.buf), returnPath: true };
    // The engine's own output (file: transport), from RAM with random and zero pages.
    engineRam = Buffer.alloc(RAM);
    crypto.randomFillSync(engineRam.subarray(0, RAM / 2));
    engineRam.fill(0x11, RAM - 3 * PAGE, RAM - 2 * PAGE);
    const eb = await engineStream(memory(RAM), engineRam, path.join(dir, 'engine.bin'));
    engine = { name: 'engine', buf: eb, index: await indexStream(eb), returnPath: false };
  });

  after(() => {
    process.off('unhandledRejection', onUnhandled);
    for (const m of mems) m.close();
    if (!keepDir) fs.rmSync(dir, { recursive: true, force: true });
  });

  afterEach(function () {
    if (this.currentTest?.state === 'failed') keepDir = true;
    assert.deepEqual(unhandled, [], 'unhandled promise rejections');
  });

  /** Loads `buf` into a fresh guarded destination; never throws, never waits longer than CASE_TIMEOUT_MS. */
  async function load(buf: Buffer, opts: { returnPath?: boolean; via?: 'channel' | 'file'; rng?: Rng } = {}): Promise<Outcome> {
    guarded.clearBlock();
    const machine = guarded.machine('inmigrate');
    const st = new MigrationStateMachine({ side: 'destination' });
    const inc = new IncomingMigration(machine, st, { autostart: true });
    const t0 = performance.now();
    let channel: BufferChannel | undefined;
    let done: Promise<void>;
    let close = async () => undefined as void;
    if (opts.via === 'file') {
      const file = path.join(dir, 'case.bin');
      fs.writeFileSync(file, buf);
      const l = await listenIncoming(`file:${file}`);
      done = inc.run(() => l.accept());
      close = () => l.close();
    } else {
      const { chunks } = opts.rng ? chunked(buf, opts.rng) : { chunks: [buf] };
      const ch = new BufferChannel(chunks, { returnPath: opts.returnPath });
      channel = ch;
      done = inc.run(async () => ch);
    }
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      done.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), CASE_TIMEOUT_MS);
      }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      inc.abort(new Error('test timeout'));
      await done;
      await close();
      return { status: 'hang', error: `no outcome within ${CASE_TIMEOUT_MS} ms`, err: undefined, machine, guard: guarded.check(), channel, ms: CASE_TIMEOUT_MS };
    }
    await close();
    return { status: st.status, error: st.error, err: inc.error, machine, guard: guarded.check(), channel, ms: performance.now() - t0 };
  }

  function assertNeverRan(o: Outcome, ctx: string): void {
    const m = o.machine;
    assert.ok(!m.runStates.includes('running'), `${ctx}: guest ran (${m.runStates.join(' -> ')})`);
    assert.equal(m.started, 0, `${ctx}: startVcpus called`);
    assert.equal(m.loaded.length, 0, `${ctx}: loadDevices called`);
    assert.equal(m.runState, 'inmigrate', `${ctx}: run state`);
  }

  function assertFailed(o: Outcome, re: RegExp, ctx: string): void {
    assert.equal(o.guard, undefined, `${ctx}: ${o.guard}`);
    assert.equal(o.status, 'failed', `${ctx}: expected failed, got ${o.status} (${o.error ?? 'no error'})`);
    assert.match(o.error ?? '', re, ctx);
    assert.equal(o.err?.code, 'ERR_MIGRATION_STREAM', `${ctx}: error ${o.err?.name} code ${o.err?.code}: ${o.error}`);
    assertClear(o.error ?? '', ctx);
    assertNeverRan(o, ctx);
    if (o.channel?.returnPath) {
      const shut = o.channel.rpMessages().filter((x) => x.type === MIG_RP_MSG.SHUT);
      // Only once the return path was opened does the destination answer SHUT(1).
      for (const s of shut) assert.equal(s.payload.readUInt32BE(0), 1, `${ctx}: SHUT status`);
    }
  }

  /** A clear error names something and carries no JS artefacts. */
  function assertClear(msg: string, ctx: string): void {
    assert.ok(msg.length >= 10, `${ctx}: error too terse: '${msg}'`);
    assert.doesNotMatch(msg, /\bNaN\b|\bundefined\b|\[object |Cannot read prop|is not a function|Maximum call stack/, `${ctx}: unclear error '${msg}'`);
    // One readable line: names from the stream are escaped and cut.
    assert.doesNotMatch(msg, /[^\x20-\x7e]/, `${ctx}: raw bytes in error ${JSON.stringify(msg)}`);
    assert.ok(msg.length < 300, `${ctx}: error of ${msg.length} characters`);
  }

  function assertCompleted(o: Outcome, ram: Buffer | undefined, ctx: string): void {
    assert.equal(o.guard, undefined, `${ctx}: ${o.guard}`);
    assert.equal(o.status, 'completed', `${ctx}: ${o.error}`);
    if (ram) assert.ok(guarded.block().equals(ram), `${ctx}: RAM differs`);
    assert.equal(o.machine.loaded.length, 1, `${ctx}: loadDevices once`);
    assert.equal(o.machine.runState, 'running');
    assert.equal(o.machine.started, 1);
  }

  // ---- locating items of a valid stream ----

  const find = (b: Base, pred: (it: IndexItem) => boolean, what: string): IndexItem => {
    const it = b.index.items.find(pred);
    if (!it) throw new Error(`${b.name}: no ${what}`);
    return it;
  };
  const section = (b: Base, idstr: string, type: number) =>
    find(b, (it) => it.kind === 'section' && it.idstr === idstr && it.type === type, `${idstr} section ${type}`) as Extract<IndexItem, { kind: 'section' }>;
  const ramRec = (b: Base, rec: string, named: boolean) =>
    find(b, (it) => it.kind === 'ram' && it.rec === rec && it.named === named, `${named ? 'named' : 'CONTINUE'} ${rec} record`) as Extract<IndexItem, { kind: 'ram' }>;
  const footerOf = (b: Base, sectionId: number) =>
    find(b, (it) => it.kind === 'footer' && it.sectionId === sectionId, `footer ${sectionId}`) as Extract<IndexItem, { kind: 'footer' }>;
  const command = (b: Base, cmd: number) => find(b, (it) => it.kind === 'command' && it.cmd === cmd, `command ${cmd}`);
  const vmdesc = (b: Base) => find(b, (it) => it.kind === 'vmdesc', 'vmdesc') as Extract<IndexItem, { kind: 'vmdesc' }>;
  /** Rewrites the offset of a RAM record header, keeping its flags. */
  const withOffset = (b: Base, pos: number, offset: bigint) => withField(b.buf, pos, 8, offset | (b.buf.readBigUInt64BE(pos) & 0xfffn));
  const withFlags = (b: Base, pos: number, flags: number) => withField(b.buf, pos, 8, (b.buf.readBigUInt64BE(pos) & ~0xfffn) | BigInt(flags));
  const ascii = (s: string) => Buffer.from(s, 'latin1');

  interface NamedCase {
    name: string;
    make: () => Buffer;
    re: RegExp;
    /** Feed with a return path (channel only; file: has none). */
    rp?: boolean;
  }

  const named = (): NamedCase[] => {
    const P = plain;
    const ramStart = section(P, 'ram', SectionType.START);
    const firstPart = section(P, 'ram', SectionType.PART);
    const endSec = section(P, 'ram', SectionType.END);
    const timer = section(P, 'timer', SectionType.FULL);
    const gs = section(P, 'globalstate', SectionType.FULL);
    const memsize = ramRec(P, 'memsize', true);
    const namedPage = ramRec(P, 'page', true);
    const contPage = ramRec(P, 'page', false);
    const zero = ramRec(P, 'zero', false);
    const footer = footerOf(P, 2);
    const vd = vmdesc(P);
    const eof = P.index.eofPos;
    const total = (v: number) => withField(P.buf, memsize.pos, 8, BigInt(v) | BigInt(RAM_FLAG.MEM_SIZE));
    const blockLenPos = memsize.pos + 9 + memsize.nameLen;
    const open = command(withRp, MIG_CMD.OPEN_RETURN_PATH);
    const ping = command(withRp, MIG_CMD.PING);
    return [
      { name: 'empty stream', make: () => Buffer.alloc(0), re: /ended at byte 0 while reading file magic/ },
      { name: 'wrong magic', make: () => withField(P.buf, 0, 4, 0x51455600), re: /not a migration stream: magic 0x51455600/ },
      { name: 'text instead of a stream', make: () => ascii('{"execute": "qmp_capabilities"}\n'), re: /magic/ },
      { name: 'version 2 (obsolete)', make: () => withField(P.buf, 4, 4, 2), re: /version 2/ },
      { name: 'version 4', make: () => withField(P.buf, 4, 4, 4), re: /unsupported stream version 4/ },
      { name: 'version 0xffffffff', make: () => withField(P.buf, 4, 4, 0xffffffff), re: /unsupported stream version 4294967295/ },
      { name: 'configuration missing', make: () => withField(P.buf, 8, 1, SectionType.START), re: /configuration section missing/ },
      { name: 'configuration for another machine', make: () => splice(P.buf, 13, 4, ascii('nonf')), re: /machine type received is 'nonf' and local is 'none'/ },
      { name: 'oversized machine name length', make: () => withField(P.buf, 9, 4, 0xffffffff), re: /configuration\.name.*out of range/ },
      { name: 'unknown section type byte', make: () => withField(P.buf, firstPart.pos, 1, 0x09), re: /unknown section type 0x09/ },
      { name: 'section type 0x42', make: () => withField(P.buf, firstPart.pos, 1, 0x42), re: /unknown section type 0x42/ },
      { name: 'subsection marker at top level', make: () => withField(P.buf, timer.pos, 1, SectionType.SUBSECTION), re: /unknown section type SUBSECTION/ },
      { name: 'vmdesc marker inside the stream', make: () => withField(P.buf, timer.pos, 1, SectionType.VMDESCRIPTION), re: /unknown section type VMDESCRIPTION/ },
      { name: 'unknown device idstr', make: () => splice(P.buf, timer.pos + 6, 5, ascii('tuner')), re: /unknown savevm section or instance 'tuner'/ },
      { name: 'unknown device instance', make: () => withField(P.buf, timer.pos + 11, 4, 1), re: /unknown savevm section or instance 'timer' 1/ },
      { name: 'unknown iterative section', make: () => splice(P.buf, ramStart.pos + 6, 3, ascii('rom')), re: /iterative section 'rom'.*not known/ },
      { name: 'RAM section instance 1', make: () => withField(P.buf, ramStart.pos + 9, 4, 1), re: /unknown savevm section or instance 'ram' 1/ },
      { name: 'RAM section sent as FULL', make: () => withField(P.buf, ramStart.pos, 1, SectionType.FULL), re: /section 'ram' sent as FULL/ },
      { name: 'RAM section version 5', make: () => withField(P.buf, ramStart.pos + 13, 4, 5), re: /section 'ram' version 5/ },
      { name: 'device section version too new', make: () => withField(P.buf, timer.pos + 15, 4, 3), re: /section 'timer' version 3 not in 1\.\.2/ },
      { name: 'device section version 0', make: () => withField(P.buf, timer.pos + 15, 4, 0), re: /section 'timer' version 0 not in 1\.\.2/ },
      { name: 'PART for an unknown section id', make: () => withField(P.buf, firstPart.pos + 1, 4, 7), re: /PART for unknown section id 7/ },
      { name: 'bad section footer id', make: () => withField(P.buf, footer.pos + 1, 4, 3), re: /footer for section 3 does not match section 2/ },
      { name: 'missing section footer', make: () => withField(P.buf, footer.pos, 1, 0x00), re: /missing footer of section 2: got byte 0x00/ },
      { name: 'page offset one page beyond the block', make: () => withOffset(P, namedPage.pos, BigInt(RAM)), re: /RAM offset 0x40000 outside block 'ram' \(262144 bytes\)/ },
      { name: 'CONTINUE page offset beyond the block', make: () => withOffset(P, contPage.pos, BigInt(RAM + 16 * PAGE)), re: /RAM offset 0x50000 outside block 'ram'/ },
      { name: 'zero page offset beyond the block', make: () => withOffset(P, zero.pos, BigInt(RAM)), re: /RAM offset 0x40000 outside block/ },
      { name: 'page offset 2^52', make: () => withOffset(P, namedPage.pos, 1n << 52n), re: /outside block 'ram'/ },
      { name: 'page offset above 2^53', make: () => withOffset(P, contPage.pos, 1n << 62n), re: /RAM record offset out of range/ },
      { name: 'page offset 2^64 - 4096', make: () => withOffset(P, contPage.pos, 0xfffffffffffff000n), re: /RAM record offset out of range/ },
      { name: 'page offset not aligned (+1)', make: () => withFlags(P, contPage.pos, RAM_FLAG.PAGE | RAM_FLAG.CONTINUE | 1), re: /unknown combination of RAM record flags 0x29/ },
      { name: 'page offset not aligned (+0x800)', make: () => withFlags(P, contPage.pos, RAM_FLAG.PAGE | RAM_FLAG.CONTINUE | 0x800), re: /RAM record flags 0x828/ },
      { name: 'XBZRLE page', make: () => withFlags(P, contPage.pos, RAM_FLAG.XBZRLE | RAM_FLAG.CONTINUE), re: /XBZRLE not supported/ },
      { name: 'compressed page', make: () => withFlags(P, contPage.pos, RAM_FLAG.COMPRESS_PAGE | RAM_FLAG.CONTINUE), re: /compressed RAM pages not supported/ },
      { name: 'obsolete FULL page flag', make: () => withFlags(P, contPage.pos, RAM_FLAG.FULL | RAM_FLAG.CONTINUE), re: /obsolete RAM_SAVE_FLAG_FULL/ },
      { name: 'CONTINUE with no previous block', make: () => withFlags(P, namedPage.pos, RAM_FLAG.PAGE | RAM_FLAG.CONTINUE), re: /CONTINUE flag but no previous block/ },
      { name: 'unknown block name in a page record', make: () => splice(P.buf, namedPage.pos + 9, 3, ascii('rom')), re: /RAM record for unknown block 'rom'/ },
      { name: 'block name with control bytes', make: () => splice(P.buf, namedPage.pos + 9, 3, Buffer.from([0x0a, 0x00, 0xff])), re: /RAM record for unknown block '\\x0a\\x00\\xff'/ },
      { name: 'unknown block name in MEM_SIZE', make: () => splice(P.buf, memsize.pos + 9, 3, ascii('rom')), re: /unknown RAM block 'rom', cannot accept migration/ },
      { name: 'oversized block name length in a page record', make: () => withField(P.buf, namedPage.pos + 8, 1, 255), re: /unknown block/ },
      { name: 'oversized idstr length (RAM START)', make: () => withField(P.buf, ramStart.pos + 5, 1, 255), re: /not known|unknown/ },
      { name: 'oversized idstr length (device)', make: () => withField(P.buf, gs.pos + 5, 1, 255), re: /unknown savevm section|ended/ },
      { name: 'oversized VM description length', make: () => withField(P.buf, vd.pos + 1, 4, 0xffffffff), re: /VM description of 4294967295 bytes exceeds the limit/ },
      { name: 'VM description longer than the stream', make: () => withField(P.buf, vd.pos + 1, 4, vd.len + 1), re: new RegExp(`stream ended at byte ${P.buf.length} while reading VM description`) },
      { name: 'VM description not JSON', make: () => withField(P.buf, vd.pos + 5, 1, 0x78), re: /VM description is not valid JSON/ },
      { name: 'MEM_SIZE total larger than the blocks', make: () => total(RAM + PAGE), re: /RAM block ''/ },
      { name: 'MEM_SIZE total smaller than the block', make: () => total(RAM - PAGE), re: /length 262144 exceeds the announced total 258048/ },
      { name: 'MEM_SIZE total 0', make: () => total(0), re: /RAM block 'ram' of this machine is missing from the incoming block list/ },
      { name: 'MEM_SIZE block length mismatch', make: () => withField(total(2 * RAM), blockLenPos, 8, 2 * RAM), re: /length mismatch, received 524288, local 262144/ },
      { name: 'MEM_SIZE block length not page aligned', make: () => withField(P.buf, blockLenPos, 8, RAM + 100), re: /length 262244 is not page aligned/ },
      { name: 'MEM_SIZE block length 2^64-1', make: () => withField(P.buf, blockLenPos, 8, 0xffffffffffffffffn), re: /RAM block length 0xffffffffffffffff out of range/ },
      { name: 'ZERO record with fill byte 1', make: () => withField(P.buf, zero.pos + 8, 1, 1), re: /zero page record with fill byte 0x1/ },
      { name: 'ZERO record with fill byte 0xff', make: () => withField(P.buf, zero.pos + 8, 1, 0xff), re: /fill byte 0xff/ },
      { name: 'stream without the final RAM section', make: () => Buffer.concat([P.buf.subarray(0, endSec.pos), P.buf.subarray(timer.pos)]), re: /stream ended without the final RAM section/ },
      { name: 'EOF right after the configuration', make: () => Buffer.concat([P.buf.subarray(0, ramStart.pos), Buffer.from([SectionType.EOF])]), re: /without the final RAM section/ },
      { name: 'unknown globalstate runstate', make: () => splice(P.buf, gs.payloadPos + 4, 7, ascii('runnink')), re: /unknown runstate 'runnink'/ },
      { name: 'globalstate runstate not NUL-terminated', make: () => Buffer.concat([P.buf.subarray(0, gs.payloadPos + 4), Buffer.alloc(100, 0x41), P.buf.subarray(gs.payloadPos + 104)]), re: /runstate is not NUL-terminated/ },
      { name: 'EOF missing (garbage instead)', make: () => withField(P.buf, eof, 1, 0x99), re: /unknown section type 0x99/ },
      // Return path and commands.
      { name: 'unknown command', rp: true, make: () => withField(withRp.buf, ping.pos + 1, 2, 0x42), re: /unknown or invalid migration command 66/ },
      { name: 'INVALID command 0', rp: true, make: () => withField(withRp.buf, ping.pos + 1, 2, 0), re: /unknown or invalid migration command 0/ },
      { name: 'command with the wrong length', rp: true, make: () => withField(withRp.buf, ping.pos + 3, 2, 0xffff), re: /command PING has length 65535, expected 4/ },
      { name: 'PING before OPEN_RETURN_PATH', rp: true, make: () => splice(withRp.buf, open.pos, 5), re: /PING before OPEN_RETURN_PATH/ },
      { name: 'postcopy command in precopy', rp: true, make: () => splice(withRp.buf, ping.pos, 0, Buffer.from([SectionType.COMMAND, 0, MIG_CMD.POSTCOPY_RUN, 0, 0])), re: /command POSTCOPY_RUN is not supported/ },
      { name: 'OPEN_RETURN_PATH on a channel without one', make: () => withRp.buf, re: /asked for a return path but .* has none/ },
    ];
  };

  it('loads the valid streams (controls): RAM byte for byte, guest started, guards intact', async () => {
    assertCompleted(await load(plain.buf), plainRam, 'plain');
    assertCompleted(await load(engine.buf), engineRam, 'engine');
    const o = await load(withRp.buf, { returnPath: true });
    assertCompleted(o, plainRam, 'return-path');
    const msgs = o.channel!.rpMessages();
    assert.deepEqual(
      msgs.map((m) => [m.type, m.payload.readUInt32BE(0)]),
      [
        [MIG_RP_MSG.PONG, 1],
        [MIG_RP_MSG.SHUT, 0],
      ],
    );
    assert.ok(engine.index.items.some((it) => it.kind === 'ram' && it.rec === 'zero'), 'engine stream has ZERO records');
    assert.ok(plain.index.fields.length > 50, `indexed ${plain.index.fields.length} fields`);
  });

  it('accepts what QEMU accepts: no VM description, trailing bytes after it', async () => {
    assertCompleted(await load(plain.buf.subarray(0, plain.index.eofPos + 1)), plainRam, 'no vmdesc');
    assertCompleted(await load(Buffer.concat([plain.buf, Buffer.from('trailing junk')])), plainRam, 'junk after vmdesc');
    assertCompleted(await load(Buffer.concat([plain.buf.subarray(0, plain.index.eofPos + 1), Buffer.from([0x42, 1, 2])])), plainRam, 'junk instead of vmdesc');
  });

  for (const via of ['channel', 'file'] as const) {
    it(`fails each hand-made bad stream with a clear error (${via === 'file' ? 'file: transport' : 'in-memory channel, return path where needed'})`, async () => {
      const cases = named().filter((c) => via === 'channel' || !c.rp);
      assert.ok(cases.length >= (via === 'file' ? 50 : 55), `${cases.length} cases`);
      for (const c of cases) {
        const buf = c.make();
        const o = await load(buf, { via, returnPath: c.rp });
        try {
          assertFailed(o, c.re, c.name);
        } catch (err) {
          const file = saveCase(dir, `named-${c.name}`, buf);
          (err as Error).message += `\n  input saved to ${file}`;
          throw err;
        }
        if (c.rp) {
          const shut = o.channel!.rpMessages().filter((m) => m.type === MIG_RP_MSG.SHUT);
          if (c.name !== 'PING before OPEN_RETURN_PATH') assert.equal(shut.length, 1, `${c.name}: SHUT(1) sent`);
        }
      }
    });
  }

  it('fails every truncation with the byte it ended at (every byte of the first 200 and the tail, stride elsewhere)', async () => {
    for (const base of [plain, engine]) {
      const buf = base.buf;
      const eof = base.index.eofPos;
      const endSec = section(base, 'ram', SectionType.END);
      const cuts = new Set<number>();
      for (let i = 0; i < Math.min(200, buf.length); i++) cuts.add(i);
      for (let i = 200; i < endSec.pos; i += 499) cuts.add(i);
      for (let i = Math.max(0, endSec.pos - 64); i < buf.length; i++) cuts.add(i);
      // Around every structural item too (record headers, footers).
      for (const f of base.index.fields) for (const d of [0, 1, f.size - 1]) if (f.pos + d < buf.length) cuts.add(f.pos + d);
      let completed = 0;
      for (const cut of [...cuts].sort((a, b) => a - b)) {
        const o = await load(buf.subarray(0, cut), { rng: new Rng(cut) });
        const ctx = `${base.name} truncated at ${cut} of ${buf.length}`;
        if (cut === eof + 1) {
          // Everything up to EOF arrived: a stream without a VM description is valid.
          assert.equal(o.status, 'completed', `${ctx}: ${o.error}`);
          assert.equal(o.guard, undefined);
          completed++;
          continue;
        }
        assertFailed(o, new RegExp(`stream ended at byte ${cut} while reading`), ctx);
      }
      assert.equal(completed, 1);
      assert.ok(cuts.size > 300, `${base.name}: ${cuts.size} truncations`);
    }
  });

  // ---- fuzz ----

  const stats = { completed: 0, failed: 0, ms: 0, max: 0, kinds: new Map<string, number>() };
  const batches = Math.ceil(FUZZ_CASES / FUZZ_BATCH);
  for (let b = 0; b < batches; b++) {
    const from = b * FUZZ_BATCH;
    const to = Math.min(FUZZ_CASES, from + FUZZ_BATCH);
    it(`fuzz: mutated valid streams ${from}..${to - 1} of ${FUZZ_CASES} (seed 0x${SEED.toString(16)}) complete or fail cleanly`, async () => {
      const bases = [plain, withRp, engine];
      for (let i = from; i < to; i++) {
        const rng = new Rng(caseSeed(SEED, i));
        const base = bases[i % bases.length]!;
        const m = mutate(rng, base.buf, base.index);
        const o = await load(m.buf, { returnPath: base.returnPath, rng });
        const ctx = `fuzz case ${i} (seed 0x${SEED.toString(16)}, base ${base.name}): ${m.desc}`;
        stats.ms += o.ms;
        stats.max = Math.max(stats.max, o.ms);
        try {
          assert.equal(o.guard, undefined, `${ctx}: ${o.guard}`);
          assert.notEqual(o.status, 'hang', `${ctx}: ${o.error}`);
          if (o.status === 'completed') {
            stats.completed++;
            assert.equal(o.machine.loaded.length, 1, `${ctx}: loadDevices once`);
          } else {
            stats.failed++;
            assertFailed(o, /./, ctx);
            const kind = (o.error ?? '').replace(/\d+|'[^']*'|0x[0-9a-f]+/g, '#').slice(0, 60);
            stats.kinds.set(kind, (stats.kinds.get(kind) ?? 0) + 1);
          }
        } catch (err) {
          const file = saveCase(dir, `fuzz-${SEED.toString(16)}-${i}`, m.buf);
          (err as Error).message += `\n  input saved to ${file}`;
          throw err;
        }
      }
      if (to === FUZZ_CASES) {
        const top = [...stats.kinds.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12);
        console.log(
          `      fuzz: ${FUZZ_CASES} cases, ${stats.completed} completed, ${stats.failed} failed cleanly; ` +
            `load time total ${stats.ms.toFixed(0)} ms, max ${stats.max.toFixed(1)} ms; ${stats.kinds.size} distinct errors, most frequent:\n` +
            top.map(([k, n]) => `        ${n} × ${k}`).join('\n'),
        );
        assert.ok(stats.failed > FUZZ_CASES / 4, `only ${stats.failed} of ${FUZZ_CASES} mutations were detected`);
      }
    });
  }
});
