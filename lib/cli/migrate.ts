/**
 * `ferry migrate`: drives a migration on a source over QMP (works against
 * ferry and QEMU alike), shows progress and prints a summary.
 *
 * Progress: a bar on a TTY (cli-progress), one plain line per second
 * otherwise. Exit status: 0 when the migration completed, 1 otherwise.
 */
import cliProgress from 'cli-progress';
import { QmpClient } from '../qmp/client';
import { FerryError } from '../errors';

export interface MigrateCommandOptions {
  qmp: string;
  to: string;
  caps: Record<string, boolean>;
  params: Record<string, unknown>;
  /** Poll interval of query-migrate (ms). */
  intervalMs?: number;
  /** Where lines go (default process.stderr for progress, stdout for the summary). */
  out?: NodeJS.WritableStream;
  err?: NodeJS.WritableStream;
  /** Force plain log lines even on a TTY. */
  plain?: boolean;
}

export interface MigrationSummary {
  status: string;
  totalTimeMs: number;
  downtimeMs: number;
  setupTimeMs: number;
  transferred: number;
  total: number;
  normal: number;
  duplicate: number;
  mbps: number;
  passes: number;
  errorDesc?: string;
}

interface RamInfo {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  mbps: number;
  'dirty-sync-count': number;
  'dirty-pages-rate': number;
  'page-size': number;
}

interface MigrationInfo {
  status?: string;
  ram?: RamInfo;
  'total-time'?: number;
  'expected-downtime'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

/** NAME=VALUE parsing for --param: numbers stay numbers, on/off/true/false become booleans. */
export function parseParamValue(v: string): unknown {
  if (/^-?\d+$/.test(v)) return Number(v);
  if (v === 'true' || v === 'on') return true;
  if (v === 'false' || v === 'off') return false;
  return v;
}

export function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function formatLine(info: MigrationInfo): string {
  const ram = info.ram;
  if (!ram) return `status ${info.status ?? 'none'}`;
  const pct = ram.total > 0 ? Math.min(100, ((ram.total - ram.remaining) / ram.total) * 100) : 0;
  const rate = ram['dirty-pages-rate'] * (ram['page-size'] || 4096);
  const etaS = ram.mbps > 0 ? (ram.remaining * 8) / (ram.mbps * 1e6) : NaN;
  return (
    `${info.status} ${pct.toFixed(0)}% transferred ${mib(ram.transferred)} of ${mib(ram.total)}, ` +
    `${ram.mbps.toFixed(0)} Mbit/s, dirty ${mib(rate)}/s, pass ${ram['dirty-sync-count']}, ` +
    `expected downtime ${info['expected-downtime'] ?? 0} ms, ETA ${Number.isFinite(etaS) ? etaS.toFixed(1) + ' s' : '?'}`
  );
}

/** Runs the migration to its end and returns the summary. */
export async function runMigrate(opts: MigrateCommandOptions): Promise<MigrationSummary> {
  const err = opts.err ?? process.stderr;
  const client = await QmpClient.connect(opts.qmp).catch((e: Error) => {
    throw new FerryError('ERR_QMP_CONNECT', `ferry migrate: cannot reach QMP at ${opts.qmp}: ${e.message}`, { cause: e });
  });
  try {
    const caps = Object.entries({ events: true, ...opts.caps }).map(([capability, state]) => ({ capability, state }));
    await client.execute('migrate-set-capabilities', { capabilities: caps });
    if (Object.keys(opts.params).length > 0) await client.execute('migrate-set-parameters', opts.params);
    await client.execute('migrate', { uri: opts.to });

    const tty = !opts.plain && (err as NodeJS.WriteStream).isTTY === true;
    const bar = tty
      ? new cliProgress.SingleBar(
          {
            format: '{bar} {percentage}% | {done} of {all} MiB | {mbps} Mbit/s | dirty {dirty} MiB/s | pass {pass} | exp. downtime {edt} ms | ETA {etaS}',
            stream: err as NodeJS.WriteStream,
            hideCursor: true,
          },
          cliProgress.Presets.shades_classic,
        )
      : undefined;
    let lastLine = 0;
    let info: MigrationInfo = {};
    bar?.start(100, 0, { done: 0, all: 0, mbps: 0, dirty: 0, pass: 0, edt: 0, etaS: '?' });
    for (;;) {
      info = await client.execute<MigrationInfo>('query-migrate');
      const ram = info.ram;
      if (bar && ram) {
        const pct = ram.total > 0 ? ((ram.total - ram.remaining) / ram.total) * 100 : 0;
        const eta = ram.mbps > 0 ? `${((ram.remaining * 8) / (ram.mbps * 1e6)).toFixed(1)} s` : '?';
        bar.update(Math.min(100, Math.round(pct)), {
          done: (ram.transferred / 1048576).toFixed(0),
          all: (ram.total / 1048576).toFixed(0),
          mbps: ram.mbps.toFixed(0),
          dirty: ((ram['dirty-pages-rate'] * 4096) / 1048576).toFixed(1),
          pass: ram['dirty-sync-count'],
          edt: info['expected-downtime'] ?? 0,
          etaS: eta,
        });
      } else if (!bar && Date.now() - lastLine >= 1000) {
        err.write(`ferry migrate: ${formatLine(info)}\n`);
        lastLine = Date.now();
      }
      if (info.status && TERMINAL.has(info.status)) break;
      await new Promise((r) => setTimeout(r, opts.intervalMs ?? 200));
    }
    if (bar) {
      if (info.status === 'completed') bar.update(100);
      bar.stop();
    }
    const ram = info.ram;
    return {
      status: info.status ?? 'none',
      totalTimeMs: info['total-time'] ?? 0,
      downtimeMs: info.downtime ?? 0,
      setupTimeMs: info['setup-time'] ?? 0,
      transferred: ram?.transferred ?? 0,
      total: ram?.total ?? 0,
      normal: ram?.normal ?? 0,
      duplicate: ram?.duplicate ?? 0,
      mbps: ram?.mbps ?? 0,
      passes: ram?.['dirty-sync-count'] ?? 0,
      errorDesc: info['error-desc'],
    };
  } finally {
    await client.close();
  }
}

export function formatSummary(s: MigrationSummary): string {
  const lines = [
    `migration ${s.status}`,
    `  total time      ${s.totalTimeMs} ms (setup ${s.setupTimeMs} ms)`,
    `  downtime        ${s.downtimeMs} ms`,
    `  transferred     ${mib(s.transferred)} of ${mib(s.total)} RAM (${s.normal} full pages, ${s.duplicate} zero pages)`,
    `  throughput      ${s.mbps.toFixed(0)} Mbit/s`,
    `  dirty-log syncs ${s.passes}`,
  ];
  if (s.errorDesc) lines.push(`  error           ${s.errorDesc}`);
  return lines.join('\n');
}
