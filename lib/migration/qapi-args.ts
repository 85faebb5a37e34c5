/**
 * The argument schemas of migrate-set-capabilities and migrate-set-parameters
 * as QAPI data, and the visitor that walks them with QEMU's input-visitor
 * error texts ("Parameter 'x' is missing", "... expects uint64", ...).
 * Split from options.ts: this is the QMP argument layer, options.ts the rules.
 */
import { ERR_MIGRATION_ARGUMENT, MigrationCommandError } from './state';
import type { CapabilityStatus, MigrateSetParameters, U64 } from './options';

/** QEMU's MigrationCapability enum in QEMU's order (7.2's list, then 8.1's and 9.0's). */
export const MIGRATION_CAPABILITIES = [
  'xbzrle',
  'rdma-pin-all',
  'auto-converge',
  'zero-blocks',
  'compress',
  'events',
  'postcopy-ram',
  'x-colo',
  'release-ram',
  'block',
  'return-path',
  'pause-before-switchover',
  'multifd',
  'dirty-bitmaps',
  'postcopy-blocktime',
  'late-block-activate',
  'x-ignore-shared',
  'validate-uuid',
  'background-snapshot',
  'zero-copy-send',
  'postcopy-preempt',
  'switchover-ack', // 8.1
  'dirty-limit', // 8.1
  'mapped-ram', // 9.0
] as const;

export type MigrationCapability = (typeof MIGRATION_CAPABILITIES)[number];
export type CapabilitySet = Record<MigrationCapability, boolean>;

export function isMigrationCapability(v: unknown): v is MigrationCapability {
  return typeof v === 'string' && (MIGRATION_CAPABILITIES as readonly string[]).includes(v);
}


// ---------------------------------------------------------------------------------------------
// Argument schemas (QAPI), table-driven: the validator below walks these.

/** A QAPI type as used by the two commands. */
export type QapiType =
  | { kind: 'uint'; bits: 8 | 32 | 64; size?: boolean }
  | { kind: 'bool' }
  | { kind: 'str' }
  | { kind: 'str-or-null' }
  | { kind: 'enum'; name: string; values: readonly string[] }
  | { kind: 'list'; of: QapiType }
  | { kind: 'struct'; name: string; members: readonly QapiMember[] };

export interface QapiMember {
  name: string;
  type: QapiType;
  optional: boolean;
}

const u8: QapiType = { kind: 'uint', bits: 8 };
const u32: QapiType = { kind: 'uint', bits: 32 };
const u64: QapiType = { kind: 'uint', bits: 64 };
const size: QapiType = { kind: 'uint', bits: 64, size: true };
const bool: QapiType = { kind: 'bool' };
const str: QapiType = { kind: 'str' };
const strOrNull: QapiType = { kind: 'str-or-null' };
const opt = (name: string, type: QapiType): QapiMember => ({ name, type, optional: true });
const req = (name: string, type: QapiType): QapiMember => ({ name, type, optional: false });

export const MIGRATION_CAPABILITY_STATUS_TYPE: QapiType = {
  kind: 'struct',
  name: 'MigrationCapabilityStatus',
  members: [
    req('capability', { kind: 'enum', name: 'MigrationCapability', values: MIGRATION_CAPABILITIES }),
    req('state', bool),
  ],
};

const BITMAP_MIGRATION_NODE_ALIAS_TYPE: QapiType = {
  kind: 'struct',
  name: 'BitmapMigrationNodeAlias',
  members: [
    req('node-name', str),
    req('alias', str),
    req('bitmaps', {
      kind: 'list',
      of: {
        kind: 'struct',
        name: 'BitmapMigrationBitmapAlias',
        members: [
          req('name', str),
          req('alias', str),
          opt('transform', {
            kind: 'struct',
            name: 'BitmapMigrationBitmapAliasTransform',
            members: [opt('persistent', bool)],
          }),
        ],
      },
    }),
  ],
};

/** Arguments of migrate-set-capabilities. */
export const MIGRATE_SET_CAPABILITIES_ARGS: readonly QapiMember[] = [
  req('capabilities', { kind: 'list', of: MIGRATION_CAPABILITY_STATUS_TYPE }),
];

/** Arguments of migrate-set-parameters (QAPI MigrateSetParameters, boxed), in QAPI order. */
export const MIGRATE_SET_PARAMETERS_ARGS: readonly QapiMember[] = [
  opt('announce-initial', size),
  opt('announce-max', size),
  opt('announce-rounds', size),
  opt('announce-step', size),
  opt('compress-level', u8),
  opt('compress-threads', u8),
  opt('compress-wait-thread', bool),
  opt('decompress-threads', u8),
  opt('throttle-trigger-threshold', u8),
  opt('cpu-throttle-initial', u8),
  opt('cpu-throttle-increment', u8),
  opt('cpu-throttle-tailslow', bool),
  opt('tls-creds', strOrNull),
  opt('tls-hostname', strOrNull),
  opt('tls-authz', strOrNull),
  opt('max-bandwidth', size),
  opt('avail-switchover-bandwidth', size),
  opt('downtime-limit', u64),
  opt('x-checkpoint-delay', u32),
  opt('block-incremental', bool),
  opt('multifd-channels', u8),
  opt('xbzrle-cache-size', size),
  opt('max-postcopy-bandwidth', size),
  opt('max-cpu-throttle', u8),
  opt('multifd-compression', { kind: 'enum', name: 'MultiFDCompression', values: ['none', 'zlib', 'zstd'] }),
  opt('multifd-zlib-level', u8),
  opt('multifd-zstd-level', u8),
  opt('block-bitmap-mapping', { kind: 'list', of: BITMAP_MIGRATION_NODE_ALIAS_TYPE }),
  opt('x-vcpu-dirty-limit-period', u64),
  opt('vcpu-dirty-limit', u64),
  opt('mode', { kind: 'enum', name: 'MigMode', values: ['normal', 'cpr-reboot'] }),
  opt('zero-page-detection', { kind: 'enum', name: 'ZeroPageDetection', values: ['none', 'legacy', 'multifd'] }),
];

