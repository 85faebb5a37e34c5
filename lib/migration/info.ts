/**
 * query-migrate: the RAM counters the engine feeds while it sends (RamStats) and the builder
 * that turns a snapshot of both sides into QEMU's MigrationInfo, field for field.
 *
 * Reference: QEMU migration/migration.c fill_source_migration_info, populate_time_info,
 * populate_ram_info, fill_destination_migration_info, migration_update_counters,
 * migration_calculate_complete; migration/ram.c ram_transferred_add, migration_bitmap_sync
 * (v7.2.0 and 9.x); shapes checked against QEMU 7.2.22.
 *
 * Which fields appear, by outgoing status (7.2):
 * - none: nothing from the source (the incoming side's status, if any, shows instead)
 * - setup, colo, cancelled, wait-unplug: status only
 * - active, cancelling, pre-switchover, device, postcopy-*: status, setup-time, total-time
 *   (running), expected-downtime, ram (with remaining and dirty-pages-rate)
 * - completed: status, setup-time, total-time (final), downtime, ram (remaining and
 *   dirty-pages-rate 0)
 * - failed: status, error-desc (when an error was recorded)
 * blocked-reasons appears in every status when a blocker exists. Compat '9' differs: downtime
 * instead of expected-downtime in postcopy states, error-desc in any status with an error,
 * ram.transferred counts every byte sent (7.2: RAM section bytes only), no ram.skipped.
 *
 * Units: times in ms, mbps in megabits/s (10^6), rates per second.
 */
import type { MigrationStateMachine, MigrationStatus } from './state';
import { isPostcopy } from './state';

/** QEMU's BUFFER_DELAY: length of a bandwidth measurement window. */
export const BANDWIDTH_WINDOW_MS = 100;
/** Dirty-page-rate period (QEMU recomputes after a sync more than 1 s after the last). */
export const DIRTY_RATE_PERIOD_MS = 1000;
/** QEMU skips the expected-downtime update when a window moved no more than this. */
const MIN_WINDOW_BYTES_FOR_ESTIMATE = 10000;

export type TransferPhase = 'precopy' | 'downtime' | 'postcopy';

/** Raw counters, in QEMU's semantics. */
export interface RamCounters {
  pageSize: number;
  /** Bytes of RAM sections on the wire (page headers, page data, block ids, EOS markers). */
  ramBytes: number;
  /** Every byte sent: RAM, device state, commands, multifd channels. */
  wireBytes: number;
  /** Guest RAM size (ram_bytes_total). */
  total: number;
  /** Dirty bytes still to send (dirty pages × page size). */
  remaining: number;
  /** Zero pages sent as ZERO records (QEMU's "duplicate"). */
  duplicate: number;
  /** Full pages sent. */
  normal: number;
  dirtyPagesRate: number;
  mbps: number;
  dirtySyncCount: number;
  postcopyRequests: number;
  multifdBytes: number;
  pagesPerSecond: number;
  precopyBytes: number;
  downtimeBytes: number;
  postcopyBytes: number;
  dirtySyncMissedZeroCopy: number;
}

/** One bandwidth window's results. */
export interface BandwidthSample {
  /** Window length (ms). */
  elapsedMs: number;
  /** Bytes sent during the window. */
  bytes: number;
  bytesPerSecond: number;
  mbps: number;
  pagesPerSecond: number;
  /**
   * Bytes that fit in the downtime limit at this bandwidth (or avail-switchover-bandwidth when
   * set): switch over once remaining <= threshold.
   */
  thresholdBytes: number;
  /** Current expected downtime (ms). */
  expectedDowntimeMs: number;
}

export interface RamStatsOptions {
  pageSize?: number;
  /** Millisecond clock (monotonic default). */
  now?: () => number;
  windowMs?: number;
}

/**
 * Counters of one outgoing migration, fed by the engine's page loop. Not thread-safe (one JS
 * thread); a worker keeps its own and sends deltas.
 */
