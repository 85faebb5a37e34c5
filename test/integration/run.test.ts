/**
 * `ferry run` as a child process: the guest boots and ticks, QMP stop/cont
 * halt and resume it, bad QMP input is answered without disturbing the
 * guest, quit exits 0 leaving nothing behind, CLI typos exit 2.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';

import { guestPath } from '../../lib/guests';
import { parseElf } from '../../lib/machine/pvh';
import { QmpError } from '../../lib/qmp/protocol';
import type { QmpClient } from '../../lib/qmp/client';
import {
  HAVE_KVM,
  RawQmp,
  TempDir,
  assertNoNewTicks,
  memwriterTicks,
  processAlive,
  processesMatching,
  quitFerry,
  sleep,
  spawnFerryRun,
  startFerryGuest,
  tickerTicks,
  ticks,
  waitFor,
  waitForTicks,
  type Proc,
} from './helpers/ferry';

const GUESTS_BUILT = fs.existsSync(guestPath('memwriter')) && fs.existsSync(guestPath('ticker'));
const CAN_RUN = HAVE_KVM && GUESTS_BUILT;
const why = !HAVE_KVM ? ' (skipped: /dev/kvm missing)' : !GUESTS_BUILT ? ' (skipped: guests not built, run npm run build:guests)' : '';

describe(`ferry run: memwriter under QMP control${why}`, function () {
  this.timeout(120_000);
  let dir: TempDir;
  let proc: Proc;
  let qmp: QmpClient;
  let serial: string;
  let qmpPath: string;

  before(async function () {
    if (!CAN_RUN) this.skip();
    dir = new TempDir('ferry-run-');
    ({ proc, qmp, serial, qmpPath } = await startFerryGuest(dir, 'mw', ['--guest', 'memwriter', '--memory', '256M', '--append', 'ws=32M rate=20M']));
  });

  after(async () => {
    if (proc) await quitFerry(proc, qmp);
    dir?.cleanup();
  });

  it('boots: ready line, then ticks with errors=0 and growing writes', async () => {
    const t = (await waitForTicks(serial, 5, 60_000, proc)) as ReturnType<typeof memwriterTicks>;
    assert.ok(
      fs.readFileSync(serial, 'utf8').includes('memwriter ready'),
      'memwriter ready line',
    );
    assert.ok(t.every((x) => x.errors === 0), 'errors=0');
    assert.ok(t.at(-1)!.writes > t[0]!.writes, 'writes grow');
    const st = await qmp.execute<{ status: string; running: boolean; singlestep: boolean }>('query-status');
    assert.deepEqual(st, { status: 'running', running: true, singlestep: false });
  });

  it('stop halts the ticks (STOP event, no new tick for 1 s); cont resumes them (RESUME event)', async () => {
    await waitForTicks(serial, 1, 60_000, proc);
    const stopEv = qmp.waitEvent('STOP', undefined, 5000);
    await qmp.execute('stop');
    await stopEv;
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'paused');
    await sleep(150); // a line the guest finished just before the stop is flushed by now
    const n = await assertNoNewTicks(serial, 1000);
    const last = ticks(serial).at(-1)!.n;
    const resumeEv = qmp.waitEvent('RESUME', undefined, 5000);
    await qmp.execute('cont');
    await resumeEv;
    const after = await waitForTicks(serial, 2, 10_000, proc, last);
    assert.ok(ticks(serial).length > n);
    assert.equal(after[0]!.n, last + 1, 'tick numbering continues');
    assert.ok(memwriterTicks(serial).every((x) => x.errors === 0));
  });

  it('stop/cont are idempotent and query-cpus-fast describes the vCPU', async () => {
    await qmp.execute('cont'); // already running: no-op
    const cpus = await qmp.execute<{ 'cpu-index': number; target: string; 'qom-path': string }[]>('query-cpus-fast');
    assert.equal(cpus.length, 1);
    assert.equal(cpus[0]!['cpu-index'], 0);
    assert.equal(cpus[0]!.target, 'x86_64');
    await qmp.execute('stop');
    await qmp.execute('stop');
    assert.equal((await qmp.execute<{ status: string }>('query-status')).status, 'paused');
    await qmp.execute('cont');
  });

  it('pmemsave writes guest memory: the guest code is where the loader put it', async () => {
    const out = dir.file('low.bin');
    const seg = parseElf(fs.readFileSync(guestPath('memwriter'))).segments[0]!;
    await qmp.execute('pmemsave', { val: seg.paddr, size: 1 << 20, filename: out });
    const b = fs.readFileSync(out);
    assert.equal(b.length, 1 << 20);
    const image = fs.readFileSync(guestPath('memwriter')).subarray(seg.offset, seg.offset + 256);
    assert.deepEqual(b.subarray(0, 256), image, 'the first 256 bytes of the image (entry code) at p_paddr');
  });

  it('bad QMP input gets clear errors and the guest keeps ticking', async () => {
    const expectErr = async (cmd: string, args: Record<string, unknown> | undefined, klass: string, re: RegExp) => {
      await assert.rejects(qmp.execute(cmd, args), (e: unknown) => {
        assert.ok(e instanceof QmpError, String(e));
        assert.equal(e.errorClass, klass);
        assert.match(e.desc, re);
        return true;
      });
    };
    await expectErr('no-such-command', undefined, 'CommandNotFound', /no-such-command/);
    await expectErr('pmemsave', { val: 'zero', size: 4096, filename: '/tmp/x' }, 'GenericError', /Invalid parameter type for 'val', expected: integer/);
    await expectErr('pmemsave', { val: 0, size: 4096 }, 'GenericError', /Parameter 'filename' is missing/);
    await expectErr('pmemsave', { val: 0, size: 4096, filename: '/tmp/x', bogus: 1 }, 'GenericError', /'bogus' is unexpected/);
    await expectErr('pmemsave', { val: 0xc0000000, size: 4096, filename: dir.file('hole.bin') }, 'GenericError', /Invalid parameter 'val'.*not RAM/);
    await expectErr('pmemsave', { val: 0, size: 512 << 20, filename: dir.file('big.bin') }, 'GenericError', /Invalid parameter 'val'/);
    await expectErr('pmemsave', { val: 0, size: 4096, filename: dir.file('no/such/dir/f') }, 'GenericError', /Could not open .*No such file/);
    await expectErr('stop', { now: true }, 'GenericError', /'now' is unexpected/);
    assert.ok(!fs.existsSync(dir.file('hole.bin')), 'no file for a refused pmemsave');

    const raw = await RawQmp.open(qmpPath);
    try {
      raw.send('{"execute": "query-status", \n');
      raw.send('}}}\n');
      const r1 = await raw.reply();
      assert.ok('error' in r1, `malformed JSON answered with an error: ${JSON.stringify(r1)}`);
      raw.send('[1, 2]\n');
      const r2 = await raw.reply();
      assert.ok('error' in r2);
      raw.send('{"execute": "query-status", "id": "after-garbage"}\n');
      let r3: Record<string, unknown>;
      do r3 = await raw.reply(); // the garbage may produce more than one error reply
      while (r3.id !== 'after-garbage');
      assert.equal((r3.return as { status: string }).status, 'running', 'the connection still works');
    } finally {
      raw.close();
    }
    const last = (await waitForTicks(serial, 1, 60_000, proc)).at(-1)!.n;
    await waitForTicks(serial, 3, 10_000, proc, last);
    assert.ok(memwriterTicks(serial).every((x) => x.errors === 0));
  });

  it('quit exits 0 with a SHUTDOWN event and leaves no process behind', async () => {
    const shut = qmp.waitEvent('SHUTDOWN', undefined, 5000);
    const pid = proc.pid;
    await qmp.execute('quit');
    const ev = await shut;
    assert.deepEqual(ev.data, { guest: false, reason: 'host-qmp-quit' });
    const exit = await proc.waitExit(10_000);
    assert.deepEqual(exit, { code: 0, signal: null }, proc.tail());
    assert.equal(processAlive(pid), false);
    assert.deepEqual(processesMatching(dir.path), [], 'no process mentions the test dir');
  });
});

describe(`ferry run: ticker, --paused, signals${why}`, function () {
  this.timeout(120_000);
  let dir: TempDir;
  const procs: Proc[] = [];

  before(function () {
    if (!CAN_RUN) this.skip();
    dir = new TempDir('ferry-run2-');
  });

  after(async () => {
    for (const p of procs) await p.kill();
    dir?.cleanup();
  });

  it('ticker runs and ticks with growing interrupt counts', async () => {
    const g = await startFerryGuest(dir, 'tk', ['--guest', 'ticker', '--memory', '64M']);
    procs.push(g.proc);
    const t = (await waitForTicks(g.serial, 5, 60_000, g.proc)) as ReturnType<typeof tickerTicks>;
    assert.ok(t.at(-1)!.irqs > t[0]!.irqs, 'LAPIC timer interrupts keep coming');
    const exit = await quitFerry(g.proc, g.qmp);
    assert.equal(exit.code, 0);
  });

  it('--paused stays in prelaunch until cont; SIGTERM exits 0 with SHUTDOWN host-signal', async () => {
    const g = await startFerryGuest(dir, 'pz', ['--guest', 'ticker', '--memory', '64M', '--paused']);
    procs.push(g.proc);
    assert.equal((await g.qmp.execute<{ status: string }>('query-status')).status, 'prelaunch');
    await sleep(500);
    assert.equal(fs.existsSync(g.serial) ? fs.readFileSync(g.serial, 'utf8') : '', '', 'no guest output before cont');
    await g.qmp.execute('cont');
    await waitForTicks(g.serial, 1, 60_000, g.proc);
    const shut = g.qmp.waitEvent('SHUTDOWN', undefined, 5000);
    g.proc.child.kill('SIGTERM');
    assert.deepEqual((await shut).data, { guest: false, reason: 'host-signal' });
    const exit = await g.proc.waitExit(10_000);
    assert.deepEqual(exit, { code: 0, signal: null }, g.proc.tail());
    g.qmp.destroy();
  });

  it('system_reset reboots the guest (ready line again, RESET event)', async () => {
    const g = await startFerryGuest(dir, 'rs', ['--guest', 'ticker', '--memory', '64M']);
    procs.push(g.proc);
    await waitForTicks(g.serial, 2, 60_000, g.proc);
    const reset = g.qmp.waitEvent('RESET', undefined, 5000);
    await g.qmp.execute('system_reset');
    assert.deepEqual((await reset).data, { guest: false, reason: 'host-qmp-system-reset' });
    await waitFor('a second ready line', 60_000, () => (fs.readFileSync(g.serial, 'utf8').match(/ticker ready/g) ?? []).length >= 2);
    const exit = await quitFerry(g.proc, g.qmp);
    assert.equal(exit.code, 0);
  });

  it('a RAM-only machine (--machine none) runs with no vCPU and serves pmemsave', async () => {
    const g = await startFerryGuest(dir, 'none', ['--machine', 'none', '--memory', '64M']);
    procs.push(g.proc);
    assert.equal((await g.qmp.execute<{ status: string }>('query-status')).status, 'running');
    assert.deepEqual(await g.qmp.execute('query-cpus-fast'), []);
    const out = dir.file('none.bin');
    await g.qmp.execute('pmemsave', { val: 0, size: 64 << 20, filename: out });
    assert.equal(fs.statSync(out).size, 64 << 20);
    const exit = await quitFerry(g.proc, g.qmp);
    assert.equal(exit.code, 0);
  });
});

describe('ferry run: command-line mistakes exit 2 with a clear message', function () {
  this.timeout(30_000);
  const cases: [string[], RegExp][] = [
    [['--guest', 'memwriter', '--memroy', '256M'], /unknown option '--memroy'.*--memory/],
    [['--guest', 'memwritter'], /--guest 'memwritter'.*memwriter/],
    [['--guest', 'memwriter', '--memory', 'lots'], /--memory 'lots'/],
    [['--guest', 'memwriter', '--serial', 'tty'], /--serial 'tty'/],
  ];
  for (const [args, re] of cases) {
    it(`ferry run ${args.join(' ')}`, async () => {
      const p = spawnFerryRun(args, 'ferry run (typo)');
      const exit = await p.waitExit(20_000);
      assert.equal(exit.code, 2, p.tail());
      assert.match(p.stderr, re);
    });
  }
});
