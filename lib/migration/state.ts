/**
 * Migration status: QEMU's status names, one compare-and-set state machine per side (outgoing and
 * incoming), and the pure guards that decide whether a migration QMP command may run now.
 *
 * Policy-free: nothing here touches a guest or a socket. The engine moves the machine with
 * `setState(expected, next)`; the QMP layer listens for 'state' and 'migration' events and calls
 * the guards before it starts work.
 *
 * Outgoing (source) side. `*` marks the states a cancel can come from (any running state goes to
 * cancelling); every running state can also fail (-> failed) except the postcopy ones, whose I/O
 * errors pause instead.
 *
 * ```
 *                  migrate
 *   none/completed/failed/cancelled ──> setup* ──> [wait-unplug*] ──> active* ─────────────┐
 *                                        │                             │  │  │               │
 *                                        └─> failed                    │  │  └─> colo ──> completed
 *                                                                      │  │
 *                     pause-before-switchover: active -> pre-switchover* -> device* -> completed
 *                                                                      │        └─> postcopy-active
 *                                                                      │
 *                         migrate-start-postcopy: active -> postcopy-active* ──> completed
 *                                                                    │    ▲
 *                                                          I/O error │    │ handshake done
 *                                                                    ▼    │
 *        postcopy-paused* ──migrate resume──> postcopy-recover-setup* ──> postcopy-recover*
 *              ▲   ▲                               │ (9.1+; 7.2 goes paused -> recover)  │
 *              │   └────────── connect failed ─────┘                                    │
 *              └──────────────────────────────── I/O error again ───────────────────────┘
 *
 *   cancelling ──> cancelled          (any `*` state -> cancelling)
 * ```
 *
 * Incoming (destination) side:
 *
 * ```
 *   none ──migrate-incoming──> setup ──stream starts──> active ──> completed | failed | colo
 *     └──────── (QEMU 7.2 skips setup) ──────────────────┘   │
 *                                                 postcopy-run │
 *                                                            ▼
 *                   postcopy-active ──> completed | failed
 *                        │     ▲
 *               I/O error│     │ recovered
 *                        ▼     │
 *               postcopy-paused ──> postcopy-recover ──> postcopy-active
 *                        ▲                │
 *                        └── I/O error ───┘
 * ```
 *
 * Facts from QEMU (migration/migration.c, savevm.c at v7.2.0 and 9.x):
 * - Transitions are compare-and-set; a failed CAS changes nothing and emits nothing.
 * - A MIGRATION event `{status}` is sent for each transition only when the `events` capability is
 *   on. (QEMU 7.2's migrate-incoming additionally sends `{status: "setup"}` unconditionally while
 *   its incoming state stays `none`; from 8.x the incoming side really enters `setup`.)
 * - A new outgoing migration resets the state to none silently, then goes none -> setup.
 * - The destination never starts twice: `migrate-incoming` succeeds at most once per process.
 */
import { EventEmitter } from 'node:events';
import { FerryError } from '../errors';

/** QEMU's MigrationStatus enum, in QEMU's order (9.1 added postcopy-recover-setup). */
export const MIGRATION_STATUSES = [
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
] as const;

export type MigrationStatus = (typeof MIGRATION_STATUSES)[number];

/** Enum-like access: `MigrationStatus.PostcopyActive === 'postcopy-active'`. */
export const MigrationStatus = {
  None: 'none',
  Setup: 'setup',
  Cancelling: 'cancelling',
  Cancelled: 'cancelled',
  Active: 'active',
  PostcopyActive: 'postcopy-active',
  PostcopyPaused: 'postcopy-paused',
  PostcopyRecoverSetup: 'postcopy-recover-setup',
  PostcopyRecover: 'postcopy-recover',
  Completed: 'completed',
  Failed: 'failed',
  Colo: 'colo',
  PreSwitchover: 'pre-switchover',
  Device: 'device',
  WaitUnplug: 'wait-unplug',
} as const satisfies Record<string, MigrationStatus>;

export function isMigrationStatus(v: unknown): v is MigrationStatus {
  return typeof v === 'string' && (MIGRATION_STATUSES as readonly string[]).includes(v);
}

// ---------------------------------------------------------------------------------------------
// Status sets (QEMU's helpers)

