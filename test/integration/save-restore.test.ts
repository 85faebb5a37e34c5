/**
 * Save a stopped guest's complete state and RAM in one `ferry run` process
 * and restore it into a fresh one (STOP-GAP commands x-ferry-save-state /
 * x-ferry-load-state, until migrate "file:" replaces them): RAM is
 * byte-identical before and after (pmemsave of all RAM), and after `cont`
 * the guest carries on where it stopped (tick numbering, counters, errors=0).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';

import { guestPath } from '../../lib/guests';
import {
  HAVE_KVM,
  TempDir,
  firstDifference,
  memwriterTicks,
  quitFerry,
  sha256File,
  sleep,
  startFerryGuest,
  tickerTicks,
  ticks,
  waitForTicks,
} from './helpers/ferry';

const BUILT = fs.existsSync(guestPath('memwriter')) && fs.existsSync(guestPath('ticker'));
const why = !HAVE_KVM ? ' (skipped: /dev/kvm missing)' : !BUILT ? ' (skipped: guests not built, run npm run build:guests)' : '';
const RAM = 256 << 20;

interface Case {
  title: string;
  guest: 'memwriter' | 'ticker';
  append: string;
  cpus: number;
}

const CASES: Case[] = [
  { title: 'memwriter rate=50M ws=64M', guest: 'memwriter', append: 'ws=64M rate=50M', cpus: 1 },
  { title: 'ticker', guest: 'ticker', append: 'hz=100', cpus: 1 },
  { title: 'memwriter with 2 vCPUs', guest: 'memwriter', append: 'ws=64M rate=50M', cpus: 2 },
];

describe(`save/restore across processes (x-ferry-save-state stop-gap)${why}`, function () {
  this.timeout(180_000);
  let dir: TempDir;

  before(function () {
    if (!HAVE_KVM || !BUILT) this.skip();
    dir = new TempDir('ferry-save-');
  });

  after(() => dir?.cleanup());

  CASES.forEach((c, i) => {
    it(`${c.title}: RAM identical, guest continues after cont`, async () => {
      const args = ['--guest', c.guest, '--memory', `${RAM >> 20}M`, '--cpus', String(c.cpus), '--append', c.append];
      const src = await startFerryGuest(dir, `src${i}`, args);
      let dst: Awaited<ReturnType<typeof startFerryGuest>> | undefined;
      try {
        await waitForTicks(src.serial, 3, 60_000, src.proc);
        await src.qmp.execute('stop');
        await sleep(150);
        const last = ticks(src.serial).at(-1)!;
        const before = dir.file(`before${i}.bin`);
        const snap = dir.file(`snap${i}.ferry`);
        await src.qmp.execute('pmemsave', { val: 0, size: RAM, filename: before });
        await src.qmp.execute('x-ferry-save-state', { filename: snap });
        assert.equal((await quitFerry(src.proc, src.qmp)).code, 0, src.proc.tail());

        dst = await startFerryGuest(dir, `dst${i}`, [...args, '--paused']);
        const loaded = await dst.qmp.execute<{ 'skipped-msrs': unknown[] }>('x-ferry-load-state', { filename: snap });
        assert.deepEqual(loaded['skipped-msrs'], [], 'every MSR restored');
        assert.equal((await dst.qmp.execute<{ status: string }>('query-status')).status, 'prelaunch');
        const after = dir.file(`after${i}.bin`);
        await dst.qmp.execute('pmemsave', { val: 0, size: RAM, filename: after });
        const diff = firstDifference(before, after);
        assert.equal(diff, -1, `RAM differs at offset 0x${diff.toString(16)}`);
        assert.equal(sha256File(before), sha256File(after));
        fs.rmSync(before);
        fs.rmSync(after);

        await dst.qmp.execute('cont');
        const t = await waitForTicks(dst.serial, 3, 30_000, dst.proc);
        assert.ok(!fs.readFileSync(dst.serial, 'utf8').includes('ready'), 'the guest did not boot again');
        assert.ok(t[0]!.n >= last.n + 1 && t[0]!.n <= last.n + 2, `first tick after restore is ${t[0]!.n}, last before was ${last.n}`);
        if (c.guest === 'memwriter') {
          const m0 = memwriterTicks(src.serial).at(-1)!;
          const m = memwriterTicks(dst.serial);
          assert.ok(m[0]!.writes >= m0.writes, 'write counter continues from the saved value');
          assert.ok(m.at(-1)!.writes > m0.writes, 'writes keep growing');
          assert.ok([...memwriterTicks(src.serial), ...m].every((x) => x.errors === 0), 'errors=0 before and after');
        } else {
          const k0 = tickerTicks(src.serial).at(-1)!;
          const k = tickerTicks(dst.serial);
          assert.ok(k[0]!.irqs >= k0.irqs && k.at(-1)!.irqs > k0.irqs, 'timer interrupts continue');
        }
        assert.equal((await quitFerry(dst.proc, dst.qmp)).code, 0, dst.proc.tail());
      } finally {
        await src.proc.kill();
        if (dst) await dst.proc.kill();
      }
    });
  });

  it('x-ferry-save-state refuses a running guest; x-ferry-load-state refuses a bad file', async () => {
    const g = await startFerryGuest(dir, 'refuse', ['--guest', 'ticker', '--memory', '64M']);
    try {
      await assert.rejects(g.qmp.execute('x-ferry-save-state', { filename: dir.file('x') }), /stop the VM first/);
      await g.qmp.execute('stop');
      const bogus = dir.file('bogus.bin');
      fs.writeFileSync(bogus, 'not a snapshot at all');
      await assert.rejects(g.qmp.execute('x-ferry-load-state', { filename: bogus }), /not a ferry snapshot/);
      await assert.rejects(g.qmp.execute('x-ferry-load-state', { filename: dir.file('missing') }), /Could not open/);
      await g.qmp.execute('cont');
      const n = ticks(g.serial).length;
      await waitForTicks(g.serial, n + 2, 30_000, g.proc);
    } finally {
      await quitFerry(g.proc, g.qmp);
    }
  });
});
