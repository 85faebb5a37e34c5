/**
 * Live precopy migration between two `ferry run` processes with real KVM
 * guests, over tcp, unix, exec: and file:. The guest proves the migration:
 * memwriter verifies every working-set page it rewrites (a lost or stale
 * page is an error), ticks continue from the source's last tick, and with a
 * paused destination all of RAM is compared byte for byte.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import {
  HAVE_KVM,
  TempDir,
  memwriterTicks,
  readText,
  startFerryGuest,
  tickerTicks,
  waitForTicks,
} from './helpers/ferry';
import { assertCompleted, quitAll, ramHash, setup, startPair, status, waitStatus, type Guest } from './helpers/migration';

const GIB = 1 << 30;

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** The destination's ticks continue where the source's stopped (a tick line cut by the stop may be lost). */
function assertContinues(srcSerial: string, dstSerial: string, kind: 'memwriter' | 'ticker'): void {
  const src = kind === 'memwriter' ? memwriterTicks(srcSerial) : tickerTicks(srcSerial);
  const dst = kind === 'memwriter' ? memwriterTicks(dstSerial) : tickerTicks(dstSerial);
  assert.ok(src.length > 0 && dst.length > 0, 'both sides printed ticks');
  const last = src.at(-1)!.n;
  const first = dst[0]!.n;
  const partialStart = !/^tick /.test(readText(dstSerial).split('\n')[0] ?? '');
  assert.ok(first === last + 1 || (partialStart && first === last + 2), `destination's first tick ${first} does not continue the source's last ${last}`);
  for (let i = 1; i < dst.length; i++) assert.equal(dst[i]!.n, dst[i - 1]!.n + 1, 'destination ticks are consecutive');
}

function assertNoErrors(serial: string): void {
  const t = memwriterTicks(serial);
  assert.ok(t.length > 0);
  assert.equal(t.at(-1)!.errors, 0, `guest reported errors:\n${readText(serial).split('\n').filter((l) => l.startsWith('CORRUPT')).slice(0, 5).join('\n')}`);
  assert.ok(!readText(serial).includes('CORRUPT'), 'no CORRUPT line');
}

async function migrateAndWait(src: Guest, uri: string, caps: Record<string, boolean> = {}, params: Record<string, unknown> = {}) {
  await setup(src.qmp, { events: true, ...caps }, { 'max-bandwidth': 0, ...params });
  await src.qmp.execute('migrate', { uri });
  return waitStatus(src.qmp, ['completed', 'failed', 'cancelled'], 120_000);
}