const RUNNING: ReadonlySet<MigrationStatus> = new Set<MigrationStatus>([
  'setup',
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover-setup',
  'postcopy-recover',
  'pre-switchover',
  'device',
  'wait-unplug',
  'cancelling',
]);

/** QEMU's migration_is_setup_or_active: the running set without cancelling, plus colo. */
const SETUP_OR_ACTIVE: ReadonlySet<MigrationStatus> = new Set<MigrationStatus>([...[...RUNNING].filter((x) => x !== 'cancelling'), 'colo']);

const POSTCOPY: ReadonlySet<MigrationStatus> = new Set<MigrationStatus>([
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover-setup',
  'postcopy-recover',
]);

const TERMINAL: ReadonlySet<MigrationStatus> = new Set<MigrationStatus>(['completed', 'failed', 'cancelled']);

/**
 * QEMU's migration_is_running(): a migration owns the outgoing side (cancelling included, colo
 * excluded). This is the set that makes migrate / migrate-set-capabilities refuse.
 */
export function isRunning(s: MigrationStatus): boolean {
  return RUNNING.has(s);
}

/** QEMU's migration_is_setup_or_active(): like isRunning but with colo and without cancelling. */
export function isSetupOrActive(s: MigrationStatus): boolean {
  return SETUP_OR_ACTIVE.has(s);
}

/**
 * QEMU's migration_is_active(): the data path is moving pages (active or postcopy-active).
 * The page-sending loops run while this is true.
 */
export function isActive(s: MigrationStatus): boolean {
  return s === 'active' || s === 'postcopy-active';
}

/** QEMU's migration_in_postcopy(): any postcopy phase, paused and recovering included. */
export function isPostcopy(s: MigrationStatus): boolean {
  return POSTCOPY.has(s);
}

/** QEMU's postcopy_is_paused(): paused, or setting up a recovery that has not connected yet. */
export function isPostcopyPaused(s: MigrationStatus): boolean {
  return s === 'postcopy-paused' || s === 'postcopy-recover-setup';
}

/** A migration that ended: completed, failed or cancelled. */
export function isTerminal(s: MigrationStatus): boolean {
  return TERMINAL.has(s);
}

// ---------------------------------------------------------------------------------------------
// Transition tables

export type MigrationSide = 'source' | 'destination';

type TransitionTable = Readonly<Record<MigrationStatus, readonly MigrationStatus[]>>;

/** Every outgoing transition QEMU's code can make (7.2 and 9.x). */
export const SOURCE_TRANSITIONS: TransitionTable = {
  none: ['setup'],
  setup: ['active', 'wait-unplug', 'failed', 'cancelling'],
  'wait-unplug': ['active', 'failed', 'cancelling'],
  active: ['pre-switchover', 'postcopy-active', 'completed', 'colo', 'failed', 'cancelling'],
  'pre-switchover': ['device', 'postcopy-active', 'failed', 'cancelling'],
  device: ['completed', 'failed', 'cancelling'],
  'postcopy-active': ['postcopy-paused', 'completed', 'failed', 'cancelling'],
  'postcopy-paused': ['postcopy-recover-setup', 'postcopy-recover', 'cancelling'],
  'postcopy-recover-setup': ['postcopy-recover', 'postcopy-paused', 'cancelling'],
  'postcopy-recover': ['postcopy-active', 'postcopy-paused', 'cancelling'],
  colo: ['completed', 'failed'],
  cancelling: ['cancelled', 'failed'],
  // A new migration restarts from a finished one (QEMU resets to none silently first).
  completed: ['setup'],
  failed: ['setup'],
  cancelled: ['setup'],
};

/** Every incoming transition QEMU's code can make (7.2 skips setup: none -> active). */
export const DESTINATION_TRANSITIONS: TransitionTable = {
  none: ['setup', 'active'],
  setup: ['active', 'failed'],
  active: ['postcopy-active', 'completed', 'failed', 'colo'],
  'postcopy-active': ['postcopy-paused', 'completed', 'failed'],
  'postcopy-paused': ['postcopy-recover', 'failed'],
  'postcopy-recover': ['postcopy-active', 'postcopy-paused'],
  colo: ['completed', 'failed'],
  'postcopy-recover-setup': [],
  'pre-switchover': [],
  device: [],
  'wait-unplug': [],
  cancelling: [],
  cancelled: [],
  completed: [],
  failed: [],
};

