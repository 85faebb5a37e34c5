import assert from 'node:assert/strict';
import {
  BACKGROUND_SNAPSHOT_INCOMPATIBLE,
  CAPABILITY_ERRORS,
  CAPABILITY_SUPPORT,
  DEFAULT_PARAMETERS,
  HOST_CHECK_ERRORS,
  MIGRATE_SET_PARAMETERS_ARGS,
  MIGRATION_CAPABILITIES,
  MigrationOptions,
  PARAMETER_ERRORS,
  checkBitmapMapping,
  isMigrationCapability,
  parseSetCapabilitiesArgs,
  parseSetParametersArgs,
  type CapabilitiesChange,
  type CapabilityContext,
  type CapabilitySet,
  type MigrationCapability,
  type ParametersChange,
} from '../../lib/migration/options';
import { MIGRATION_STATUSES, MigrationCommandError, isRunning } from '../../lib/migration/state';

const ALL = Object.fromEntries(MIGRATION_CAPABILITIES.map((c) => [c, true])) as CapabilitySet;

/** Asserts `fn` throws a MigrationCommandError with exactly `msg` (and `code` if given). */
function rejects(fn: () => unknown, msg: string, code?: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof MigrationCommandError, `not a MigrationCommandError: ${String(e)}`);
    assert.equal(e.message, msg);
    assert.equal(e.errorClass, 'GenericError');
    if (code) assert.equal(e.code, code);
    return true;
  });
}

const on = (...caps: MigrationCapability[]) => caps.map((capability) => ({ capability, state: true }));

