import assert from 'node:assert/strict';
import {
  DESTINATION_TRANSITIONS,
  MIGRATION_ERRORS,
  MIGRATION_STATUSES,
  MigrationCommandError,
  MigrationStateMachine,
  MigrationStatus,
  MigrationTransitionError,
  SOURCE_TRANSITIONS,
  canTransition,
  guardMigrate,
  guardMigrateCancel,
  guardMigrateContinue,
  guardMigrateIncoming,
  guardMigratePause,
  guardMigrateRecover,
  guardMigrateStartPostcopy,
  guardSetCapabilities,
  isActive,
  isMigrationStatus,
  isPostcopy,
  isPostcopyPaused,
  isRunning,
  isSetupOrActive,
  isTerminal,
  type GuardContext,
  type MigrationSide,
  type MigrationStateChange,
} from '../../lib/migration/state';
import {
  RamStats,
  buildMigrationInfo,
  destinationSnapshot,
  ramStatsJson,
  sourceSnapshot,
  type RamCounters,
  type SourceSnapshot,
} from '../../lib/migration/info';
import { FerryError } from '../../lib/errors';
import { errorClassOf, errorDescOf } from '../../lib/qmp/protocol';

type S = MigrationStatus;

/** A settable clock for the machine and the stats. */
function clock(start = 1000): { now: () => number; t: number; advance(ms: number): number } {
  const c = {
    t: start,
    now: () => c.t,
    advance(ms: number) {
      c.t += ms;
      return c.t;
    },
  };
  return c;
}

/** Shortest path of statuses from none to `target` through `side`'s table (undefined: unreachable). */
function pathTo(side: MigrationSide, target: S): S[] | undefined {
  const table = side === 'source' ? SOURCE_TRANSITIONS : DESTINATION_TRANSITIONS;
  const prev = new Map<S, S | null>([['none', null]]);
  const queue: S[] = ['none'];
  while (queue.length) {
    const s = queue.shift()!;
    if (s === target) break;
    for (const n of table[s]) {
      if (!prev.has(n)) {
        prev.set(n, s);
        queue.push(n);
      }
    }
  }
  if (!prev.has(target)) return undefined;
  const path: S[] = [];
  for (let s: S | null = target; s !== null; s = prev.get(s)!) path.unshift(s);
  return path;
}

function machineAt(side: MigrationSide, target: S): MigrationStateMachine | undefined {
  const path = pathTo(side, target);
  if (!path) return undefined;
  const m = new MigrationStateMachine({ side });
  for (let i = 1; i < path.length; i++) assert.ok(m.setState(path[i - 1]!, path[i]!));
  assert.equal(m.status, target);
  return m;
}

describe('migration status names and sets', () => {
  it('has QEMU\'s 15 status names in QEMU\'s order', () => {
    assert.deepEqual(
      [...MIGRATION_STATUSES],
      [
        'none',
        'setup',
        'cancelling',
        'cancelled',
        'active',
        'postcopy-active',
        'postcopy-paused',
        'postcopy-recover-setup',
        'postcopy-recover',
        'completed',
        'failed',
        'colo',
        'pre-switchover',
        'device',
        'wait-unplug',
      ],
    );
    assert.equal(MigrationStatus.PostcopyRecoverSetup, 'postcopy-recover-setup');
    assert.equal(MigrationStatus.WaitUnplug, 'wait-unplug');
    assert.equal(Object.keys(MigrationStatus).length, 15);
    assert.ok(isMigrationStatus('device'));
    assert.ok(!isMigrationStatus('paused'));
    assert.ok(!isMigrationStatus(3));
  });

  const sets: [string, (s: S) => boolean, S[]][] = [
    // QEMU migration_is_running()
    [
      'isRunning',
      isRunning,
      [
        'setup',
        'cancelling',
        'active',
        'postcopy-active',
        'postcopy-paused',
        'postcopy-recover-setup',
        'postcopy-recover',
        'pre-switchover',
        'device',
        'wait-unplug',
      ],
    ],
    // QEMU migration_is_setup_or_active()
    [
      'isSetupOrActive',
      isSetupOrActive,
      [
        'setup',
        'active',
        'postcopy-active',
        'postcopy-paused',
        'postcopy-recover-setup',
        'postcopy-recover',
        'colo',
        'pre-switchover',
        'device',
        'wait-unplug',
      ],
    ],
    ['isActive', isActive, ['active', 'postcopy-active']],
    ['isPostcopy', isPostcopy, ['postcopy-active', 'postcopy-paused', 'postcopy-recover-setup', 'postcopy-recover']],
    ['isPostcopyPaused', isPostcopyPaused, ['postcopy-paused', 'postcopy-recover-setup']],
    ['isTerminal', isTerminal, ['cancelled', 'completed', 'failed']],
  ];
  for (const [name, fn, members] of sets) {
    it(`${name} is true exactly for ${members.join(', ')}`, () => {
      for (const s of MIGRATION_STATUSES) assert.equal(fn(s), members.includes(s), `${name}(${s})`);
    });
  }
});