export function transitionsFor(side: MigrationSide): TransitionTable {
  return side === 'source' ? SOURCE_TRANSITIONS : DESTINATION_TRANSITIONS;
}

/** True when `side`'s table allows from -> to. */
export function canTransition(side: MigrationSide, from: MigrationStatus, to: MigrationStatus): boolean {
  return transitionsFor(side)[from].includes(to);
}

// ---------------------------------------------------------------------------------------------
// Errors

/** QMP error classes; everything migration raises is GenericError in QEMU. */
export type QmpErrorClass = 'GenericError' | 'CommandNotFound' | 'DeviceNotActive' | 'DeviceNotFound';

export const ERR_MIGRATION_ACTIVE = 'ERR_MIGRATION_ACTIVE';
export const ERR_MIGRATION_INVALID_STATE = 'ERR_MIGRATION_INVALID_STATE';
export const ERR_MIGRATION_INVALID_TRANSITION = 'ERR_MIGRATION_INVALID_TRANSITION';
export const ERR_MIGRATION_INCOMING = 'ERR_MIGRATION_INCOMING';
export const ERR_MIGRATION_BLOCKED = 'ERR_MIGRATION_BLOCKED';
export const ERR_MIGRATION_UNSUPPORTED = 'ERR_MIGRATION_UNSUPPORTED';
export const ERR_MIGRATION_CAPABILITY = 'ERR_MIGRATION_CAPABILITY';
export const ERR_MIGRATION_PARAMETER = 'ERR_MIGRATION_PARAMETER';
export const ERR_MIGRATION_ARGUMENT = 'ERR_MIGRATION_ARGUMENT';

/**
 * A refusal a QMP command returns: `message` is QEMU's `desc` text, `errorClass` its `class`
 * (also readable as `qmpClass`, which lib/qmp's errorClassOf() picks up). The QMP layer answers
 * `{"error": {"class": e.errorClass, "desc": e.message}}`.
 */
export class MigrationCommandError extends FerryError {
  readonly errorClass: QmpErrorClass;

  constructor(code: string, message: string, errorClass: QmpErrorClass = 'GenericError', options?: { cause?: unknown }) {
    super(code, message, options);
    this.name = 'MigrationCommandError';
    this.errorClass = errorClass;
  }

  get qmpClass(): QmpErrorClass {
    return this.errorClass;
  }

  /** The QMP error object. */
  toQmp(): { class: QmpErrorClass; desc: string } {
    return { class: this.errorClass, desc: this.message };
  }
}

/** Raised by setState for a transition the side's table does not allow (a bug in the caller). */
export class MigrationTransitionError extends FerryError {
  constructor(
    readonly side: MigrationSide,
    readonly from: MigrationStatus,
    readonly to: MigrationStatus,
  ) {
    super(ERR_MIGRATION_INVALID_TRANSITION, `invalid ${side} migration transition ${from} -> ${to}`);
    this.name = 'MigrationTransitionError';
  }
}

// ---------------------------------------------------------------------------------------------
// The machine

/** Payload of the 'state' event. */
export interface MigrationStateChange {
  side: MigrationSide;
  from: MigrationStatus;
  to: MigrationStatus;
  /** Clock reading (ms) of the transition. */
  at: number;
}

/** Payload of the 'migration' event: the data of QMP's MIGRATION event. */
export interface MigrationEventData {
  status: MigrationStatus;
}

export interface MigrationStateMachineOptions {
  side: MigrationSide;
  /** Millisecond clock; monotonic by default (only differences are reported). */
  now?: () => number;
  /**
   * Checked at each transition: when it returns true a 'migration' event is emitted too
   * (QEMU sends MIGRATION only with the `events` capability on). Absent: never emitted.
   */
  eventsEnabled?: () => boolean;
}

/** Timestamps (clock ms) of the current/last migration on this side. */
export interface MigrationTimes {
  /** Entry into setup (outgoing: the migrate command). */
  startedAt?: number;
  /** Entry into active: end of setup. */
  activeAt?: number;
  /** Guest stopped for switchover (engine-marked). */
  downtimeStartAt?: number;
  /** Guest running again on either side / device state sent (engine-marked, or at completion). */
  downtimeEndAt?: number;
  /** Entry into completed, failed or cancelled. */
  endedAt?: number;
  /** Last entry into each status. */
  enteredAt: Partial<Record<MigrationStatus, number>>;
}

