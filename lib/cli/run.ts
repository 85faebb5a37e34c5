/**
 * `ferry run`: builds the Machine from RunOptions, its serial sink and QMP
 * server(s), registers the machine's and the migration controller's QMP
 * commands, loads the guest and starts it (or stays in prelaunch with
 * --paused until `cont`, or waits in inmigrate with --incoming).
 *
 * Ends (resolving with the exit status: 0, or 1 after a failed incoming
 * migration with exit-on-error) on: the guest powering off or
 * triple-faulting (SHUTDOWN guest=true), QMP `quit` (SHUTDOWN host-qmp-quit),
 * SIGINT/SIGTERM (SHUTDOWN host-signal). Every end path runs the same
 * cleanup: SHUTDOWN reaches the QMP clients, the migration controller stops,
 * the QMP servers close, the vCPU threads are joined, RAM is unmapped and
 * the serial output flushed, so the process exits with nothing left behind.
 *
 * Contract with lib/cli/main.ts: runMachine(options) resolves when the
 * machine has shut down with the exit code; failures to start throw a
 * FerryError (main prints it, exit status 1).
 */
import { FerryError } from '../errors';
import { Machine, type ShutdownInfo } from '../machine/machine';
import { createSerialSink, type SerialSpec } from '../machine/serial';
import type * as MigratableModule from '../machine/migratable';
import type * as MachineCommandsModule from '../machine/qmp-commands';
import type * as ControllerModule from '../migration/controller';
import type { MigrationController } from '../migration/controller';
import type * as QmpProtocolModule from '../qmp/protocol';
import type * as QmpServerModule from '../qmp/server';
import type { QmpServer } from '../qmp/server';
import type { RunOptions } from './run-options';

/** How long pending QMP output (the SHUTDOWN event) may take to drain at exit. */
const FLUSH_MS = 500;
/** Safety net: exit even if some handle we do not own keeps the loop alive. */
const FORCE_EXIT_MS = 3000;

function serialSpec(o: RunOptions): SerialSpec {
  switch (o.serial.type) {
    case 'stdio':
      return 'stdio';
    case 'none':
      return 'none';
    case 'file':
      return { file: o.serial.path };
  }
}

