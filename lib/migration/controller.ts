/**
 * One process's migration control: the outgoing and incoming state machines,
 * capabilities and parameters, the running migration (if any), and the QMP
 * commands and events that drive them, with QEMU's names and refusals.
 */
import { EventEmitter } from 'node:events';
import type { QmpServer } from '../qmp/server';
import { QmpError } from '../qmp/protocol';
import type * as TransportModule from '../transport';
import { resolveMigrationTarget, type MigrationAddress } from '../transport/address';
import type { IncomingListener } from '../transport/types';
import type * as DestinationModule from './destination';
import type { IncomingMigration } from './destination';
import { RamStats, buildMigrationInfo, destinationSnapshot, sourceSnapshot, type MigrationInfoJson, type SocketAddressJson } from './info';
import type { MigratableMachine } from './machine-port';
import { MigrationOptions, parseSetCapabilitiesArgs, parseSetParametersArgs } from './options';
import type * as SourceModule from './source';
import type { OutgoingMigration } from './source';
import {
  MigrationCommandError,
  MigrationStateMachine,
  guardMigrate,
  guardMigrateCancel,
  guardMigrateContinue,
  guardMigrateIncoming,
  guardSetCapabilities,
  isRunning,
  type MigrationStatus,
  type TransportKind,
} from './state';

/*
 * The engines and transports load at the first migration command: a guest
 * that is never migrated does not pay for them, and at boot they were ~10 ms
 * of the JS thread's time while the guest waited for its first exits.
 */
/* eslint-disable @typescript-eslint/no-require-imports */
const sourceEngine = (): typeof SourceModule => require('./source') as typeof SourceModule;
const destinationEngine = (): typeof DestinationModule => require('./destination') as typeof DestinationModule;
const transports = (): typeof TransportModule => require('../transport') as typeof TransportModule;
/* eslint-enable @typescript-eslint/no-require-imports */

export interface ControllerOptions {
  /** QEMU's autostart: false with -S / --paused. */
  autostart: boolean;
  /** Named fds from QMP getfd (fd:NAME). */
  lookupFd?: (name: string) => number | undefined;
}

export class MigrationController extends EventEmitter {
  /** Postcopy and background snapshots come with their own issues: refused until then. */
  readonly options = new MigrationOptions({
    supported: { 'postcopy-ram': false, 'postcopy-preempt': false, 'background-snapshot': false, 'switchover-ack': true },
  });
  readonly source: MigrationStateMachine;
  readonly destination: MigrationStateMachine;
  readonly stats = new RamStats();
  private outgoing: OutgoingMigration | undefined;
  private incoming: IncomingMigration | undefined;
  private listener: IncomingListener | undefined;
  private incomingStarted = false;
  /** Settles when the current outgoing migration finished (for tests and the CLI). */
  outgoingDone: Promise<void> = Promise.resolve();
  incomingDone: Promise<void> = Promise.resolve();
  exitOnError = true;

  constructor(
    readonly machine: MigratableMachine,
    private readonly opts: ControllerOptions,
  ) {
    super();
    const eventsEnabled = () => this.options.capability('events');
    this.source = new MigrationStateMachine({ side: 'source', eventsEnabled });
    this.destination = new MigrationStateMachine({ side: 'destination', eventsEnabled });
  }

  /**
   * Loads the engines and transports, and makes the RAM views, ahead of the
   * first migration command (lazy, so booting does not wait for them; done
   * at `migrate` time they counted ~15 ms into setup-time).
   */
  preload(): void {
    sourceEngine();
    destinationEngine();
    transports();
    this.machine.warmRam?.();
  }

  private guardContext() {
    return {
      source: this.source.status,
      destination: this.destination.status,
      runState: this.machine.runState,
      incomingStarted: this.incomingStarted,
    };
  }

  /** QMP migrate. Starts the migration in the background and returns. */
  migrate(args: { uri?: unknown; channels?: unknown; resume?: boolean; blk?: boolean; inc?: boolean }): void {
    const addr = this.target(args.uri, args.channels);
    const refusal = guardMigrate(this.guardContext(), this.options.capabilities, {
      resume: args.resume,
      blk: args.blk,
      inc: args.inc,
      transport: transportKind(addr),
    });
    if (refusal) throw refusal;
    const from = this.source.status;
    this.source.setState(from, 'setup');
    const out = new (sourceEngine().OutgoingMigration)(this.machine, this.options, this.source, this.stats);
    this.outgoing = out;
    out.on('pass', (pass: number) => this.emit('pass', pass));
    out.on('progress', () => this.emit('progress'));
    this.outgoingDone = out.run((signal) => transports().connectOutgoing(addr, { signal, lookupFd: this.opts.lookupFd }));
  }

  /** QMP migrate-incoming (or -incoming URI at start). */
  async migrateIncoming(args: { uri?: unknown; channels?: unknown; 'exit-on-error'?: boolean }): Promise<void> {
    const refusal = guardMigrateIncoming(this.guardContext());
    if (refusal) throw refusal;
    const addr = this.target(args.uri, args.channels);
    if (args['exit-on-error'] !== undefined) this.exitOnError = args['exit-on-error'];
    this.incomingStarted = true;
    try {
      this.listener = await transports().listenIncoming(addr, { lookupFd: this.opts.lookupFd });
    } catch (err) {
      this.incomingStarted = false;
      throw new QmpError('GenericError', (err as Error).message);
    }
    const listener = this.listener;
    this.machine.warmRam?.(); // while nobody has connected yet (see preload)
    const inc = new (destinationEngine().IncomingMigration)(this.machine, this.destination, {
      autostart: this.opts.autostart,
      switchoverAck: () => this.options.capability('switchover-ack'),
    });
    this.incoming = inc;
    this.incomingDone = inc.run(() => listener.accept()).then(async () => {
      await listener.close();
      this.emit('incoming-finished', this.destination.status);
    });
  }

