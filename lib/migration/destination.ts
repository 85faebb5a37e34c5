/**
 * Incoming precopy migration: reads a savevm stream into a machine that
 * waits in `inmigrate`, then applies device state and starts the guest as
 * the source's globalstate says.
 *
 *   none ──> setup ──> active ──(EOF, devices applied)──> completed
 *                        └────── any error ─────────────> failed
 *
 * Invariants: every length, offset, id and version from the stream is
 * checked against this machine before it touches memory (the codec and the
 * vmstate loader bound them); device state is applied only after EOF, so a
 * half-loaded guest never runs.
 */
import { EventEmitter } from 'node:events';
import type { IncomingChannel } from '../transport/types';
import { MIG_CMD, SectionType } from '../stream/constants';
import { GLOBALSTATE_VMSD, TIMER_VMSD, runstateOf } from '../stream/devices';
import { StreamError, printable } from '../stream/errors';
import { native } from '../native';
import { FdSource } from '../stream/fd-source';
import { StreamReader } from '../stream/reader';
import { SectionParser, type StreamItem } from '../stream/sections';
import { loadVmState, type VmStateDescription } from '../stream/vmstate';
import type { DeviceStateSection, MigratableMachine } from './machine-port';
import { RamLoader } from './ram';
import { RpWriter } from './return-path';
import { describeError } from './source';
import type { MigrationStateMachine, RunState } from './state';

/**
 * Bytes the reader queues before pausing the socket. The kernel's socket
 * buffer already absorbs bursts; more read-ahead only holds memory (the
 * reader's 16 MiB default showed as +13 MiB resident on a 2 GiB receive).
 */
const READ_AHEAD = 2 << 20;

export interface IncomingOptions {
  /** Start the guest when the source was running (QEMU's autostart; false with -S). */
  autostart: boolean;
  /** switchover-ack capability on this side: acknowledge once RAM setup loaded (no device needs more). */
  switchoverAck?: () => boolean;
}

export class IncomingMigration extends EventEmitter {
  private rp: RpWriter | undefined;
  private channel: IncomingChannel | undefined;
  private fdSource: FdSource | undefined;
  private failure: Error | undefined;

  constructor(
    private readonly machine: MigratableMachine,
    private readonly state: MigrationStateMachine,
    private readonly opts: IncomingOptions,
  ) {
    super();
  }

  /** The error that failed the load, if it failed (its `code` tells stream from transport errors). */
  get error(): Error | undefined {
    return this.failure;
  }

  /** Aborts a load in progress (the guest stays in inmigrate, never runs). */
  abort(err: Error): void {
    this.fdSource?.close(err);
    this.channel?.destroy(err);
  }

  /**
   * Loads the stream from the channel `accept` yields. Resolves once the
   * migration completed or failed (never rejects); the final status says which.
   */
  async run(accept: () => Promise<IncomingChannel>): Promise<void> {
    const st = this.state;
    try {
      st.tryTransition('setup');
      const channel = await accept();
      this.channel = channel;
      st.tryTransition('active');
      try {
        await this.load(channel);
      } finally {
        this.fdSource?.close();
      }
      this.rp?.shut(false);
      st.tryTransition('completed');
      await channel.close();
    } catch (err) {
      this.failure = err as Error;
      st.setError(describeError(err as Error));
      this.rp?.shut(true);
      st.tryTransition('failed');
      this.channel?.destroy();
    }
  }