describe(HAVE_KVM ? 'precopy live migration (two ferry processes, KVM)' : 'precopy live migration (skipped: /dev/kvm missing)', function () {
  this.timeout(180_000);
  let dir: TempDir;
  let guests: (Guest | undefined)[] = [];

  before(function () {
    if (!HAVE_KVM) this.skip();
  });
  beforeEach(() => {
    dir = new TempDir('ferry-precopy-');
  });
  afterEach(async function () {
    await quitAll(...guests);
    guests = [];
    if (this.currentTest?.state === 'passed') dir.cleanup();
    else if (dir) console.log(`    (kept ${dir.path})`);
  });

  const MEMWRITER_1G = ['--guest', 'memwriter', '--memory', '1G', '--append', 'ws=256M rate=50M fill=random'];

  it('memwriter 1G ws=256M rate=50M fill=random over unix: ticks continue with errors=0, source in postmigrate', async () => {
    const { src, dst, uri } = await startPair(dir, MEMWRITER_1G);
    guests = [src, dst];
    await waitForTicks(src.serial, 3, 60_000, src.proc);
    const info = await migrateAndWait(src, uri, { 'return-path': true });
    assertCompleted(info);
    assert.equal(await status(src.qmp), 'postmigrate');
    assert.equal(await status(dst.qmp), 'running');
    const lastSrc = memwriterTicks(src.serial).at(-1)!.n;
    await waitForTicks(dst.serial, 5, 30_000, dst.proc);
    assertContinues(src.serial, dst.serial, 'memwriter');
    assertNoErrors(dst.serial);
    assert.ok(memwriterTicks(dst.serial).at(-1)!.writes > memwriterTicks(src.serial).at(-1)!.writes, 'the guest keeps writing on the destination');
    assert.equal(memwriterTicks(src.serial).at(-1)!.n, lastSrc, 'the source guest stays stopped');
    assert.ok(info.ram!.total === GIB && info.ram!.transferred > 0);
  });

  it('over tcp into a --paused destination: all 1G of RAM byte-identical, then cont continues the guest', async () => {
    const port = await freePort();
    const { src, dst, uri } = await startPair(dir, MEMWRITER_1G, { incoming: `tcp:127.0.0.1:${port}`, dstArgs: ['--paused'] });
    guests = [src, dst];
    await waitForTicks(src.serial, 3, 60_000, src.proc);
    assertCompleted(await migrateAndWait(src, uri));
    // Without the return path the source completes once the stream is sent; the destination may still be loading.
    assert.equal((await waitStatus(dst.qmp, ['completed', 'failed'], 30_000)).status, 'completed');
    assert.equal(await status(dst.qmp), 'paused');
    const [a, b] = await Promise.all([ramHash(dir, src, 'src', GIB), ramHash(dir, dst, 'dst', GIB)]);
    assert.equal(b, a, 'destination RAM differs from the source');
    fs.rmSync(dir.file('src.ram'));
    fs.rmSync(dir.file('dst.ram'));
    await dst.qmp.execute('cont');
    await waitForTicks(dst.serial, 3, 30_000, dst.proc);
    assertContinues(src.serial, dst.serial, 'memwriter');
    assertNoErrors(dst.serial);
  });

  it('ticker: interrupts keep coming on the destination', async () => {
    const { src, dst, uri } = await startPair(dir, ['--guest', 'ticker', '--memory', '64M']);
    guests = [src, dst];
    await waitForTicks(src.serial, 3, 30_000, src.proc);
    assertCompleted(await migrateAndWait(src, uri, { 'return-path': true }));
    const t = (await waitForTicks(dst.serial, 5, 30_000, dst.proc)) as ReturnType<typeof tickerTicks>;
    assertContinues(src.serial, dst.serial, 'ticker');
    for (let i = 1; i < t.length; i++) assert.ok(t[i]!.irqs > t[i - 1]!.irqs, 'irqs grow on the destination');
    assert.ok(t.at(-1)!.irqs > tickerTicks(src.serial).at(-1)!.irqs);
  });

  it('2 vCPUs: memwriter migrates with both vCPUs state, errors=0', async () => {
    const { src, dst, uri } = await startPair(dir, ['--guest', 'memwriter', '--memory', '512M', '--cpus', '2', '--append', 'ws=64M rate=50M fill=random']);
    guests = [src, dst];
    await waitForTicks(src.serial, 3, 60_000, src.proc);
    assertCompleted(await migrateAndWait(src, uri, { 'return-path': true }));
    const cpus = await dst.qmp.execute<unknown[]>('query-cpus-fast');
    assert.equal(cpus.length, 2);
    await waitForTicks(dst.serial, 5, 30_000, dst.proc);
    assertContinues(src.serial, dst.serial, 'memwriter');
    assertNoErrors(dst.serial);
  });

  for (const kind of ['exec', 'file'] as const) {
    it(`${kind}: round trip: save, stop the source, restore in a new process, the guest continues`, async () => {
      const file = dir.file('saved.mig');
      const src = await startFerryGuest(dir, 'src', ['--guest', 'memwriter', '--memory', '256M', '--append', 'ws=32M rate=20M fill=random']);
      guests = [src];
      await waitForTicks(src.serial, 3, 30_000, src.proc);
      const uri = kind === 'exec' ? `exec:cat > ${file}` : `file:${file},offset=4096`;
      assertCompleted(await migrateAndWait(src, uri));
      assert.equal(await status(src.qmp), 'postmigrate');
      await quitAll(src);
      const from = kind === 'exec' ? `exec:cat ${file}` : `file:${file},offset=4096`;
      const dst = await startFerryGuest(dir, 'dst', ['--guest', 'memwriter', '--memory', '256M', '--incoming', from]);
      guests = [dst];
      await waitStatus(dst.qmp, ['completed', 'failed'], 60_000).then(assertCompleted);
      assert.equal(await status(dst.qmp), 'running');
      await waitForTicks(dst.serial, 3, 30_000, dst.proc);
      assertContinues(src.serial, dst.serial, 'memwriter');
      assertNoErrors(dst.serial);
    });
  }
});
