/**
 * The migration control plane over real QMP sockets: QEMU's refusals,
 * `-incoming defer` + `migrate-incoming`, query-migrate's fields, events,
 * and the fd: transport with a socket handed over by `getfd` (SCM_RIGHTS).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { HAVE_KVM, TempDir, memwriterTicks, startFerryGuest, waitFor, waitForTicks } from './helpers/ferry';
import { events, quitAll, setup, status, waitStatus, type Guest, type MigrationInfo } from './helpers/migration';

const GUEST = ['--guest', 'memwriter', '--memory', '128M', '--append', 'ws=16M rate=10M'];

describe(HAVE_KVM ? 'migration over QMP (KVM, two processes)' : 'migration over QMP (skipped: /dev/kvm missing)', function () {
  this.timeout(90_000);
  let dir: TempDir;
  let guests: Guest[] = [];

  before(function () {
    if (!HAVE_KVM) this.skip();
  });
  beforeEach(() => {
    dir = new TempDir('ferry-mqmp-');
  });
  afterEach(async function () {
    await quitAll(...guests);
    guests = [];
    if (this.currentTest?.state === 'passed') dir.cleanup();
    else console.log(`    (kept ${dir.path})`);
  });

  it('-incoming defer + migrate-incoming; QEMU refusals; query-migrate fields and MIGRATION events', async () => {
    const src = await startFerryGuest(dir, 'src', GUEST);
    const dst = await startFerryGuest(dir, 'dst', [...GUEST, '--incoming', 'defer']);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    assert.equal(await status(dst.qmp), 'inmigrate');
    assert.deepEqual(await src.qmp.execute('query-migrate'), {}, 'nothing has run yet');

    // A guest waiting for an incoming migration cannot be migrated.
    await assert.rejects(dst.qmp.execute('migrate', { uri: `unix:${dir.file('x.sock')}` }), /Guest is waiting for an incoming migration/);
    // migrate-incoming on a machine not started with -incoming.
    await assert.rejects(src.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' }), /'-incoming' was not specified on the command line/);
    // A bad URI is named.
    await assert.rejects(src.qmp.execute('migrate', { uri: 'bogus:1' }), /bogus/);

    const uri = `unix:${dir.file('mig.sock')}`;
    await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await dst.qmp.execute('migrate-incoming', { uri });
    await assert.rejects(dst.qmp.execute('migrate-incoming', { uri }), /The incoming migration has already been started/);

    await setup(src.qmp, { events: true, 'return-path': true }, { 'max-bandwidth': 16 << 20 });
    await src.qmp.execute('migrate', { uri });
    await assert.rejects(src.qmp.execute('migrate', { uri }), /There's a migration process in progress/);
    await assert.rejects(
      src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: false }] }),
      /There's a migration process in progress/,
    );
    const active = await waitStatus(src.qmp, ['active'], 10_000);
    for (const k of ['total-time', 'expected-downtime', 'setup-time']) assert.equal(typeof (active as Record<string, unknown>)[k], 'number', k);
    for (const k of ['transferred', 'remaining', 'total', 'duplicate', 'normal', 'normal-bytes', 'mbps', 'dirty-sync-count', 'dirty-pages-rate', 'page-size', 'pages-per-second', 'precopy-bytes', 'downtime-bytes']) {
      assert.ok(k in (active.ram as object), `ram.${k} present while active`);
    }
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    const done = await waitStatus(src.qmp, ['completed', 'failed'], 60_000);
    assert.equal(done.status, 'completed', done['error-desc']);
    assert.equal(typeof done.downtime, 'number');
    assert.ok(done.downtime! >= 0 && done.downtime! < 5000);
    assert.equal(done.ram!.remaining, 0);
    assert.ok(done.ram!.total === 128 << 20 && done.ram!.normal > 0 && done.ram!.duplicate > 0);
    await waitFor('MIGRATION completed event', 5000, () => events(src.qmp, 'MIGRATION').some((e) => e.status === 'completed'));
    assert.deepEqual(
      events(src.qmp, 'MIGRATION').map((e) => e.status),
      ['setup', 'active', 'completed'],
    );
    await waitFor('destination completed', 10_000, async () => (await dst.qmp.execute<MigrationInfo>('query-migrate')).status === 'completed');
    assert.ok(events(dst.qmp, 'MIGRATION').some((e) => e.status === 'completed'), 'destination MIGRATION events');

    // The source stays in postmigrate and refuses a second migration, as QEMU 7.2.
    assert.equal(await status(src.qmp), 'postmigrate');
    await assert.rejects(src.qmp.execute('migrate', { uri }), /Can't migrate the vm that was paused due to previous migration/);
    await waitForTicks(dst.serial, 3, 20_000, dst.proc);
    assert.equal(memwriterTicks(dst.serial).at(-1)!.errors, 0);
  });

  it('fd: a connected socket handed to the source with getfd carries the migration', async () => {
    const src = await startFerryGuest(dir, 'src', GUEST);
    const dst = await startFerryGuest(dir, 'dst', [...GUEST, '--incoming', `unix:${dir.file('mig.sock')}`]);
    guests = [src, dst];
    await waitForTicks(src.serial, 2, 30_000, src.proc);
    const sock = net.connect(dir.file('mig.sock'));
    await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
    const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
    await src.qmp.sendFd('migfd', fd);
    sock.destroy(); // the source holds its own copy now
    await setup(src.qmp, {}, { 'max-bandwidth': 0 });
    // An fd name nobody gave fails the migration with the name in error-desc; the guest runs on.
    await src.qmp.execute('migrate', { uri: 'fd:nosuch' });
    const bad = await waitStatus(src.qmp, ['failed', 'completed'], 10_000);
    assert.equal(bad.status, 'failed');
    assert.match(bad['error-desc'] ?? '', /nosuch/);
    assert.equal(await status(src.qmp), 'running');
    await src.qmp.execute('migrate', { uri: 'fd:migfd' });
    const done = await waitStatus(src.qmp, ['completed', 'failed'], 60_000);
    assert.equal(done.status, 'completed', done['error-desc']);
    await waitForTicks(dst.serial, 3, 20_000, dst.proc);
    assert.equal(memwriterTicks(dst.serial).at(-1)!.errors, 0);
  });
});