const monotonicMs = (): number => performance.now();

/**
 * One side's migration status with compare-and-set transitions.
 *
 * Events (emitted synchronously after the status changed; listeners must not throw, or the
 * exception reaches the setState caller with the transition already made):
 * - 'state' (MigrationStateChange): every successful transition.
 * - 'migration' (MigrationEventData): every successful transition while eventsEnabled() is true;
 *   wire it as `eventsEnabled: () => options.capability('events')`.
 */
export class MigrationStateMachine extends EventEmitter {
  readonly side: MigrationSide;
  private current: MigrationStatus = 'none';
  private readonly now: () => number;
  private readonly eventsEnabled: () => boolean;
  private t: MigrationTimes = { enteredAt: {} };
  private errorDesc: string | undefined;

  constructor(opts: MigrationStateMachineOptions) {
    super();
    this.side = opts.side;
    this.now = opts.now ?? monotonicMs;
    this.eventsEnabled = opts.eventsEnabled ?? (() => false);
  }

  get status(): MigrationStatus {
    return this.current;
  }

  /**
   * Compare-and-set: when the status is `expected`, move to `next`, record the time and emit.
   * Returns false (and changes nothing) when the status is not `expected`. Throws
   * MigrationTransitionError when `expected -> next` is not in this side's table.
   */
  setState(expected: MigrationStatus, next: MigrationStatus): boolean {
    if (this.current !== expected) return false;
    if (!canTransition(this.side, expected, next)) throw new MigrationTransitionError(this.side, expected, next);
    const at = this.now();
    if (next === 'setup' && (expected === 'none' || isTerminal(expected))) {
      // A new migration: forget the previous one's times and error (QEMU's migrate_init).
      this.t = { enteredAt: {}, startedAt: at };
      this.errorDesc = undefined;
    }
    if (expected === 'none' && next === 'active') this.t = { enteredAt: {}, startedAt: at }; // 7.2 incoming
    this.current = next;
    this.t.enteredAt[next] = at;
    if (next === 'active' && this.t.activeAt === undefined) this.t.activeAt = at;
    if (isTerminal(next)) {
      this.t.endedAt = at;
      if (next === 'completed' && this.t.downtimeStartAt !== undefined && this.t.downtimeEndAt === undefined) {
        this.t.downtimeEndAt = at;
      }
    }
    const change: MigrationStateChange = { side: this.side, from: expected, to: next, at };
    this.emit('state', change);
    if (this.eventsEnabled()) this.emit('migration', { status: next } satisfies MigrationEventData);
    return true;
  }

  /** setState from whatever the status is now, if the table allows it; false otherwise. */
  tryTransition(next: MigrationStatus): boolean {
    const from = this.current;
    if (!canTransition(this.side, from, next)) return false;
    return this.setState(from, next);
  }

  /** The engine marks the guest stop of the switchover (QEMU's downtime_start). */
  markDowntimeStart(at: number = this.now()): void {
    this.t.downtimeStartAt = at;
    this.t.downtimeEndAt = undefined;
  }

  /**
   * The engine marks the end of the downtime (postcopy: when the destination runs the guest;
   * precopy: left unmarked, completion ends it).
   */
  markDowntimeEnd(at: number = this.now()): void {
    if (this.t.downtimeStartAt !== undefined) this.t.downtimeEndAt = at;
  }

  /** Record the reason of a failure (query-migrate's error-desc). First error wins, as in QEMU. */
  setError(desc: string): void {
    if (this.errorDesc === undefined) this.errorDesc = desc;
  }

  get error(): string | undefined {
    return this.errorDesc;
  }

  get times(): Readonly<MigrationTimes> {
    return { ...this.t, enteredAt: { ...this.t.enteredAt } };
  }

  /** QEMU's setup-time (ms): setup entry to active entry; 0 before active. */
  setupTime(): number {
    const { startedAt, activeAt } = this.t;
    if (startedAt === undefined || activeAt === undefined) return 0;
    return Math.round(activeAt - startedAt);
  }

  /** QEMU's total-time (ms): from setup entry to now, or to the end once finished. */
  totalTime(now: number = this.now()): number {
    const { startedAt, endedAt } = this.t;
    if (startedAt === undefined) return 0;
    return Math.round((endedAt ?? now) - startedAt);
  }

