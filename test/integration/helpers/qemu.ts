/**
 * Helpers for integration tests that run QEMU 7.2 next to ferry: detection,
 * spawning with a QMP socket (driven by ferry's own QmpClient, which speaks
 * to QEMU unchanged), RAM-only machine arguments, random RAM
 * images and polling query-migrate until a final status.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';

import type { QmpClient } from '../../../lib/qmp/client';
import { Proc, connectQmp, sleep, type Exit, type TempDir } from './ferry';

export const QEMU = 'qemu-system-x86_64';
export const HAVE_QEMU = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;

/** `-M none -m SIZE`, RAM block 'ram' (zero-filled). */
export function qemuNoneArgs(sizeMiB: number): string[] {
  return ['-M', 'none', '-m', `${sizeMiB}M`];
}

/** `-M none` with RAM in a shared memory-backend-file: RAM block 'mem0', contents = the file. */
export function qemuMemFileArgs(sizeMiB: number, file: string): string[] {
  return [
    '-M',
    'none,memory-backend=mem0',
    '-m',
    `${sizeMiB}M`,
    '-object',
    `memory-backend-file,id=mem0,size=${sizeMiB}M,mem-path=${file},share=on`,
  ];
}

export interface QemuHandle {
  proc: Proc;
  qmp: QmpClient;
  qmpPath: string;
}

/** Starts QEMU with `-nodefaults -display none -qmp unix:DIR/NAME.qmp` plus `args`; waits for QMP. */
export async function startQemu(dir: TempDir, name: string, args: string[]): Promise<QemuHandle> {
  const qmpPath = dir.file(`${name}.qmp`);
  const proc = new Proc(QEMU, ['-nodefaults', '-display', 'none', '-qmp', `unix:${qmpPath},server=on,wait=off`, ...args], name);
  try {
    const qmp = await connectQmp(`unix:${qmpPath}`, 15_000, proc);
    return { proc, qmp, qmpPath };
  } catch (err) {
    await proc.kill();
    throw err;
  }
}

/** `quit`, then SIGKILL if QEMU is still there after `timeoutMs`. */
export async function stopQemu(h: QemuHandle | undefined, timeoutMs = 3000): Promise<Exit | undefined> {
  if (!h) return undefined;
  if (h.proc.running && !h.qmp.closed) await h.qmp.execute('quit').catch(() => undefined);
  try {
    return await h.proc.waitExit(timeoutMs).catch(() => undefined);
  } finally {
    await h.proc.kill();
    if (!h.qmp.closed) h.qmp.destroy();
  }
}

/**
 * Writes a RAM image of `size` bytes: random data, except every `zeroEvery`-th
 * 4 KiB page is zero (so both engines' zero-page paths are exercised).
 * Returns the content.
 */
export function writeRandomImage(file: string, size: number, zeroEvery = 7): Buffer {
  const buf = crypto.randomBytes(size);
  for (let off = 0; off < size; off += 4096 * zeroEvery) buf.fill(0, off, Math.min(size, off + 4096));
  fs.writeFileSync(file, buf);
  return buf;
}

export interface MigrateInfo {
  status?: string;
  'error-desc'?: string;
  ram?: { total: number; transferred: number; duplicate: number; normal: number };
  [k: string]: unknown;
}

/** Polls query-migrate until the status is completed, failed or cancelled. */
export async function waitMigrationEnd(qmp: QmpClient, label: string, timeoutMs = 20_000, proc?: Proc): Promise<MigrateInfo> {
  const end = Date.now() + timeoutMs;
  let last: MigrateInfo = {};
  for (;;) {
    last = await qmp.execute<MigrateInfo>('query-migrate');
    if (last.status === 'completed' || last.status === 'failed' || last.status === 'cancelled') return last;
    if (Date.now() > end) {
      throw new Error(`${label}: migration still '${last.status}' after ${timeoutMs} ms: ${JSON.stringify(last)}${proc ? `\n${proc.tail()}` : ''}`);
    }
    await sleep(20);
  }
}
