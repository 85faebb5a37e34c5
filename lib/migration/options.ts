/**
 * Migration capabilities and parameters: QEMU's names, defaults, types, argument validation and
 * compatibility rules, for migrate-set-capabilities / migrate-set-parameters and their queries.
 *
 * Reference: QEMU migration/options.c (9.0) and migration/migration.c (7.2): migrate_caps_check,
 * migrate_params_check, qmp_query_migrate_parameters; qapi/migration.json; the QAPI input
 * visitor's error texts. Error texts were checked against QEMU 7.2.22 over QMP.
 *
 * Invariants:
 * - Both setters are atomic: either every requested change is applied or none is.
 * - Checks run in QEMU's order on the merged (current + requested) set, so the first failing
 *   rule in QEMU's order is the one reported.
 * - A capability that this engine cannot do is refused when enabled, naming it (table
 *   `supported`, overridable per instance so later work can turn features on).
 *
 * Where QEMU 7.2 and 9.x differ we follow 9.x when it is stricter or fixes a bug, and say so:
 * postcopy-ram + multifd is refused (9.0), multifd-zlib/zstd-level are range-checked and
 * applied (7.2 silently ignored them), tls-authz accepts null as "" (9.0).
 */
import { EventEmitter } from 'node:events';
import {
  ERR_MIGRATION_ACTIVE,
  ERR_MIGRATION_CAPABILITY,
  ERR_MIGRATION_PARAMETER,
  ERR_MIGRATION_UNSUPPORTED,
  MIGRATION_ERRORS,
  MigrationCommandError,
  isRunning,
  type MigrationStatus,
} from './state';
import {
  MIGRATE_SET_PARAMETERS_ARGS,
  MIGRATION_CAPABILITIES,
  MIGRATION_CAPABILITY_STATUS_TYPE,
  parseSetCapabilitiesArgs,
  parseSetParametersArgs,
  visit,
  type CapabilitySet,
  type MigrationCapability,
} from './qapi-args';

// The QMP argument layer (schemas, visitor, the capability enum) lives in qapi-args.ts.
export * from './qapi-args';

// ---------------------------------------------------------------------------------------------
// Capabilities


/**
 * What this engine can do today. `true` for no-ops without a block layer (zero-blocks,
 * late-block-activate). Flip an entry (or pass `supported` to MigrationOptions) when the engine
 * implements the feature.
 */
export const CAPABILITY_SUPPORT: Readonly<CapabilitySet> = Object.freeze({
  xbzrle: false,
  'rdma-pin-all': false,
  'auto-converge': false,
  'zero-blocks': true,
  compress: false,
  events: true,
  'postcopy-ram': true,
  'x-colo': false,
  'release-ram': false,
  block: false,
  'return-path': true,
  'pause-before-switchover': true,
  multifd: false,
  'dirty-bitmaps': false,
  'postcopy-blocktime': false,
  'late-block-activate': true,
  'x-ignore-shared': false,
  'validate-uuid': false,
  'background-snapshot': true,
  'zero-copy-send': false,
  'postcopy-preempt': true,
  'switchover-ack': false,
  'dirty-limit': false,
  'mapped-ram': false,
});

/** Capabilities that conflict with background-snapshot, in QEMU's order. */
export const BACKGROUND_SNAPSHOT_INCOMPATIBLE: readonly MigrationCapability[] = [
  'postcopy-ram',
  'dirty-bitmaps',
  'postcopy-blocktime',
  'late-block-activate',
  'return-path',
  'multifd',
  'pause-before-switchover',
  'auto-converge',
  'release-ram',
  'rdma-pin-all',
  'compress',
  'xbzrle',
  'x-colo',
  'validate-uuid',
  'zero-copy-send',
];

export interface CapabilityStatus {
  capability: MigrationCapability;
  state: boolean;
}

