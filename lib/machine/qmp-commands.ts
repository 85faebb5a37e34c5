/**
 * The machine's QMP commands, with QEMU 7.2's names, argument shapes and
 * refusals: query-status, stop, cont, system_reset, query-cpus-fast,
 * pmemsave, query-kvm. Saving and restoring a guest is QEMU's way:
 * `migrate "file:..."` (or exec:) and `ferry run --incoming file:...`.
 *
 * `quit` is the QMP server's own command; its hook lives in lib/cli/run.ts.
 * Events (STOP, RESUME, SHUTDOWN, RESET) are forwarded from the machine's
 * 'qmp-event' by the caller.
 */
import fs from 'node:fs/promises';

import { QmpError } from '../qmp/protocol';
import type { QmpServer } from '../qmp/server';
import type { Machine } from './machine';
import { needsReset } from './runstate';

export interface MachineCommandOptions {
  /**
   * QEMU's autostart: whether an incoming migration starts the guest when it
   * completes. `stop` during 'inmigrate' clears it, `cont` sets it.
   */
  autostart: { value: boolean };
}

const PMEMSAVE_CHUNK = 16 << 20;

function generic(desc: string): QmpError {
  return new QmpError('GenericError', desc);
}

function fileError(filename: string, err: unknown): QmpError {
  const e = err as NodeJS.ErrnoException;
  const why: Record<string, string> = {
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    EISDIR: 'Is a directory',
    ENOSPC: 'No space left on device',
    ENOTDIR: 'Not a directory',
  };
  return generic(`Could not open '${filename}': ${why[e.code ?? ''] ?? e.message}`);
}

/** Register the machine's commands on `server`. */
export function registerMachineCommands(server: QmpServer, machine: Machine, opts: MachineCommandOptions): void {
  server.register({
    name: 'query-status',
    handler: () => ({ status: machine.runState, singlestep: false, running: machine.isRunning }),
  });

  server.register({
    name: 'query-kvm',
    handler: () => ({ enabled: true, present: true }),
  });

  server.register({
    name: 'stop',
    handler: async () => {
      // QEMU: during an incoming migration, only remember not to start after it.
      if (machine.runState === 'inmigrate') {
        opts.autostart.value = false;
        return {};
      }
      if (machine.isRunning) await machine.stop('paused');
      return {};
    },
  });

  server.register({
    name: 'cont',
    handler: async () => {
      const s = machine.runState;
      if (needsReset(s)) throw generic('Resetting the Virtual Machine is required');
      if (s === 'suspended') return {};
      if (s === 'inmigrate') {
        opts.autostart.value = true;
        return {};
      }
      if (s === 'finish-migrate' || s === 'save-vm' || s === 'restore-vm') {
        throw generic(`Cannot continue while the VM is in state '${s}'`);
      }
      await machine.cont();
      return {};
    },
  });

  server.register({
    name: 'system_reset',
    handler: async () => {
      await machine.reset({ guest: false, reason: 'host-qmp-system-reset' });
      return {};
    },
  });

  server.register({
    name: 'query-cpus-fast',
    handler: () =>
      machine.vcpus.map((v, i) => ({
        'cpu-index': i,
        'qom-path': `/machine/unattached/device[${i}]`,
        'thread-id': process.pid,
        target: 'x86_64',
        props: { 'core-id': i, 'thread-id': 0, 'socket-id': 0 },
      })),
  });

  server.register<{ val: number; size: number; filename: string }>({
    name: 'pmemsave',
    args: { val: 'int', size: 'int', filename: 'str' },
    handler: async (args) => {
      const { val, size, filename } = args;
      if (val < 0) throw generic(`Invalid parameter 'val': ${val} is not a guest-physical address`);
      if (size < 0) throw generic(`Invalid parameter 'size': ${size} is negative`);
      const where = machine.findRam(val, size);
      if (!where) {
        throw generic(
          `Invalid parameter 'val': guest-physical range [0x${val.toString(16)}, 0x${(val + size).toString(16)}) is not RAM`,
        );
      }
      let fh: fs.FileHandle;
      try {
        fh = await fs.open(filename, 'w');
      } catch (err) {
        throw fileError(filename, err);
      }
      try {
        let pos = 0;
        while (pos < size) {
          const n = Math.min(PMEMSAVE_CHUNK, size - pos);
          // Copy each piece out of guest memory (views may not cross 1 GiB) before the async write.
          const data = where.block.read(where.offset + pos, n);
          let done = 0;
          while (done < n) done += (await fh.write(data, done, n - done, pos + done)).bytesWritten;
          pos += n;
        }
      } catch (err) {
        throw generic(`Error writing '${filename}': ${(err as Error).message}`);
      } finally {
        await fh.close();
      }
      return {};
    },
  });
}
