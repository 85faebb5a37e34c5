/**
 * Precopy failure rules with real processes: a migration that cannot
 * converge keeps iterating; cancel in setup, active and pre-switchover; the
 * destination killed; the connection cut. Each leaves the source guest
 * running with errors=0 and the migration failed or cancelled with an
 * error-desc.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { HAVE_KVM, TempDir, memwriterTicks, sleep, startFerryGuest, waitFor, waitForTicks } from './helpers/ferry';
import { events, quitAll, setup, startPair, status, waitStatus, type Guest } from './helpers/migration';

/** The source guest runs on: new ticks after now, still errors=0. */
async function assertSourceHealthy(src: Guest): Promise<void> {
  assert.equal(await status(src.qmp), 'running');
  const last = memwriterTicks(src.serial).at(-1)?.n ?? 0;
  const t = await waitForTicks(src.serial, 3, 20_000, src.proc, last);
  assert.equal(t.at(-1)!.kind, 'memwriter-tick');
  assert.equal((t.at(-1) as { errors: number }).errors, 0, 'source guest reports errors after the failed migration');
}

function statuses(g: Guest): string[] {
  return events(g.qmp, 'MIGRATION').map((d) => String(d.status));
}

describe(HAVE_KVM ? 'precopy failure rules (KVM, two processes)' : 'precopy failure rules (skipped: /dev/kvm missing)', function () {
  this.timeout(120_000);
  let dir: TempDir;
  let guests: (Guest | undefined)[] = [];
  const extra: { destroy(): void }[] = [];

  before(function () {
    if (!HAVE_KVM) this.skip();
  });
  beforeEach(() => {
    dir = new TempDir('ferry-faults-');
  });
  afterEach(async function () {
    for (const e of extra.splice(0)) e.destroy();
    await quitAll(...guests);
    guests = [];
    if (this.currentTest?.state === 'passed') dir.cleanup();
    else console.log(`    (kept ${dir.path})`);
  });

  const SLOW = { 'max-bandwidth': 32 << 20 };
  const GUEST = ['--guest', 'memwriter', '--memory', '256M', '--append', 'ws=32M rate=20M fill=random'];

  it('a guest dirtying faster than max-bandwidth keeps iterating until cancelled; the source keeps running', async () => {
    const { src, dst, uri } = await startPair(dir, ['--guest', 'memwriter', '--memory', '64M', '--append', 'ws=32M']);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    await setup(src.qmp, { events: true }, SLOW);
    await src.qmp.execute('migrate', { uri });
    const counts: number[] = [];
    const info = await waitFor('three dirty-log syncs', 60_000, async () => {
      const i = await src.qmp.execute<{ status: string; 'expected-downtime'?: number; ram?: { 'dirty-sync-count': number } }>('query-migrate');
      counts.push(i.ram?.['dirty-sync-count'] ?? 0);
      return (i.ram?.['dirty-sync-count'] ?? 0) >= 3 ? i : undefined;
    }, undefined, 200);
    assert.equal(info.status, 'active');
    assert.ok(typeof info['expected-downtime'] === 'number', 'expected-downtime is reported while active');
    const passes = events(src.qmp, 'MIGRATION_PASS').map((d) => Number(d.pass));
    assert.ok(passes.length >= 2, `MIGRATION_PASS events: ${JSON.stringify(passes)}`);
    for (let i = 1; i < passes.length; i++) assert.ok(passes[i]! > passes[i - 1]!, 'pass numbers grow');
    await src.qmp.execute('migrate_cancel');
    const end = await waitStatus(src.qmp, ['cancelled', 'failed', 'completed'], 20_000);
    assert.equal(end.status, 'cancelled');
    await assertSourceHealthy(src);
  });

  it('cancel in setup', async () => {
    const { src, dst, uri } = await startPair(dir, GUEST);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    await setup(src.qmp, { events: true }, SLOW);
    // Pipelined: the cancel is handled before the connection is up.
    const [m, c] = await Promise.all([src.qmp.execute('migrate', { uri }), src.qmp.execute('migrate_cancel')]);
    assert.deepEqual([m, c], [{}, {}]);
    const end = await waitStatus(src.qmp, ['cancelled', 'failed', 'completed'], 20_000);
    assert.equal(end.status, 'cancelled');
    await waitFor('MIGRATION cancelled event', 5000, () => statuses(src).includes('cancelled'));
    assert.deepEqual(statuses(src), ['setup', 'cancelling', 'cancelled']);
    await assertSourceHealthy(src);
  });

  it('cancel in active', async () => {
    const { src, dst, uri } = await startPair(dir, GUEST);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    await setup(src.qmp, { events: true }, SLOW);
    await src.qmp.execute('migrate', { uri });
    await waitStatus(src.qmp, ['active'], 10_000);
    await sleep(500);
    await src.qmp.execute('migrate_cancel');
    const end = await waitStatus(src.qmp, ['cancelled', 'failed', 'completed'], 20_000);
    assert.equal(end.status, 'cancelled');
    assert.ok(statuses(src).includes('cancelling'));
    await assertSourceHealthy(src);
  });

  it('cancel in pre-switchover restarts the stopped source guest; migrate-continue completes another run', async () => {
    const { src, dst, uri } = await startPair(dir, GUEST);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    await setup(src.qmp, { events: true, 'pause-before-switchover': true }, { 'max-bandwidth': 0 });
    await assert.rejects(src.qmp.execute('migrate-continue', { state: 'pre-switchover' }), /Migration not in expected state: none/);
    await src.qmp.execute('migrate', { uri });
    await waitStatus(src.qmp, ['pre-switchover'], 30_000);
    assert.equal(await status(src.qmp), 'finish-migrate', 'the source is stopped while it waits');
    await src.qmp.execute('migrate_cancel');
    const end = await waitStatus(src.qmp, ['cancelled', 'failed', 'completed'], 20_000);
    assert.equal(end.status, 'cancelled');
    await assertSourceHealthy(src);

    // A second destination, this time continued past the pause.
    const dst2 = await startFerryGuest(dir, 'dst2', [...GUEST, '--incoming', `unix:${dir.file('mig2.sock')}`]);
    guests.push(dst2);
    await src.qmp.execute('migrate', { uri: `unix:${dir.file('mig2.sock')}` });
    await waitStatus(src.qmp, ['pre-switchover'], 30_000);
    await src.qmp.execute('migrate-continue', { state: 'pre-switchover' });
    const done = await waitStatus(src.qmp, ['completed', 'failed', 'cancelled'], 30_000);
    assert.equal(done.status, 'completed', done['error-desc']);
    assert.ok(statuses(src).join(',').endsWith('pre-switchover,device,completed'));
    await waitForTicks(dst2.serial, 3, 20_000, dst2.proc);
    assert.equal(memwriterTicks(dst2.serial).at(-1)!.errors, 0);
  });

  it('kill -9 of the destination mid-transfer: source failed with error-desc, guest running', async () => {
    const { src, dst, uri } = await startPair(dir, GUEST);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    await setup(src.qmp, { events: true }, SLOW);
    await src.qmp.execute('migrate', { uri });
    await waitStatus(src.qmp, ['active'], 10_000);
    await sleep(500);
    dst.proc.child.kill('SIGKILL');
    const end = await waitStatus(src.qmp, ['failed', 'cancelled', 'completed'], 30_000);
    assert.equal(end.status, 'failed');
    assert.ok((end['error-desc'] ?? '').length > 0, 'error-desc explains the failure');
    await assertSourceHealthy(src);
  });

  it('the connection closed mid-transfer: both sides fail, the source guest runs on', async () => {
    const port = await new Promise<number>((resolve) => {
      const proxy = net.createServer((client) => {
        const upstream = net.connect(dir.file('mig.sock'));
        client.pipe(upstream).pipe(client);
        client.on('error', () => undefined);
        upstream.on('error', () => undefined);
        // Cut both directions once the transfer is under way.
        setTimeout(() => {
          client.destroy();
          upstream.destroy();
        }, 700);
      });
      extra.push({ destroy: () => proxy.close() });
      proxy.listen(0, '127.0.0.1', () => resolve((proxy.address() as net.AddressInfo).port));
    });
    const { src, dst } = await startPair(dir, GUEST);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    await setup(src.qmp, { events: true }, SLOW);
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    const end = await waitStatus(src.qmp, ['failed', 'cancelled', 'completed'], 30_000);
    assert.equal(end.status, 'failed');
    assert.ok((end['error-desc'] ?? '').length > 0);
    await assertSourceHealthy(src);
    // exit-on-error (default): the destination reports and exits with status 1.
    const exit = await dst.proc.waitExit(15_000);
    assert.equal(exit.code, 1);
    assert.match(dst.proc.stderr, /load of migration failed/);
  });
});