describe('migration capabilities', () => {
  it("query: QEMU 7.2's 21 capabilities plus switchover-ack, dirty-limit, mapped-ram, in QEMU order, all off", () => {
    const o = new MigrationOptions();
    const q = o.queryCapabilities();
    // Order as QEMU 7.2.22 answered query-migrate-capabilities on this machine.
    const qemu72 =
      'xbzrle rdma-pin-all auto-converge zero-blocks compress events postcopy-ram x-colo release-ram block ' +
      'return-path pause-before-switchover multifd dirty-bitmaps postcopy-blocktime late-block-activate ' +
      'x-ignore-shared validate-uuid background-snapshot zero-copy-send postcopy-preempt';
    assert.deepEqual(
      q.map((c) => c.capability),
      [...qemu72.split(' '), 'switchover-ack', 'dirty-limit', 'mapped-ram'],
    );
    assert.ok(q.every((c) => c.state === false));
    assert.ok(isMigrationCapability('mapped-ram'));
    assert.ok(!isMigrationCapability('compression'));
  });

  it('unsupported capabilities are refused when enabled, naming them; disabling them is fine', () => {
    const o = new MigrationOptions();
    const unsupported = MIGRATION_CAPABILITIES.filter((c) => !CAPABILITY_SUPPORT[c]);
    assert.ok(unsupported.includes('xbzrle') && unsupported.includes('rdma-pin-all') && unsupported.includes('x-colo'));
    assert.ok(unsupported.includes('block') && unsupported.includes('compress') && unsupported.includes('multifd'));
    for (const c of unsupported) {
      rejects(() => o.setCapability(c, true), `Migration capability '${c}' is not supported by ferry`, 'ERR_MIGRATION_UNSUPPORTED');
      o.setCapability(c, false);
    }
    rejects(
      () => o.setCapabilities(on('events', 'xbzrle', 'compress')),
      "Migration capabilities 'xbzrle', 'compress' are not supported by ferry",
    );
    assert.equal(o.capability('events'), false, 'atomic: nothing applied');
  });

  it('each supported capability can be enabled alone (with return-path for nothing else needed)', () => {
    for (const c of MIGRATION_CAPABILITIES.filter((x) => CAPABILITY_SUPPORT[x])) {
      const o = new MigrationOptions();
      const list = c === 'postcopy-preempt' ? on('postcopy-ram', c) : on(c);
      o.setCapabilities(list);
      assert.equal(o.capability(c), true, c);
    }
  });

  it('the supported table is per instance: later work can turn features on', () => {
    const o = new MigrationOptions({ supported: { multifd: true } });
    o.setCapability('multifd', true);
    assert.equal(o.capability('multifd'), true);
    assert.equal(CAPABILITY_SUPPORT.multifd, false, 'default table untouched');
    assert.throws(() => ((CAPABILITY_SUPPORT as CapabilitySet).multifd = true));
  });

  // Every rule of QEMU's migrate_caps_check (9.0 order), with every capability supported.
  const rules: { name: string; caps: MigrationCapability[]; ctx?: CapabilityContext; msg: string }[] = [
    { name: 'postcopy + ignore-shared', caps: ['postcopy-ram', 'x-ignore-shared'], msg: 'Postcopy is not compatible with ignore-shared' },
    { name: 'postcopy + multifd (9.0)', caps: ['postcopy-ram', 'multifd'], msg: 'Postcopy is not yet compatible with multifd' },
    ...BACKGROUND_SNAPSHOT_INCOMPATIBLE.map((c) => ({
      name: `background-snapshot + ${c}`,
      caps: ['background-snapshot', c] as MigrationCapability[],
      msg: `Background-snapshot is not compatible with ${c}`,
    })),
    { name: 'zero-copy without multifd', caps: ['zero-copy-send'], msg: CAPABILITY_ERRORS.zeroCopy },
    { name: 'zero-copy + compress', caps: ['zero-copy-send', 'multifd', 'compress'], msg: CAPABILITY_ERRORS.zeroCopy },
    { name: 'zero-copy + xbzrle', caps: ['zero-copy-send', 'multifd', 'xbzrle'], msg: CAPABILITY_ERRORS.zeroCopy },
    { name: 'preempt without postcopy', caps: ['postcopy-preempt'], msg: 'Postcopy preempt requires postcopy-ram' },
    { name: 'preempt + compress', caps: ['postcopy-preempt', 'postcopy-ram', 'compress'], msg: 'Postcopy preempt not compatible with compress' },
    {
      name: 'preempt after incoming started',
      caps: ['postcopy-preempt', 'postcopy-ram'],
      ctx: { incomingStarted: true },
      msg: 'Postcopy preempt must be set before incoming starts',
    },
    { name: 'multifd + compress', caps: ['multifd', 'compress'], msg: 'Multifd is not compatible with compress' },
    { name: 'multifd after incoming started', caps: ['multifd'], ctx: { incomingStarted: true }, msg: 'Multifd must be set before incoming starts' },
    { name: 'switchover-ack without return-path', caps: ['switchover-ack'], msg: "Capability 'switchover-ack' requires capability 'return-path'" },
    {
      name: 'dirty-limit + auto-converge',
      caps: ['dirty-limit', 'auto-converge'],
      msg: 'dirty-limit conflicts with auto-converge either of then available currently',
    },
    { name: 'multifd + xbzrle', caps: ['multifd', 'xbzrle'], msg: 'Multifd is not compatible with xbzrle' },
    { name: 'compress + xbzrle', caps: ['compress', 'xbzrle'], msg: 'Compression is not compatible with xbzrle' },
    { name: 'mapped-ram + xbzrle', caps: ['mapped-ram', 'xbzrle'], msg: 'Mapped-ram migration is incompatible with xbzrle' },
    { name: 'mapped-ram + compress', caps: ['mapped-ram', 'compress'], msg: 'Mapped-ram migration is incompatible with compression' },
    { name: 'mapped-ram + postcopy', caps: ['mapped-ram', 'postcopy-ram'], msg: 'Mapped-ram migration is incompatible with postcopy' },
  ];
  for (const r of rules) {
    it(`rule: ${r.name} -> "${r.msg}"`, () => {
      const o = new MigrationOptions({ supported: ALL });
      let events = 0;
      o.on('capabilities', () => events++);
      rejects(() => o.setCapabilities(on(...r.caps), r.ctx), r.msg, 'ERR_MIGRATION_CAPABILITY');
      assert.ok(o.queryCapabilities().every((c) => !c.state), 'atomic: nothing applied');
      assert.equal(events, 0);
    });
  }

  it('accepted combinations: preempt with postcopy, switchover-ack with return-path, zero-copy with multifd, dirty-limit alone', () => {
    for (const caps of [
      ['postcopy-ram', 'postcopy-preempt'],
      ['switchover-ack', 'return-path'],
      ['zero-copy-send', 'multifd'],
      ['dirty-limit'],
      ['mapped-ram', 'multifd'],
      ['background-snapshot', 'events', 'zero-blocks', 'mapped-ram', 'x-ignore-shared', 'block'],
      ['postcopy-ram', 'postcopy-blocktime', 'return-path', 'pause-before-switchover', 'release-ram', 'late-block-activate'],
    ] as MigrationCapability[][]) {
      const o = new MigrationOptions({ supported: ALL });
      o.setCapabilities(on(...caps));
      for (const c of caps) assert.equal(o.capability(c), true, `${caps.join('+')}: ${c}`);
    }
  });

  it('rules see the merged set: a rule can be broken by turning a capability off later', () => {
    const o = new MigrationOptions({ supported: ALL });
    o.setCapabilities(on('postcopy-ram', 'postcopy-preempt'));
    rejects(() => o.setCapability('postcopy-ram', false), 'Postcopy preempt requires postcopy-ram');
    assert.equal(o.capability('postcopy-ram'), true);
    o.setCapabilities([
      { capability: 'postcopy-preempt', state: false },
      { capability: 'postcopy-ram', state: false },
    ]);
    assert.equal(o.capability('postcopy-ram'), false);
    // Later entries for the same capability win (QEMU applies the list in order).
    o.setCapabilities([
      { capability: 'events', state: true },
      { capability: 'events', state: false },
    ]);
    assert.equal(o.capability('events'), false);
  });

  it('zero-copy-send also depends on parameters: multifd-compression and tls-creds', () => {
    const o = new MigrationOptions({ supported: ALL });
    o.setParameters({ 'multifd-compression': 'zlib' });
    rejects(() => o.setCapabilities(on('multifd', 'zero-copy-send')), CAPABILITY_ERRORS.zeroCopy);
    o.setParameters({ 'multifd-compression': 'none', 'tls-creds': 'tls0' });
    rejects(() => o.setCapabilities(on('multifd', 'zero-copy-send')), CAPABILITY_ERRORS.zeroCopy);
    o.setParameters({ 'tls-creds': null });
    o.setCapabilities(on('multifd', 'zero-copy-send'));
    // ... and the reverse: parameters are checked against the capabilities.
    rejects(() => o.setParameters({ 'multifd-compression': 'zstd' }), CAPABILITY_ERRORS.zeroCopy, 'ERR_MIGRATION_PARAMETER');
    rejects(() => o.setParameters({ 'tls-creds': 'tls0' }), CAPABILITY_ERRORS.zeroCopy);
    assert.equal(o.parameter('tls-creds'), '');
  });

  it('mapped-ram refuses compressed or TLS parameters', () => {
    const o = new MigrationOptions({ supported: ALL });
    o.setCapabilities(on('mapped-ram', 'multifd'));
    rejects(() => o.setParameters({ 'multifd-compression': 'zlib' }), 'Mapped-ram only available for non-compressed non-TLS multifd migration');
    rejects(() => o.setParameters({ 'tls-creds': 'x' }), CAPABILITY_ERRORS.mappedRamParams);
  });

  it('host checks: postcopy only on a waiting destination and only when newly enabled; snapshot and dirty-limit always', () => {
    const asked: MigrationCapability[] = [];
    let answer: Partial<Record<MigrationCapability, string>> = {
      'postcopy-ram': HOST_CHECK_ERRORS.postcopyUnsupported('Userfaultfd not available'),
      'background-snapshot': HOST_CHECK_ERRORS.backgroundSnapshotKernel,
      'dirty-limit': HOST_CHECK_ERRORS.dirtyLimitNeedsRing,
    };
    const o = new MigrationOptions({
      supported: ALL,
      hostCheck: (c) => {
        asked.push(c);
        return answer[c] ?? null;
      },
    });
    o.setCapability('postcopy-ram', true); // source side: no host check
    assert.deepEqual(asked, []);
    o.setCapability('postcopy-ram', false);
    rejects(
      () => o.setCapability('postcopy-ram', true, { inmigrate: true }),
      'Postcopy is not supported: Userfaultfd not available',
      'ERR_MIGRATION_UNSUPPORTED',
    );
    assert.deepEqual(asked, ['postcopy-ram']);
    rejects(() => o.setCapability('background-snapshot', true), 'Background-snapshot is not supported by host kernel');
    answer['background-snapshot'] = HOST_CHECK_ERRORS.backgroundSnapshotMemory;
    rejects(() => o.setCapability('background-snapshot', true), 'Background-snapshot is not compatible with guest memory configuration');
    rejects(() => o.setCapability('dirty-limit', true), "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set");
    answer = {};
    asked.length = 0;
    o.setCapability('postcopy-ram', true, { inmigrate: true });
    o.setCapability('events', true, { inmigrate: true });
    assert.deepEqual(asked, ['postcopy-ram'], 'postcopy is not re-checked once on');
    assert.equal(HOST_CHECK_ERRORS.postcopyUnsupported(), 'Postcopy is not supported');
  });

  it("refused while a migration runs (and in colo): \"There's a migration process in progress\"", () => {
    for (const status of MIGRATION_STATUSES) {
      const o = new MigrationOptions();
      if (isRunning(status) || status === 'colo') {
        rejects(() => o.setCapability('events', true, { status }), "There's a migration process in progress", 'ERR_MIGRATION_ACTIVE');
        assert.equal(o.capability('events'), false);
      } else {
        o.setCapability('events', true, { status });
        assert.equal(o.capability('events'), true, status);
      }
    }
  });

  it("emits 'capabilities' with what changed, only when something changed", () => {
    const o = new MigrationOptions();
    const seen: CapabilitiesChange[] = [];
    o.on('capabilities', (c: CapabilitiesChange) => seen.push(c));
    o.setCapabilities(on('events', 'return-path'));
    o.setCapabilities(on('events'));
    assert.equal(seen.length, 1);
    assert.deepEqual(seen[0]!.changed, ['events', 'return-path']);
    assert.equal(seen[0]!.capabilities.events, true);
  });

  it('argument errors have QEMU 7.2\'s texts (probed over QMP)', () => {
    const cases: [unknown, string][] = [
      [{}, "Parameter 'capabilities' is missing"],
      [undefined, "Parameter 'capabilities' is missing"],
      [{ capabilities: null }, "Invalid parameter type for 'capabilities', expected: array"],
      [{ capabilities: { capability: 'xbzrle', state: true } }, "Invalid parameter type for 'capabilities', expected: array"],
      [{ capabilities: [5] }, "Invalid parameter type for 'capabilities[0]', expected: object"],
      [{ capabilities: [null] }, "Invalid parameter type for 'capabilities[0]', expected: object"],
      [{ capabilities: [{ state: true }] }, "Parameter 'capabilities[0].capability' is missing"],
      [{ capabilities: [{ capability: 'xbzrle' }] }, "Parameter 'capabilities[0].state' is missing"],
      [{ capabilities: [{ capability: 'xbzrle', state: 'yes' }] }, "Invalid parameter type for 'capabilities[0].state', expected: boolean"],
      [{ capabilities: [{ capability: 7, state: true }] }, "Invalid parameter type for 'capabilities[0].capability', expected: string"],
      [{ capabilities: [{ capability: 'xbzrle', state: true, foo: 1 }] }, "Parameter 'capabilities[0].foo' is unexpected"],
      [{ capabilities: [{ foo: 1, capability: 'xbzrle', state: 'x' }] }, "Invalid parameter type for 'capabilities[0].state', expected: boolean"],
      [{ capabilities: [], bar: 1 }, "Parameter 'bar' is unexpected"],
      [{ capabilities: [{ capability: 'events', state: true }, { capability: 'nope', state: true }] }, "Parameter 'capability' does not accept value 'nope'"],
      [{ capabilities: [{ capability: 'switchover-acks', state: true }] }, "Parameter 'capability' does not accept value 'switchover-acks'"],
      [[1], "QMP input member 'arguments' must be an object"],
    ];
    const o = new MigrationOptions();
    for (const [args, msg] of cases) {
      rejects(() => o.qmpSetCapabilities(args), msg, 'ERR_MIGRATION_ARGUMENT');
      rejects(() => parseSetCapabilitiesArgs(args), msg);
    }
    assert.equal(o.capability('events'), false);
    o.qmpSetCapabilities({ capabilities: [] });
    o.qmpSetCapabilities({ capabilities: [{ capability: 'events', state: true }] });
    assert.equal(o.capability('events'), true);
    // The typed entry point validates too (callers outside QMP).
    rejects(() => o.setCapabilities([{ capability: 'bogus' as MigrationCapability, state: true }]), "Parameter 'capability' does not accept value 'bogus'");
  });
});