  /** QEMU's downtime (ms): guest stop to downtime end (or to now while it lasts); 0 if unmarked. */
  downtime(now: number = this.now()): number {
    const { downtimeStartAt, downtimeEndAt } = this.t;
    if (downtimeStartAt === undefined) return 0;
    return Math.round((downtimeEndAt ?? now) - downtimeStartAt);
  }
}

// ---------------------------------------------------------------------------------------------
// Command guards: pure functions the QMP layer calls before doing anything.

/** QEMU's RunState names (query-status): one list, in lib/machine/runstate.ts. */
import type { RunState } from '../machine/runstate';
export type { RunState };

/** QEMU's error texts for the refusals below (exact strings, checked against QEMU 7.2.22). */
export const MIGRATION_ERRORS = {
  inProgress: "There's a migration process in progress",
  waitingIncoming: 'Guest is waiting for an incoming migration',
  postmigrate: "Can't migrate the vm that was paused due to previous migration",
  resumeNotPaused: 'Cannot resume if there is no paused migration',
  resumeReleaseRam: 'Postcopy recovery cannot work when release-ram capability is set',
  incomingStarted: 'The incoming migration has already been started',
  incomingNotSpecified: "'-incoming' was not specified on the command line",
  notInExpectedState: (s: MigrationStatus): string => `Migration not in expected state: ${s}`,
  recoverNotPaused: 'Migrate recover can only be run when postcopy is paused.',
  pauseNotPostcopy: 'migrate-pause is currently only supported during postcopy-active state',
  startPostcopyNotEnabled: 'Enable postcopy with migrate_set_capability before the start of migration',
  startPostcopyNotStarted: 'Postcopy must be started after migration has been started',
  cancelPostcopy: 'Postcopy migration in progress, cannot cancel.',
  invalidUri: "Parameter 'uri' expects a valid migration protocol",
  needsMultiChannel: 'Migration requires multi-channel URIs (e.g. tcp)',
  needsSeekable: 'Migration requires seekable transport (e.g. file)',
  blockMigration: 'Block migration (blk/inc) is not supported by ferry; use blockdev-mirror with NBD instead',
} as const;

/** What the guards need to know about the process. */
export interface GuardContext {
  /** Outgoing machine status. */
  source: MigrationStatus;
  /** Incoming machine status (default none). */
  destination?: MigrationStatus;
  /** The VM's run state. */
  runState: RunState;
  /** migrate-incoming (or -incoming URI at start) already succeeded once. */
  incomingStarted?: boolean;
  /** Migration blockers (QEMU's texts, most recent first); the first is reported. */
  blockers?: readonly string[];
}

/** Capabilities the guards look at. */
export interface GuardCapabilities {
  'postcopy-ram'?: boolean;
  'dirty-bitmaps'?: boolean;
  'release-ram'?: boolean;
  multifd?: boolean;
  'postcopy-preempt'?: boolean;
  'mapped-ram'?: boolean;
}

/** Kind of transport a migrate URI names (see lib/transport). */
export type TransportKind = 'inet' | 'unix' | 'vsock' | 'fd' | 'exec' | 'file' | 'rdma';

export interface MigrateArgs {
  resume?: boolean;
  blk?: boolean;
  inc?: boolean;
  /** The parsed URI's transport, for the multi-channel/seekable checks (skipped if absent). */
  transport?: TransportKind;
}

const err = (code: string, msg: string): MigrationCommandError => new MigrationCommandError(code, msg);

/**
 * `migrate`: null when it may start, else the refusal, in QEMU's order (migrate_prepare, then the
 * 9.x channel/transport checks). After null the caller moves the source machine none/terminal ->
 * setup (or, for resume, postcopy-paused -> postcopy-recover-setup).
 */
export function guardMigrate(
  ctx: GuardContext,
  caps: GuardCapabilities = {},
  args: MigrateArgs = {},
): MigrationCommandError | null {
  if (args.resume) {
    if (ctx.source !== 'postcopy-paused') return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.resumeNotPaused);
    if (caps['release-ram']) return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.resumeReleaseRam);
    return transportGuard(caps, args);
  }
  if (isRunning(ctx.source)) return err(ERR_MIGRATION_ACTIVE, MIGRATION_ERRORS.inProgress);
  if (ctx.runState === 'inmigrate') return err(ERR_MIGRATION_INCOMING, MIGRATION_ERRORS.waitingIncoming);
  if (ctx.runState === 'postmigrate') return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.postmigrate);
  if (ctx.blockers && ctx.blockers.length > 0) return err(ERR_MIGRATION_BLOCKED, ctx.blockers[0]!);
  if (args.blk || args.inc) return err(ERR_MIGRATION_UNSUPPORTED, MIGRATION_ERRORS.blockMigration);
  return transportGuard(caps, args);
}