describe('MigrationStateMachine transitions', () => {
  for (const side of ['source', 'destination'] as const) {
    const table = side === 'source' ? SOURCE_TRANSITIONS : DESTINATION_TRANSITIONS;
    for (const from of MIGRATION_STATUSES) {
      const allowed = table[from];
      it(`${side}: from ${from} allows exactly [${allowed.join(', ')}]`, () => {
        const probe = machineAt(side, from);
        if (!probe) {
          // Unreachable on this side: nothing may leave it either.
          assert.deepEqual(allowed, [], `${side} ${from} is unreachable but has exits`);
          return;
        }
        for (const to of MIGRATION_STATUSES) {
          const m = machineAt(side, from)!;
          const seen: MigrationStateChange[] = [];
          m.on('state', (c: MigrationStateChange) => seen.push(c));
          if (allowed.includes(to)) {
            assert.equal(canTransition(side, from, to), true);
            assert.equal(m.setState(from, to), true, `${from} -> ${to}`);
            assert.equal(m.status, to);
            assert.equal(seen.length, 1);
            assert.equal(seen[0]!.from, from);
            assert.equal(seen[0]!.to, to);
            assert.equal(seen[0]!.side, side);
          } else {
            assert.equal(canTransition(side, from, to), false);
            assert.throws(
              () => m.setState(from, to),
              (e: unknown) => e instanceof MigrationTransitionError && e.code === 'ERR_MIGRATION_INVALID_TRANSITION',
            );
            assert.equal(m.status, from, 'a refused transition changes nothing');
            assert.equal(seen.length, 0);
          }
        }
      });
    }
  }

  it('the tables are exactly the transitions QEMU\'s code makes (written out independently)', () => {
    const edges = (t: typeof SOURCE_TRANSITIONS): string[] =>
      MIGRATION_STATUSES.flatMap((f) => t[f].map((to) => `${f}>${to}`)).sort();
    const source = [
      'none>setup',
      'setup>active setup>wait-unplug setup>failed setup>cancelling',
      'wait-unplug>active wait-unplug>failed wait-unplug>cancelling',
      'active>pre-switchover active>postcopy-active active>completed active>colo active>failed active>cancelling',
      'pre-switchover>device pre-switchover>postcopy-active pre-switchover>failed pre-switchover>cancelling',
      'device>completed device>failed device>cancelling',
      'postcopy-active>postcopy-paused postcopy-active>completed postcopy-active>failed postcopy-active>cancelling',
      'postcopy-paused>postcopy-recover-setup postcopy-paused>postcopy-recover postcopy-paused>cancelling',
      'postcopy-recover-setup>postcopy-recover postcopy-recover-setup>postcopy-paused postcopy-recover-setup>cancelling',
      'postcopy-recover>postcopy-active postcopy-recover>postcopy-paused postcopy-recover>cancelling',
      'colo>completed colo>failed',
      'cancelling>cancelled cancelling>failed',
      'completed>setup failed>setup cancelled>setup',
    ];
    const destination = [
      'none>setup none>active',
      'setup>active setup>failed',
      'active>postcopy-active active>completed active>failed active>colo',
      'postcopy-active>postcopy-paused postcopy-active>completed postcopy-active>failed',
      'postcopy-paused>postcopy-recover postcopy-paused>failed',
      'postcopy-recover>postcopy-active postcopy-recover>postcopy-paused',
      'colo>completed colo>failed',
    ];
    assert.deepEqual(edges(SOURCE_TRANSITIONS), source.join(' ').split(' ').sort());
    assert.deepEqual(edges(DESTINATION_TRANSITIONS), destination.join(' ').split(' ').sort());
  });

  it('source: every status is reachable; destination: only QEMU\'s incoming statuses are', () => {
    for (const s of MIGRATION_STATUSES) assert.ok(pathTo('source', s), `source ${s}`);
    const dst = MIGRATION_STATUSES.filter((s) => pathTo('destination', s));
    assert.deepEqual(dst.sort(), [
      'active',
      'colo',
      'completed',
      'failed',
      'none',
      'postcopy-active',
      'postcopy-paused',
      'postcopy-recover',
      'setup',
    ]);
  });

  it('compare-and-set: a wrong expected state changes nothing and emits nothing', () => {
    const m = new MigrationStateMachine({ side: 'source', eventsEnabled: () => true });
    let events = 0;
    m.on('state', () => events++);
    m.on('migration', () => events++);
    assert.equal(m.setState('active', 'completed'), false);
    assert.equal(m.setState('setup', 'active'), false);
    assert.equal(m.status, 'none');
    assert.equal(events, 0);
    assert.ok(m.setState('none', 'setup'));
    assert.equal(m.setState('none', 'setup'), false, 'second CAS from none loses');
    assert.equal(events, 2);
  });

  it('tryTransition moves from the current state when the table allows it', () => {
    const m = new MigrationStateMachine({ side: 'source' });
    assert.equal(m.tryTransition('active'), false);
    assert.equal(m.tryTransition('setup'), true);
    assert.equal(m.tryTransition('cancelling'), true);
    assert.equal(m.tryTransition('cancelled'), true);
    assert.equal(m.status, 'cancelled');
  });

  it("emits 'migration' {status} only while eventsEnabled() is true (the events capability)", () => {
    let on = false;
    const m = new MigrationStateMachine({ side: 'source', eventsEnabled: () => on });
    const events: unknown[] = [];
    const states: S[] = [];
    m.on('migration', (e) => events.push(e));
    m.on('state', (c: MigrationStateChange) => states.push(c.to));
    m.setState('none', 'setup');
    on = true;
    m.setState('setup', 'active');
    m.setState('active', 'completed');
    on = false;
    m.setState('completed', 'setup');
    assert.deepEqual(events, [{ status: 'active' }, { status: 'completed' }]);
    assert.deepEqual(states, ['setup', 'active', 'completed', 'setup']);
    const silent = new MigrationStateMachine({ side: 'destination' });
    let n = 0;
    silent.on('migration', () => n++);
    silent.setState('none', 'setup');
    assert.equal(n, 0, 'no callback: never emitted');
  });

  it('QEMU sequences: precopy, pause-before-switchover, postcopy with recovery (7.2 and 9.1), cancel', () => {
    const run = (side: MigrationSide, seq: S[]): void => {
      const m = new MigrationStateMachine({ side });
      for (let i = 1; i < seq.length; i++) assert.ok(m.setState(seq[i - 1]!, seq[i]!), `${seq[i - 1]} -> ${seq[i]}`);
    };
    run('source', ['none', 'setup', 'active', 'completed']);
    run('source', ['none', 'setup', 'wait-unplug', 'active', 'completed']);
    run('source', ['none', 'setup', 'active', 'pre-switchover', 'device', 'completed']);
    run('source', ['none', 'setup', 'active', 'pre-switchover', 'postcopy-active', 'completed']);
    run('source', ['none', 'setup', 'active', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed']);
    run('source', [
      'none',
      'setup',
      'active',
      'postcopy-active',
      'postcopy-paused',
      'postcopy-recover-setup',
      'postcopy-paused',
      'postcopy-recover-setup',
      'postcopy-recover',
      'postcopy-paused',
      'postcopy-recover-setup',
      'postcopy-recover',
      'postcopy-active',
      'completed',
    ]);
    run('source', ['none', 'setup', 'active', 'pre-switchover', 'cancelling', 'cancelled', 'setup', 'failed', 'setup']);
    run('source', ['none', 'setup', 'active', 'colo', 'completed']);
    // Incoming: 9.x enters setup at migrate-incoming; 7.2 goes straight to active.
    run('destination', ['none', 'setup', 'active', 'completed']);
    run('destination', ['none', 'active', 'failed']);
    run('destination', ['none', 'setup', 'active', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'postcopy-paused', 'postcopy-recover', 'postcopy-active', 'completed']);
  });

  it('postcopy I/O errors have no way to failed on the source: only paused (or an explicit cancel)', () => {
    for (const s of ['postcopy-paused', 'postcopy-recover-setup', 'postcopy-recover'] as const) {
      assert.ok(!SOURCE_TRANSITIONS[s].includes('failed'), s);
    }
    assert.ok(SOURCE_TRANSITIONS['postcopy-active'].includes('postcopy-paused'));
  });

  it('the destination never restarts: terminal states are final', () => {
    for (const s of ['completed', 'failed'] as const) assert.deepEqual(DESTINATION_TRANSITIONS[s], []);
  });
});

describe('MigrationStateMachine times', () => {
  it('setup-time, total-time (running, then final), downtime, error; a new migration resets them', () => {
    const c = clock();
    const m = new MigrationStateMachine({ side: 'source', now: c.now });
    assert.equal(m.totalTime(), 0);
    assert.equal(m.setupTime(), 0);
    m.setState('none', 'setup');
    c.advance(7);
    assert.equal(m.setupTime(), 0, 'QEMU reports setup-time 0 until iterations begin');
    assert.equal(m.totalTime(), 7);
    m.setState('setup', 'active');
    c.advance(100);
    assert.equal(m.setupTime(), 7);
    assert.equal(m.totalTime(), 107);
    m.markDowntimeStart();
    c.advance(30);
    assert.equal(m.downtime(), 30, 'downtime runs while the guest is stopped');
    m.setState('active', 'completed');
    c.advance(1000);
    assert.equal(m.totalTime(), 137, 'frozen at completion');
    assert.equal(m.downtime(), 30, 'precopy downtime ends at completion');
    assert.equal(m.times.enteredAt.active, 1007);
    assert.equal(m.times.endedAt, 1137);

    m.setError('first');
    m.setError('second');
    assert.equal(m.error, 'first', 'first error wins');
    m.setState('completed', 'setup');
    assert.equal(m.error, undefined);
    assert.equal(m.downtime(), 0);
    assert.equal(m.setupTime(), 0);
    assert.equal(m.times.startedAt, c.t);
    assert.deepEqual(Object.keys(m.times.enteredAt), ['setup']);
  });

  it('postcopy downtime ends where the engine marks it, not at completion', () => {
    const c = clock();
    const m = new MigrationStateMachine({ side: 'source', now: c.now });
    m.setState('none', 'setup');
    m.setState('setup', 'active');
    c.advance(50);
    m.markDowntimeStart();
    c.advance(12);
    m.setState('active', 'postcopy-active');
    m.markDowntimeEnd();
    c.advance(500);
    m.setState('postcopy-active', 'completed');
    assert.equal(m.downtime(), 12);
    assert.equal(m.totalTime(), 562);
  });

  it('destination 7.2 path (none -> active) starts the clock too', () => {
    const c = clock();
    const m = new MigrationStateMachine({ side: 'destination', now: c.now });
    m.setState('none', 'active');
    c.advance(40);
    m.setState('active', 'completed');
    assert.equal(m.totalTime(), 40);
  });
});

describe('migration command guards', () => {
  const idle: GuardContext = { source: 'none', runState: 'running' };
  const is = (e: unknown, msg: string, code?: string): void => {
    assert.ok(e instanceof MigrationCommandError, `expected an error "${msg}", got ${String(e)}`);
    assert.equal(e.message, msg);
    assert.equal(e.errorClass, 'GenericError');
    assert.deepEqual(e.toQmp(), { class: 'GenericError', desc: msg });
    if (code) assert.equal(e.code, code);
  };

  it('refusals are FerryErrors the QMP server turns into {class, desc}', () => {
    const e = guardMigrateContinue({ source: 'none' }, 'pre-switchover')!;
    assert.ok(e instanceof FerryError);
    assert.equal(e.code, 'ERR_MIGRATION_INVALID_STATE');
    assert.equal(errorClassOf(e), 'GenericError');
    assert.equal(errorDescOf(e), 'Migration not in expected state: none');
    const t = new MigrationTransitionError('source', 'none', 'completed');
    assert.ok(t instanceof FerryError);
    assert.equal(t.code, 'ERR_MIGRATION_INVALID_TRANSITION');
  });

  it('migrate: allowed when idle or after a finished migration (running VM)', () => {
    for (const s of ['none', 'completed', 'failed', 'cancelled', 'colo'] as const) {
      assert.equal(guardMigrate({ ...idle, source: s }), null, s);
    }
    assert.equal(guardMigrate({ ...idle, runState: 'paused' }), null, 'a paused VM migrates');
  });

  it("migrate: refused while one runs — \"There's a migration process in progress\"", () => {
    for (const s of MIGRATION_STATUSES.filter(isRunning)) {
      is(guardMigrate({ ...idle, source: s }), "There's a migration process in progress", 'ERR_MIGRATION_ACTIVE');
    }
  });

  it('migrate: refused on a guest waiting for an incoming migration, and after a completed one (postmigrate)', () => {
    is(guardMigrate({ ...idle, runState: 'inmigrate' }), 'Guest is waiting for an incoming migration');
    is(
      guardMigrate({ ...idle, source: 'completed', runState: 'postmigrate' }),
      "Can't migrate the vm that was paused due to previous migration",
    );
    // QEMU's order: "in progress" is checked before the run state.
    is(guardMigrate({ ...idle, source: 'active', runState: 'inmigrate' }), MIGRATION_ERRORS.inProgress);
  });

  it('migrate: blockers report the most recent; blk/inc refused; URI transport checks (9.x)', () => {
    is(guardMigrate({ ...idle, blockers: ['newest blocker', 'older'] }), 'newest blocker', 'ERR_MIGRATION_BLOCKED');
    is(guardMigrate(idle, {}, { blk: true }), MIGRATION_ERRORS.blockMigration, 'ERR_MIGRATION_UNSUPPORTED');
    is(guardMigrate(idle, {}, { inc: true }), MIGRATION_ERRORS.blockMigration);
    assert.equal(guardMigrate(idle, { multifd: true }, { transport: 'inet' }), null);
    assert.equal(guardMigrate(idle, { 'postcopy-preempt': true }, { transport: 'unix' }), null);
    is(guardMigrate(idle, { multifd: true }, { transport: 'exec' }), 'Migration requires multi-channel URIs (e.g. tcp)');
    is(guardMigrate(idle, { 'postcopy-preempt': true }, { transport: 'fd' }), MIGRATION_ERRORS.needsMultiChannel);
    is(guardMigrate(idle, { 'mapped-ram': true }, { transport: 'inet' }), 'Migration requires seekable transport (e.g. file)');
    assert.equal(guardMigrate(idle, { 'mapped-ram': true, multifd: true }, { transport: 'file' }), null);
    assert.equal(guardMigrate(idle, {}, { transport: 'exec' }), null);
  });

  it('migrate resume: only from postcopy-paused, not with release-ram', () => {
    is(guardMigrate(idle, {}, { resume: true }), 'Cannot resume if there is no paused migration');
    is(guardMigrate({ ...idle, source: 'postcopy-active' }, {}, { resume: true }), MIGRATION_ERRORS.resumeNotPaused);
    const paused = { ...idle, source: 'postcopy-paused' as const, runState: 'postmigrate' as const };
    assert.equal(guardMigrate(paused, { 'postcopy-ram': true }, { resume: true }), null, 'resume skips the run-state checks');
    is(
      guardMigrate(paused, { 'release-ram': true }, { resume: true }),
      'Postcopy recovery cannot work when release-ram capability is set',
    );
  });

  it('migrate-incoming: once only, and only with -incoming (QEMU checks "started" first)', () => {
    const waiting: GuardContext = { source: 'none', runState: 'inmigrate' };
    assert.equal(guardMigrateIncoming(waiting), null);
    is(guardMigrateIncoming({ ...waiting, incomingStarted: true }), 'The incoming migration has already been started');
    is(guardMigrateIncoming(idle), "'-incoming' was not specified on the command line", 'ERR_MIGRATION_INCOMING');
    is(guardMigrateIncoming({ ...idle, incomingStarted: true }), MIGRATION_ERRORS.incomingStarted);
  });

  it('migrate_cancel: a no-op when nothing runs; refused during postcopy', () => {
    for (const s of MIGRATION_STATUSES) {
      const e = guardMigrateCancel({ source: s });
      if (isPostcopy(s)) is(e, 'Postcopy migration in progress, cannot cancel.');
      else assert.equal(e, null, s);
    }
  });

  it('migrate-continue: "Migration not in expected state: <current>"', () => {
    assert.equal(guardMigrateContinue({ source: 'pre-switchover' }, 'pre-switchover'), null);
    is(guardMigrateContinue({ source: 'none' }, 'pre-switchover'), 'Migration not in expected state: none');
    is(guardMigrateContinue({ source: 'pre-switchover' }, 'active'), 'Migration not in expected state: pre-switchover');
    is(guardMigrateContinue({ source: 'active' }, 'pre-switchover'), 'Migration not in expected state: active');
  });

  it('migrate-recover, migrate-pause, migrate-start-postcopy', () => {
    assert.equal(guardMigrateRecover({ destination: 'postcopy-paused' }), null);
    is(guardMigrateRecover({}), 'Migrate recover can only be run when postcopy is paused.');
    is(guardMigrateRecover({ destination: 'postcopy-active' }), MIGRATION_ERRORS.recoverNotPaused);

    assert.deepEqual(guardMigratePause({ source: 'postcopy-active', destination: 'none' }), { side: 'source' });
    assert.deepEqual(guardMigratePause({ source: 'none', destination: 'postcopy-active' }), { side: 'destination' });
    is(guardMigratePause({ source: 'active' }), 'migrate-pause is currently only supported during postcopy-active state');

    is(
      guardMigrateStartPostcopy({ source: 'active' }, {}),
      'Enable postcopy with migrate_set_capability before the start of migration',
    );
    is(guardMigrateStartPostcopy({ source: 'none' }, { 'postcopy-ram': true }), 'Postcopy must be started after migration has been started');
    assert.equal(guardMigrateStartPostcopy({ source: 'active' }, { 'postcopy-ram': true }), null);
    assert.equal(guardMigrateStartPostcopy({ source: 'active' }, { 'dirty-bitmaps': true }), null);
    assert.equal(guardMigrateStartPostcopy({ source: 'completed' }, { 'postcopy-ram': true }), null, 'racy finish accepted');
  });

  it('migrate-set-capabilities: refused while running or in colo', () => {
    for (const s of MIGRATION_STATUSES) {
      const e = guardSetCapabilities({ source: s });
      if (isRunning(s) || s === 'colo') is(e, MIGRATION_ERRORS.inProgress);
      else assert.equal(e, null, s);
    }
  });
});

describe('RamStats', () => {
  it('counts pages, bytes by phase, syncs and requests with QEMU semantics', () => {
    const c = clock();
    const r = new RamStats({ now: c.now });
    r.reset(300);
    r.setTotal(64 << 20);
    r.setRemainingPages(100);
    assert.equal(r.counters().remaining, 100 * 4096);
    r.onPageSent(4096 + 9, 1);
    r.onPageSent(2 * (4096 + 9), 2);
    r.onZeroPage(10, 1);
    r.onRamBytes(8); // EOS
    r.onBytes(1000); // device state
    r.onMultifdBytes(500);
    r.setPhase('downtime');
    r.onPageSent(4105);
    r.setPhase('postcopy');
    r.onPageSent(4105);
    r.onPostcopyRequest();
    r.onPostcopyRequest(2);
    r.onZeroCopyMiss();
    const k = r.counters();
    assert.equal(k.normal, 5);
    assert.equal(k.duplicate, 1);
    const precopy = 3 * 4105 + 10 + 8;
    assert.equal(k.precopyBytes, precopy);
    assert.equal(k.downtimeBytes, 4105);
    assert.equal(k.postcopyBytes, 4105);
    assert.equal(k.ramBytes, precopy + 2 * 4105);
    assert.equal(k.wireBytes, k.ramBytes + 1000 + 500);
    assert.equal(k.multifdBytes, 500);
    assert.equal(k.postcopyRequests, 3);
    assert.equal(k.dirtySyncMissedZeroCopy, 1);
    assert.equal(r.expectedDowntimeMs, 300, 'starts at the downtime limit');
  });

  it('bandwidthWindow: nothing before 100 ms, then bytes/s, mbps, pages/s, threshold, expected downtime', () => {
    const c = clock();
    const r = new RamStats({ now: c.now });
    r.reset(300);
    r.onPageSent(4096 * 100, 100);
    c.advance(99);
    assert.equal(r.bandwidthWindow({ downtimeLimitMs: 300 }), null);
    c.advance(1);
    let s = r.bandwidthWindow({ downtimeLimitMs: 300 })!;
    assert.equal(s.elapsedMs, 100);
    assert.equal(s.bytes, 409600);
    assert.equal(s.bytesPerSecond, 4096000);
    assert.equal(s.mbps, (409600 * 8) / 0.1 / 1e6);
    assert.equal(s.pagesPerSecond, 1000);
    assert.equal(s.thresholdBytes, 4096 * 300, 'bytes per ms × downtime limit');
    assert.equal(s.expectedDowntimeMs, 300, 'no dirty rate yet: estimate not updated (QEMU)');
    assert.equal(r.bandwidth, 4096000);

    // With a dirty rate, expected downtime = remaining / bandwidth.
    r.onSync(0, c.t);
    r.onSync(5000, c.advance(1001));
    assert.equal(r.counters().dirtyPagesRate, Math.floor((5000 * 1000) / 1001));
    r.setRemaining(8192000);
    r.onPageSent(4096 * 200, 200);
    c.advance(100); // window restarted at the last call; 1001 + 100 ms later
    s = r.bandwidthWindow({ downtimeLimitMs: 300 })!;
    assert.equal(s.elapsedMs, 1101);
    const perMs = (4096 * 200) / 1101;
    assert.ok(Math.abs(s.expectedDowntimeMs - 8192000 / perMs) < 1e-6);
    // avail-switchover-bandwidth replaces the measured bandwidth for threshold and estimate.
    r.onPageSent(20000, 4);
    c.advance(200);
    s = r.bandwidthWindow({ downtimeLimitMs: 300, availSwitchoverBandwidth: 1_000_000 })!;
    assert.equal(s.thresholdBytes, 1000 * 300);
    assert.equal(s.expectedDowntimeMs, 8192000 / 1000);
    // A quiet window (<= 10000 bytes) keeps the previous estimate.
    r.onPageSent(5000, 1);
    c.advance(100);
    s = r.bandwidthWindow({ downtimeLimitMs: 300 })!;
    assert.equal(s.expectedDowntimeMs, 8192000 / 1000);
  });

  it('dirty-pages-rate only updates after more than a 1 s period; sync count always counts', () => {
    const c = clock();
    const r = new RamStats({ now: c.now });
    r.onSync(10);
    r.onSync(10, c.advance(1000));
    assert.equal(r.counters().dirtyPagesRate, 0, 'exactly 1000 ms is not more than 1 s');
    r.onSync(10, c.advance(1));
    assert.equal(r.counters().dirtyPagesRate, Math.floor((30 * 1000) / 1001));
    assert.equal(r.counters().dirtySyncCount, 3);
  });

  it('complete(): mbps over the whole transfer; reset() zeroes everything', () => {
    const r = new RamStats({ now: () => 0 });
    r.onPageSent(1_000_000);
    r.onBytes(250_000);
    r.complete(1010, 10);
    assert.equal(r.counters().mbps, (1_250_000 * 8) / 1000 / 1000);
    r.reset(123);
    const k = r.counters();
    assert.equal(k.wireBytes + k.ramBytes + k.normal + k.mbps + k.dirtySyncCount, 0);
    assert.equal(r.expectedDowntimeMs, 123);
    assert.equal(r.currentPhase, 'precopy');
  });
});

describe('query-migrate info', () => {
  const counters = (over: Partial<RamCounters> = {}): RamCounters => ({
    pageSize: 4096,
    ramBytes: 180477,
    wireBytes: 190000,
    total: 67186688,
    remaining: 4096,
    duplicate: 16395,
    normal: 8,
    dirtyPagesRate: 12,
    mbps: 1.5,
    dirtySyncCount: 2,
    postcopyRequests: 0,
    multifdBytes: 0,
    pagesPerSecond: 220.7,
    precopyBytes: 180477,
    downtimeBytes: 0,
    postcopyBytes: 0,
    dirtySyncMissedZeroCopy: 0,
    ...over,
  });
  const src = (status: S, over: Partial<SourceSnapshot> = {}): SourceSnapshot => ({
    status,
    setupTime: 2,
    totalTime: 1505,
    downtime: 40,
    expectedDowntime: 300,
    ram: counters(),
    ...over,
  });
  const RAM_KEYS = [
    'transferred',
    'remaining',
    'total',
    'duplicate',
    'skipped',
    'normal',
    'normal-bytes',
    'dirty-pages-rate',
    'mbps',
    'dirty-sync-count',
    'postcopy-requests',
    'page-size',
    'multifd-bytes',
    'pages-per-second',
    'precopy-bytes',
    'downtime-bytes',
    'postcopy-bytes',
    'dirty-sync-missed-zero-copy',
  ];

  it("none -> {} (nothing ever happened)", () => {
    assert.deepEqual(buildMigrationInfo({}), {});
    assert.deepEqual(buildMigrationInfo({ source: src('none', { errorDesc: 'x' }) }), {});
  });

  it('setup, colo, cancelled, wait-unplug -> status only', () => {
    for (const s of ['setup', 'colo', 'cancelled', 'wait-unplug'] as const) {
      assert.deepEqual(buildMigrationInfo({ source: src(s, { errorDesc: 'boom' }) }), { status: s }, s);
    }
  });

  it('running statuses -> status, ram, total-time, expected-downtime, setup-time (QEMU key order)', () => {
    const running: S[] = ['active', 'cancelling', 'postcopy-active', 'pre-switchover', 'device', 'postcopy-paused', 'postcopy-recover-setup', 'postcopy-recover'];
    for (const s of running) {
      const info = buildMigrationInfo({ source: src(s) });
      assert.deepEqual(Object.keys(info), ['status', 'ram', 'total-time', 'expected-downtime', 'setup-time'], s);
      assert.equal(info.status, s);
      assert.equal(info['total-time'], 1505);
      assert.equal(info['expected-downtime'], 300);
      assert.equal(info['setup-time'], 2);
      assert.deepEqual(Object.keys(info.ram!), RAM_KEYS);
      assert.equal(info.ram!.remaining, 4096);
      assert.equal(info.ram!['dirty-pages-rate'], 12);
      assert.equal(info.ram!.transferred, 180477, '7.2: RAM section bytes');
      assert.equal(info.ram!['normal-bytes'], 8 * 4096);
      assert.equal(info.ram!['pages-per-second'], 220, 'uint64 in QEMU: truncated');
      assert.equal(info.ram!.skipped, 0);
      assert.equal(info.ram!.mbps, 1.5);
    }
  });

  it('completed -> downtime instead of expected-downtime, remaining and dirty-pages-rate 0', () => {
    const info = buildMigrationInfo({ source: src('completed') });
    assert.deepEqual(Object.keys(info), ['status', 'ram', 'total-time', 'downtime', 'setup-time']);
    assert.equal(info.downtime, 40);
    assert.equal(info.ram!.remaining, 0);
    assert.equal(info.ram!['dirty-pages-rate'], 0);
  });

  it('failed -> status and error-desc (only when an error was recorded)', () => {
    assert.deepEqual(buildMigrationInfo({ source: src('failed', { errorDesc: 'Connection refused' }) }), {
      status: 'failed',
      'error-desc': 'Connection refused',
    });
    assert.deepEqual(buildMigrationInfo({ source: src('failed') }), { status: 'failed' });
  });

  it("compat '9': error-desc in any status, downtime during postcopy, transferred = every byte, no skipped", () => {
    const e = buildMigrationInfo({ source: src('cancelled', { errorDesc: 'cancelled by user' }), compat: '9' });
    assert.deepEqual(e, { status: 'cancelled', 'error-desc': 'cancelled by user' });
    const pc = buildMigrationInfo({ source: src('postcopy-active'), compat: '9' });
    assert.equal(pc.downtime, 40);
    assert.equal(pc['expected-downtime'], undefined);
    assert.equal(pc.ram!.transferred, 190000);
    assert.ok(!('skipped' in pc.ram!));
    const act = buildMigrationInfo({ source: src('active'), compat: '9' });
    assert.equal(act['expected-downtime'], 300);
  });

  it('optional extras: cpu-throttle-percentage and xbzrle-cache only when given', () => {
    const x = { 'cache-size': 67108864, bytes: 1, pages: 2, 'cache-miss': 3, 'cache-miss-rate': 0.5, 'encoding-rate': 2, overflow: 0 };
    const info = buildMigrationInfo({ source: src('active', { cpuThrottlePercentage: 30, xbzrleCache: x }) });
    assert.deepEqual(Object.keys(info), ['status', 'ram', 'xbzrle-cache', 'total-time', 'expected-downtime', 'setup-time', 'cpu-throttle-percentage']);
    assert.equal(info['cpu-throttle-percentage'], 30);
    assert.deepEqual(buildMigrationInfo({ source: src('setup', { cpuThrottlePercentage: 30 }) }), { status: 'setup' });
  });

  it('blocked-reasons in every status, none included', () => {
    assert.deepEqual(buildMigrationInfo({ blockedReasons: ['a', 'b'] }), { 'blocked-reasons': ['a', 'b'] });
    assert.deepEqual(buildMigrationInfo({ source: src('failed'), blockedReasons: ['a'] }), { status: 'failed', 'blocked-reasons': ['a'] });
    assert.deepEqual(buildMigrationInfo({ blockedReasons: [] }), {});
  });

  it('destination: status, socket-address, postcopy blocktime once completed; the source wins unless none', () => {
    const addr = [{ type: 'inet' as const, host: '127.0.0.1', port: '37467', ipv4: true }];
    assert.deepEqual(buildMigrationInfo({ destination: { status: 'none', socketAddress: addr } }), { 'socket-address': addr });
    for (const s of ['setup', 'active', 'postcopy-active', 'postcopy-paused', 'postcopy-recover', 'failed', 'colo'] as const) {
      assert.deepEqual(buildMigrationInfo({ destination: { status: s, postcopyBlocktime: 5 } }), { status: s }, s);
    }
    assert.deepEqual(
      buildMigrationInfo({ destination: { status: 'completed', postcopyBlocktime: 5, postcopyVcpuBlocktime: [2, 3] } }),
      { status: 'completed', 'postcopy-blocktime': 5, 'postcopy-vcpu-blocktime': [2, 3] },
    );
    assert.deepEqual(
      buildMigrationInfo({ destination: { status: 'active', socketAddress: addr }, source: src('none') }),
      { status: 'active', 'socket-address': addr },
    );
    assert.equal(buildMigrationInfo({ destination: { status: 'completed' }, source: src('setup') }).status, 'setup');
  });

  it('ramStatsJson clamps to non-negative integers except mbps', () => {
    const j = ramStatsJson(counters({ pagesPerSecond: 9.99, remaining: -5 }), 'active');
    assert.equal(j['pages-per-second'], 9);
    assert.equal(j.remaining, 0);
  });

  it('snapshots from a live machine and RamStats (end to end)', () => {
    const c = clock();
    const m = new MigrationStateMachine({ side: 'source', now: c.now });
    const r = new RamStats({ now: c.now });
    m.setState('none', 'setup');
    r.reset(300);
    r.setTotal(1 << 20);
    c.advance(3);
    m.setState('setup', 'active');
    r.onZeroPage(9, 1);
    c.advance(10);
    let info = buildMigrationInfo({ source: sourceSnapshot(m, r) });
    assert.equal(info['setup-time'], 3);
    assert.equal(info['total-time'], 13);
    assert.equal(info['expected-downtime'], 300);
    assert.equal(info.ram!.duplicate, 1);
    m.markDowntimeStart();
    c.advance(5);
    m.setState('active', 'failed');
    m.setError('Unable to write to socket: Broken pipe');
    info = buildMigrationInfo({ source: sourceSnapshot(m, r, { cpuThrottlePercentage: 20 }) });
    assert.deepEqual(info, { status: 'failed', 'error-desc': 'Unable to write to socket: Broken pipe' });
    const d = new MigrationStateMachine({ side: 'destination' });
    d.setState('none', 'setup');
    assert.deepEqual(buildMigrationInfo({ destination: destinationSnapshot(d, { socketAddress: [{ type: 'unix', path: '/x' }] }) }), {
      status: 'setup',
      'socket-address': [{ type: 'unix', path: '/x' }],
    });
  });
});
