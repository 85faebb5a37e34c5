/**
 * The test guests boot under QEMU 7.2 (microvm, KVM) and report as
 * documented: memwriter's ready and tick lines with no verification errors,
 * ticker's growing interrupt count, error lines for bad parameters. QEMU is
 * the reference VMM here: if a guest works under QEMU and fails under ferry,
 * the fault is ferry's.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import {
  type GuestLine,
  guestPath,
  listGuests,
  memwriterPage,
  parseGuestOutput,
  readMemwriterStamp,
} from '../../lib/guests';

const HAVE_KVM = fs.existsSync('/dev/kvm');

function findOnPath(exe: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, exe);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

const QEMU = findOnPath('qemu-system-x86_64');
const SKIP = !HAVE_KVM ? '/dev/kvm missing' : !QEMU ? 'qemu-system-x86_64 not installed' : '';

type Tick<K extends GuestLine['kind']> = Extract<GuestLine, { kind: K }>;

interface QemuOptions {
  guest: string;
  append: string;
  mem?: string;
  /** Back RAM with this file (memory-backend-file, share=on) so the test can read and write guest RAM. */
  ramFile?: string;
}

interface Vm {
  /** Poll the serial log until `pred` holds for the lines so far; fails if QEMU exits or time runs out. */
  waitFor(pred: (lines: GuestLine[]) => boolean, timeoutMs?: number): Promise<GuestLine[]>;
  /** The serial log so far. */
  text(): string;
  qmp(commands: { execute: string; arguments?: object }[]): Promise<unknown[]>;
}

const running = new Set<ChildProcess>();

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

async function killQemu(child: ChildProcess): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await exited(child);
  running.delete(child);
}

