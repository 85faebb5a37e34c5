/**
 * The two VMMs a benchmark compares, started the same way: ferry (`ferry run`)
 * and QEMU 7.2 (`-M microvm`), booting the same PVH guest image with the same
 * RAM size and command line, serial to a file, QMP on a unix socket, and
 * optionally waiting for an incoming migration.
 *
 * FERRY_NODE_OPTIONS (whitespace-separated) is passed to the node that runs
 * ferry, e.g. `FERRY_NODE_OPTIONS='--cpu-prof --cpu-prof-dir=/tmp/prof'`.
 */
import fs from 'node:fs';
import path from 'node:path';

import { ferryArgv } from '../../lib/cli/launch';
import { guestPath } from '../../lib/guests';
import { QmpClient } from '../../lib/qmp/client';
import { Proc, SerialLog, sleep, waitFor, type TempDir } from './proc';

export type Engine = 'ferry' | 'qemu';
export const ENGINES: readonly Engine[] = ['ferry', 'qemu'];

export const QEMU_BINARY = process.env.QEMU ?? 'qemu-system-x86_64';

export interface VmSpec {
  /** Size as both CLIs spell it ('4G'). */
  memory: string;
  ramBytes: number;
  /** memwriter's command line. */
  append: string;
}

export interface VmStartOptions {
  dir: TempDir;
  /** File name prefix inside dir ('src', 'dst'). */
  name: string;
  /** Migration URI to wait on (destination). */
  incoming?: string;
  /** Extra node options for ferry (profiling). */
  nodeOptions?: readonly string[];
  guest?: string;
}

export function ferryNodeOptions(): string[] {
  return (process.env.FERRY_NODE_OPTIONS ?? '').split(/\s+/).filter((s) => s.length > 0);
}

/** Whether QEMU can be run here (binary on PATH). */
export function haveQemu(): boolean {
  const dirs = (process.env.PATH ?? '').split(':');
  return QEMU_BINARY.includes('/') ? fs.existsSync(QEMU_BINARY) : dirs.some((d) => fs.existsSync(path.join(d, QEMU_BINARY)));
}

export class Vm {
  qmp!: QmpClient;
  constructor(
    readonly engine: Engine,
    readonly proc: Proc,
    readonly serial: SerialLog,
    readonly qmpPath: string,
  ) {}

  get pid(): number {
    return this.proc.pid;
  }

  describe(): string {
    return `${this.proc.tail()}\n${this.serial.tail()}`;
  }

  /** Connects QMP once the socket exists (the process may still be starting). */
  async connect(timeoutMs = 20_000): Promise<void> {
    this.qmp = await waitFor(
      `QMP socket of ${this.proc.label}`,
      timeoutMs,
      async () => {
        if (!this.proc.running) throw new Error(`${this.proc.label} exited (code ${this.proc.exitCode}, signal ${this.proc.exitSignal})\n${this.describe()}`);
        if (!fs.existsSync(this.qmpPath)) return undefined;
        try {
          return await QmpClient.connect(`unix:${this.qmpPath}`, { timeoutMs: 5000 });
        } catch {
          return undefined;
        }
      },
      () => this.describe(),
      50,
    );
  }

  /** QMP quit, then wait for the exit (SIGKILL after `timeoutMs`). */
  async quit(timeoutMs = 10_000): Promise<boolean> {
    if (this.qmp && !this.qmp.closed) {
      await this.qmp.execute('quit', undefined, { timeoutMs: 2000 }).catch(() => undefined);
      await this.qmp.close().catch(() => undefined);
    }
    return this.proc.stop(timeoutMs);
  }

  async kill(): Promise<void> {
    this.qmp?.destroy();
    if (this.proc.running) {
      this.proc.child.kill('SIGKILL');
      await this.proc.exited;
    }
  }
}

export async function startVm(engine: Engine, spec: VmSpec, opts: VmStartOptions): Promise<Vm> {
  const serial = opts.dir.file(`${opts.name}.serial`);
  const qmp = opts.dir.file(`${opts.name}.qmp`);
  const elf = guestPath(opts.guest ?? 'memwriter');
  let proc: Proc;
  if (engine === 'ferry') {
    const args = [
      'run',
      '--guest',
      elf,
      '--memory',
      spec.memory,
      '--append',
      spec.append,
      '--serial',
      `file:${serial}`,
      '--qmp',
      `unix:${qmp}`,
    ];
    if (opts.incoming) args.push('--incoming', opts.incoming);
    proc = new Proc(`ferry ${opts.name}`, process.execPath, ferryArgv(args, opts.nodeOptions));
  } else {
    const args = ['-M', 'microvm', '-accel', 'kvm', '-m', spec.memory, '-smp', '1', '-nodefaults', '-display', 'none'];
    args.push('-serial', `file:${serial}`, '-qmp', `unix:${qmp},server=on,wait=off`, '-kernel', elf, '-append', spec.append);
    if (opts.incoming) args.push('-incoming', opts.incoming);
    proc = new Proc(`qemu ${opts.name}`, QEMU_BINARY, args);
  }
  const vm = new Vm(engine, proc, new SerialLog(serial), qmp);
  try {
    await vm.connect();
  } catch (err) {
    await vm.kill();
    throw err;
  }
  return vm;
}

/** Waits for `memwriter ready` and then `ticks` more ticks; throws on a reported problem. */
export async function waitGuestReady(vm: Vm, ticks: number, timeoutMs: number): Promise<void> {
  await waitFor(
    `memwriter ready + ${ticks} ticks on ${vm.proc.label}`,
    timeoutMs,
    () => {
      vm.serial.poll();
      if (vm.serial.problems.length > 0) throw new Error(`guest on ${vm.proc.label} reported: ${vm.serial.problems[0]}`);
      if (!vm.proc.running) throw new Error(`${vm.proc.label} exited\n${vm.describe()}`);
      return vm.serial.ready() && vm.serial.ticks().length >= ticks;
    },
    () => vm.describe(),
    50,
  );
}

/**
 * After a migration: the destination runs and its guest ticks `ticks` more
 * times (counting from the ticks seen now) with errors=0 and no CORRUPT line.
 * Returns the last tick.
 */
export async function checkGuestTicking(vm: Vm, ticks: number, timeoutMs: number): Promise<{ n: number; errors: number; verified: number }> {
  vm.serial.poll();
  const seen = vm.serial.ticks().length;
  // Without the return path the source completes once the stream is sent: the destination
  // may still be loading what its socket and read buffers hold.
  let status = '';
  const deadline = Date.now() + 5000;
  do {
    status = ((await vm.qmp.execute('query-status')) as { status: string }).status;
    if (status === 'inmigrate') await sleep(10);
  } while (status === 'inmigrate' && Date.now() < deadline);
  if (status !== 'running') throw new Error(`destination ${vm.proc.label} is '${status}', not running`);
  await waitFor(
    `${ticks} ticks after the migration on ${vm.proc.label}`,
    timeoutMs,
    () => {
      vm.serial.poll();
      return vm.serial.ticks().length >= seen + ticks;
    },
    () => vm.describe(),
    50,
  );
  const last = vm.serial.ticks().at(-1)!;
  if (vm.serial.problems.length > 0) throw new Error(`guest on ${vm.proc.label} reported after migration: ${vm.serial.problems.slice(0, 3).join(' | ')}`);
  if (last.errors !== 0) throw new Error(`guest on ${vm.proc.label}: tick ${last.n} errors=${last.errors}`);
  return last;
}

export { sleep };