/**
 * Host-dependent check, supplied by the engine. Called for:
 * - 'postcopy-ram' when it is being turned on while the VM waits for an incoming migration
 *   (only the destination needs userfaultfd),
 * - 'background-snapshot' whenever it is on (userfaultfd write-protect on guest RAM),
 * - 'dirty-limit' whenever it is on (KVM dirty ring).
 * Returns null when fine, else the complete error text (see HOST_CHECK_ERRORS).
 */
export type HostCheck = (capability: MigrationCapability) => string | null;

/** QEMU's texts for host-dependent refusals, for HostCheck implementations. */
export const HOST_CHECK_ERRORS = {
  /** QEMU 9.x prefixes the detail; 7.2 said just "Postcopy is not supported". */
  postcopyUnsupported: (detail?: string): string =>
    detail ? `Postcopy is not supported: ${detail}` : 'Postcopy is not supported',
  backgroundSnapshotKernel: 'Background-snapshot is not supported by host kernel',
  backgroundSnapshotMemory: 'Background-snapshot is not compatible with guest memory configuration',
  dirtyLimitNeedsRing: "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set",
} as const;

/** QEMU's texts for capability rules (migrate_caps_check, 9.0). */
export const CAPABILITY_ERRORS = {
  postcopyIgnoreShared: 'Postcopy is not compatible with ignore-shared',
  postcopyMultifd: 'Postcopy is not yet compatible with multifd',
  backgroundSnapshotWith: (c: MigrationCapability): string => `Background-snapshot is not compatible with ${c}`,
  zeroCopy: 'Zero copy only available for non-compressed non-TLS multifd migration',
  preemptNeedsPostcopy: 'Postcopy preempt requires postcopy-ram',
  preemptCompress: 'Postcopy preempt not compatible with compress',
  preemptIncomingStarted: 'Postcopy preempt must be set before incoming starts',
  multifdCompress: 'Multifd is not compatible with compress',
  multifdIncomingStarted: 'Multifd must be set before incoming starts',
  switchoverAckNeedsReturnPath: "Capability 'switchover-ack' requires capability 'return-path'",
  dirtyLimitAutoConverge: 'dirty-limit conflicts with auto-converge either of then available currently',
  multifdXbzrle: 'Multifd is not compatible with xbzrle',
  compressXbzrle: 'Compression is not compatible with xbzrle',
  mappedRamXbzrle: 'Mapped-ram migration is incompatible with xbzrle',
  mappedRamCompress: 'Mapped-ram migration is incompatible with compression',
  mappedRamPostcopy: 'Mapped-ram migration is incompatible with postcopy',
  mappedRamParams: 'Mapped-ram only available for non-compressed non-TLS multifd migration',
  /** ferry's own: names the capabilities this engine cannot do. */
  unsupported: (caps: readonly MigrationCapability[]): string =>
    caps.length === 1
      ? `Migration capability '${caps[0]}' is not supported by ferry`
      : `Migration capabilities ${caps.map((c) => `'${c}'`).join(', ')} are not supported by ferry`,
} as const;

