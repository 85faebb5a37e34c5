/**
 * Bad migration streams against a real destination process:
 *
 *   ferry run --machine none --memory 64M --serial none --incoming file:FILE
 *   ferry run ... --incoming 'exec:cat FILE'
 *
 * With exit-on-error (the default, as QEMU's), a stream the destination
 * rejects must end the process with status 1 (never a signal: no crash, no
 * abort) and one clear line on stderr naming what was wrong; a valid stream
 * must load without that line. Streams come from test/helpers/streams.ts:
 * a valid stream for a 64 MiB `-M none` machine (block 'ram'), hand-made
 * corruptions of it, and seeded random mutations (the seed is in the title).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FERRY_MAIN, ferryArgv } from '../../lib/cli/launch';
import { RAM_FLAG, SectionType } from '../../lib/stream/constants';
import { Rng, buildStream, caseSeed, indexStream, mutate, splice, withField, type IndexItem, type StreamIndex } from '../helpers/streams';

const RUN = path.join(__dirname, '..', '..', 'lib', 'cli', 'run.js');
const HAVE_KVM = fs.existsSync('/dev/kvm');
const HAVE_RUN = fs.existsSync(RUN) && fs.existsSync(FERRY_MAIN);
const RAM = 64 << 20;
const SEED = process.env.FERRY_FUZZ_SEED ? Number(process.env.FERRY_FUZZ_SEED) >>> 0 : 0x5eed0002;
const FUZZ = Number(process.env.FERRY_PROC_FUZZ_CASES ?? 24);
const EXIT_TIMEOUT_MS = 20_000;

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stderr: string;
  stdout: string;
  /** True when the test had to stop the process (it did not exit on its own). */
  stopped: boolean;
  ms: number;
}

/** Runs `ferry run` as a destination of `incoming`; stops it with SIGTERM after `stopAfterMs` if still alive. */
function runDestination(incoming: string, stopAfterMs = EXIT_TIMEOUT_MS): Promise<Exit> {
  const t0 = Date.now();
  const child = spawn(process.execPath, ferryArgv(['run', '--machine', 'none', '--memory', '64M', '--serial', 'none', '--incoming', incoming]), {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let stdout = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  let stopped = false;
  const timer = setTimeout(() => {
    stopped = true;
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), 5000).unref();
  }, stopAfterMs);
  return new Promise((resolve) => {
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr, stdout, stopped, ms: Date.now() - t0 });
    });
  });
}

function describeExit(e: Exit): string {
  return `status ${e.code} signal ${e.signal}${e.stopped ? ' (stopped by the test)' : ''} after ${e.ms} ms; stderr: ${JSON.stringify(e.stderr.slice(0, 800))}`;
}

/** Exit status 1 on its own, no signal, one readable line naming the failure. */
function assertRejected(e: Exit, re: RegExp, ctx: string): void {
  assert.equal(e.signal, null, `${ctx}: killed by a signal: ${describeExit(e)}`);
  assert.equal(e.stopped, false, `${ctx}: did not exit on its own: ${describeExit(e)}`);
  assert.equal(e.code, 1, `${ctx}: ${describeExit(e)}`);
  const lines = e.stderr.split('\n').filter((l) => l.trim() !== '');
  const line = lines.find((l) => /load of migration failed: /.test(l));
  assert.ok(line, `${ctx}: no failure line: ${describeExit(e)}`);
  assert.match(line, re, ctx);
  assert.doesNotMatch(line, /[^\x20-\x7e]/, `${ctx}: raw bytes in ${JSON.stringify(line)}`);
  // No JS stack, no native abort text.
  assert.doesNotMatch(e.stderr, /^\s+at .+:\d+:\d+\)?$|Segmentation|Aborted|FATAL ERROR|core dumped|Unhandled|uncaught/im, `${ctx}: ${describeExit(e)}`);
}

