/**
 * Outgoing precopy migration: setup, iteration over the dirty log,
 * switchover, and the failure rules.
 *
 *   setup ──> active ──(pending < threshold)──> [pre-switchover] ──> device ──> completed
 *     │          │                                    │                │
 *     └──────────┴──────── error / cancel ────────────┴────────────────┴──> failed / cancelled
 *
 * Invariant: until the device state and EOF are on the wire, any failure or
 * cancel leaves the source guest running (vCPUs restarted if the switchover
 * had stopped them) with its memory untouched: the engine only ever reads
 * guest RAM.
 */
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import type { OutgoingChannel } from '../transport/types';
import { encodeBe32Payload } from '../stream/commands';
import { MIG_CMD, SectionType, TARGET_PAGE_SIZE } from '../stream/constants';
import { GLOBALSTATE_VMSD, TIMER_VMSD, globalState, timerState } from '../stream/devices';
import { RamEncoder } from '../stream/ram-codec';
import { buildVmdesc, formatVmdescJson, writeDeviceSection, type DeviceSection, type VmdescDevice } from '../stream/vmstate';
import { FdSink } from '../stream/fd-sink';
import { StreamSink, StreamWriter } from '../stream/writer';
import { native } from '../native';
import type { RamStats } from './info';
import type { DeviceStateSection, MigratableMachine } from './machine-port';
import type { MigrationOptions } from './options';
import { RamSender } from './ram';
import { RpReader, type RpMessage } from './return-path';
import type { MigrationStateMachine, RunState } from './state';

/** Section ids: QEMU numbers handlers in registration order (timer, globalstate, ram, ...). */
const TIMER_SECTION = 0;
const GLOBALSTATE_SECTION = 1;
const RAM_SECTION = 2;
const FIRST_DEVICE_SECTION = 3;

/** Longest one iteration may encode before yielding (QEMU: 50 ms). */
const ITERATION_BUDGET_MS = 50;
/** Bytes encoded between checks of time, rate limit and backpressure. */
const BATCH_BYTES = 256 << 10;
/**
 * Switchover waits until the pending RAM fits in this share of bandwidth x
 * downtime-limit: above it (and under the threshold) the excess is sent live
 * first (see transfer()). A half measured 70-470 ms of downtime on the c200
 * bench (one run over the 300 ms limit on a noisy host); a tenth, 9-80 ms at
 * the same total time.
 */
const LIVE_SHARE = 0.1;
/**
 * Output queued in user space before the encoder waits for the socket. Small
 * batches written as soon as they are encoded, with this much allowed in
 * flight, keep the kernel's socket buffer (about 200 KiB) from running dry
 * while the next batch is encoded; waiting for a full drain after every
 * large batch left the destination idle for the length of each encode.
 */
const MAX_QUEUED = 1 << 20;
/** Output chunk size: small enough that recycled chunks come back quickly. */
const CHUNK_BYTES = 256 << 10;
/** Longest wait for the peer to read spliced pages before the source guest may run (ms). */
const SPLICED_READ_LIMIT_MS = 1000;
/** How long completion waits for the destination's SHUT on the return path. */
const SHUT_TIMEOUT_MS = 30_000;

export class MigrationCancelled extends Error {
  readonly code = 'ERR_MIGRATION_CANCELLED';
  constructor() {
    super('migration cancelled');
  }
}

export interface OutgoingEvents {
  /** MIGRATION_PASS: a dirty-log sync started pass `pass`. */
  pass: (pass: number) => void;
}

export class OutgoingMigration extends EventEmitter {
  private readonly abort = new AbortController();
  private continueResolve: (() => void) | undefined;
  private rp: RpReader | undefined;
  private rpError: Error | undefined;
  /** The native socket writer, when the channel is a socket (closed when the run ends). */
  private fdSink: FdSink | undefined;
  /** Every byte of the stream (through EOF and the description) is written. */
  private streamComplete = false;
  private shut: Promise<RpMessage> | undefined;
  private vcpusStoppedByUs = false;
  private wasRunning = false;
  private channel: OutgoingChannel | undefined;