/** What setCapabilities needs to know about the process. */
export interface CapabilityContext {
  /** Outgoing migration status: refuse while running (QEMU's migration_is_running) or colo. */
  status?: MigrationStatus;
  /** Run state is inmigrate (waiting for an incoming migration): postcopy host check applies. */
  inmigrate?: boolean;
  /** The incoming transport is already set up (multifd/preempt must be set before). */
  incomingStarted?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Parameters

/** uint64 / size values: a number when exactly representable, a bigint above 2^53. */
export type U64 = number | bigint;

export type MultiFDCompression = 'none' | 'zlib' | 'zstd';
export type MigMode = 'normal' | 'cpr-reboot';
export type ZeroPageDetection = 'none' | 'legacy' | 'multifd';

export interface BitmapMigrationBitmapAliasTransform {
  persistent?: boolean;
}
export interface BitmapMigrationBitmapAlias {
  name: string;
  alias: string;
  transform?: BitmapMigrationBitmapAliasTransform;
}
export interface BitmapMigrationNodeAlias {
  'node-name': string;
  alias: string;
  bitmaps: BitmapMigrationBitmapAlias[];
}

/** QEMU's MigrationParameters (query-migrate-parameters), keys as on the wire. */
export interface MigrationParameters {
  'announce-initial': U64;
  'announce-max': U64;
  'announce-rounds': U64;
  'announce-step': U64;
  'compress-level': number;
  'compress-threads': number;
  'compress-wait-thread': boolean;
  'decompress-threads': number;
  'throttle-trigger-threshold': number;
  'cpu-throttle-initial': number;
  'cpu-throttle-increment': number;
  'cpu-throttle-tailslow': boolean;
  'tls-creds': string;
  'tls-hostname': string;
  'tls-authz': string;
  'max-bandwidth': U64;
  'avail-switchover-bandwidth': U64;
  'downtime-limit': U64;
  'x-checkpoint-delay': number;
  'block-incremental': boolean;
  'multifd-channels': number;
  'xbzrle-cache-size': U64;
  'max-postcopy-bandwidth': U64;
  'max-cpu-throttle': number;
  'multifd-compression': MultiFDCompression;
  'multifd-zlib-level': number;
  'multifd-zstd-level': number;
  /** Present only once set (as in QEMU). */
  'block-bitmap-mapping'?: BitmapMigrationNodeAlias[];
  'x-vcpu-dirty-limit-period': U64;
  'vcpu-dirty-limit': U64;
  mode: MigMode;
  'zero-page-detection': ZeroPageDetection;
}

export type MigrationParameterName = keyof MigrationParameters;

/** migrate-set-parameters after argument parsing (tls-* null already turned into ""). */
export type MigrateSetParameters = Partial<MigrationParameters>;

/** QEMU's defaults (options.c). */
export const DEFAULT_PARAMETERS: Readonly<Omit<MigrationParameters, 'block-bitmap-mapping'>> = Object.freeze({
  'announce-initial': 50,
  'announce-max': 550,
  'announce-rounds': 5,
  'announce-step': 100,
  'compress-level': 1,
  'compress-threads': 8,
  'compress-wait-thread': true,
  'decompress-threads': 2,
  'throttle-trigger-threshold': 50,
  'cpu-throttle-initial': 20,
  'cpu-throttle-increment': 10,
  'cpu-throttle-tailslow': false,
  'tls-creds': '',
  'tls-hostname': '',
  'tls-authz': '',
  'max-bandwidth': 134217728, // 128 MiB/s
  'avail-switchover-bandwidth': 0,
  'downtime-limit': 300, // ms
  'x-checkpoint-delay': 20000, // ms
  'block-incremental': false,
  'multifd-channels': 2,
  'xbzrle-cache-size': 67108864, // 64 MiB
  'max-postcopy-bandwidth': 0, // unlimited
  'max-cpu-throttle': 99,
  'multifd-compression': 'none',
  'multifd-zlib-level': 1,
  'multifd-zstd-level': 1,
  'x-vcpu-dirty-limit-period': 1000, // ms
  'vcpu-dirty-limit': 1, // MB/s
  mode: 'normal',
  'zero-page-detection': 'multifd',
});

/** Largest downtime-limit (ms): 2000 s. */
export const MAX_DOWNTIME_LIMIT_MS = 2000 * 1000;


// ---------------------------------------------------------------------------------------------
// Parameter rules (migrate_params_check), on the merged set, in QEMU's order.

/** QEMU's QERR_INVALID_PARAMETER_VALUE text; names are QEMU's (underscores, as QEMU prints). */
const expects = (name: string, what: string): string => `Parameter '${name}' expects ${what}`;

export const PARAMETER_ERRORS = {
  compressLevel: expects('compress_level', 'a value between 0 and 9'),
  compressThreads: expects('compress_threads', 'a value between 1 and 255'),
  decompressThreads: expects('decompress_threads', 'a value between 1 and 255'),
  throttleTriggerThreshold: expects('throttle_trigger_threshold', 'an integer in the range of 1 to 100'),
  cpuThrottleInitial: expects('cpu_throttle_initial', 'an integer in the range of 1 to 99'),
  cpuThrottleIncrement: expects('cpu_throttle_increment', 'an integer in the range of 1 to 99'),
  downtimeLimit: expects('downtime_limit', 'an integer in the range of 0 to (2000 * 1000) ms'),
  multifdChannels: expects('multifd_channels', 'a value between 1 and 255'),
  multifdZlibLevel: expects('multifd_zlib_level', 'a value between 0 and 9'),
  multifdZstdLevel: expects('multifd_zstd_level', 'a value between 0 and 20'),
  xbzrleCacheSize: expects('xbzrle_cache_size', 'a power of two no less than the target page size'),
  maxCpuThrottle: expects('max_cpu_throttle', 'an integer in the range of cpu_throttle_initial to 99'),
  announceInitial: expects('announce_initial', 'a value between 0 and 100000'),
  announceMax: expects('announce_max', 'a value between 0 and 100000'),
  announceRounds: expects('announce_rounds', 'a value between 0 and 1000'),
  announceStep: expects('announce_step', 'a value between 0 and 10000'),
  vcpuDirtyLimitPeriod: expects('x-vcpu-dirty-limit-period', 'a value between 1 and 1000'),
  vcpuDirtyLimit: "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s",
  bitmapMappingPrefix: 'Invalid mapping given for block-bitmap-mapping: ',
} as const;

const big = (v: U64): bigint => BigInt(v);

/** QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'. */
function idWellFormed(id: string): boolean {
  return /^[A-Za-z][A-Za-z0-9\-._]*$/.test(id);
}

const MAX_NODE_NAME_BYTES = 31; // BlockDriverState.node_name[32]
const MAX_BITMAP_NAME_BYTES = 1023; // BDRV_BITMAP_MAX_NAME_SIZE
const MAX_ALIAS_BYTES = 255;

/**
 * block-bitmap-mapping validation (QEMU's check_dirty_bitmap_mig_alias_map): one pass mapping
 * names to aliases, then one mapping aliases to names; returns QEMU's detail text or null.
 */
export function checkBitmapMapping(map: readonly BitmapMigrationNodeAlias[]): string | null {
  const bytes = (s: string): number => Buffer.byteLength(s, 'utf8');
  for (const nameToAlias of [true, false]) {
    const nodes = new Set<string>();
    for (const n of map) {
      if (!idWellFormed(n.alias)) return `The node alias '${n.alias}' is not well-formed`;
      if (bytes(n.alias) > MAX_ALIAS_BYTES) {
        return `The node alias '${n.alias}' is longer than ${MAX_ALIAS_BYTES} bytes`;
      }
      if (bytes(n['node-name']) > MAX_NODE_NAME_BYTES) {
        return `The node name '${n['node-name']}' is longer than ${MAX_NODE_NAME_BYTES} bytes`;
      }
      const from = nameToAlias ? n['node-name'] : n.alias;
      if (nodes.has(from)) {
        return nameToAlias ? `The node name '${from}' is mapped twice` : `The node alias '${from}' is used twice`;
      }
      nodes.add(from);
      const bitmaps = new Set<string>();
      for (const b of n.bitmaps) {
        if (bytes(b.alias) > MAX_ALIAS_BYTES) {
          return `The bitmap alias '${b.alias}' is longer than ${MAX_ALIAS_BYTES} bytes`;
        }
        if (bytes(b.name) > MAX_BITMAP_NAME_BYTES) {
          return `The bitmap name '${b.name}' is longer than ${MAX_BITMAP_NAME_BYTES} bytes`;
        }
        const bfrom = nameToAlias ? b.name : b.alias;
        if (bitmaps.has(bfrom)) {
          return nameToAlias
            ? `The bitmap '${n['node-name']}'/'${bfrom}' is mapped twice`
            : `The bitmap alias '${n.alias}'/'${bfrom}' is used twice`;
        }
        bitmaps.add(bfrom);
      }
    }
  }
  return null;
}

/** migrate_params_check on a merged set; `caps` are the current capabilities. Pure. */
export function checkParameters(
  p: MigrationParameters,
  caps: Readonly<CapabilitySet>,
  pageSize = 4096,
): string | null {
  const E = PARAMETER_ERRORS;
  if (p['compress-level'] > 9) return E.compressLevel;
  if (p['compress-threads'] < 1) return E.compressThreads;
  if (p['decompress-threads'] < 1) return E.decompressThreads;
  const ttt = p['throttle-trigger-threshold'];
  if (ttt < 1 || ttt > 100) return E.throttleTriggerThreshold;
  const cti = p['cpu-throttle-initial'];
  if (cti < 1 || cti > 99) return E.cpuThrottleInitial;
  const ctinc = p['cpu-throttle-increment'];
  if (ctinc < 1 || ctinc > 99) return E.cpuThrottleIncrement;
  // max-bandwidth / avail-switchover-bandwidth > SIZE_MAX cannot happen with 64-bit size_t.
  if (big(p['downtime-limit']) > BigInt(MAX_DOWNTIME_LIMIT_MS)) return E.downtimeLimit;
  if (p['multifd-channels'] < 1) return E.multifdChannels;
  if (p['multifd-zlib-level'] > 9) return E.multifdZlibLevel;
  if (p['multifd-zstd-level'] > 20) return E.multifdZstdLevel;
  const xcs = big(p['xbzrle-cache-size']);
  if (xcs < BigInt(pageSize) || (xcs & (xcs - 1n)) !== 0n) return E.xbzrleCacheSize;
  const mct = p['max-cpu-throttle'];
  if (mct < cti || mct > 99) return E.maxCpuThrottle;
  if (big(p['announce-initial']) > 100000n) return E.announceInitial;
  if (big(p['announce-max']) > 100000n) return E.announceMax;
  if (big(p['announce-rounds']) > 1000n) return E.announceRounds;
  const step = big(p['announce-step']);
  if (step < 1n || step > 10000n) return E.announceStep;
  const bbm = p['block-bitmap-mapping'];
  if (bbm) {
    const detail = checkBitmapMapping(bbm);
    if (detail) return E.bitmapMappingPrefix + detail;
  }
  const compressed = p['multifd-compression'] !== 'none';
  const tls = p['tls-creds'] !== '';
  if (caps['zero-copy-send'] && (compressed || tls)) return CAPABILITY_ERRORS.zeroCopy;
  if (caps['mapped-ram'] && (compressed || tls)) return CAPABILITY_ERRORS.mappedRamParams;
  const period = big(p['x-vcpu-dirty-limit-period']);
  if (period < 1n || period > 1000n) return E.vcpuDirtyLimitPeriod;
  if (big(p['vcpu-dirty-limit']) < 1n) return E.vcpuDirtyLimit;
  return null;
}

// ---------------------------------------------------------------------------------------------
// The options object

export interface MigrationOptionsInit {
  /** Overrides of CAPABILITY_SUPPORT for this instance. */
  supported?: Partial<CapabilitySet>;
  /** Host-dependent capability check (see HostCheck). Absent: every host check passes. */
  hostCheck?: HostCheck;
  /** Target page size for xbzrle-cache-size (4096 on x86). */
  pageSize?: number;
}

/** Payload of the 'capabilities' event. */
export interface CapabilitiesChange {
  changed: MigrationCapability[];
  capabilities: Readonly<CapabilitySet>;
}

/** Payload of the 'parameters' event (e.g. the engine re-applies max-bandwidth mid-run). */
export interface ParametersChange {
  changed: MigrationParameterName[];
  parameters: Readonly<MigrationParameters>;
}

function allCaps(v: boolean): CapabilitySet {
  return Object.fromEntries(MIGRATION_CAPABILITIES.map((c) => [c, v])) as CapabilitySet;
}

/**
 * The migration capabilities and parameters of one VMM process (QEMU keeps one set for both
 * directions). Setters throw MigrationCommandError with QEMU's texts.
 *
 * Events: 'capabilities' (CapabilitiesChange), 'parameters' (ParametersChange), after a
 * successful set that changed something.
 */
export class MigrationOptions extends EventEmitter {
  readonly supported: Readonly<CapabilitySet>;
  readonly pageSize: number;
  private readonly hostCheck: HostCheck;
  private caps: CapabilitySet = allCaps(false);
  private params: MigrationParameters = { ...DEFAULT_PARAMETERS };