export class RamStats {
  readonly pageSize: number;
  private readonly now: () => number;
  private readonly windowMs: number;
  private c!: RamCounters;
  private phase: TransferPhase = 'precopy';
  private expectedDowntime = 0;
  private threshold = 0;
  private lastBytesPerSecond = 0;
  // Bandwidth window.
  private winStart = 0;
  private winBytes = 0;
  private winPages = 0;
  // Dirty-rate period.
  private periodStart: number | undefined;
  private periodPages = 0;

  constructor(opts: RamStatsOptions = {}) {
    this.pageSize = opts.pageSize ?? 4096;
    this.now = opts.now ?? (() => performance.now());
    this.windowMs = opts.windowMs ?? BANDWIDTH_WINDOW_MS;
    this.reset();
  }

  /** Zero everything (a new migration); expected downtime starts at the downtime limit. */
  reset(downtimeLimitMs = 0, at: number = this.now()): void {
    this.c = {
      pageSize: this.pageSize,
      ramBytes: 0,
      wireBytes: 0,
      total: 0,
      remaining: 0,
      duplicate: 0,
      normal: 0,
      dirtyPagesRate: 0,
      mbps: 0,
      dirtySyncCount: 0,
      postcopyRequests: 0,
      multifdBytes: 0,
      pagesPerSecond: 0,
      precopyBytes: 0,
      downtimeBytes: 0,
      postcopyBytes: 0,
      dirtySyncMissedZeroCopy: 0,
    };
    this.phase = 'precopy';
    this.expectedDowntime = downtimeLimitMs;
    this.threshold = 0;
    this.lastBytesPerSecond = 0;
    this.winStart = at;
    this.winBytes = 0;
    this.winPages = 0;
    this.periodStart = undefined;
    this.periodPages = 0;
  }

  /** Which of precopy/downtime/postcopy-bytes RAM bytes count towards from now on. */
  setPhase(p: TransferPhase): void {
    this.phase = p;
  }

  get currentPhase(): TransferPhase {
    return this.phase;
  }

  setTotal(bytes: number): void {
    this.c.total = bytes;
  }

  setRemaining(bytes: number): void {
    this.c.remaining = bytes;
  }

  setRemainingPages(pages: number): void {
    this.c.remaining = pages * this.pageSize;
  }

  private ram(bytes: number): void {
    this.c.ramBytes += bytes;
    if (this.phase === 'precopy') this.c.precopyBytes += bytes;
    else if (this.phase === 'postcopy') this.c.postcopyBytes += bytes;
    else this.c.downtimeBytes += bytes;
    this.wire(bytes);
  }

  private wire(bytes: number): void {
    this.c.wireBytes += bytes;
    this.winBytes += bytes;
  }

  /** `pages` full pages sent, `wireBytes` = their headers + data. */
  onPageSent(wireBytes: number, pages = 1): void {
    this.c.normal += pages;
    this.winPages += pages;
    this.ram(wireBytes);
  }

  /** `pages` zero pages sent as ZERO records of `wireBytes` in all. */
  onZeroPage(wireBytes: number, pages = 1): void {
    this.c.duplicate += pages;
    this.winPages += pages;
    this.ram(wireBytes);
  }

  /** Other RAM-section bytes (block headers, EOS markers, the total-size record). */
  onRamBytes(bytes: number): void {
    this.ram(bytes);
  }

  /** Non-RAM bytes on the main channel (device state, section headers, commands). */
  onBytes(bytes: number): void {
    this.wire(bytes);
  }

  /** Bytes sent on multifd channels (counted in multifd-bytes and the bandwidth). */
  onMultifdBytes(bytes: number): void {
    this.c.multifdBytes += bytes;
    this.wire(bytes);
  }

  onPostcopyRequest(count = 1): void {
    this.c.postcopyRequests += count;
  }

  onZeroCopyMiss(count = 1): void {
    this.c.dirtySyncMissedZeroCopy += count;
  }