function transportGuard(caps: GuardCapabilities, args: MigrateArgs): MigrationCommandError | null {
  const t = args.transport;
  if (t === undefined) return null;
  if (caps['mapped-ram'] && t !== 'file') return err(ERR_MIGRATION_ARGUMENT, MIGRATION_ERRORS.needsSeekable);
  const multi = t === 'inet' || t === 'unix' || t === 'vsock' || (t === 'file' && !!caps['mapped-ram']);
  if ((caps.multifd || caps['postcopy-preempt']) && !multi) {
    return err(ERR_MIGRATION_ARGUMENT, MIGRATION_ERRORS.needsMultiChannel);
  }
  return null;
}

/** `migrate-incoming`: QEMU checks "already started" before "-incoming not given". */
export function guardMigrateIncoming(ctx: GuardContext): MigrationCommandError | null {
  if (ctx.incomingStarted) return err(ERR_MIGRATION_INCOMING, MIGRATION_ERRORS.incomingStarted);
  if (ctx.runState !== 'inmigrate') return err(ERR_MIGRATION_INCOMING, MIGRATION_ERRORS.incomingNotSpecified);
  return null;
}

/**
 * `migrate_cancel`: null means go ahead. With nothing running QEMU returns success and does
 * nothing: check `isRunning(ctx.source)` after a null. During postcopy the source's guest
 * state is gone, so cancelling would lose the guest: refused with QEMU 10's text (QEMU 7.2
 * allowed it).
 */
export function guardMigrateCancel(ctx: Pick<GuardContext, 'source'>): MigrationCommandError | null {
  if (isPostcopy(ctx.source)) return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.cancelPostcopy);
  return null;
}

/** `migrate-continue {state}`: the current outgoing status must equal `state`. */
export function guardMigrateContinue(
  ctx: Pick<GuardContext, 'source'>,
  state: MigrationStatus,
): MigrationCommandError | null {
  if (ctx.source !== state) return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.notInExpectedState(ctx.source));
  return null;
}

/** `migrate-recover` (destination): only while the incoming side is postcopy-paused. */
export function guardMigrateRecover(ctx: Pick<GuardContext, 'destination'>): MigrationCommandError | null {
  if ((ctx.destination ?? 'none') !== 'postcopy-paused') {
    return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.recoverNotPaused);
  }
  return null;
}

/** `migrate-pause`: acts on whichever side is postcopy-active (source first). */
export function guardMigratePause(
  ctx: Pick<GuardContext, 'source' | 'destination'>,
): { side: MigrationSide } | MigrationCommandError {
  if (ctx.source === 'postcopy-active') return { side: 'source' };
  if (ctx.destination === 'postcopy-active') return { side: 'destination' };
  return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.pauseNotPostcopy);
}

/**
 * `migrate-start-postcopy`: needs postcopy-ram or dirty-bitmaps, and a migration that started.
 * A migration that already finished is accepted (QEMU: refusing would race with completion).
 */
export function guardMigrateStartPostcopy(
  ctx: Pick<GuardContext, 'source'>,
  caps: GuardCapabilities,
): MigrationCommandError | null {
  if (!caps['postcopy-ram'] && !caps['dirty-bitmaps']) {
    return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.startPostcopyNotEnabled);
  }
  if (ctx.source === 'none') return err(ERR_MIGRATION_INVALID_STATE, MIGRATION_ERRORS.startPostcopyNotStarted);
  return null;
}

/** `migrate-set-capabilities`: refused while the source runs (or is in colo). */
export function guardSetCapabilities(ctx: Pick<GuardContext, 'source'>): MigrationCommandError | null {
  if (isRunning(ctx.source) || ctx.source === 'colo') return err(ERR_MIGRATION_ACTIVE, MIGRATION_ERRORS.inProgress);
  return null;
}
