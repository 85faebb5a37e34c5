/**
 * Live migration between ferry and QEMU 7.2 for the RAM-only profile both
 * share: `-M none` (configuration name 'none', no vCPU, one RAM block, the
 * devices timer and globalstate), with RAM either anonymous (block 'ram') or
 * in a shared file (block 'mem0', QEMU's memory-backend-file share=on).
 *
 * Each direction over tcp and through an exec: stream file; RAM must be
 * byte-identical on both sides afterwards (pmemsave on each, and the
 * destination's backing file), and the run states on both sides must follow
 * QEMU's rules (checked against QEMU -> QEMU as the reference).
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';

import type { QmpClient } from '../../lib/qmp/client';
import {
  HAVE_KVM,
  TempDir,
  connectQmp,
  processesMatching,
  quitFerry,
  spawnFerryRun,
  waitFor,
  type Proc,
} from './helpers/ferry';
import {
  HAVE_QEMU,
  qemuMemFileArgs,
  qemuNoneArgs,
  startQemu,
  stopQemu,
  waitMigrationEnd,
  writeRandomImage,
  type MigrateInfo,
  type QemuHandle,
} from './helpers/qemu';

const MiB = 1 << 20;
const SIZE_MIB = 64;
const SIZE = SIZE_MIB * MiB;
/** Run-state scenarios only need a stream, not much RAM. */
const SMALL_MIB = 8;
const MAX_BANDWIDTH = 107374182400;

const why = !HAVE_KVM ? ' (skipped: /dev/kvm missing)' : !HAVE_QEMU ? ' (skipped: qemu-system-x86_64 missing)' : '';

interface FerryHandle {
  proc: Proc;
  qmp: QmpClient;
}

interface Status {
  status: string;
  running: boolean;
}