  constructor(
    private readonly machine: MigratableMachine,
    private readonly options: MigrationOptions,
    private readonly state: MigrationStateMachine,
    private readonly stats: RamStats,
  ) {
    super();
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  /** migrate_cancel: move to cancelling and tear the channel down. */
  cancel(): void {
    const s = this.state.status;
    if (s === 'setup' || s === 'active' || s === 'pre-switchover' || s === 'device' || s === 'wait-unplug') {
      this.state.setState(s, 'cancelling');
    }
    this.abort.abort(new MigrationCancelled());
    // A complete stream may still be read: fail() waits for its spliced pages first.
    if (!this.streamComplete) this.fdSink?.close(new MigrationCancelled());
    this.channel?.destroy(new MigrationCancelled());
    this.continueResolve?.();
  }

  /** migrate-continue from pre-switchover. */
  continueSwitchover(): void {
    this.continueResolve?.();
  }

  /**
   * Runs the migration over a channel `connect` produces. The state must be
   * `setup` already (the migrate command moved it). Never throws: the
   * outcome is the final status.
   */
  async run(connect: (signal: AbortSignal) => Promise<OutgoingChannel>): Promise<void> {
    const m = this.machine;
    try {
      this.stats.reset(this.options.parameterNumber('downtime-limit'));
      const channel = await connect(this.abort.signal);
      this.channel = channel;
      this.checkCancelled();
      await this.transfer(channel);
    } catch (err) {
      await this.fail(err as Error);
    } finally {
      this.fdSink?.close();
      try {
        m.dirtyLogStop();
      } catch {
        // Dirty logging already off or the VM is closing: nothing to undo.
      }
    }
  }

  private checkCancelled(): void {
    if (this.abort.signal.aborted || this.state.status === 'cancelling') throw new MigrationCancelled();
    if (this.rpError) throw this.rpError;
  }

  private async transfer(channel: OutgoingChannel): Promise<void> {
    const m = this.machine;
    const opts = this.options;
    // A socket gets the native writer: pages go from guest memory to the kernel with no copy of ours.
    const fd = channel.writeFd?.();
    if (fd !== undefined) {
      this.fdSink = new FdSink(native(), fd);
      if (this.abort.signal.aborted) this.fdSink.close(new MigrationCancelled());
    }
    const sink = this.fdSink ?? new StreamSink(channel.stream, { maxQueued: MAX_QUEUED });
    const w = new StreamWriter({ sink, chunkSize: CHUNK_BYTES, maxFreeChunks: 4 });
    const enc = new RamEncoder(w);
    const sender = new RamSender(m.ramBlocks, enc, this.fdSink);
    this.stats.setTotal(sender.totalBytes);

    w.header();
    w.configuration({ machine: m.configName });
    if (opts.capability('return-path')) {
      if (!channel.returnPath) throw new Error(`return-path capability needs a bidirectional channel (${channel.describe()} has none)`);
      this.openReturnPath(channel);
      w.command(MIG_CMD.OPEN_RETURN_PATH);
      w.command(MIG_CMD.PING, encodeBe32Payload(1));
    }

    if (m.dirtyLogStart()) sender.deferProtection((i, first, count) => m.dirtyLogProtect(i, first, count));
    sender.markAllDirty();
    this.stats.setRemainingPages(sender.dirtyPages);
    // QEMU counts the setup-time bitmap sync as pass 1 (MIGRATION_PASS before active).
    this.stats.onSync(0);
    this.emit('pass', this.stats.counters().dirtySyncCount);
    w.sectionStart(SectionType.START, RAM_SECTION, 'ram', 0, 4);
    const before = w.totalBytes;
    sender.writeSetup();
    this.stats.onRamBytes(w.totalBytes - before);
    w.footer(RAM_SECTION);
    await w.flush();
    this.checkCancelled();
    this.state.setState('setup', 'active');

    // Iterate until the remaining dirty RAM fits in the downtime limit.
    this.closeBandwidthWindow();
    let windowStart = performance.now();
    let windowBytes = 0;
    let finishingPass = false;
    for (;;) {
      this.checkCancelled();
      const iterStart = performance.now();
      w.sectionPart(SectionType.PART, RAM_SECTION);
      let done = false;
      while (!done && performance.now() - iterStart < ITERATION_BUDGET_MS) {
        const limit = this.rateLimitBytesPerWindow();
        if (limit > 0 && windowBytes >= limit) {
          const wait = 100 - (performance.now() - windowStart);
          if (wait > 0) await sleep(wait, undefined, { signal: this.abort.signal }).catch(() => undefined);
          windowStart = performance.now();
          windowBytes = 0;
          this.checkCancelled();
        }
        const batch = limit > 0 ? Math.min(BATCH_BYTES, Math.max(TARGET_PAGE_SIZE, limit - windowBytes)) : BATCH_BYTES;
        const b0 = w.totalBytes;
        const n0 = sender.counts.normal;
        const z0 = sender.counts.duplicate;
        done = sender.encodeSome(batch);
        this.account(w.totalBytes - b0, sender.counts.normal - n0, sender.counts.duplicate - z0);
        windowBytes += w.totalBytes - b0;
        await w.flush();
        this.checkCancelled();
        if (performance.now() - windowStart >= 100) {
          windowStart = performance.now();
          windowBytes = 0;
        }
      }
      enc.eos();
      this.stats.onRamBytes(8);
      w.footer(RAM_SECTION);
      await w.flush();
      this.stats.setRemainingPages(sender.dirtyPages);
      this.closeBandwidthWindow();
      this.emit('progress');

      // QEMU's rule: an estimate under the threshold triggers an exact count (a dirty-log sync);
      // switch over when nothing is pending or the pending bytes fit in the downtime limit.
      // Better than QEMU: when what is pending would still take more than a tenth of the
      // limit, first send it live down to that tenth (at most the rest of the pass) and count
      // again. Those pages go out either way; sent while the guest runs, they no longer count
      // as downtime (QEMU sends up to bandwidth x limit, e.g. 670 MiB in 300 ms, with the
      // guest stopped).
      const threshold = this.stats.thresholdBytes;
      if (!finishingPass || sender.dirtyPages * TARGET_PAGE_SIZE <= threshold * LIVE_SHARE) {
        let pending = sender.dirtyPages * TARGET_PAGE_SIZE;
        if (pending < threshold || finishingPass) {
          this.sync(sender);
          pending = sender.dirtyPages * TARGET_PAGE_SIZE;
        }
        const under = pending === 0 || pending < threshold;
        if (under && !finishingPass && pending > threshold * LIVE_SHARE) {
          finishingPass = true;
        } else {
          finishingPass = false;
          if (under && !this.switchoverBlocked()) break;
          if (sender.dirtyPages === 0) this.sync(sender); // a pass ended above the threshold: next pass
        }
      }
      // Yield to the event loop so QMP stays responsive between iterations.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }

    await this.complete(w, enc, sender, channel);
  }


  /** Whether switchover must wait (switchover-ack not received yet). */
  private switchoverAcked = false;
  private switchoverBlocked(): boolean {
    return this.options.capability('switchover-ack') && !this.switchoverAcked;
  }

  private sync(sender: RamSender): void {
    const m = this.machine;
    const before = sender.dirtyPages;
    sender.mergeDirty(m.ramBlocks.map((_, i) => m.dirtyLogSync(i)));
    sender.allProtected();
    this.stats.onSync(Math.max(0, sender.dirtyPages - before));
    this.stats.setRemainingPages(sender.dirtyPages);
    this.emit('pass', this.stats.counters().dirtySyncCount);
  }

  private account(bytes: number, normal: number, zero: number): void {
    // Attribute bytes to page kinds by their encoded sizes; the rest is headers.
    const zeroBytes = zero * 9;
    this.stats.onZeroPage(Math.min(bytes, zeroBytes), zero);
    this.stats.onPageSent(Math.max(0, bytes - zeroBytes), normal);
  }

  /** Closes the 100 ms bandwidth window when due (threshold, mbps, expected downtime). */
  private closeBandwidthWindow(): void {
    this.stats.bandwidthWindow({ downtimeLimitMs: this.downtimeLimit(), availSwitchoverBandwidth: this.availBandwidth() });
  }

  private downtimeLimit(): number {
    return this.options.parameterNumber('downtime-limit');
  }

  private availBandwidth(): number {
    return this.options.parameterNumber('avail-switchover-bandwidth');
  }

  /** max-bandwidth per 100 ms window (QEMU's BUFFER_DELAY); 0 = unlimited. */
  private rateLimitBytesPerWindow(): number {
    const max = this.options.parameterNumber('max-bandwidth');
    if (!Number.isFinite(max) || max <= 0 || max >= Number.MAX_SAFE_INTEGER) return 0;
    return Math.floor(max / 10);
  }

  private async complete(w: StreamWriter, enc: RamEncoder, sender: RamSender, channel: OutgoingChannel): Promise<void> {
    const m = this.machine;
    const st = this.state;
    // Stop the guest first (QEMU stops before the pre-switchover pause too).
    this.wasRunning = m.runState === 'running';
    st.markDowntimeStart();
    this.stats.setPhase('downtime');
    const oldRunState: RunState = m.runState;
    if (this.wasRunning) {
      await m.stopVcpus();
      this.vcpusStoppedByUs = true;
    }
    m.setRunState('finish-migrate');

    // QEMU passes through pre-switchover and device only with pause-before-switchover.
    let active: 'active' | 'device' = 'active';
    if (this.options.capability('pause-before-switchover')) {
      if (!st.setState('active', 'pre-switchover')) throw new MigrationCancelled();
      await new Promise<void>((resolve) => {
        this.continueResolve = resolve;
      });
      this.continueResolve = undefined;
      this.checkCancelled();
      if (!st.setState('pre-switchover', 'device')) throw new MigrationCancelled();
      active = 'device';
    }

    // Final pass with the guest stopped.
    this.sync(sender);
    w.sectionPart(SectionType.END, RAM_SECTION);
    const b0 = w.totalBytes;
    const n0 = sender.counts.normal;
    const z0 = sender.counts.duplicate;
    while (!sender.encodeSome(BATCH_BYTES)) {
      await w.flush();
      this.checkCancelled();
    }
    enc.eos();
    this.account(w.totalBytes - b0, sender.counts.normal - n0, sender.counts.duplicate - z0);
    w.footer(RAM_SECTION);
    this.stats.setRemainingPages(0);

    // Device state, EOF, description.
    const d0 = w.totalBytes;
    const descs = this.writeDevices(w, oldRunState);
    w.eof();
    w.vmdescription(formatVmdescJson(buildVmdesc(descs)));
    this.stats.onBytes(w.totalBytes - d0);
    await w.flush();
    this.streamComplete = true;
    // With a return path, SHUT below says the destination read everything.
    if (!this.rp) await this.splicedPagesRead(this.abort.signal);
    this.checkCancelled();

    if (this.rp) {
      const reply = await this.waitShut();
      if (reply.type === 'SHUT' && reply.status !== 0) throw new Error('destination failed to load the migration stream (return path SHUT with error)');
    }
    await channel.finish();
    st.markDowntimeEnd();
    m.setRunState('postmigrate');
    this.vcpusStoppedByUs = false;
    if (st.setState(active, 'completed')) this.stats.complete(st.totalTime(), st.setupTime());
    void channel.close();
  }

  private writeDevices(w: StreamWriter, runState: RunState): VmdescDevice[] {
    const sections: DeviceSection[] = [
      { sectionId: TIMER_SECTION, idstr: 'timer', instanceId: 0, vmsd: TIMER_VMSD, state: timerState() },
      { sectionId: GLOBALSTATE_SECTION, idstr: 'globalstate', instanceId: 0, vmsd: GLOBALSTATE_VMSD, state: globalState(runState) },
    ];
    let id = FIRST_DEVICE_SECTION;
    for (const dev of this.machine.saveDevices() as DeviceStateSection[]) {
      sections.push({ sectionId: id++, idstr: dev.idstr, instanceId: dev.instanceId, vmsd: dev.vmsd, state: dev.state });
    }
    const descs: VmdescDevice[] = [];
    for (const s of sections) descs.push(writeDeviceSection(w, s));
    if (w.error) throw w.error;
    return descs;
  }

  private openReturnPath(channel: OutgoingChannel): void {
    const rp = new RpReader(channel.returnPath!);
    this.rp = rp;
    let shutResolve: (m: RpMessage) => void = () => undefined;
    let shutReject: (e: Error) => void = () => undefined;
    this.shut = new Promise<RpMessage>((resolve, reject) => {
      shutResolve = resolve;
      shutReject = reject;
    });
    this.shut.catch(() => undefined);
    rp.on('message', (msg: RpMessage) => {
      if (msg.type === 'SHUT') shutResolve(msg);
      else if (msg.type === 'SWITCHOVER_ACK') this.switchoverAcked = true;
      else if (msg.type === 'PONG') this.emit('pong', msg.value);
      else {
        this.rpError = new Error(`unexpected return-path message ${msg.type} during precopy`);
        shutReject(this.rpError);
      }
    });
    rp.on('error', (err: Error) => {
      this.rpError = new Error(`return path: ${err.message}`, { cause: err });
      shutReject(this.rpError);
    });
    rp.on('end', () => shutReject(new Error('return path closed by the destination before SHUT')));
  }

  private async waitShut(): Promise<RpMessage> {
    const timeout = sleep(SHUT_TIMEOUT_MS, undefined, { signal: this.abort.signal }).then(() => {
      throw new Error(`no SHUT from the destination within ${SHUT_TIMEOUT_MS / 1000} s`);
    });
    return Promise.race([this.shut!, timeout]);
  }

  /** Failure rules: guest running again, state failed/cancelled with error-desc. */
  /**
   * The peer reads spliced pages from guest memory (FdSink): once the whole
   * stream is out, the guest may run again (postmigrate `cont`, or a failure
   * that restarts it) only after the peer has read them. Completion waits
   * for that until cancelled; a failure waits SPLICED_READ_LIMIT_MS at most,
   * so a peer that stopped reading cannot keep the source guest down. The
   * stream's tail is device state and sparse pages, which go by copy, so the
   * wait is usually nil.
   */
  private async splicedPagesRead(signal?: AbortSignal): Promise<void> {
    const sink = this.fdSink;
    if (!sink?.splicing) return;
    const limit = signal ?? AbortSignal.timeout(SPLICED_READ_LIMIT_MS);
    await sink.drained(limit).catch(() => undefined);
  }

  private async fail(err: Error): Promise<void> {
    const m = this.machine;
    const st = this.state;
    if (this.streamComplete) await this.splicedPagesRead();
    this.fdSink?.close(err);
    this.channel?.destroy(err);
    if (this.vcpusStoppedByUs || m.runState === 'finish-migrate') {
      try {
        if (this.wasRunning) {
          await m.startVcpus();
        } else {
          m.setRunState('paused');
        }
      } catch (restartErr) {
        st.setError(`migration failed and the guest could not be restarted: ${(restartErr as Error).message}`);
      }
      this.vcpusStoppedByUs = false;
    }
    const cancelled = err instanceof MigrationCancelled || st.status === 'cancelling';
    if (cancelled) {
      if (st.status !== 'cancelling') st.tryTransition('cancelling');
      st.setState('cancelling', 'cancelled');
    } else {
      st.setError(describeError(err));
      st.tryTransition('failed');
    }
  }
}

/** error-desc: the message plus the root cause's code where it adds information. */
export function describeError(err: Error): string {
  let msg = err.message;
  let cause = (err as { cause?: unknown }).cause;
  while (cause instanceof Error) {
    if (!msg.includes(cause.message)) msg += `: ${cause.message}`;
    cause = (cause as { cause?: unknown }).cause;
  }
  return msg;
}
