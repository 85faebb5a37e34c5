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

import { type GuestLine, guestPath, listGuests, parseGuestOutput } from '../../lib/guests';

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

interface BootOptions {
  guest: string;
  mem?: string;
  append: string;
  /** Stop once this holds for the lines parsed so far. */
  until: (lines: GuestLine[]) => boolean;
  timeoutMs?: number;
  /** Called (while QEMU still runs) once `until` holds, with the QMP socket path. */
  whileRunning?: (qmpSocket: string) => Promise<void>;
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

/** Boot a guest under QEMU, poll its serial file until `until` holds, then kill QEMU. */
async function boot(opts: BootOptions): Promise<{ lines: GuestLine[]; text: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-guest-'));
  const serial = path.join(dir, 'serial.log');
  const qmp = path.join(dir, 'qmp.sock');
  const args = [
    '-M', 'microvm', '-accel', 'kvm', '-m', opts.mem ?? '256M', '-smp', '1',
    '-nodefaults', '-display', 'none', '-serial', `file:${serial}`,
    '-qmp', `unix:${qmp},server=on,wait=off`,
    '-kernel', guestPath(opts.guest), '-append', opts.append,
  ];
  const child = spawn(QEMU!, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const deadline = Date.now() + (opts.timeoutMs ?? 20000);
  let text = '';
  try {
    for (;;) {
      text = fs.existsSync(serial) ? fs.readFileSync(serial, 'latin1') : '';
      const lines = parseGuestOutput(text);
      if (opts.until(lines)) {
        if (opts.whileRunning) await opts.whileRunning(qmp);
        return { lines, text };
      }
      if (child.exitCode !== null || child.signalCode !== null) {
        assert.fail(`QEMU exited (${child.exitCode ?? child.signalCode}); stderr: ${stderr}; serial:\n${text}`);
      }
      if (Date.now() > deadline) assert.fail(`timed out waiting for ${opts.guest}; serial:\n${text}\nstderr: ${stderr}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  } finally {
    await killQemu(child);
    // no process left behind: the pid is gone (or at least reaped by us)
    assert.ok(child.exitCode !== null || child.signalCode !== null, 'QEMU still running');
    fs.rmSync(dir, { recursive: true, force: true });
  }
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
    let sample: Buffer | undefined;
    const { lines } = await boot({
      guest: 'memwriter',
      append: 'ws=16M fill=random order=random',
      until: (l) => ticks(l, 'memwriter-tick').length >= 4,
      whileRunning: async (qmp) => {
        const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-pmem-'));
        const file = path.join(dir, 'mem.bin');
        try {
          // 1 MiB at 128 MiB: above the 16M working set, below the end of RAM
          await qmpSession(qmp, [{ execute: 'pmemsave', arguments: { val: 128 << 20, size: 1 << 20, filename: file } }]);
          sample = fs.readFileSync(file);
        } finally {
          fs.rmSync(dir, { recursive: true, force: true });
        }
      },
    });
    assertNoErrorLines(lines);
    const ready = lines.find((l) => l.kind === 'memwriter-ready');
    assert.ok(ready && ready.kind === 'memwriter-ready' && ready.ws === 16 << 20, 'ready line with ws=16M');
    const t = ticks(lines, 'memwriter-tick');
    assertIncreasingTicks(t, 4);
    assert.equal(t[t.length - 1].errors, 0);
    assert.ok(t[t.length - 1].writes > t[0].writes, 'flat-out writes grow');
    assert.ok(sample && sample.length === 1 << 20, 'pmemsave sample');
    const pages = new Set<string>();
    for (let o = 0; o < sample.length; o += 4096) {
      const page = sample.subarray(o, o + 4096);
      assert.ok(page.some((b) => b !== 0), `page at +0x${o.toString(16)} is zero`);
      pages.add(page.toString('base64'));
    }
    assert.equal(pages.size, 256, 'every filled page differs from the others');
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
