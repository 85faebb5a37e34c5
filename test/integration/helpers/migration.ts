/**
 * Helpers for migration integration tests: a source/destination pair of
 * `ferry run` processes, driving `migrate` over QMP, waiting for a final
 * status, and comparing guest RAM through pmemsave.
 */
import assert from 'node:assert/strict';
import type { QmpClient } from '../../../lib/qmp/client';
import {
  quitFerry,
  sha256File,
  startFerryGuest,
  waitFor,
  type Proc,
  type TempDir,
} from './ferry';

export interface Guest {
  proc: Proc;
  qmp: QmpClient;
  serial: string;
  qmpPath: string;
}

export interface MigrationInfo {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  ram?: { transferred: number; total: number; remaining: number; 'dirty-sync-count': number; normal: number; duplicate: number; mbps: number };
}

export const TERMINAL = ['completed', 'failed', 'cancelled'];

/** Starts a source guest and a destination waiting on `incoming` (unix:DIR/mig.sock when omitted). */
export async function startPair(
  dir: TempDir,
  args: string[],
  opts: { incoming?: string; dstArgs?: string[]; srcArgs?: string[] } = {},
): Promise<{ src: Guest; dst: Guest; uri: string }> {
  const uri = opts.incoming ?? `unix:${dir.file('mig.sock')}`;
  const [src, dst] = await Promise.all([
    startFerryGuest(dir, 'src', [...args, ...(opts.srcArgs ?? [])]),
    startFerryGuest(dir, 'dst', [...args, ...(opts.dstArgs ?? []), '--incoming', uri]),
  ]);
  return { src, dst, uri };
}

export async function setup(qmp: QmpClient, caps: Record<string, boolean>, params: Record<string, unknown>): Promise<void> {
  const list = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
  if (list.length) await qmp.execute('migrate-set-capabilities', { capabilities: list });
  if (Object.keys(params).length) await qmp.execute('migrate-set-parameters', params);
}

export async function waitStatus(qmp: QmpClient, want: string[], timeoutMs: number): Promise<MigrationInfo> {
  return waitFor(
    `migration status in ${want.join('|')}`,
    timeoutMs,
    async () => {
      const info = await qmp.execute<MigrationInfo>('query-migrate');
      return info.status && want.includes(info.status) ? info : undefined;
    },
    undefined,
    50,
  );
}

export async function status(qmp: QmpClient): Promise<string | undefined> {
  return (await qmp.execute<{ status: string }>('query-status')).status;
}

/** pmemsave of [0, size) to DIR/NAME.ram; returns its sha256. */
export async function ramHash(dir: TempDir, g: Guest, name: string, size: number): Promise<string> {
  const file = dir.file(`${name}.ram`);
  await g.qmp.execute('pmemsave', { val: 0, size, filename: file }, { timeoutMs: 60_000 });
  return sha256File(file);
}

export async function quitAll(...guests: (Guest | undefined)[]): Promise<void> {
  await Promise.all(guests.filter((g): g is Guest => g !== undefined).map((g) => quitFerry(g.proc, g.qmp).catch(() => undefined)));
}

/** Events of `name` received by `qmp` so far (from its history). */
export function events(qmp: QmpClient, name: string): Record<string, unknown>[] {
  return qmp.history.filter((e) => e.event === name).map((e) => (e.data ?? {}) as Record<string, unknown>);
}

export function assertCompleted(info: MigrationInfo): void {
  assert.equal(info.status, 'completed', `migration ended ${info.status}: ${info['error-desc'] ?? ''}`);
}