describe(`QEMU 7.2 interop, RAM-only machine (-M none)${why}`, function () {
  this.timeout(60_000);
  let dir: TempDir;
  let qemus: QemuHandle[] = [];
  let ferries: FerryHandle[] = [];
  const leftovers: string[] = [];

  before(function () {
    if (!HAVE_KVM || !HAVE_QEMU) this.skip();
  });

  beforeEach(() => {
    dir = new TempDir('ferry-qemu-interop-');
  });

  afterEach(async () => {
    await Promise.all([...ferries.map((f) => quitFerry(f.proc, f.qmp, 5000).catch(() => undefined)), ...qemus.map((q) => stopQemu(q))]);
    qemus = [];
    ferries = [];
    if (dir) {
      // Anything still running with our temp dir on its command line (QEMU, ferry, exec's cat) is a leak.
      for (const pid of processesMatching(dir.path)) {
        leftovers.push(`${pid}: ${fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ')}`);
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone meanwhile */
        }
      }
      dir.cleanup();
    }
  });

  // ---- helpers -----------------------------------------------------------------------------

  async function qemu(name: string, args: string[]): Promise<QemuHandle> {
    const h = await startQemu(dir, name, args);
    qemus.push(h);
    return h;
  }

  async function ferry(name: string, args: string[]): Promise<FerryHandle> {
    const qmpPath = dir.file(`${name}.qmp`);
    const proc = spawnFerryRun(['--machine', 'none', ...args, '--qmp', `unix:${qmpPath}`], name);
    const h: FerryHandle = { proc, qmp: undefined as unknown as QmpClient };
    ferries.push(h);
    h.qmp = await connectQmp(`unix:${qmpPath}`, 20_000, proc);
    return h;
  }

  /**
   * The tcp port an incoming side listens on, from query-migrate's
   * socket-address (both engines take `tcp:127.0.0.1:0` and report the port
   * they got). ferry answers QMP before its listener is up: poll.
   */
  async function listeningPort(q: QmpClient, proc: Proc): Promise<number> {
    const addr = await waitFor(
      'socket-address in query-migrate',
      10_000,
      async () => (await q.execute<MigrateInfo>('query-migrate'))['socket-address'] as { type: string; host: string; port: string; ipv4?: boolean }[] | undefined,
      () => proc.tail(),
    );
    assert.equal(addr.length, 1);
    const a = addr[0]!;
    assert.deepEqual({ type: a.type, host: a.host, ipv4: a.ipv4 }, { type: 'inet', host: '127.0.0.1', ipv4: true }, JSON.stringify(addr));
    assert.match(a.port, /^[1-9][0-9]*$/, 'a real port, not 0');
    return Number(a.port);
  }

  async function status(q: QmpClient): Promise<Status> {
    const s = await q.execute<Status>('query-status');
    return { status: s.status, running: s.running };
  }

  async function migrate(q: QmpClient, uri: string): Promise<void> {
    await q.execute('migrate-set-parameters', { 'max-bandwidth': MAX_BANDWIDTH });
    await q.execute('migrate', { uri });
  }

  /** pmemsave of [0, size) into DIR/NAME; returns the file's content. */
  async function pmem(q: QmpClient, name: string, size: number): Promise<Buffer> {
    const file = dir.file(name);
    await q.execute('pmemsave', { val: 0, size, filename: file });
    return fs.readFileSync(file);
  }

  function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
    assert.equal(actual.length, expected.length, `${what}: length`);
    if (actual.equals(expected)) return;
    let i = 0;
    while (actual[i] === expected[i]) i++;
    assert.fail(`${what}: first difference at offset 0x${i.toString(16)} (page ${Math.floor(i / 4096)})`);
  }

  function assertCompleted(info: MigrateInfo, who: string, proc: Proc): void {
    assert.equal(info.status, 'completed', `${who}: ${JSON.stringify(info)}\n${proc.tail()}`);
  }

  // ---- QEMU -> ferry over tcp --------------------------------------------------------------

  it('QEMU -> ferry over tcp, RAM in a shared file (block mem0): RAM identical, run states running / postmigrate', async () => {
    const imgA = dir.file('A.img');
    const imgB = dir.file('B.img');
    const content = writeRandomImage(imgA, SIZE);
    const src = await qemu('qemu-src', qemuMemFileArgs(SIZE_MIB, imgA));
    const dst = await ferry('ferry-dst', ['--memory', `${SIZE_MIB}M`, '--mem-path', imgB, '--incoming', 'tcp:127.0.0.1:0']);
    const port = await listeningPort(dst.qmp, dst.proc);
    assert.deepEqual(await status(src.qmp), { status: 'running', running: true }, 'QEMU -M none without -S runs');
    assert.deepEqual(await status(dst.qmp), { status: 'inmigrate', running: false });

    await migrate(src.qmp, `tcp:127.0.0.1:${port}`);
    const srcInfo = await waitMigrationEnd(src.qmp, 'QEMU source', 20_000, src.proc);
    const dstInfo = await waitMigrationEnd(dst.qmp, 'ferry destination', 20_000, dst.proc);
    assertCompleted(srcInfo, 'QEMU source', src.proc);
    assertCompleted(dstInfo, 'ferry destination', dst.proc);
    assert.equal(dstInfo['socket-address'], undefined, 'no socket-address once the incoming migration ended (as QEMU)');
    assert.equal(srcInfo.ram!.total, SIZE);
    assert.ok(srcInfo.ram!.normal > 0 && srcInfo.ram!.duplicate > 0, `random and zero pages sent: ${JSON.stringify(srcInfo.ram)}`);

    assert.deepEqual(await status(src.qmp), { status: 'postmigrate', running: false });
    assert.deepEqual(await status(dst.qmp), { status: 'running', running: true });

    assertSameBytes(await pmem(src.qmp, 'src.pmem', SIZE), content, 'QEMU source pmemsave vs A');
    assertSameBytes(await pmem(dst.qmp, 'dst.pmem', SIZE), content, 'ferry destination pmemsave vs A');
    assertSameBytes(fs.readFileSync(imgB), content, "ferry's backing file B vs A");
  });

  it('QEMU -> ferry over tcp, anonymous RAM (block ram): completed, RAM identical (all zero)', async () => {
    const src = await qemu('qemu-src', qemuNoneArgs(SIZE_MIB));
    const dst = await ferry('ferry-dst', ['--memory', `${SIZE_MIB}M`, '--incoming', 'tcp:127.0.0.1:0']);
    const port = await listeningPort(dst.qmp, dst.proc);
    await migrate(src.qmp, `tcp:127.0.0.1:${port}`);
    const srcInfo = await waitMigrationEnd(src.qmp, 'QEMU source', 20_000, src.proc);
    const dstInfo = await waitMigrationEnd(dst.qmp, 'ferry destination', 20_000, dst.proc);
    assertCompleted(srcInfo, 'QEMU source', src.proc);
    assertCompleted(dstInfo, 'ferry destination', dst.proc);
    assert.equal(srcInfo.ram!.duplicate, SIZE / 4096, 'every page is a zero page');
    assert.deepEqual(await status(dst.qmp), { status: 'running', running: true });
    const a = await pmem(src.qmp, 'src.pmem', SIZE);
    assertSameBytes(a, Buffer.alloc(SIZE), 'QEMU source RAM is zero');
    assertSameBytes(await pmem(dst.qmp, 'dst.pmem', SIZE), a, 'ferry destination vs QEMU source');
  });

  // ---- ferry -> QEMU over tcp --------------------------------------------------------------

  it('ferry -> QEMU over tcp, RAM in a shared file (block mem0): RAM identical, run states postmigrate / running', async () => {
    const imgA = dir.file('A.img');
    const imgB = dir.file('B.img');
    const content = writeRandomImage(imgA, SIZE);
    const src = await ferry('ferry-src', ['--memory', `${SIZE_MIB}M`, '--mem-path', imgA]);
    const dst = await qemu('qemu-dst', [...qemuMemFileArgs(SIZE_MIB, imgB), '-incoming', 'tcp:127.0.0.1:0']);
    const port = await listeningPort(dst.qmp, dst.proc);
    assert.deepEqual(await status(src.qmp), { status: 'running', running: true }, "ferry's none machine runs like QEMU's");
    assert.deepEqual(await status(dst.qmp), { status: 'inmigrate', running: false });

    await migrate(src.qmp, `tcp:127.0.0.1:${port}`);
    const srcInfo = await waitMigrationEnd(src.qmp, 'ferry source', 20_000, src.proc);
    const dstInfo = await waitMigrationEnd(dst.qmp, 'QEMU destination', 20_000, dst.proc);
    assertCompleted(srcInfo, 'ferry source', src.proc);
    assertCompleted(dstInfo, 'QEMU destination', dst.proc);
    assert.equal(dstInfo['socket-address'], undefined, 'QEMU drops socket-address once the incoming migration ended');

    assert.deepEqual(await status(src.qmp), { status: 'postmigrate', running: false });
    assert.deepEqual(await status(dst.qmp), { status: 'running', running: true });

    assertSameBytes(await pmem(src.qmp, 'src.pmem', SIZE), content, 'ferry source pmemsave vs A');
    assertSameBytes(await pmem(dst.qmp, 'dst.pmem', SIZE), content, 'QEMU destination pmemsave vs A');
    assertSameBytes(fs.readFileSync(imgB), content, "QEMU's backing file B vs A");
  });

  it('ferry -> QEMU over tcp, anonymous RAM (block ram): completed, RAM identical (all zero)', async () => {
    const src = await ferry('ferry-src', ['--memory', `${SIZE_MIB}M`]);
    const dst = await qemu('qemu-dst', [...qemuNoneArgs(SIZE_MIB), '-incoming', 'tcp:127.0.0.1:0']);
    const port = await listeningPort(dst.qmp, dst.proc);
    await migrate(src.qmp, `tcp:127.0.0.1:${port}`);
    assertCompleted(await waitMigrationEnd(src.qmp, 'ferry source', 20_000, src.proc), 'ferry source', src.proc);
    assertCompleted(await waitMigrationEnd(dst.qmp, 'QEMU destination', 20_000, dst.proc), 'QEMU destination', dst.proc);
    assert.deepEqual(await status(dst.qmp), { status: 'running', running: true });
    const a = await pmem(src.qmp, 'src.pmem', SIZE);
    assertSameBytes(a, Buffer.alloc(SIZE), 'ferry source RAM is zero');
    assertSameBytes(await pmem(dst.qmp, 'dst.pmem', SIZE), a, 'QEMU destination vs ferry source');
  });

  // ---- exec: streams -----------------------------------------------------------------------

  it('exec: a stream ferry writes (exec:cat > F) is loaded by QEMU -incoming "exec:cat F"', async () => {
    const imgA = dir.file('A.img');
    const imgB = dir.file('B.img');
    const stream = dir.file('ferry.stream');
    const content = writeRandomImage(imgA, SIZE);
    const src = await ferry('ferry-src', ['--memory', `${SIZE_MIB}M`, '--mem-path', imgA]);
    await migrate(src.qmp, `exec:cat > ${stream}`);
    assertCompleted(await waitMigrationEnd(src.qmp, 'ferry source', 20_000, src.proc), 'ferry source', src.proc);
    assert.equal(fs.readFileSync(stream).readUInt32BE(0), 0x5145564d, 'stream starts with QEVM');

    const dst = await qemu('qemu-dst', [...qemuMemFileArgs(SIZE_MIB, imgB), '-incoming', `exec:cat ${stream}`]);
    assertCompleted(await waitMigrationEnd(dst.qmp, 'QEMU destination', 20_000, dst.proc), 'QEMU destination', dst.proc);
    assert.deepEqual(await status(dst.qmp), { status: 'running', running: true });
    assertSameBytes(await pmem(dst.qmp, 'dst.pmem', SIZE), content, 'QEMU destination pmemsave vs A');
    assertSameBytes(fs.readFileSync(imgB), content, "QEMU's backing file B vs A");
  });

  it('exec: a stream QEMU writes (exec:cat > F) is loaded by ferry --incoming "exec:cat F" and by file:F', async () => {
    const imgA = dir.file('A.img');
    const stream = dir.file('qemu.stream');
    const content = writeRandomImage(imgA, SIZE);
    const src = await qemu('qemu-src', qemuMemFileArgs(SIZE_MIB, imgA));
    await migrate(src.qmp, `exec:cat > ${stream}`);
    assertCompleted(await waitMigrationEnd(src.qmp, 'QEMU source', 20_000, src.proc), 'QEMU source', src.proc);

    for (const [name, uri] of [
      ['exec', `exec:cat ${stream}`],
      ['file', `file:${stream}`],
    ] as const) {
      const img = dir.file(`${name}.img`);
      const dst = await ferry(`ferry-dst-${name}`, ['--memory', `${SIZE_MIB}M`, '--mem-path', img, '--incoming', uri]);
      assertCompleted(await waitMigrationEnd(dst.qmp, `ferry destination (${uri})`, 20_000, dst.proc), `ferry destination (${uri})`, dst.proc);
      assert.deepEqual(await status(dst.qmp), { status: 'running', running: true });
      assertSameBytes(await pmem(dst.qmp, `${name}.pmem`, SIZE), content, `ferry destination (${uri}) pmemsave vs A`);
      assertSameBytes(fs.readFileSync(img), content, `ferry's backing file (${uri}) vs A`);
    }
  });

  // ---- return path and QMP shapes -------------------------------------------------------

  it('with return-path (OPEN_RETURN_PATH, PING/PONG, SHUT) both ways; query-migrate and query-status shaped as QEMU; same page counts', async () => {
    const img = dir.file('A.img');
    writeRandomImage(img, SMALL_MIB * MiB);
    const caps = { capabilities: [{ capability: 'return-path', state: true }] };
    const keys = (o: object | undefined) => Object.keys(o ?? {}).sort();

    // QEMU -> ferry
    const fdst = await ferry('ferry-dst', ['--memory', `${SMALL_MIB}M`, '--mem-path', dir.file('B.img'), '--incoming', 'tcp:127.0.0.1:0']);
    const fport = await listeningPort(fdst.qmp, fdst.proc);
    const qsrc = await qemu('qemu-src', qemuMemFileArgs(SMALL_MIB, img));
    await qsrc.qmp.execute('migrate-set-capabilities', caps);
    await migrate(qsrc.qmp, `tcp:127.0.0.1:${fport}`);
    const qsrcInfo = await waitMigrationEnd(qsrc.qmp, 'QEMU source', 10_000, qsrc.proc);
    const fdstInfo = await waitMigrationEnd(fdst.qmp, 'ferry destination', 10_000, fdst.proc);
    assertCompleted(qsrcInfo, 'QEMU source (return-path)', qsrc.proc);
    assertCompleted(fdstInfo, 'ferry destination (return-path)', fdst.proc);

    // ferry -> QEMU
    const qdst = await qemu('qemu-dst', [...qemuMemFileArgs(SMALL_MIB, dir.file('C.img')), '-incoming', 'tcp:127.0.0.1:0']);
    const qport = await listeningPort(qdst.qmp, qdst.proc);
    const fsrc = await ferry('ferry-src', ['--memory', `${SMALL_MIB}M`, '--mem-path', img]);
    await fsrc.qmp.execute('migrate-set-capabilities', caps);
    await migrate(fsrc.qmp, `tcp:127.0.0.1:${qport}`);
    const fsrcInfo = await waitMigrationEnd(fsrc.qmp, 'ferry source', 10_000, fsrc.proc);
    const qdstInfo = await waitMigrationEnd(qdst.qmp, 'QEMU destination', 10_000, qdst.proc);
    assertCompleted(fsrcInfo, 'ferry source (return-path)', fsrc.proc);
    assertCompleted(qdstInfo, 'QEMU destination (return-path)', qdst.proc);

    // Same members (QEMU 7.2's MigrationInfo / MigrationStats) on both engines.
    assert.deepEqual(keys(fsrcInfo), keys(qsrcInfo), 'completed source query-migrate members');
    assert.deepEqual(keys(fsrcInfo.ram), keys(qsrcInfo.ram), 'completed source ram members');
    assert.deepEqual(fdstInfo, qdstInfo, 'completed destination query-migrate');
    assert.deepEqual(keys(await fdst.qmp.execute('query-status')), keys(await qdst.qmp.execute('query-status')), 'query-status members');
    // The same RAM gives the same page counts, and nearly the same byte count (section framing differs).
    const { total, duplicate, normal } = qsrcInfo.ram!;
    assert.deepEqual({ total, duplicate, normal }, { total: fsrcInfo.ram!.total, duplicate: fsrcInfo.ram!.duplicate, normal: fsrcInfo.ram!.normal });
    const dt = Math.abs(fsrcInfo.ram!.transferred - qsrcInfo.ram!.transferred);
    assert.ok(dt < 4096, `transferred ${fsrcInfo.ram!.transferred} (ferry) vs ${qsrcInfo.ram!.transferred} (QEMU)`);
  });

  it('a RAM block mismatch (mem0 vs ram) fails on both sides: the destination exits 1 naming the block, the source reports failed', async () => {
    const img = dir.file('A.img');
    writeRandomImage(img, SMALL_MIB * MiB);
    const caps = { capabilities: [{ capability: 'return-path', state: true }] };

    // QEMU (mem0) -> ferry (ram)
    const fdst = await ferry('ferry-dst', ['--memory', `${SMALL_MIB}M`, '--incoming', 'tcp:127.0.0.1:0']);
    const fport = await listeningPort(fdst.qmp, fdst.proc);
    const qsrc = await qemu('qemu-src', qemuMemFileArgs(SMALL_MIB, img));
    await qsrc.qmp.execute('migrate-set-capabilities', caps);
    await migrate(qsrc.qmp, `tcp:127.0.0.1:${fport}`);
    const qsrcInfo = await waitMigrationEnd(qsrc.qmp, 'QEMU source', 10_000, qsrc.proc);
    assert.equal(qsrcInfo.status, 'failed', JSON.stringify(qsrcInfo));
    assert.deepEqual(await status(qsrc.qmp), { status: 'running', running: true }, 'a failed migration leaves the QEMU source running');
    const fexit = await fdst.proc.waitExit(10_000);
    assert.equal(fexit.code, 1, fdst.proc.tail());
    assert.match(fdst.proc.stderr, /mem0/, 'ferry names the unknown block');

    // ferry (ram) -> QEMU (mem0)
    const qdst = await qemu('qemu-dst', [...qemuMemFileArgs(SMALL_MIB, dir.file('C.img')), '-incoming', 'tcp:127.0.0.1:0']);
    const qport = await listeningPort(qdst.qmp, qdst.proc);
    const fsrc = await ferry('ferry-src', ['--memory', `${SMALL_MIB}M`]);
    await fsrc.qmp.execute('migrate-set-capabilities', caps);
    await migrate(fsrc.qmp, `tcp:127.0.0.1:${qport}`);
    const fsrcInfo = await waitMigrationEnd(fsrc.qmp, 'ferry source', 10_000, fsrc.proc);
    assert.equal(fsrcInfo.status, 'failed', JSON.stringify(fsrcInfo));
    assert.equal(typeof fsrcInfo['error-desc'], 'string');
    assert.deepEqual(await status(fsrc.qmp), { status: 'running', running: true }, 'a failed migration leaves the ferry source running');
    const qexit = await qdst.proc.waitExit(10_000);
    assert.equal(qexit.code, 1, qdst.proc.tail());
    assert.match(qdst.proc.stderr, /ram/i, qdst.proc.tail());
  });

  it('events (MIGRATION statuses, STOP, RESUME) match QEMU -> QEMU on both sides; destination via -incoming defer + migrate-incoming', async () => {
    type Engine = 'qemu' | 'ferry';
    const start = async (e: Engine, name: string, extra: string[]) =>
      e === 'qemu' ? qemu(name, [...qemuNoneArgs(SMALL_MIB), ...extra]) : ferry(name, ['--memory', `${SMALL_MIB}M`, ...extra]);
    const events = { on: { capabilities: [{ capability: 'events', state: true }] } };
    const seen: Record<string, { src: string[]; dst: string[]; passes: number }> = {};
    for (const [se, de] of [
      ['qemu', 'qemu'],
      ['qemu', 'ferry'],
      ['ferry', 'qemu'],
    ] as [Engine, Engine][]) {
      const tag = `${se}-${de}`;
      const log = { src: [] as string[], dst: [] as string[], passes: 0 };
      // MIGRATION_PASS is compared too: both count the setup-time bitmap sync as pass 1.
      const record = (list: string[]) => (e: { event: string; data?: Record<string, unknown> }) => {
        if (e.event === 'MIGRATION_PASS') log.passes++;
        list.push(e.data && 'status' in e.data ? `${e.event}:${String(e.data.status)}` : e.event);
      };
      const dst = await start(de, `${tag}-dst`, ['-incoming', 'defer']);
      dst.qmp.on('event', record(log.dst));
      await dst.qmp.execute('migrate-set-capabilities', events.on);
      await dst.qmp.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
      const port = await listeningPort(dst.qmp, dst.proc);
      const src = await start(se, `${tag}-src`, []);
      src.qmp.on('event', record(log.src));
      await src.qmp.execute('migrate-set-capabilities', events.on);
      await migrate(src.qmp, `tcp:127.0.0.1:${port}`);
      assertCompleted(await waitMigrationEnd(src.qmp, `${tag} source`, 10_000, src.proc), `${tag} source`, src.proc);
      assertCompleted(await waitMigrationEnd(dst.qmp, `${tag} destination`, 10_000, dst.proc), `${tag} destination`, dst.proc);
      await waitFor(`${tag}: destination RESUME`, 5000, () => log.dst.includes('RESUME'));
      seen[tag] = log;
    }
    const ref = seen['qemu-qemu']!;
    assert.deepEqual(ref.src, ['MIGRATION:setup', 'MIGRATION_PASS', 'MIGRATION:active', 'STOP', 'MIGRATION_PASS', 'MIGRATION:completed'], JSON.stringify(seen));
    assert.deepEqual(ref.dst, ['MIGRATION:setup', 'MIGRATION:active', 'RESUME', 'MIGRATION:completed'], JSON.stringify(seen));
    for (const tag of ['qemu-ferry', 'ferry-qemu']) {
      assert.deepEqual({ src: seen[tag]!.src, dst: seen[tag]!.dst }, { src: ref.src, dst: ref.dst }, `${tag} vs qemu-qemu: ${JSON.stringify(seen)}`);
    }
    assert.ok(seen['ferry-qemu']!.passes >= 1, 'ferry emits MIGRATION_PASS with the events capability');
  });

  // ---- run states --------------------------------------------------------------------------

  /**
   * Source run state before migrating, and whether the destination autostarts
   * (-S / --paused clears it). QEMU's rule on the destination: the source's
   * globalstate 'running' -> running if autostart else paused; any other
   * state is adopted as it is. The source ends in postmigrate.
   */
  const SCENARIOS: { name: string; source: 'running' | 'stop' | 'prelaunch'; autostart: boolean; dst: string }[] = [
    { name: 'source running, destination -S', source: 'running', autostart: false, dst: 'paused' },
    { name: 'source stopped (paused)', source: 'stop', autostart: true, dst: 'paused' },
    { name: 'source never started (-S: prelaunch)', source: 'prelaunch', autostart: true, dst: 'prelaunch' },
  ];

  for (const sc of SCENARIOS) {
    it(`run states match QEMU -> QEMU: ${sc.name}`, async () => {
      type Engine = 'qemu' | 'ferry';
      const pairs: [Engine, Engine][] = [
        ['qemu', 'qemu'],
        ['qemu', 'ferry'],
        ['ferry', 'qemu'],
      ];
      const results: Record<string, { src: Status; dst: Status; srcBefore: Status }> = {};
      for (const [se, de] of pairs) {
        const tag = `${se}-${de}`;
        const stream = dir.file(`${tag}.stream`);
        let src: { qmp: QmpClient; proc: Proc };
        if (se === 'qemu') src = await qemu(`${tag}-src`, [...qemuNoneArgs(SMALL_MIB), ...(sc.source === 'prelaunch' ? ['-S'] : [])]);
        else src = await ferry(`${tag}-src`, ['--memory', `${SMALL_MIB}M`, ...(sc.source === 'prelaunch' ? ['--paused'] : [])]);
        if (sc.source === 'stop') await src.qmp.execute('stop');
        const srcBefore = await status(src.qmp);
        await migrate(src.qmp, `exec:cat > ${stream}`);
        assertCompleted(await waitMigrationEnd(src.qmp, `${tag} source`, 10_000, src.proc), `${tag} source`, src.proc);
        const srcAfter = await status(src.qmp);

        const incoming = `exec:cat ${stream}`;
        let dst: { qmp: QmpClient; proc: Proc };
        if (de === 'qemu') dst = await qemu(`${tag}-dst`, [...qemuNoneArgs(SMALL_MIB), ...(sc.autostart ? [] : ['-S']), '-incoming', incoming]);
        else dst = await ferry(`${tag}-dst`, ['--memory', `${SMALL_MIB}M`, ...(sc.autostart ? [] : ['--paused']), '--incoming', incoming]);
        assertCompleted(await waitMigrationEnd(dst.qmp, `${tag} destination`, 10_000, dst.proc), `${tag} destination`, dst.proc);
        results[tag] = { srcBefore, src: srcAfter, dst: await status(dst.qmp) };
      }
      const ref = results['qemu-qemu']!;
      // The reference itself, so a change in QEMU's behaviour shows up here first.
      const expectedBefore = { running: 'running', stop: 'paused', prelaunch: 'prelaunch' }[sc.source];
      assert.equal(ref.srcBefore.status, expectedBefore);
      assert.equal(ref.src.status, 'postmigrate');
      assert.deepEqual(ref.dst, { status: sc.dst, running: false });
      for (const tag of ['qemu-ferry', 'ferry-qemu']) {
        assert.deepEqual(results[tag], ref, `${tag} vs qemu-qemu: ${JSON.stringify(results)}`);
      }
    });
  }

  it('leaves no QEMU, ferry or exec child process behind', () => {
    assert.deepEqual(leftovers, []);
  });
});