  /** The address the incoming side listens on (tcp port 0 resolved). */
  get incomingAddress(): MigrationAddress | undefined {
    return this.listener?.address;
  }

  cancel(): void {
    const refusal = guardMigrateCancel({ source: this.source.status });
    if (refusal) throw refusal;
    if (isRunning(this.source.status)) this.outgoing?.cancel();
  }

  continueSwitchover(state: MigrationStatus): void {
    const refusal = guardMigrateContinue({ source: this.source.status }, state);
    if (refusal) throw refusal;
    this.outgoing?.continueSwitchover();
  }

  /** Process exit: cancel an outgoing migration, abort an incoming one, stop listening. */
  async shutdown(): Promise<void> {
    if (isRunning(this.source.status)) this.outgoing?.cancel();
    this.incoming?.abort(new Error('process exiting'));
    await this.listener?.close();
  }

  queryMigrate(): MigrationInfoJson {
    return buildMigrationInfo({
      source: sourceSnapshot(this.source, this.stats),
      destination: destinationSnapshot(this.destination, { socketAddress: this.listeningAddress() }),
    });
  }

  /**
   * query-migrate's socket-address: the address an incoming tcp/unix listener
   * is bound to (a tcp port 0 shows the port picked), as QEMU reports it from
   * the moment it listens until the incoming migration ends.
   */
  private listeningAddress(): SocketAddressJson[] | undefined {
    const a = this.listener?.address;
    const st = this.destination.status;
    if (!a || a.transport !== 'socket' || st === 'completed' || st === 'failed') return undefined;
    if (a.type === 'inet') {
      // QEMU reports the family of the bound socket (ipv4 or ipv6 true), not the URI's flags.
      return [{ type: 'inet', host: a.host, port: a.port, ...(a.host.includes(':') ? { ipv6: true } : { ipv4: true }) }];
    }
    if (a.type === 'unix') return [{ type: 'unix', path: a.path, ...(a.abstract ? { abstract: true } : {}) }];
    return undefined;
  }

  private target(uri: unknown, channels: unknown): MigrationAddress {
    try {
      return resolveMigrationTarget(uri, channels);
    } catch (err) {
      throw new QmpError('GenericError', (err as Error).message);
    }
  }

  /** Registers the migration QMP commands and events on `server`. */
  register(server: QmpServer): void {
    const wrap = <A>(fn: (args: A) => unknown | Promise<unknown>) => async (args: A) => {
      try {
        return await fn(args);
      } catch (err) {
        if (err instanceof MigrationCommandError) throw new QmpError(err.toQmp().class, err.toQmp().desc);
        throw err;
      }
    };
    server.register({
      name: 'migrate',
      args: { 'uri?': 'str', 'channels?': 'array', 'detach?': 'bool', 'resume?': 'bool', 'blk?': 'bool', 'inc?': 'bool' },
      handler: wrap((a: { uri?: string; channels?: unknown; resume?: boolean; blk?: boolean; inc?: boolean }) => {
        this.migrate(a);
      }),
    });
    server.register({
      name: 'migrate-incoming',
      args: { 'uri?': 'str', 'channels?': 'array', 'exit-on-error?': 'bool' },
      handler: wrap((a: { uri?: string; channels?: unknown; 'exit-on-error'?: boolean }) => this.migrateIncoming(a).then(() => undefined)),
    });
    server.register({ name: 'migrate_cancel', handler: wrap(() => this.cancel()) });
    server.register({
      name: 'migrate-continue',
      args: { state: 'str' },
      handler: wrap((a: { state: MigrationStatus }) => this.continueSwitchover(a.state)),
    });
    server.register({
      name: 'migrate-set-capabilities',
      args: 'any',
      handler: wrap((a: unknown) => {
        const refusal = guardSetCapabilities({ source: this.source.status });
        if (refusal) throw refusal;
        this.options.setCapabilities(parseSetCapabilitiesArgs(a), {
          status: this.source.status,
          inmigrate: this.machine.runState === 'inmigrate',
          incomingStarted: this.incomingStarted,
        });
      }),
    });
    server.register({ name: 'query-migrate-capabilities', handler: () => this.options.queryCapabilities() });
    server.register({
      name: 'migrate-set-parameters',
      args: 'any',
      handler: wrap((a: unknown) => this.options.setParameters(parseSetParametersArgs(a))),
    });
    server.register({ name: 'query-migrate-parameters', handler: () => this.options.queryParameters() });
    server.register({ name: 'query-migrate', handler: () => this.queryMigrate() });

    const onMigration = (data: { status: MigrationStatus }) => server.emitEvent('MIGRATION', { status: data.status });
    this.source.on('migration', onMigration);
    this.destination.on('migration', onMigration);
    this.on('pass', (pass: number) => {
      if (this.options.capability('events')) server.emitEvent('MIGRATION_PASS', { pass });
    });
  }
}

function transportKind(addr: MigrationAddress): TransportKind {
  if (addr.transport === 'socket') return addr.type === 'inet' ? 'inet' : addr.type === 'unix' ? 'unix' : addr.type === 'fd' ? 'fd' : 'inet';
  return addr.transport;
}