async function flushClients(server: QmpServer): Promise<void> {
  const end = Date.now() + FLUSH_MS;
  while (Date.now() < end && server.clients.some((c) => !c.closed && c.socket.writableLength > 0)) {
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** When the migration engines are loaded after start (see MigrationController.preload). */
const PRELOAD_DELAY_MS = 250;

export async function runMachine(options: RunOptions): Promise<number> {
  let machine: Machine;
  try {
    machine = new Machine({
      machineType: options.machine,
      ramSize: options.memory,
      cpus: options.cpus,
      guest: options.guest?.path,
      cmdline: options.append,
      serial: createSerialSink(serialSpec(options)),
      memPath: options.memPath,
    });
  } catch (err) {
    if (err instanceof FerryError) throw err;
    throw new FerryError('ERR_MACHINE_CREATE', `cannot create the machine: ${(err as Error).message}`, { cause: err });
  }

  const autostart = { value: !options.paused };
  let server: QmpServer | undefined;
  let controller: MigrationController | undefined;
  let finishing: Promise<void> | undefined;
  let preloadTimer: NodeJS.Timeout | undefined;
  let resolveDone!: (code: number) => void;
  const done = new Promise<number>((r) => (resolveDone = r));

  // A RAM-only machine has no vCPU thread: keep the process alive until quit, as QEMU does.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  machine.on('qmp-event', (name: string, data?: Record<string, unknown>) => server?.emitEvent(name, data));
  machine.on('guest-error', (msg: string) => process.stderr.write(`ferry run: ${msg}\n`));
  machine.on('shutdown', () => void finish());

  const onSignal = (sig: NodeJS.Signals) => {
    process.stderr.write(`ferry run: terminating on signal ${sig}\n`);
    void finish({ guest: false, reason: 'host-signal' });
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const onInput = (chunk: Buffer) => machine.serialDevice?.receive(chunk);
  const stdinInput = options.serial.type === 'stdio' && process.stdin.isTTY === true && machine.serialDevice !== undefined;
  if (stdinInput) process.stdin.on('data', onInput);

  /** The one exit path. `info` given: a host-initiated shutdown (the guest's own already emitted SHUTDOWN). */
  function finish(info?: ShutdownInfo): Promise<void> {
    finishing ??= (async () => {
      try {
        if (info) await machine.shutdown(info);
        await controller?.shutdown().catch(() => undefined);
        if (server) {
          await flushClients(server);
          await server.close();
        }
      } finally {
        clearInterval(keepAlive);
        clearTimeout(preloadTimer);
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        if (stdinInput) {
          process.stdin.off('data', onInput);
          process.stdin.pause();
        }
        machine.close();
        setTimeout(() => process.exit(process.exitCode ?? 0), FORCE_EXIT_MS).unref();
        resolveDone(typeof process.exitCode === 'number' ? process.exitCode : 0);
      }
    })();
    return finishing;
  }

  try {
    // Boot first, then load and start the control plane while the guest runs
    // its early code: the QMP and migration modules take milliseconds to load
    // (required here, not imported at the top, for that reason).
    const boot = !options.incoming && !options.paused;
    if (boot) {
      if (machine.machineType === 'pvh') machine.loadGuest(options.guest?.path, options.append);
      await machine.cont();
    }
    // Between modules the event loop runs, so the guest's console output (queued by the vCPU
    // thread) reaches its file within one module's load instead of after all of them.
    const turn = () => new Promise<void>((resolve) => setImmediate(resolve));
    /* eslint-disable @typescript-eslint/no-require-imports */
    const { QmpServer: Server } = require('../qmp/server') as typeof QmpServerModule;
    const { formatQmpAddress } = require('../qmp/protocol') as typeof QmpProtocolModule;
    await turn();
    const { registerMachineCommands } = require('../machine/qmp-commands') as typeof MachineCommandsModule;
    const { MigratableAdapter } = require('../machine/migratable') as typeof MigratableModule;
    await turn();
    const { MigrationController: Controller } = require('../migration/controller') as typeof ControllerModule;
    await turn();
    /* eslint-enable @typescript-eslint/no-require-imports */
    if (finishing) return await done; // a signal or the guest ended it meanwhile
    const srv = new Server({ onQuit: () => finish({ guest: false, reason: 'host-qmp-quit' }) });
    server = srv;
    registerMachineCommands(srv, machine, { autostart });
    controller = new Controller(new MigratableAdapter(machine), {
      get autostart() {
        return autostart.value;
      },
      lookupFd: (name) => srv.takeFd(name),
    });
    controller.register(srv);
    // QEMU's exit-on-error (default on): a failed incoming migration ends the process with status 1.
    const ctl = controller;
    ctl.on('incoming-finished', (status: string) => {
      if (status !== 'failed' || !ctl.exitOnError) return;
      process.stderr.write(`ferry run: load of migration failed: ${ctl.destination.error ?? 'unknown error'}\n`);
      process.exitCode = 1;
      void finish();
    });
    for (const addr of options.qmp) {
      try {
        await srv.listen(addr);
      } catch (err) {
        throw new FerryError('ERR_QMP_LISTEN', `cannot serve QMP at ${formatQmpAddress(addr)}: ${(err as Error).message}`, { cause: err });
      }
    }
    // The migration code, once the guest has booted: off the boot path, ready before a migrate.
    preloadTimer = setTimeout(() => {
      if (!finishing) ctl.preload();
    }, PRELOAD_DELAY_MS).unref();
    if (options.incoming) {
      machine.setRunState('inmigrate');
      if (options.incoming.type === 'uri') await controller.migrateIncoming({ uri: options.incoming.uri });
    } else if (!boot && machine.machineType === 'pvh') {
      machine.loadGuest(options.guest?.path, options.append); // --paused: loaded, waiting for cont
    }
  } catch (err) {
    await finish().catch(() => undefined);
    if (err instanceof FerryError) throw err;
    throw new FerryError('ERR_RUN_START', (err as Error).message, { cause: err });
  }
  return done;
}