  /**
   * A dirty-log sync found `newlyDirtyPages` pages dirty that were clean in the migration
   * bitmap. Counts the sync and recomputes dirty-pages-rate once a period of more than 1 s
   * has passed since the period began (as QEMU's migration_bitmap_sync).
   */
  onSync(newlyDirtyPages: number, at: number = this.now()): void {
    this.c.dirtySyncCount++;
    if (this.periodStart === undefined) this.periodStart = at;
    this.periodPages += newlyDirtyPages;
    if (at > this.periodStart + DIRTY_RATE_PERIOD_MS) {
      this.c.dirtyPagesRate = Math.floor((this.periodPages * 1000) / (at - this.periodStart));
      this.periodStart = at;
      this.periodPages = 0;
    }
  }

  /**
   * Close the bandwidth window if it is at least BUFFER_DELAY old: compute bytes/s, mbps,
   * pages/s, the switchover threshold and the expected downtime (remaining / bandwidth), then
   * start a new window. Returns null (changing nothing) while the window is younger.
   */
  bandwidthWindow(opts: { downtimeLimitMs: number; availSwitchoverBandwidth?: number; at?: number }): BandwidthSample | null {
    const at = opts.at ?? this.now();
    const elapsed = at - this.winStart;
    if (elapsed < this.windowMs) return null;
    const bytes = this.winBytes;
    const perMs = bytes / elapsed;
    const avail = opts.availSwitchoverBandwidth ?? 0;
    const expectedPerMs = avail > 0 ? avail / 1000 : perMs;
    this.threshold = expectedPerMs * opts.downtimeLimitMs;
    this.lastBytesPerSecond = perMs * 1000;
    this.c.mbps = (bytes * 8) / (elapsed / 1000) / 1e6;
    this.c.pagesPerSecond = this.winPages / (elapsed / 1000);
    if (this.c.dirtyPagesRate > 0 && bytes > MIN_WINDOW_BYTES_FOR_ESTIMATE && expectedPerMs > 0) {
      this.expectedDowntime = this.c.remaining / expectedPerMs;
    }
    this.winStart = at;
    this.winBytes = 0;
    this.winPages = 0;
    return {
      elapsedMs: elapsed,
      bytes,
      bytesPerSecond: this.lastBytesPerSecond,
      mbps: this.c.mbps,
      pagesPerSecond: this.c.pagesPerSecond,
      thresholdBytes: this.threshold,
      expectedDowntimeMs: this.expectedDowntime,
    };
  }

  /** Bytes/s of the last closed window (0 before the first). */
  get bandwidth(): number {
    return this.lastBytesPerSecond;
  }

  /** Switchover threshold (bytes) from the last closed window. */
  get thresholdBytes(): number {
    return this.threshold;
  }

  /** Expected downtime (ms): the downtime limit until a window produced an estimate. */
  get expectedDowntimeMs(): number {
    return this.expectedDowntime;
  }

  /**
   * At completion: mbps over the whole transfer (every byte, total time minus setup time),
   * as QEMU's migration_calculate_complete.
   */
  complete(totalTimeMs: number, setupTimeMs: number): void {
    const transferMs = totalTimeMs - setupTimeMs;
    if (transferMs > 0) this.c.mbps = (this.c.wireBytes * 8) / transferMs / 1000;
  }

  counters(): RamCounters {
    return { ...this.c };
  }
}

// ---------------------------------------------------------------------------------------------
// MigrationInfo

export type InfoCompat = '7.2' | '9';

/** QEMU's MigrationStats (query-migrate "ram"). */
export interface MigrationStatsJson {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  skipped?: number;
  normal: number;
  'normal-bytes': number;
  'dirty-pages-rate': number;
  mbps: number;
  'dirty-sync-count': number;
  'postcopy-requests': number;
  'page-size': number;
  'multifd-bytes': number;
  'pages-per-second': number;
  'precopy-bytes': number;
  'downtime-bytes': number;
  'postcopy-bytes': number;
  'dirty-sync-missed-zero-copy': number;
}