describe('migration parameters', () => {
  it("defaults are QEMU's (the values QEMU 7.2.22 reported, plus 8.x/9.0 parameters)", () => {
    // query-migrate-parameters from QEMU 7.2.22 on this machine.
    const qemu72 = {
      'cpu-throttle-tailslow': false,
      'xbzrle-cache-size': 67108864,
      'cpu-throttle-initial': 20,
      'announce-max': 550,
      'decompress-threads': 2,
      'compress-threads': 8,
      'compress-level': 1,
      'multifd-channels': 2,
      'multifd-zstd-level': 1,
      'announce-initial': 50,
      'block-incremental': false,
      'compress-wait-thread': true,
      'downtime-limit': 300,
      'tls-authz': '',
      'multifd-compression': 'none',
      'announce-rounds': 5,
      'announce-step': 100,
      'tls-creds': '',
      'multifd-zlib-level': 1,
      'max-cpu-throttle': 99,
      'max-postcopy-bandwidth': 0,
      'tls-hostname': '',
      'throttle-trigger-threshold': 50,
      'max-bandwidth': 134217728,
      'x-checkpoint-delay': 20000,
      'cpu-throttle-increment': 10,
    };
    const q = new MigrationOptions().queryParameters() as unknown as Record<string, unknown>;
    for (const [k, v] of Object.entries(qemu72)) assert.equal(q[k], v, k);
    assert.equal(q['avail-switchover-bandwidth'], 0);
    assert.equal(q['x-vcpu-dirty-limit-period'], 1000);
    assert.equal(q['vcpu-dirty-limit'], 1);
    assert.equal(q.mode, 'normal');
    assert.equal(q['zero-page-detection'], 'multifd');
    assert.ok(!('block-bitmap-mapping' in q), 'only once set');
    assert.deepEqual(
      Object.keys(q),
      MIGRATE_SET_PARAMETERS_ARGS.map((m) => m.name).filter((n) => n !== 'block-bitmap-mapping'),
      'QAPI order',
    );
    assert.deepEqual(Object.keys(DEFAULT_PARAMETERS).sort(), Object.keys(q).sort());
  });

  // Every range check, in QEMU's wording (underscored names are QEMU's), with the first
  // rejected and the last accepted values at each bound.
  const ranges: { set: Record<string, unknown>; ok: Record<string, unknown>[]; msg: string }[] = [
    { set: { 'compress-level': 10 }, ok: [{ 'compress-level': 0 }, { 'compress-level': 9 }], msg: PARAMETER_ERRORS.compressLevel },
    { set: { 'compress-threads': 0 }, ok: [{ 'compress-threads': 1 }, { 'compress-threads': 255 }], msg: "Parameter 'compress_threads' expects a value between 1 and 255" },
    { set: { 'decompress-threads': 0 }, ok: [{ 'decompress-threads': 1 }], msg: "Parameter 'decompress_threads' expects a value between 1 and 255" },
    { set: { 'throttle-trigger-threshold': 0 }, ok: [{ 'throttle-trigger-threshold': 1 }], msg: "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100" },
    { set: { 'throttle-trigger-threshold': 101 }, ok: [{ 'throttle-trigger-threshold': 100 }], msg: PARAMETER_ERRORS.throttleTriggerThreshold },
    { set: { 'cpu-throttle-initial': 0 }, ok: [{ 'cpu-throttle-initial': 1 }], msg: "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99" },
    { set: { 'cpu-throttle-initial': 100 }, ok: [{ 'cpu-throttle-initial': 99 }], msg: PARAMETER_ERRORS.cpuThrottleInitial },
    { set: { 'cpu-throttle-increment': 0 }, ok: [{ 'cpu-throttle-increment': 1 }], msg: "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99" },
    { set: { 'cpu-throttle-increment': 100 }, ok: [{ 'cpu-throttle-increment': 99 }], msg: PARAMETER_ERRORS.cpuThrottleIncrement },
    { set: { 'downtime-limit': 2000001 }, ok: [{ 'downtime-limit': 2000000 }, { 'downtime-limit': 0 }], msg: "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms" },
    { set: { 'downtime-limit': -5 }, ok: [], msg: PARAMETER_ERRORS.downtimeLimit },
    { set: { 'multifd-channels': 0 }, ok: [{ 'multifd-channels': 255 }], msg: "Parameter 'multifd_channels' expects a value between 1 and 255" },
    { set: { 'multifd-zlib-level': 10 }, ok: [{ 'multifd-zlib-level': 9 }], msg: "Parameter 'multifd_zlib_level' expects a value between 0 and 9" },
    { set: { 'multifd-zstd-level': 21 }, ok: [{ 'multifd-zstd-level': 20 }], msg: "Parameter 'multifd_zstd_level' expects a value between 0 and 20" },
    { set: { 'xbzrle-cache-size': 4095 }, ok: [{ 'xbzrle-cache-size': 4096 }, { 'xbzrle-cache-size': 2 ** 40 }], msg: "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size" },
    { set: { 'xbzrle-cache-size': 12288 }, ok: [], msg: PARAMETER_ERRORS.xbzrleCacheSize },
    { set: { 'xbzrle-cache-size': 2048 }, ok: [], msg: PARAMETER_ERRORS.xbzrleCacheSize },
    { set: { 'max-cpu-throttle': 100 }, ok: [{ 'max-cpu-throttle': 99 }, { 'max-cpu-throttle': 20 }], msg: "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99" },
    { set: { 'max-cpu-throttle': 19 }, ok: [], msg: PARAMETER_ERRORS.maxCpuThrottle },
    { set: { 'cpu-throttle-initial': 50, 'max-cpu-throttle': 40 }, ok: [{ 'cpu-throttle-initial': 50, 'max-cpu-throttle': 50 }], msg: PARAMETER_ERRORS.maxCpuThrottle },
    { set: { 'announce-initial': 100001 }, ok: [{ 'announce-initial': 100000 }, { 'announce-initial': 0 }], msg: "Parameter 'announce_initial' expects a value between 0 and 100000" },
    { set: { 'announce-max': 100001 }, ok: [{ 'announce-max': 100000 }], msg: "Parameter 'announce_max' expects a value between 0 and 100000" },
    { set: { 'announce-rounds': 1001 }, ok: [{ 'announce-rounds': 1000 }, { 'announce-rounds': 0 }], msg: "Parameter 'announce_rounds' expects a value between 0 and 1000" },
    { set: { 'announce-step': 0 }, ok: [{ 'announce-step': 1 }], msg: "Parameter 'announce_step' expects a value between 0 and 10000" },
    { set: { 'announce-step': 10001 }, ok: [{ 'announce-step': 10000 }], msg: PARAMETER_ERRORS.announceStep },
    { set: { 'x-vcpu-dirty-limit-period': 0 }, ok: [{ 'x-vcpu-dirty-limit-period': 1 }], msg: "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000" },
    { set: { 'x-vcpu-dirty-limit-period': 1001 }, ok: [{ 'x-vcpu-dirty-limit-period': 1000 }], msg: PARAMETER_ERRORS.vcpuDirtyLimitPeriod },
    { set: { 'vcpu-dirty-limit': 0 }, ok: [{ 'vcpu-dirty-limit': 1 }], msg: "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s" },
  ];
  for (const r of ranges) {
    it(`range: ${JSON.stringify(r.set)} -> "${r.msg}"`, () => {
      const o = new MigrationOptions();
      const before = o.queryParameters();
      let events = 0;
      o.on('parameters', () => events++);
      rejects(() => o.setParameters(r.set), r.msg, 'ERR_MIGRATION_PARAMETER');
      assert.deepEqual(o.queryParameters(), before, 'atomic: nothing applied');
      assert.equal(events, 0);
      for (const ok of r.ok) {
        const p = new MigrationOptions();
        p.setParameters(ok);
        for (const [k, v] of Object.entries(ok)) assert.equal(p.parameter(k as 'mode'), v, k);
      }
    });
  }

  it("range checks run in QEMU's order whatever the argument order", () => {
    const o = new MigrationOptions();
    rejects(() => o.setParameters({ 'announce-step': 0, 'compress-level': 10 }), PARAMETER_ERRORS.compressLevel);
    rejects(() => o.setParameters({ 'compress-level': 3, 'announce-step': 0 }), PARAMETER_ERRORS.announceStep);
    assert.equal(o.parameter('compress-level'), 1, 'the valid half was not applied either');
  });

  it('type errors have QEMU 7.2\'s texts (probed over QMP)', () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ 'max-bandwidth': 'fast' }, "Parameter 'max-bandwidth' expects uint64"],
      [{ 'max-bandwidth': 1.5 }, "Parameter 'max-bandwidth' expects uint64"],
      [{ 'max-bandwidth': null }, "Parameter 'max-bandwidth' expects uint64"],
      [{ 'max-bandwidth': 2n ** 64n }, "Parameter 'max-bandwidth' expects uint64"],
      [{ 'max-bandwidth': -(2n ** 63n) - 1n }, "Parameter 'max-bandwidth' expects uint64"],
      [{ 'compress-level': 256 }, "Parameter 'compress-level' expects uint8_t"],
      [{ 'compress-level': -1 }, "Parameter 'compress-level' expects uint8_t"],
      [{ 'compress-level': '1' }, "Parameter 'compress-level' expects uint64"],
      [{ 'compress-level': true }, "Parameter 'compress-level' expects uint64"],
      [{ 'downtime-limit': '5' }, "Parameter 'downtime-limit' expects uint64"],
      [{ 'x-checkpoint-delay': 4294967296 }, "Parameter 'x-checkpoint-delay' expects uint32_t"],
      [{ 'x-checkpoint-delay': -1 }, "Parameter 'x-checkpoint-delay' expects uint32_t"],
      [{ 'cpu-throttle-tailslow': 1 }, "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"],
      [{ 'block-incremental': 'no' }, "Invalid parameter type for 'block-incremental', expected: boolean"],
      [{ 'tls-creds': 5 }, "Invalid parameter type for 'tls-creds', expected: StrOrNull"],
      [{ 'tls-hostname': ['a'] }, "Invalid parameter type for 'tls-hostname', expected: StrOrNull"],
      [{ 'multifd-compression': 'lz4' }, "Parameter 'multifd-compression' does not accept value 'lz4'"],
      [{ 'multifd-compression': 5 }, "Invalid parameter type for 'multifd-compression', expected: string"],
      [{ mode: 'cpr' }, "Parameter 'mode' does not accept value 'cpr'"],
      [{ 'zero-page-detection': 'always' }, "Parameter 'zero-page-detection' does not accept value 'always'"],
      [{ foo: 1 }, "Parameter 'foo' is unexpected"],
      [{ foo: 1, 'max-bandwidth': 'x' }, "Parameter 'max-bandwidth' expects uint64"],
      [{ 'max-bandwidth': 'x', 'announce-initial': 'y' }, "Parameter 'announce-initial' expects uint64"],
      [{ 'block-bitmap-mapping': {} }, "Invalid parameter type for 'block-bitmap-mapping', expected: array"],
      [{ 'block-bitmap-mapping': [{ 'node-name': 'a', alias: 'b' }] }, "Parameter 'block-bitmap-mapping[0].bitmaps' is missing"],
      [
        { 'block-bitmap-mapping': [{ 'node-name': 'a', alias: 'b', bitmaps: [{ name: 'x' }] }] },
        "Parameter 'block-bitmap-mapping[0].bitmaps[0].alias' is missing",
      ],
      [
        { 'block-bitmap-mapping': [{ 'node-name': 'a', alias: 'b', bitmaps: [{ name: 'x', alias: 'y', transform: { persistent: 1 } }] }] },
        "Invalid parameter type for 'block-bitmap-mapping[0].bitmaps[0].transform.persistent', expected: boolean",
      ],
    ];
    for (const [args, msg] of cases) {
      const o = new MigrationOptions();
      rejects(() => o.setParameters(args), msg, 'ERR_MIGRATION_ARGUMENT');
      rejects(() => parseSetParametersArgs(args), msg);
    }
  });

  it('uint64: negative int64 values wrap (QEMU keeps this for compatibility); big values become bigints', () => {
    const o = new MigrationOptions();
    o.setParameters({ 'max-bandwidth': -1 });
    assert.equal(o.parameter('max-bandwidth'), 2n ** 64n - 1n);
    assert.equal(o.parameterNumber('max-bandwidth'), 2 ** 64);
    o.setParameters({ 'max-bandwidth': 2n ** 64n - 1n });
    assert.equal(o.queryParameters()['max-bandwidth'], 2n ** 64n - 1n);
    o.setParameters({ 'max-bandwidth': 2n ** 40n });
    assert.equal(o.parameter('max-bandwidth'), 2 ** 40, 'exact values stay numbers');
    o.setParameters({ 'compress-level': -0 });
    assert.equal(o.parameter('compress-level'), 0);
    o.setParameters({ 'multifd-channels': 255 });
    assert.equal(o.parameter('multifd-channels'), 255);
  });

  it('tls-* accept strings and null (null means ""); applied all together', () => {
    const o = new MigrationOptions();
    o.setParameters({ 'tls-creds': 'x', 'tls-hostname': 'h', 'tls-authz': 'z', 'max-bandwidth': 1000, 'multifd-zlib-level': 5 });
    const q = o.queryParameters();
    assert.equal(q['tls-creds'], 'x');
    assert.equal(q['tls-hostname'], 'h');
    assert.equal(q['tls-authz'], 'z');
    assert.equal(q['max-bandwidth'], 1000);
    assert.equal(q['multifd-zlib-level'], 5, '9.x applies it (7.2 ignored it)');
    o.setParameters({ 'tls-creds': null, 'tls-hostname': null, 'tls-authz': null });
    const r = o.queryParameters();
    assert.equal(r['tls-creds'], '');
    assert.equal(r['tls-hostname'], '');
    assert.equal(r['tls-authz'], '');
    assert.deepEqual(parseSetParametersArgs({ 'tls-creds': null }), { 'tls-creds': '' });
    assert.deepEqual(parseSetParametersArgs(undefined), {});
  });

  it('block-bitmap-mapping: QEMU\'s checks, in QEMU\'s order, with its prefix', () => {
    const node = (n: string, a: string, bitmaps: { name: string; alias: string }[] = []) => ({ 'node-name': n, alias: a, bitmaps });
    const P = PARAMETER_ERRORS.bitmapMappingPrefix;
    const cases: [unknown[], string][] = [
      [[node('a', 'b'), node('a', 'c')], "The node name 'a' is mapped twice"],
      [[node('a', 'b'), node('c', 'b')], "The node alias 'b' is used twice"],
      [[node('a', '')], "The node alias '' is not well-formed"],
      [[node('a', '0abc')], "The node alias '0abc' is not well-formed"],
      [[node('a', 'b c')], "The node alias 'b c' is not well-formed"],
      [[node('a', 'b'.repeat(256))], `The node alias '${'b'.repeat(256)}' is longer than 255 bytes`],
      [[node('n'.repeat(32), 'b')], `The node name '${'n'.repeat(32)}' is longer than 31 bytes`],
      [[node('a', 'b', [{ name: 'x', alias: 'y' }, { name: 'x', alias: 'z' }])], "The bitmap 'a'/'x' is mapped twice"],
      [[node('a', 'b', [{ name: 'x', alias: 'y' }, { name: 'w', alias: 'y' }])], "The bitmap alias 'b'/'y' is used twice"],
      [[node('a', 'b', [{ name: 'x', alias: 'y'.repeat(256) }])], `The bitmap alias '${'y'.repeat(256)}' is longer than 255 bytes`],
      [[node('a', 'b', [{ name: 'x'.repeat(1024), alias: 'y' }])], `The bitmap name '${'x'.repeat(1024)}' is longer than 1023 bytes`],
      // name->alias pass runs over all nodes before the alias->name pass
      [[node('a', 'b'), node('c', 'b'), node('a', 'd')], "The node name 'a' is mapped twice"],
    ];
    for (const [map, detail] of cases) {
      const o = new MigrationOptions();
      rejects(() => o.setParameters({ 'block-bitmap-mapping': map }), P + detail, 'ERR_MIGRATION_PARAMETER');
      assert.equal(o.queryParameters()['block-bitmap-mapping'], undefined);
    }
    const good = [node('a', 'b-c.d_e', [{ name: 'x', alias: '' }]), node('n'.repeat(31), 'Z')];
    assert.equal(checkBitmapMapping(good), null);
    const o = new MigrationOptions();
    o.setParameters({ 'block-bitmap-mapping': [] });
    assert.deepEqual(o.queryParameters()['block-bitmap-mapping'], [], 'an empty mapping is "set"');
    o.setParameters({ 'block-bitmap-mapping': good });
    assert.deepEqual(o.queryParameters()['block-bitmap-mapping'], good);
    (good[0]!.bitmaps as { name: string }[])[0]!.name = 'mutated';
    assert.equal(o.queryParameters()['block-bitmap-mapping']![0]!.bitmaps[0]!.name, 'x', 'stored by copy');
  });

  it('allowed while a migration runs (as in QEMU); emits what changed', () => {
    const o = new MigrationOptions();
    const seen: ParametersChange[] = [];
    o.on('parameters', (c: ParametersChange) => seen.push(c));
    o.setParameters({ 'max-bandwidth': 1 << 30, 'downtime-limit': 300 });
    o.setParameters({ 'max-bandwidth': 1 << 30 });
    o.setParameters({});
    assert.equal(seen.length, 1);
    assert.deepEqual(seen[0]!.changed, ['max-bandwidth']);
    assert.equal(seen[0]!.parameters['max-bandwidth'], 1 << 30);
    assert.equal(o.parameterNumber('downtime-limit'), 300);
    assert.throws(() => o.parameterNumber('mode'), TypeError);
  });

  it('query results are copies', () => {
    const o = new MigrationOptions();
    const q = o.queryParameters();
    q['downtime-limit'] = 5;
    assert.equal(o.parameter('downtime-limit'), 300);
    const c = o.queryCapabilities();
    c[0]!.state = true;
    assert.equal(o.capability('xbzrle'), false);
  });
});
