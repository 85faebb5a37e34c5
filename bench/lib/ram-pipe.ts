/**
 * Throughput probe of ferry's precopy RAM path alone, without KVM or a
 * guest: a source process sends SIZE of random RAM (a MemoryMachine, no
 * dirtying) to a destination process over a unix socket with the real engine
 * (OutgoingMigration -> IncomingMigration). With --warm the destination's RAM
 * is touched before the migration, which isolates the pipeline's own cost
 * from the kernel's first-touch cost (page zeroing, which on these machines
 * dominates a cold receive; see COLD_PAUSE_MS in bench/precopy.ts).
 *
 *   node dist/bench/lib/ram-pipe.js [--size 1G] [--warm] [--reps N]
 *
 * Prints per run: MB/s, and CPU time (user+sys) of each side. Handy under
 * `perf record -p` or with FERRY_NODE_OPTIONS=--cpu-prof (applied to the
 * destination child).
 */
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { IncomingMigration } from '../../lib/migration/destination';
import { RamStats } from '../../lib/migration/info';
import { MigrationOptions } from '../../lib/migration/options';
import { OutgoingMigration } from '../../lib/migration/source';
import { MigrationStateMachine } from '../../lib/migration/state';
import { native } from '../../lib/native';
import { connectOutgoing, listenIncoming } from '../../lib/transport';
import { parseSize } from '../../lib/util/size';
import { MemoryMachine } from '../../test/helpers/memory-machine';
import { cpuTimeMs } from './memsample';
import { ferryNodeOptions } from './vmm';

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function destination(sock: string, size: number, warm: boolean): Promise<void> {
  const mem = new (native().GuestMemory)(size, { hugepages: true });
  if (warm) new Uint8Array(mem.view(0, Math.min(size, 1 << 30))).fill(1); // fill: pages exist and are not zero
  for (let off = 1 << 30; warm && off < size; off += 1 << 30) new Uint8Array(mem.view(off, Math.min(1 << 30, size - off))).fill(1);
  const machine = new MemoryMachine(mem, 'inmigrate');
  const state = new MigrationStateMachine({ side: 'destination' });
  const listener = await listenIncoming(`unix:${sock}`);
  process.send?.('listening');
  const inc = new IncomingMigration(machine, state, { autostart: true });
  await inc.run(() => listener.accept());
  await listener.close();
  process.send?.(state.status === 'completed' ? 'ok' : `failed: ${inc.error?.message}`);
  mem.close();
}

async function source(size: number, warm: boolean, reps: number): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ram-pipe-'));
  const mem = new (native().GuestMemory)(size, { hugepages: true });
  for (let off = 0; off < size; off += 64 << 20) crypto.randomFillSync(new Uint8Array(mem.view(off, Math.min(64 << 20, size - off))));
  try {
    for (let rep = 0; rep < reps; rep++) {
      const sock = path.join(dir, `m${rep}.sock`);
      const child = spawn(process.execPath, [...ferryNodeOptions(), __filename, '--role', 'dst', '--sock', sock, '--size', String(size), ...(warm ? ['--warm'] : [])], {
        stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
      });
      const messages: string[] = [];
      const next = () => new Promise<string>((resolve) => child.once('message', (m) => resolve(String(m))));
      let msg = next();
      const m0 = await msg;
      if (m0 !== 'listening') throw new Error(`destination: ${m0}`);
      msg = next();
      const machine = new MemoryMachine(mem, 'running');
      const options = new MigrationOptions();
      options.setParameters({ 'max-bandwidth': 0 } as never);
      const state = new MigrationStateMachine({ side: 'source' });
      const stats = new RamStats();
      const out = new OutgoingMigration(machine, options, state, stats);
      state.setState('none', 'setup');
      const c0 = [cpuTimeMs(process.pid), cpuTimeMs(child.pid!)];
      const t0 = performance.now();
      await out.run((signal) => connectOutgoing(`unix:${sock}`, { signal }));
      const result = await msg;
      const ms = performance.now() - t0;
      const c1 = [cpuTimeMs(process.pid) - c0[0]!, cpuTimeMs(child.pid!) - c0[1]!];
      messages.push(result);
      await new Promise((r) => child.once('exit', r));
      console.log(
        `${(size / 1048576).toFixed(0)} MiB ${warm ? 'warm' : 'cold'} dst: ${ms.toFixed(0)} ms, ${(size / 1e6 / (ms / 1000)).toFixed(0)} MB/s, ` +
          `cpu src ${c1[0]!.toFixed(0)} / dst ${c1[1]!.toFixed(0)} ms, source ${state.status}, destination ${result}`,
      );
    }
  } finally {
    mem.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module) {
  const size = parseSize(arg('--size') ?? '1G');
  const warm = process.argv.includes('--warm');
  const run = arg('--role') === 'dst' ? destination(arg('--sock')!, size, warm) : source(size, warm, parseInt(arg('--reps') ?? '3', 10));
  run.catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