  constructor(init: MigrationOptionsInit = {}) {
    super();
    this.supported = Object.freeze({ ...CAPABILITY_SUPPORT, ...init.supported });
    this.hostCheck = init.hostCheck ?? (() => null);
    this.pageSize = init.pageSize ?? 4096;
  }

  /** Is `cap` on? */
  capability(cap: MigrationCapability): boolean {
    return this.caps[cap];
  }

  get capabilities(): Readonly<CapabilitySet> {
    return { ...this.caps };
  }

  /** One parameter's value. */
  parameter<K extends MigrationParameterName>(name: K): MigrationParameters[K] {
    return this.params[name];
  }

  /** A uint64/size parameter as a JS number (values above 2^53 lose precision). */
  parameterNumber(name: MigrationParameterName): number {
    const v = this.params[name];
    if (typeof v === 'number') return v;
    if (typeof v === 'bigint') return Number(v);
    throw new TypeError(`migration parameter ${name} is not numeric`);
  }

  get parameters(): Readonly<MigrationParameters> {
    return structuredClone(this.params);
  }

  /**
   * The capability rules on a candidate set (QEMU's migrate_caps_check, 9.0 order, preceded by
   * ferry's supported table). `old` is the current set. Pure apart from calling hostCheck.
   */
  checkCapabilities(next: Readonly<CapabilitySet>, ctx: CapabilityContext = {}): MigrationCommandError | null {
    const old = this.caps;
    const E = CAPABILITY_ERRORS;
    const fail = (msg: string, code = ERR_MIGRATION_CAPABILITY) => new MigrationCommandError(code, msg);

    const unsupported = MIGRATION_CAPABILITIES.filter((c) => next[c] && !this.supported[c]);
    if (unsupported.length > 0) return fail(E.unsupported(unsupported), ERR_MIGRATION_UNSUPPORTED);

    if (next['postcopy-ram']) {
      if (!old['postcopy-ram'] && ctx.inmigrate) {
        const why = this.hostCheck('postcopy-ram');
        if (why) return fail(why, ERR_MIGRATION_UNSUPPORTED);
      }
      if (next['x-ignore-shared']) return fail(E.postcopyIgnoreShared);
      if (next.multifd) return fail(E.postcopyMultifd);
    }
    if (next['background-snapshot']) {
      const why = this.hostCheck('background-snapshot');
      if (why) return fail(why, ERR_MIGRATION_UNSUPPORTED);
      const bad = BACKGROUND_SNAPSHOT_INCOMPATIBLE.find((c) => next[c]);
      if (bad) return fail(E.backgroundSnapshotWith(bad));
    }
    if (
      next['zero-copy-send'] &&
      (!next.multifd ||
        next.compress ||
        next.xbzrle ||
        this.params['multifd-compression'] !== 'none' ||
        this.params['tls-creds'] !== '')
    ) {
      return fail(E.zeroCopy);
    }
    if (next['postcopy-preempt']) {
      if (!next['postcopy-ram']) return fail(E.preemptNeedsPostcopy);
      if (next.compress) return fail(E.preemptCompress);
      if (ctx.incomingStarted) return fail(E.preemptIncomingStarted);
    }
    if (next.multifd) {
      if (next.compress) return fail(E.multifdCompress);
      if (ctx.incomingStarted) return fail(E.multifdIncomingStarted);
    }
    if (next['switchover-ack'] && !next['return-path']) return fail(E.switchoverAckNeedsReturnPath);
    if (next['dirty-limit']) {
      if (next['auto-converge']) return fail(E.dirtyLimitAutoConverge);
      const why = this.hostCheck('dirty-limit');
      if (why) return fail(why, ERR_MIGRATION_UNSUPPORTED);
    }
    if (next.multifd && next.xbzrle) return fail(E.multifdXbzrle);
    if (next.compress && next.xbzrle) return fail(E.compressXbzrle);
    if (next['mapped-ram']) {
      if (next.xbzrle) return fail(E.mappedRamXbzrle);
      if (next.compress) return fail(E.mappedRamCompress);
      if (next['postcopy-ram']) return fail(E.mappedRamPostcopy);
    }
    return null;
  }