/** Run `body` against a guest booted under QEMU; QEMU is killed (and reaped) afterwards whatever happens. */
async function withQemu<T>(opts: QemuOptions, body: (vm: Vm) => Promise<T>): Promise<T> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-guest-'));
  const serial = path.join(dir, 'serial.log');
  const qmpSock = path.join(dir, 'qmp.sock');
  const mem = opts.mem ?? '256M';
  const machine = opts.ramFile ? 'microvm,memory-backend=mem0' : 'microvm';
  const args = [
    '-M', machine, '-accel', 'kvm', '-m', mem, '-smp', '1',
    '-nodefaults', '-display', 'none', '-serial', `file:${serial}`,
    '-qmp', `unix:${qmpSock},server=on,wait=off`,
    '-kernel', guestPath(opts.guest), '-append', opts.append,
  ];
  if (opts.ramFile) args.push('-object', `memory-backend-file,id=mem0,size=${mem},mem-path=${opts.ramFile},share=on`);
  const child = spawn(QEMU!, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const text = (): string => (fs.existsSync(serial) ? fs.readFileSync(serial, 'latin1') : '');
  const vm: Vm = {
    text,
    async waitFor(pred, timeoutMs = 20000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const t = text();
        const lines = parseGuestOutput(t);
        if (pred(lines)) return lines;
        if (child.exitCode !== null || child.signalCode !== null) {
          assert.fail(`QEMU exited (${child.exitCode ?? child.signalCode}); stderr: ${stderr}; serial:\n${t}`);
        }
        if (Date.now() > deadline) assert.fail(`timed out waiting for ${opts.guest}; serial:\n${t}\nstderr: ${stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    qmp: (commands) => qmpSession(qmpSock, commands),
  };
  try {
    return await body(vm);
  } finally {
    await killQemu(child);
    assert.ok(child.exitCode !== null || child.signalCode !== null, 'QEMU still running');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Boot, wait until `until` holds, return the lines. */
function boot(opts: QemuOptions & { until: (lines: GuestLine[]) => boolean }): Promise<{ lines: GuestLine[]; text: string }> {
  return withQemu(opts, async (vm) => {
    const lines = await vm.waitFor(opts.until);
    return { lines, text: vm.text() };
  });
}

/** Minimal QMP client: one command at a time, events skipped. */
async function qmpSession(socketPath: string, commands: { execute: string; arguments?: object }[]): Promise<unknown[]> {
  const sock = net.connect(socketPath);
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  let buf = '';
  const pending: ((msg: Record<string, unknown>) => void)[] = [];
  const queue: Record<string, unknown>[] = [];
  sock.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line) continue;
      const msg = JSON.parse(line) as Record<string, unknown>;
      if ('event' in msg) continue;
      const waiter = pending.shift();
      if (waiter) waiter(msg);
      else queue.push(msg);
    }
  });
  const next = (): Promise<Record<string, unknown>> =>
    queue.length ? Promise.resolve(queue.shift()!) : new Promise((resolve) => pending.push(resolve));
  try {
    await next(); // greeting
    const results: unknown[] = [];
    for (const c of [{ execute: 'qmp_capabilities' }, ...commands]) {
      sock.write(JSON.stringify(c) + '\n');
      const r = await next();
      if ('error' in r) throw new Error(`QMP ${c.execute}: ${JSON.stringify(r.error)}`);
      results.push(r.return);
    }
    return results.slice(1);
  } finally {
    sock.destroy();
  }
}

function ticks<K extends 'memwriter-tick' | 'ticker-tick'>(lines: GuestLine[], kind: K): Tick<K>[] {
  return lines.filter((l): l is Tick<K> => l.kind === kind);
}

function assertNoErrorLines(lines: GuestLine[]): void {
  const bad = lines.filter((l) => l.kind === 'error' || l.kind === 'corrupt');
  assert.deepEqual(bad, [], 'error or CORRUPT lines in the serial output');
}

function assertIncreasingTicks(t: { n: number }[], min: number): void {
  assert.ok(t.length >= min, `expected >= ${min} tick lines, got ${t.length}`);
  for (let i = 1; i < t.length; i++) assert.equal(t[i].n, t[i - 1].n + 1, 'tick numbers must count up by one');
}

describe(SKIP ? `test guests under QEMU (skipped: ${SKIP})` : 'test guests under QEMU', function () {
  this.timeout(60000);

  before(function () {
    if (SKIP) this.skip();
    // incremental: nothing to do when `npm run build:guests` already ran
    const make = spawnSync('make', ['-s', '-C', path.dirname(path.dirname(guestPath('memwriter')))], { encoding: 'utf8' });
    assert.equal(make.status, 0, `building the guests failed: ${make.stderr}`);
    for (const g of listGuests()) assert.ok(g.built, `${g.path} missing after make`);
  });

  after(async () => {
    for (const c of [...running]) await killQemu(c);
  });

  it('memwriter ws=32M rate=20M: ready, ticks, paced writes, no errors', async () => {
    const { lines } = await boot({
      guest: 'memwriter',
      append: 'ws=32M rate=20M',
      until: (l) => ticks(l, 'memwriter-tick').length >= 6,
    });
    assertNoErrorLines(lines);
    const ready = lines.find((l) => l.kind === 'memwriter-ready');
    assert.ok(ready && ready.kind === 'memwriter-ready', 'no ready line');
    assert.equal(ready.ws, 32 << 20);
    assert.ok(ready.ram > 250 << 20 && ready.ram <= 256 << 20, `ram=${ready.ram}`);
    const t = ticks(lines, 'memwriter-tick');
    assertIncreasingTicks(t, 6);
    for (const x of t) assert.equal(x.errors, 0);
    for (let i = 1; i < t.length; i++) assert.ok(t[i].writes > t[i - 1].writes, 'writes must grow every tick');
    // 20 MiB/s = 5120 pages/s = 512 per 100 ms tick; pacing may be off by a slice, not by 2x
    const perTick = (t[t.length - 1].writes - t[1].writes) / (t.length - 2);
    assert.ok(perTick > 256 && perTick < 1024, `writes per tick ${perTick}, expected about 512`);
    // every page was verified before being rewritten (after the initial pass)
    assert.equal(t[t.length - 1].verified, t[t.length - 1].writes);
  });

  it('memwriter fill=random ws=16M: no errors, RAM outside the working set holds page-unique data', async () => {
    const { lines, sample } = await withQemu({ guest: 'memwriter', append: 'ws=16M fill=random order=random' }, async (vm) => {
      const lines = await vm.waitFor((l) => ticks(l, 'memwriter-tick').length >= 4);
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-pmem-'));
      const file = path.join(dir, 'mem.bin');
      try {
        // 1 MiB at 128 MiB: above the 16M working set, below the end of RAM
        await vm.qmp([{ execute: 'pmemsave', arguments: { val: 128 << 20, size: 1 << 20, filename: file } }]);
        return { lines, sample: fs.readFileSync(file) };
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
    assertNoErrorLines(lines);
    const ready = lines.find((l) => l.kind === 'memwriter-ready');
    assert.ok(ready && ready.kind === 'memwriter-ready' && ready.ws === 16 << 20, 'ready line with ws=16M');
    const t = ticks(lines, 'memwriter-tick');
    assertIncreasingTicks(t, 4);
    assert.equal(t[t.length - 1].errors, 0);
    assert.ok(t[t.length - 1].writes > t[0].writes, 'flat-out writes grow');
    assert.equal(sample.length, 1 << 20, 'pmemsave sample');
    const pages = new Set<string>();
    for (let o = 0; o < sample.length; o += 4096) {
      const page = sample.subarray(o, o + 4096);
      assert.ok(page.some((b) => b !== 0), `page at +0x${o.toString(16)} is zero`);
      pages.add(page.toString('base64'));
    }
    assert.equal(pages.size, 256, 'every filled page differs from the others');
  });

  it('memwriter reports pages that are lost, stale or torn behind its back', async () => {
    // RAM in a shared file: the test plays a broken migration by editing pages while the VM is stopped
    const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
    const ramFile = path.join(shm, `ferry-guest-ram-${process.pid}`);
    try {
      const result = await withQemu({ guest: 'memwriter', append: 'ws=1M', ramFile }, async (vm) => {
        await vm.waitFor((l) => ticks(l, 'memwriter-tick').length >= 2);
        await vm.qmp([{ execute: 'stop' }]);
        // the working set starts after the image (1 MiB) and its table; find stamped pages
        const fd = fs.openSync(ramFile, 'r+');
        try {
          const base = 1 << 20;
          const region = Buffer.alloc(4 << 20);
          fs.readSync(fd, region, 0, region.length, base);
          const stamps: { gpa: number; stamped: boolean; gen: number }[] = [];
          for (let o = 0; o < region.length; o += 4096) {
            const gpa = base + o;
            stamps.push({ gpa, ...readMemwriterStamp(region.subarray(o, o + 4096), gpa) });
          }
          // pages away from the write position: stamped, with stamped neighbours of the same generation
          const quiet = stamps.filter(
            (s, i) => i > 0 && i + 1 < stamps.length && s.stamped && [stamps[i - 1], stamps[i + 1]].every((n) => n.stamped && n.gen === s.gen),
          );
          assert.ok(quiet.length >= 64, `expected a working set of stamped pages, found ${quiet.length}`);
          // lib/guests.ts knows the whole page format, not just the stamp words
          const q = quiet[10];
          assert.ok(region.subarray(q.gpa - base, q.gpa - base + 4096).equals(memwriterPage(q.gpa, q.gen)), 'page body matches memwriterPage()');
          const [lost, stale, torn] = [quiet[5], quiet[20], quiet[40]];
          fs.writeSync(fd, Buffer.alloc(4096), 0, 4096, lost.gpa);
          fs.writeSync(fd, memwriterPage(stale.gpa, stale.gen - 1), 0, 4096, stale.gpa);
          const tornPage = memwriterPage(torn.gpa, torn.gen);
          tornPage.writeUInt32LE(0xdeadbeef, 4092); // a half-copied page: the tail is wrong
          fs.writeSync(fd, tornPage, 0, 4096, torn.gpa);
          await vm.qmp([{ execute: 'cont' }]);
          const before = ticks(await vm.waitFor(() => true), 'memwriter-tick').length;
          const lines = await vm.waitFor((l) => ticks(l, 'memwriter-tick').length >= before + 3);
          return { lines, text: vm.text(), lost, stale, torn };
        } finally {
          fs.closeSync(fd);
        }
      });
      const { lines, text, lost, stale, torn } = result;
      const corrupt = lines.filter((l) => l.kind === 'corrupt');
      assert.deepEqual(
        corrupt.map((c) => (c.kind === 'corrupt' ? [c.gpa, c.expected, c.found] : [])).sort((a, b) => a[0] - b[0]),
        [
          [lost.gpa, lost.gen, 0],
          [stale.gpa, stale.gen, stale.gen - 1],
          [torn.gpa, torn.gen, torn.gen],
        ].sort((a, b) => a[0] - b[0]),
      );
      assert.match(text, new RegExp(`CORRUPT gpa=0x${lost.gpa.toString(16)} expected=${lost.gen} found=0 stamp=0x0\n`));
      assert.match(text, new RegExp(`CORRUPT gpa=0x${torn.gpa.toString(16)} expected=${torn.gen} found=${torn.gen} tail=0x`));
      const t = ticks(lines, 'memwriter-tick');
      assert.equal(t[t.length - 1].errors, 3, 'each damaged page counted once, then rewritten and verified again');
      assert.ok(t[t.length - 1].verified > 0);
    } finally {
      fs.rmSync(ramFile, { force: true });
    }
  });

  it('memwriter clamps a working set larger than RAM', async () => {
    const { lines } = await boot({
      guest: 'memwriter',
      append: 'ws=1G rate=1M',
      until: (l) => ticks(l, 'memwriter-tick').length >= 1,
    });
    assertNoErrorLines(lines);
    const ready = lines.find((l) => l.kind === 'memwriter-ready');
    assert.ok(ready && ready.kind === 'memwriter-ready');
    assert.ok(ready.ws > 0 && ready.ws < ready.ram, `ws=${ready.ws} ram=${ready.ram}`);
    assert.equal(ready.ws % 4096, 0);
  });

  it('memwriter rejects an unknown parameter with an error line', async () => {
    const { lines } = await boot({
      guest: 'memwriter',
      append: 'ws=8M bogus=1',
      until: (l) => l.some((x) => x.kind === 'error'),
    });
    const err = lines.find((l) => l.kind === 'error');
    assert.ok(err && err.kind === 'error');
    assert.match(err.message, /unknown parameter bogus/);
    assert.ok(!lines.some((l) => l.kind === 'memwriter-ready'), 'no ready line after an error');
  });

  it('ticker: ready, ticks, LAPIC timer interrupts keep coming', async () => {
    const { lines } = await boot({
      guest: 'ticker',
      append: 'hz=100 tick=100',
      until: (l) => ticks(l, 'ticker-tick').length >= 5,
    });
    assertNoErrorLines(lines);
    const ready = lines.find((l) => l.kind === 'ticker-ready');
    assert.ok(ready && ready.kind === 'ticker-ready' && ready.hz === 100, 'ready line with hz=100');
    const t = ticks(lines, 'ticker-tick');
    assertIncreasingTicks(t, 5);
    for (let i = 1; i < t.length; i++) assert.ok(t[i].irqs > t[i - 1].irqs, 'irqs must grow every tick');
    // 100 Hz over 100 ms ticks: about 10 interrupts per tick
    const perTick = (t[t.length - 1].irqs - t[0].irqs) / (t.length - 1);
    assert.ok(perTick >= 7 && perTick <= 13, `irqs per tick ${perTick}, expected about 10`);
  });
});