describe(HAVE_KVM && HAVE_RUN ? 'bad migration streams (ferry run destination process)' : `bad migration streams (ferry run destination process) (skipped: ${HAVE_KVM ? 'dist/lib/cli/run.js missing' : '/dev/kvm missing'})`, function () {
  this.timeout(120_000);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-bad-proc-'));
  let good: Buffer;
  let index: StreamIndex;
  let keep = false;

  before(async function () {
    if (!HAVE_KVM || !HAVE_RUN) this.skip();
    // 64 MiB machine: random content in the first 512 KiB, the rest ZERO records.
    good = buildStream({ ramSize: RAM, seed: 11, randomBytes: 512 << 10 }).buf;
    index = await indexStream(good);
  });

  afterEach(function () {
    if (this.currentTest?.state === 'failed') keep = true;
  });
  after(() => {
    if (!keep) fs.rmSync(dir, { recursive: true, force: true });
  });

  const file = (name: string, buf: Buffer): string => {
    const f = path.join(dir, `${name.replace(/[^A-Za-z0-9_.-]+/g, '_')}.bin`);
    fs.writeFileSync(f, buf);
    return f;
  };
  const find = (pred: (it: IndexItem) => boolean): IndexItem => {
    const it = index.items.find(pred);
    if (!it) throw new Error('item not in the stream');
    return it;
  };

  it('loads the valid stream (control): no failure line, exits 0 by itself or on SIGTERM, no signal', async () => {
    const e = await runDestination(`file:${file('good', good)}`, 5000);
    assert.equal(e.signal, null, describeExit(e));
    assert.equal(e.code, 0, describeExit(e));
    assert.doesNotMatch(e.stderr, /failed/, describeExit(e));
  });

  it('rejects hand-made bad streams with status 1 and a clear message (file: and exec:)', async () => {
    const timer = find((it) => it.kind === 'section' && it.idstr === 'timer');
    const part = find((it) => it.kind === 'section' && it.type === SectionType.PART);
    const memsize = find((it) => it.kind === 'ram' && it.rec === 'memsize') as Extract<IndexItem, { kind: 'ram' }>;
    const page = find((it) => it.kind === 'ram' && it.rec === 'page' && !it.named);
    const zero = find((it) => it.kind === 'ram' && it.rec === 'zero' && !it.named);
    const footer = find((it) => it.kind === 'footer' && it.sectionId === 2);
    const vd = find((it) => it.kind === 'vmdesc');
    const withOffset = (pos: number, off: number) => withField(good, pos, 8, BigInt(off) | (good.readBigUInt64BE(pos) & 0xfffn));
    const cases: Array<{ name: string; buf: Buffer; re: RegExp; exec?: boolean }> = [
      { name: 'empty', buf: Buffer.alloc(0), re: /stream ended at byte 0 while reading file magic/ },
      { name: 'wrong magic', buf: withField(good, 0, 4, 0x12345678), re: /not a migration stream: magic 0x12345678/ },
      { name: 'version 2', buf: withField(good, 4, 4, 2), re: /version 2/, exec: true },
      { name: 'version 4', buf: withField(good, 4, 4, 4), re: /unsupported stream version 4/ },
      { name: 'truncated in the header', buf: good.subarray(0, 6), re: /stream ended at byte 6 while reading file version/ },
      { name: 'truncated in RAM', buf: good.subarray(0, page.pos + 100), re: new RegExp(`stream ended at byte ${page.pos + 100} while reading RAM page data`), exec: true },
      { name: 'truncated before EOF', buf: good.subarray(0, index.eofPos), re: new RegExp(`stream ended at byte ${index.eofPos} while reading section type`) },
      { name: 'unknown section type', buf: withField(good, part.pos, 1, 0x09), re: /unknown section type 0x09/ },
      { name: 'unknown device', buf: splice(good, timer.pos + 6, 5, Buffer.from('tuner')), re: /unknown savevm section or instance 'tuner'/ },
      { name: 'page offset beyond RAM', buf: withOffset(page.pos, RAM), re: /RAM offset 0x4000000 outside block 'ram' \(67108864 bytes\)/, exec: true },
      { name: 'page offset 2^63', buf: withField(good, page.pos, 8, (1n << 63n) | BigInt(RAM_FLAG.PAGE | RAM_FLAG.CONTINUE)), re: /RAM record offset out of range/ },
      { name: 'page offset unaligned', buf: withField(good, page.pos, 8, good.readBigUInt64BE(page.pos) | 0x801n), re: /unknown combination of RAM record flags/ },
      { name: 'zero fill byte', buf: withField(good, zero.pos + 8, 1, 0x5a), re: /zero page record with fill byte 0x5a/ },
      { name: 'MEM_SIZE of a 128 MiB source', buf: withField(withField(good, memsize.pos, 8, 2 * RAM + RAM_FLAG.MEM_SIZE), memsize.pos + 9 + memsize.nameLen, 8, 2 * RAM), re: /RAM block 'ram': length mismatch, received 134217728, local 67108864/, exec: true },
      { name: 'bad footer', buf: withField(good, footer.pos + 1, 4, 9), re: /footer for section 9 does not match section 2/ },
      { name: 'oversized vmdesc length', buf: withField(good, vd.pos + 1, 4, 0xfffffff0), re: /VM description of 4294967280 bytes exceeds the limit/ },
      { name: 'block name with control bytes', buf: splice(good, memsize.pos + 9, 3, Buffer.from([0x0a, 0x1b, 0xff])), re: /unknown RAM block '\\x0a\\x1b\\xff'/ },
    ];
    for (const c of cases) {
      const f = file(c.name, c.buf);
      for (const uri of c.exec ? [`file:${f}`, `exec:cat ${f}`] : [`file:${f}`]) {
        const e = await runDestination(uri);
        assertRejected(e, c.re, `${c.name} via ${uri.slice(0, 5)}`);
      }
    }
    assert.ok(cases.length >= 15);
  });

  it(`fuzz: ${FUZZ} mutated streams (seed 0x${SEED.toString(16)}) end with status 0 or 1, never a signal or a hang`, async () => {
    let rejected = 0;
    for (let i = 0; i < FUZZ; i++) {
      const rng = new Rng(caseSeed(SEED, i));
      const m = mutate(rng, good, index);
      const f = file(`fuzz-${i}`, m.buf);
      // A mutation the format cannot detect loads: the process then stays up (or exits 0).
      const e = await runDestination(`file:${f}`, 8000);
      const ctx = `fuzz case ${i} (seed 0x${SEED.toString(16)}): ${m.desc}; input ${f}`;
      assert.equal(e.signal, null, `${ctx}: ${describeExit(e)}`);
      if (e.code === 1 && !e.stopped) {
        rejected++;
        assertRejected(e, /./, ctx);
      } else {
        assert.equal(e.code, 0, `${ctx}: ${describeExit(e)}`);
        assert.doesNotMatch(e.stderr, /failed/, `${ctx}: ${describeExit(e)}`);
      }
    }
    assert.ok(rejected >= FUZZ / 3, `only ${rejected} of ${FUZZ} mutations rejected`);
  });
});