export interface XbzrleCacheStatsJson {
  'cache-size': number;
  bytes: number;
  pages: number;
  'cache-miss': number;
  'cache-miss-rate': number;
  'encoding-rate': number;
  overflow: number;
}

/** QEMU's SocketAddress as query-migrate prints it (port as a string for inet). */
export type SocketAddressJson =
  | { type: 'inet'; host: string; port: string; ipv4?: boolean; ipv6?: boolean; numeric?: boolean; to?: number }
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'vsock'; cid: string; port: string }
  | { type: 'fd'; str: string };

/** QEMU's MigrationInfo. */
export interface MigrationInfoJson {
  status?: MigrationStatus;
  ram?: MigrationStatsJson;
  'xbzrle-cache'?: XbzrleCacheStatsJson;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'cpu-throttle-percentage'?: number;
  'error-desc'?: string;
  'blocked-reasons'?: string[];
  'postcopy-blocktime'?: number;
  'postcopy-vcpu-blocktime'?: number[];
  'socket-address'?: SocketAddressJson[];
}

/** Outgoing side, as the engine sees it now. */
export interface SourceSnapshot {
  status: MigrationStatus;
  /** ms; QEMU's setup_time. */
  setupTime: number;
  /** ms since the migrate command (running) or the final total (completed). */
  totalTime: number;
  /** ms the guest was stopped (completed; postcopy: until the destination ran it). */
  downtime: number;
  /** ms, RamStats.expectedDowntimeMs. */
  expectedDowntime: number;
  ram: RamCounters;
  errorDesc?: string;
  /** Present only while auto-converge throttles the guest. */
  cpuThrottlePercentage?: number;
  /** Present only with the xbzrle capability. */
  xbzrleCache?: XbzrleCacheStatsJson;
}

/** Incoming side. */
export interface DestinationSnapshot {
  status: MigrationStatus;
  /** Listening addresses (a tcp port 0 shows the real port). */
  socketAddress?: SocketAddressJson[];
  /** With the postcopy-blocktime capability, shown once completed. */
  postcopyBlocktime?: number;
  postcopyVcpuBlocktime?: number[];
}

export interface QueryMigrateInput {
  source?: SourceSnapshot;
  destination?: DestinationSnapshot;
  /** Migration blockers, most recent first. */
  blockedReasons?: readonly string[];
  compat?: InfoCompat;
}

/** QEMU's MigrationInfo key order (QAPI member order). */
const INFO_KEYS: readonly (keyof MigrationInfoJson)[] = [
  'status',
  'ram',
  'xbzrle-cache',
  'total-time',
  'expected-downtime',
  'downtime',
  'setup-time',
  'cpu-throttle-percentage',
  'error-desc',
  'blocked-reasons',
  'postcopy-blocktime',
  'postcopy-vcpu-blocktime',
  'socket-address',
];

const int = (v: number): number => Math.max(0, Math.trunc(v));

/** The "ram" object for a status, in QAPI member order. */
export function ramStatsJson(c: RamCounters, status: MigrationStatus, compat: InfoCompat = '7.2'): MigrationStatsJson {
  const done = status === 'completed';
  const out: MigrationStatsJson = {
    transferred: int(compat === '9' ? c.wireBytes : c.ramBytes),
    remaining: done ? 0 : int(c.remaining),
    total: int(c.total),
    duplicate: int(c.duplicate),
    skipped: 0,
    normal: int(c.normal),
    'normal-bytes': int(c.normal * c.pageSize),
    'dirty-pages-rate': done ? 0 : int(c.dirtyPagesRate),
    mbps: c.mbps,
    'dirty-sync-count': int(c.dirtySyncCount),
    'postcopy-requests': int(c.postcopyRequests),
    'page-size': c.pageSize,
    'multifd-bytes': int(c.multifdBytes),
    'pages-per-second': int(c.pagesPerSecond),
    'precopy-bytes': int(c.precopyBytes),
    'downtime-bytes': int(c.downtimeBytes),
    'postcopy-bytes': int(c.postcopyBytes),
    'dirty-sync-missed-zero-copy': int(c.dirtySyncMissedZeroCopy),
  };
  if (compat === '9') delete out.skipped;
  return out;
}