  /**
   * migrate-set-capabilities: refused while a migration runs, then every rule on the merged
   * set; applies all or nothing. Later entries for the same capability win, as in QEMU.
   */
  setCapabilities(list: readonly CapabilityStatus[], ctx: CapabilityContext = {}): void {
    // Runtime shape check, for callers that did not go through parseSetCapabilitiesArgs.
    const items = visit({ kind: 'list', of: MIGRATION_CAPABILITY_STATUS_TYPE }, list, 'capabilities', 'capabilities');
    const parsed = items as CapabilityStatus[];
    const status = ctx.status ?? 'none';
    if (isRunning(status) || status === 'colo') {
      throw new MigrationCommandError(ERR_MIGRATION_ACTIVE, MIGRATION_ERRORS.inProgress);
    }
    const next = { ...this.caps };
    for (const { capability, state } of parsed) next[capability] = state;
    const e = this.checkCapabilities(next, ctx);
    if (e) throw e;
    const changed = MIGRATION_CAPABILITIES.filter((c) => next[c] !== this.caps[c]);
    this.caps = next;
    if (changed.length > 0) this.emit('capabilities', { changed, capabilities: this.capabilities } satisfies CapabilitiesChange);
  }

  /** One capability (QEMU's migrate_cap_set), with the same checks. */
  setCapability(capability: MigrationCapability, state: boolean, ctx: CapabilityContext = {}): void {
    this.setCapabilities([{ capability, state }], ctx);
  }

