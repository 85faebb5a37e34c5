/**
 * Save a stopped guest's complete state and RAM in one `ferry run` process
 * and restore it into a fresh one, QEMU's way: `migrate "file:PATH"` from
 * the stopped source, `ferry run --incoming file:PATH` in a new process.
 * RAM is byte-identical before and after (pmemsave of all RAM), the
 * destination stays paused (the saved run state), and after `cont` the guest
 * carries on where it stopped (tick numbering, counters, errors=0).
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
  spawnFerryRun,
  startFerryGuest,
  tickerTicks,
  ticks,
  waitForTicks,
} from './helpers/ferry';
import { waitStatus } from './helpers/migration';

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

describe(`save/restore across processes (migrate file: / --incoming file:)${why}`, function () {
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
        await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
        await src.qmp.execute('migrate', { uri: `file:${snap}` });
        const saved = await waitStatus(src.qmp, ['completed', 'failed'], 60_000);
        assert.equal(saved.status, 'completed', saved['error-desc']);
        assert.equal((await quitFerry(src.proc, src.qmp)).code, 0, src.proc.tail());

        dst = await startFerryGuest(dir, `dst${i}`, [...args, '--incoming', `file:${snap}`]);
        const loaded = await waitStatus(dst.qmp, ['completed', 'failed'], 60_000);
        assert.equal(loaded.status, 'completed', loaded['error-desc']);
        assert.equal((await dst.qmp.execute<{ status: string }>('query-status')).status, 'paused', 'the saved run state');
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

  it('a bad or missing save file: the restoring process fails with a clear error and exits 1', async () => {
    const bogus = dir.file('bogus.bin');
    fs.writeFileSync(bogus, 'not a migration stream at all');
    for (const [file, re] of [
      [bogus, /magic/],
      [dir.file('missing'), /missing/],
    ] as const) {
      const p = spawnFerryRun(['--guest', 'ticker', '--memory', '64M', '--serial', 'none', '--incoming', `file:${file}`]);
      const exit = await p.waitExit(20_000);
      assert.equal(exit.code, 1, p.tail());
      assert.match(p.stderr, re);
    }
  });
});