/** Statuses whose source info carries times and ram counters (besides completed). */
const WITH_RAM: ReadonlySet<MigrationStatus> = new Set<MigrationStatus>([
  'active',
  'cancelling',
  'postcopy-active',
  'pre-switchover',
  'device',
  'postcopy-paused',
  'postcopy-recover-setup',
  'postcopy-recover',
]);

/**
 * query-migrate's answer: the incoming side first, then the outgoing side over it (an outgoing
 * status other than none wins), as QEMU's qmp_query_migrate.
 */
export function buildMigrationInfo(input: QueryMigrateInput): MigrationInfoJson {
  const compat = input.compat ?? '7.2';
  const f: MigrationInfoJson = {};

  const dst = input.destination;
  if (dst) {
    if (dst.socketAddress && dst.socketAddress.length > 0) f['socket-address'] = structuredClone(dst.socketAddress);
    if (dst.status !== 'none') {
      f.status = dst.status;
      if (dst.status === 'completed') {
        if (dst.postcopyBlocktime !== undefined) f['postcopy-blocktime'] = int(dst.postcopyBlocktime);
        if (dst.postcopyVcpuBlocktime !== undefined) f['postcopy-vcpu-blocktime'] = dst.postcopyVcpuBlocktime.map(int);
      }
    }
  }

  if (input.blockedReasons && input.blockedReasons.length > 0) f['blocked-reasons'] = [...input.blockedReasons];

  const src = input.source;
  if (src && src.status !== 'none') {
    const s = src.status;
    f.status = s;
    if (WITH_RAM.has(s) || s === 'completed') {
      f['setup-time'] = int(src.setupTime);
      f['total-time'] = int(src.totalTime);
      const showDowntime = s === 'completed' || (compat === '9' && isPostcopy(s));
      if (showDowntime) f.downtime = int(src.downtime);
      else f['expected-downtime'] = int(src.expectedDowntime);
      f.ram = ramStatsJson(src.ram, s, compat);
      if (src.xbzrleCache) f['xbzrle-cache'] = { ...src.xbzrleCache };
      if (src.cpuThrottlePercentage !== undefined) f['cpu-throttle-percentage'] = int(src.cpuThrottlePercentage);
    }
    const showError = compat === '9' || s === 'failed';
    if (showError && src.errorDesc !== undefined) f['error-desc'] = src.errorDesc;
  }

  const out: MigrationInfoJson = {};
  for (const k of INFO_KEYS) if (f[k] !== undefined) (out as Record<string, unknown>)[k] = f[k];
  return out;
}

/** Gathers a SourceSnapshot from the outgoing machine and its RamStats. */
export function sourceSnapshot(
  machine: MigrationStateMachine,
  ram: RamStats,
  extra: Pick<SourceSnapshot, 'cpuThrottlePercentage' | 'xbzrleCache'> & { now?: number } = {},
): SourceSnapshot {
  const snap: SourceSnapshot = {
    status: machine.status,
    setupTime: machine.setupTime(),
    totalTime: machine.totalTime(extra.now),
    downtime: machine.downtime(extra.now),
    expectedDowntime: ram.expectedDowntimeMs,
    ram: ram.counters(),
  };
  if (machine.error !== undefined) snap.errorDesc = machine.error;
  if (extra.cpuThrottlePercentage !== undefined) snap.cpuThrottlePercentage = extra.cpuThrottlePercentage;
  if (extra.xbzrleCache !== undefined) snap.xbzrleCache = extra.xbzrleCache;
  return snap;
}

/** Gathers a DestinationSnapshot from the incoming machine. */
export function destinationSnapshot(
  machine: MigrationStateMachine,
  extra: Omit<DestinationSnapshot, 'status'> = {},
): DestinationSnapshot {
  return { status: machine.status, ...extra };
}