  /** The QMP command: raw `arguments` in, QEMU's errors out. */
  qmpSetCapabilities(args: unknown, ctx: CapabilityContext = {}): void {
    this.setCapabilities(parseSetCapabilitiesArgs(args), ctx);
  }

  /**
   * migrate-set-parameters: `args` are the raw QMP arguments (or an already parsed object).
   * Types are checked first (QEMU's visitor texts), then the ranges on the merged set; applied
   * all or nothing. Allowed while a migration runs, as in QEMU (e.g. max-bandwidth mid-run).
   */
  setParameters(args: unknown): void {
    const req = parseSetParametersArgs(args);
    const merged: MigrationParameters = { ...this.params, ...structuredClone(req) };
    const e = checkParameters(merged, this.caps, this.pageSize);
    if (e) throw new MigrationCommandError(ERR_MIGRATION_PARAMETER, e);
    const changed = (Object.keys(req) as MigrationParameterName[]).filter(
      (k) => JSON.stringify(jsonable(req[k])) !== JSON.stringify(jsonable(this.params[k])),
    );
    this.params = merged;
    if (changed.length > 0) this.emit('parameters', { changed, parameters: this.parameters } satisfies ParametersChange);
  }

  /** query-migrate-capabilities: every capability, in QEMU's order. */
  queryCapabilities(): CapabilityStatus[] {
    return MIGRATION_CAPABILITIES.map((capability) => ({ capability, state: this.caps[capability] }));
  }

  /**
   * query-migrate-parameters: every parameter in QAPI order, tls-* as "" when unset,
   * block-bitmap-mapping only once set. uint64 values above 2^53 are bigints: the JSON writer
   * must print them as integers.
   */
  queryParameters(): MigrationParameters {
    const out: Record<string, unknown> = {};
    for (const m of MIGRATE_SET_PARAMETERS_ARGS) {
      const k = m.name as MigrationParameterName;
      if (this.params[k] === undefined) continue;
      out[k] = structuredClone(this.params[k]);
    }
    return out as unknown as MigrationParameters;
  }
}

function jsonable(v: unknown): unknown {
  return typeof v === 'bigint' ? `${v}n` : v;
}