const argError = (msg: string): MigrationCommandError => new MigrationCommandError(ERR_MIGRATION_ARGUMENT, msg);

const TWO_64 = 1n << 64n;
const MIN_I64 = -(1n << 63n);

/** A bigint as U64: a number when exactly representable. */
function toU64(v: bigint): U64 {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Visits `value` as `type` the way QEMU's QObject input visitor does, with its error texts.
 * `path` is the full name ('capabilities[0].state'), `name` the member name alone (QEMU uses
 * the bare name for enum values and small-integer ranges).
 */
export function visit(type: QapiType, value: unknown, path: string, name: string): unknown {
  switch (type.kind) {
    case 'uint': {
      let v: bigint;
      if (typeof value === 'bigint') v = value;
      else if (typeof value === 'number' && Number.isInteger(value)) v = BigInt(value);
      else throw argError(`Parameter '${path}' expects uint64`);
      // QEMU accepts negative int64 values for uint64 and wraps them (backward compatibility).
      if (v < MIN_I64 || v >= TWO_64) throw argError(`Parameter '${path}' expects uint64`);
      if (v < 0n) v += TWO_64;
      if (type.bits !== 64 && v > (1n << BigInt(type.bits)) - 1n) {
        throw argError(`Parameter '${name}' expects uint${type.bits}_t`);
      }
      return toU64(v);
    }
    case 'bool':
      if (typeof value !== 'boolean') throw argError(`Invalid parameter type for '${path}', expected: boolean`);
      return value;
    case 'str':
      if (typeof value !== 'string') throw argError(`Invalid parameter type for '${path}', expected: string`);
      return value;
    case 'str-or-null':
      if (typeof value !== 'string' && value !== null) {
        throw argError(`Invalid parameter type for '${path}', expected: StrOrNull`);
      }
      return value;
    case 'enum':
      if (typeof value !== 'string') throw argError(`Invalid parameter type for '${path}', expected: string`);
      if (!type.values.includes(value)) throw argError(`Parameter '${name}' does not accept value '${value}'`);
      return value;
    case 'list': {
      if (!Array.isArray(value)) throw argError(`Invalid parameter type for '${path}', expected: array`);
      return value.map((el, i) => visit(type.of, el, `${path}[${i}]`, `${path}[${i}]`));
    }
    case 'struct':
      if (!isPlainObject(value)) throw argError(`Invalid parameter type for '${path}', expected: object`);
      return visitMembers(type.members, value, `${path}.`);
  }
}

/** Visits an object's members in schema order, then refuses unknown keys (QEMU's order). */
function visitMembers(members: readonly QapiMember[], obj: Record<string, unknown>, prefix: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const m of members) {
    if (!Object.hasOwn(obj, m.name)) {
      if (m.optional) continue;
      throw argError(`Parameter '${prefix}${m.name}' is missing`);
    }
    out[m.name] = visit(m.type, obj[m.name], `${prefix}${m.name}`, m.name);
  }
  for (const k of Object.keys(obj)) {
    if (!members.some((m) => m.name === k)) throw argError(`Parameter '${prefix}${k}' is unexpected`);
  }
  return out;
}

function argsObject(args: unknown): Record<string, unknown> {
  if (args === undefined || args === null) return {};
  if (!isPlainObject(args)) throw argError("QMP input member 'arguments' must be an object");
  return args;
}

/** Parses migrate-set-capabilities arguments (`{capabilities: [...]}`) with QEMU's errors. */
export function parseSetCapabilitiesArgs(args: unknown): CapabilityStatus[] {
  const out = visitMembers(MIGRATE_SET_CAPABILITIES_ARGS, argsObject(args), '');
  return out.capabilities as CapabilityStatus[];
}

/** Parses migrate-set-parameters arguments with QEMU's errors; tls-* null becomes "". */
export function parseSetParametersArgs(args: unknown): MigrateSetParameters {
  const out = visitMembers(MIGRATE_SET_PARAMETERS_ARGS, argsObject(args), '');
  for (const k of ['tls-creds', 'tls-hostname', 'tls-authz'] as const) {
    if (Object.hasOwn(out, k) && out[k] === null) out[k] = '';
  }
  return out as MigrateSetParameters;
}