  private async load(channel: IncomingChannel): Promise<void> {
    const m = this.machine;
    const reader = this.openReader(channel);
    const parser = new SectionParser(reader, { expectMachine: m.configName });
    const ram = new RamLoader(reader, m.ramBlocks);
    const devices: DeviceStateSection[] = [];
    let runState: string | undefined;
    let sawRamEnd = false;

    for (;;) {
      const item: StreamItem | undefined = await parser.next();
      if (!item) break;
      switch (item.kind) {
        case 'header':
        case 'configuration':
        case 'vmdesc':
          break;
        case 'command':
          this.command(item, channel);
          break;
        case 'section': {
          if (item.idstr === 'ram') {
            if (item.type === SectionType.FULL) throw streamError(`section 'ram' sent as FULL (expected START/PART/END)`, item.position);
            // QEMU registers one 'ram' handler, instance 0: any other instance is unknown.
            if (item.instanceId !== 0) throw streamError(`unknown savevm section or instance 'ram' ${item.instanceId}`, item.position);
            if (item.version !== 4 && (item.type === SectionType.START)) {
              throw streamError(`section 'ram' version ${item.version} (this machine loads version 4)`, item.position);
            }
            await ram.loadSection();
            if (item.type === SectionType.END) sawRamEnd = true;
            if (item.type === SectionType.START && this.rp && this.opts.switchoverAck?.()) this.rp.switchoverAck();
            break;
          }
          if (item.type !== SectionType.FULL) {
            throw streamError(`iterative section '${printable(item.idstr)}' (instance ${item.instanceId}) is not known to this machine`, item.position);
          }
          const vmsd = this.vmsdFor(item.idstr, item.instanceId);
          if (!vmsd) throw streamError(`unknown savevm section or instance '${printable(item.idstr)}' ${item.instanceId}`, item.position);
          if (item.version > vmsd.version || item.version < (vmsd.minimumVersion ?? 1)) {
            throw streamError(`section '${printable(item.idstr)}' version ${item.version} not in ${vmsd.minimumVersion ?? 1}..${vmsd.version}`, item.position);
          }
          const loaded = await loadVmState(reader, vmsd, item.version);
          if (item.idstr === 'globalstate') runState = runstateOf(loaded);
          else if (item.idstr !== 'timer') devices.push({ idstr: item.idstr, instanceId: item.instanceId, vmsd, state: loaded });
          break;
        }
        case 'eof':
          break;
      }
      if (item.kind === 'eof') {
        // Read (and discard) the VM description if the source sent one.
        while ((await parser.next()) !== undefined);
        break;
      }
    }
    if (!sawRamEnd) throw streamError('stream ended without the final RAM section', reader.position);
    await m.loadDevices(devices);
    await this.startGuest(runState);
  }

  /** Reads the socket's fd natively when the channel allows it (recycled buffers), else the Node stream. */
  private openReader(channel: IncomingChannel): StreamReader {
    const fd = channel.readFd?.();
    if (fd === undefined) return StreamReader.fromReadable(channel.stream, { highWaterMark: READ_AHEAD });
    const reader = new StreamReader();
    this.fdSource = new FdSource(native(), fd, reader);
    return reader;
  }

  private vmsdFor(idstr: string, instanceId: number): VmStateDescription | undefined {
    if (idstr === 'timer' && instanceId === 0) return TIMER_VMSD;
    if (idstr === 'globalstate' && instanceId === 0) return GLOBALSTATE_VMSD;
    return this.machine.deviceVmsd(idstr, instanceId);
  }

  private command(item: Extract<StreamItem, { kind: 'command' }>, channel: IncomingChannel): void {
    switch (item.cmd) {
      case MIG_CMD.OPEN_RETURN_PATH:
        if (!channel.returnPath) throw streamError(`the source asked for a return path but ${channel.describe()} has none`, item.position);
        this.rp ??= new RpWriter(channel.returnPath);
        return;
      case MIG_CMD.PING:
        if (!this.rp) throw streamError('PING before OPEN_RETURN_PATH', item.position);
        this.rp.pong(item.payload.readUInt32BE(0));
        return;
      default:
        throw streamError(`command ${item.name} is not supported by this destination in precopy`, item.position);
    }
  }

  /** QEMU's rule: run when the source ran (and autostart), else adopt its run state. */
  private async startGuest(received: string | undefined): Promise<void> {
    const m = this.machine;
    if (received === undefined || received === 'running') {
      if (this.opts.autostart) {
        await m.startVcpus();
      } else {
        m.setRunState('paused');
      }
    } else {
      m.setRunState(received as RunState);
    }
  }
}

/** A StreamError whose message names the byte where the offending item starts, as lib/stream's do. */
function streamError(message: string, position: number): StreamError {
  return new StreamError(`${message} at byte ${position}`, position);
}
