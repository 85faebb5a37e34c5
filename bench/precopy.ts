/**
 * Benchmark: precopy live migration, ferry -> ferry vs QEMU 7.2 -> QEMU 7.2,
 * same memwriter PVH image, same RAM size and command line, same transport
 * (a unix socket), max-bandwidth effectively unlimited on both
 * (107374182400 B/s, which ferry treats as no limit), downtime-limit 300 ms.
 *
 * Scenarios:
 *   a     idle 4G         ws=0                          (mostly never-touched RAM)
 *   b     random 2G       ws=0 fill=random              (every page non-zero, no dirtying)
 *   c50   dirty 1G        fill=random ws=256M rate=50M  (converging precopy)
 *   c200  dirty 1G        fill=random ws=256M rate=200M
 *
 * Per migration: start destination (-incoming) and source, wait for
 * `memwriter ready` + 2 ticks, sample both processes' memory beyond guest RAM
 * every 20 ms (see lib/memsample.ts), migrate, poll query-migrate until
 * completed, then require the destination to run and tick twice more with
 * errors=0 and no CORRUPT line: a fast but wrong migration is a failure.
 *
 * Engines alternate (ferry first on even repetitions, QEMU first on odd),
 * 3 repetitions by default (--quick: 1). Reported per scenario and engine:
 * best and spread (min..max) of total time, downtime, MB/s
 * (transferred / total time), QEMU's mbps field, peak memory beyond guest RAM
 * of source and destination; the ferry/QEMU ratios of the best values and of
 * the medians (the targets use the best values); and
 * a PASS/MISS line per target of the issue.
 *
 *   node dist/bench/precopy.js [--quick] [--reps N] [--only a,b,c50,c200]
 *        [--engines ferry,qemu] [--profile DIR] [--json FILE]
 *
 * --profile DIR runs the ferry processes with --cpu-prof into DIR and prints
 * the hot spots of each profile (bench/lib/cpuprofile.ts) restricted to the
 * migration window.
 */
import fs from 'node:fs';
import path from 'node:path';

import { summarizeProfile, formatProfileSummary } from './lib/cpuprofile';
import { MemSampler, cpuTimeMs, type MemSummary } from './lib/memsample';
import { warmHugePages } from './lib/warm';
import { TempDir, sleep, waitFor } from './lib/proc';
import { MIB, fmt, fmtSummary, ratio, summarize, table, type Summary } from './lib/stats';
import { ENGINES, checkGuestTicking, ferryNodeOptions, haveQemu, startVm, waitGuestReady, type Engine, type Vm, type VmSpec } from './lib/vmm';

export interface Scenario {
  id: string;
  name: string;
  spec: VmSpec;
}

const GIB = 1 << 30;

export const SCENARIOS: readonly Scenario[] = [
  { id: 'a', name: 'idle 4G ws=0', spec: { memory: '4G', ramBytes: 4 * GIB, append: 'ws=0' } },
  { id: 'b', name: '2G ws=0 fill=random', spec: { memory: '2G', ramBytes: 2 * GIB, append: 'ws=0 fill=random' } },
  { id: 'c50', name: '1G random ws=256M rate=50M', spec: { memory: '1G', ramBytes: GIB, append: 'fill=random ws=256M rate=50M' } },
  { id: 'c200', name: '1G random ws=256M rate=200M', spec: { memory: '1G', ramBytes: GIB, append: 'fill=random ws=256M rate=200M' } },
];

/** "Unlimited" for QEMU (its default is 128 MiB/s); ferry treats it as no limit too. */
export const MAX_BANDWIDTH = 107374182400;
export const DOWNTIME_LIMIT_MS = 300;
/** Target of the issue: neither ferry process holds more than this beyond guest RAM. */
export const BEYOND_LIMIT = 64 * MIB;

export interface PrecopyOptions {
  reps: number;
  only?: string[];
  engines: Engine[];
  /** Directory for ferry CPU profiles (enables --cpu-prof). */
  profileDir?: string;
  /** Memory sampling interval (ms). */
  sampleMs: number;
  /** Pause before each trial (ms): see COLD_PAUSE_MS. */
  pauseMs: number;
  /**
   * Touch and free RAM-size of huge pages right before each migration that
   * populates destination RAM (bench/lib/warm.ts), so both destinations
   * receive into warm memory. Off (--cold): pause pauseMs before each trial
   * instead, so both start on cold memory.
   */
  warm: boolean;
}

/**
 * Free page reporting on these machines (virtio-balloon, page_reporting_order
 * 9) hands freed 2 MiB blocks back to the host, and the next first touch of
 * such memory costs several times a warm one; huge pages (both VMMs madvise
 * guest RAM) come from such blocks. Without care, whichever engine runs
 * second gets the memory the first one just freed, still warm: measured
 * here, a 2 GiB receive took 0.8 s of destination CPU warm vs 4-5 s cold.
 * Default: warm RAM-size right before each migrate (bench/lib/warm.ts). With
 * --cold, pause this long instead, past the reporting delay, so every trial
 * starts on cold memory (less reproducible: reporting also waits for enough
 * free memory to accumulate).
 */
export const COLD_PAUSE_MS = 4000;

export const DEFAULTS: PrecopyOptions = { reps: 3, engines: [...ENGINES], sampleMs: 20, pauseMs: 300, warm: true };

export interface Trial {
  scenario: string;
  engine: Engine;
  rep: number;
  ok: boolean;
  error?: string;
  totalMs: number;
  downtimeMs: number;
  setupMs: number;
  transferred: number;
  /** transferred / total time, 10^6 bytes per second. */
  mbPerS: number;
  /** query-migrate ram.mbps (megabits/s). */
  mbps: number;
  syncs: number;
  /** RAM bytes sent while the guest was stopped (query-migrate ram.downtime-bytes). */
  downtimeBytes: number;
  /** CPU time (all threads) of the source and destination from migrate to completion, ms. */
  srcCpuMs: number;
  dstCpuMs: number;
  src?: MemSummary;
  dst?: MemSummary;
  /** Wall time of the whole trial (boot to teardown), ms. */
  wallMs: number;
  profiles?: { src?: string; dst?: string };
}

export interface PrecopyResult {
  options: PrecopyOptions;
  qemuAvailable: boolean;
  trials: Trial[];
  wallMs: number;
}

interface MigrateInfo {
  status: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  ram?: { transferred: number; mbps: number; 'dirty-sync-count'?: number; 'downtime-bytes'?: number };
}

function newestFile(dir: string, ext: string): string | undefined {
  if (!fs.existsSync(dir)) return undefined;
  const files = fs.readdirSync(dir).filter((f) => f.endsWith(ext));
  if (files.length === 0) return undefined;
  return files.map((f) => path.join(dir, f)).sort((x, y) => fs.statSync(y).mtimeMs - fs.statSync(x).mtimeMs)[0];
}

async function runTrial(sc: Scenario, engine: Engine, rep: number, opts: PrecopyOptions, log: (s: string) => void): Promise<Trial> {
  const t0 = performance.now();
  const dir = new TempDir(`ferry-bench-precopy-${sc.id}-`);
  const trial: Trial = { scenario: sc.id, engine, rep, ok: false, totalMs: NaN, downtimeMs: NaN, setupMs: NaN, transferred: NaN, mbPerS: NaN, mbps: NaN, syncs: NaN, downtimeBytes: NaN, srcCpuMs: NaN, dstCpuMs: NaN, wallMs: NaN };
  const uri = `unix:${dir.file('mig.sock')}`;
  const profDir = (role: string) => (opts.profileDir ? path.join(opts.profileDir, `${sc.id}-${engine}-${rep}-${role}`) : undefined);
  const nodeOptions = (role: string) => {
    const o = ferryNodeOptions();
    const d = profDir(role);
    if (d) o.push('--cpu-prof', `--cpu-prof-dir=${d}`);
    return o;
  };
  let src: Vm | undefined;
  let dst: Vm | undefined;
  let srcMem: MemSampler | undefined;
  let dstMem: MemSampler | undefined;
  try {
    dst = await startVm(engine, sc.spec, { dir, name: 'dst', incoming: uri, nodeOptions: nodeOptions('dst') });
    src = await startVm(engine, sc.spec, { dir, name: 'src', nodeOptions: nodeOptions('src') });
    await waitGuestReady(src, 2, 180_000);
    for (const vm of [src, dst]) {
      await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': MAX_BANDWIDTH, 'downtime-limit': DOWNTIME_LIMIT_MS });
    }
    srcMem = new MemSampler(src.pid, sc.spec.ramBytes, opts.sampleMs);
    dstMem = new MemSampler(dst.pid, sc.spec.ramBytes, opts.sampleMs);
    srcMem.start();
    dstMem.start();
    // Warm memory for the destination to receive into, right before the
    // migration (after the source's boot); scenario a populates almost none.
    if (opts.warm && sc.spec.append.includes('fill=random')) warmHugePages(sc.spec.ramBytes);
    const cpu0 = [cpuTimeMs(src.pid), cpuTimeMs(dst.pid)];
    await src.qmp.execute('migrate', { uri });
    const source = src;
    const info = await waitFor<MigrateInfo>(
      `migration ${sc.id} (${engine}) to complete`,
      300_000,
      async () => {
        const q = (await source.qmp.execute('query-migrate')) as MigrateInfo;
        if (q.status === 'failed' || q.status === 'cancelled') throw new Error(`migration ${q.status}: ${q['error-desc'] ?? ''}\n${source.describe()}`);
        // QEMU 7.2 was seen answering `completed` with total-time and downtime 0 (its
        // migration thread stores the times just after the status): poll until they are in.
        return q.status === 'completed' && (q['total-time'] ?? 0) > 0 ? q : undefined;
      },
      () => `${source.describe()}\n${dst!.describe()}`,
      50,
    );
    trial.srcCpuMs = cpuTimeMs(src.pid) - cpu0[0]!;
    trial.dstCpuMs = cpuTimeMs(dst.pid) - cpu0[1]!;
    await checkGuestTicking(dst, 2, 30_000);
    trial.src = srcMem.stop();
    trial.dst = dstMem.stop();
    trial.totalMs = info['total-time'] ?? NaN;
    trial.downtimeMs = info.downtime ?? NaN;
    trial.setupMs = info['setup-time'] ?? NaN;
    trial.transferred = info.ram?.transferred ?? NaN;
    trial.mbps = info.ram?.mbps ?? NaN;
    trial.syncs = info.ram?.['dirty-sync-count'] ?? NaN;
    trial.downtimeBytes = info.ram?.['downtime-bytes'] ?? NaN;
    trial.mbPerS = trial.transferred / 1e6 / (trial.totalMs / 1000);
    trial.ok = true;
  } catch (err) {
    trial.error = (err as Error).message;
  } finally {
    srcMem?.stop();
    dstMem?.stop();
    await Promise.all([src?.quit(), dst?.quit()]);
    dir.cleanup();
  }
  if (opts.profileDir && engine === 'ferry') {
    trial.profiles = { src: newestFile(profDir('src')!, '.cpuprofile'), dst: newestFile(profDir('dst')!, '.cpuprofile') };
  }
  trial.wallMs = performance.now() - t0;
  const mem = (m?: MemSummary) => (m ? `${fmt(m.peakBeyond / MIB, 1)}` : '-');
  log(
    trial.ok
      ? `  ${sc.id.padEnd(4)} ${engine.padEnd(5)} #${rep}: total ${trial.totalMs} ms, downtime ${trial.downtimeMs} ms ` +
          `(${fmt(trial.downtimeBytes / MIB, 1)} MiB, ${trial.syncs} syncs), ` +
          `${fmt(trial.mbPerS)} MB/s (mbps ${fmt(trial.mbps)}), beyond RAM src ${mem(trial.src)} / dst ${mem(trial.dst)} MiB, ` +
          `cpu src ${fmt(trial.srcCpuMs)} / dst ${fmt(trial.dstCpuMs)} ms ` +
          `[${fmt(trial.wallMs / 1000, 1)} s]`
      : `  ${sc.id.padEnd(4)} ${engine.padEnd(5)} #${rep}: FAILED ${trial.error?.split('\n')[0]}`,
  );
  return trial;
}

export async function benchPrecopy(opts: PrecopyOptions = DEFAULTS, log: (s: string) => void = console.log): Promise<PrecopyResult> {
  const t0 = performance.now();
  const qemuAvailable = haveQemu();
  let engines = opts.engines;
  if (!qemuAvailable && engines.includes('qemu')) {
    log('  QEMU not found on PATH: ferry only, no ratios');
    engines = engines.filter((e) => e !== 'qemu');
  }
  const scenarios = SCENARIOS.filter((s) => !opts.only || opts.only.includes(s.id));
  const trials: Trial[] = [];
  for (let rep = 0; rep < opts.reps; rep++) {
    for (const sc of scenarios) {
      const order = rep % 2 === 0 ? engines : [...engines].reverse();
      for (const engine of order) {
        await sleep(opts.pauseMs);
        trials.push(await runTrial(sc, engine, rep, opts, log));
      }
    }
  }
  return { options: opts, qemuAvailable, trials, wallMs: performance.now() - t0 };
}

interface Cell {
  total: Summary;
  downtime: Summary;
  mbPerS: Summary;
  mbps: Summary;
  srcBeyond: Summary;
  dstBeyond: Summary;
  failed: number;
}

function cell(trials: readonly Trial[]): Cell {
  const ok = trials.filter((t) => t.ok);
  return {
    total: summarize(ok.map((t) => t.totalMs), 'lower'),
    downtime: summarize(ok.map((t) => t.downtimeMs), 'lower'),
    mbPerS: summarize(ok.map((t) => t.mbPerS), 'higher'),
    mbps: summarize(ok.map((t) => t.mbps), 'higher'),
    srcBeyond: summarize(ok.map((t) => (t.src?.peakBeyond ?? NaN) / MIB), 'lower'),
    dstBeyond: summarize(ok.map((t) => (t.dst?.peakBeyond ?? NaN) / MIB), 'lower'),
    failed: trials.length - ok.length,
  };
}

export interface TargetLine {
  name: string;
  pass: boolean | undefined;
  detail: string;
}

export function evaluateTargets(r: PrecopyResult): TargetLine[] {
  const out: TargetLine[] = [];
  const get = (sc: string, e: Engine) => cell(r.trials.filter((t) => t.scenario === sc && t.engine === e));
  const has = (sc: string, e: Engine) => r.trials.some((t) => t.scenario === sc && t.engine === e && t.ok);
  if (has('b', 'ferry') && has('b', 'qemu')) {
    const f = get('b', 'ferry').mbPerS.best;
    const q = get('b', 'qemu').mbPerS.best;
    out.push({ name: '(b) ferry throughput >= QEMU', pass: f >= q, detail: `${fmt(f)} vs ${fmt(q)} MB/s (${ratio(f, q)})` });
  }
  for (const sc of ['a', 'c50', 'c200']) {
    if (!has(sc, 'ferry') || !has(sc, 'qemu')) continue;
    const f = get(sc, 'ferry').total.best;
    const q = get(sc, 'qemu').total.best;
    out.push({ name: `(${sc}) ferry total time <= QEMU`, pass: f <= q, detail: `${fmt(f)} vs ${fmt(q)} ms (${ratio(f, q)})` });
  }
  for (const sc of ['c50', 'c200']) {
    if (!has(sc, 'ferry')) continue;
    const d = get(sc, 'ferry').downtime;
    out.push({
      name: `(${sc}) ferry downtime <= ${DOWNTIME_LIMIT_MS} ms (every run)`,
      pass: d.max <= DOWNTIME_LIMIT_MS,
      detail: `${fmtSummary(d)} ms`,
    });
  }
  const ferry = r.trials.filter((t) => t.engine === 'ferry' && t.ok);
  if (ferry.length > 0) {
    let worst = 0;
    let where = '';
    for (const t of ferry) {
      for (const [role, m] of [['src', t.src], ['dst', t.dst]] as const) {
        if (m && m.peakBeyond > worst) {
          worst = m.peakBeyond;
          where = `${t.scenario} #${t.rep} ${role}`;
        }
      }
    }
    out.push({ name: `ferry beyond guest RAM <= ${BEYOND_LIMIT / MIB} MiB (every process, every run)`, pass: worst <= BEYOND_LIMIT, detail: `peak ${fmt(worst / MIB, 1)} MiB (${where})` });
  }
  const failed = r.trials.filter((t) => !t.ok);
  out.push({ name: 'every migration correct (destination ticks, errors=0)', pass: failed.length === 0, detail: `${r.trials.length - failed.length}/${r.trials.length} ok` });
  return out;
}

export function formatPrecopy(r: PrecopyResult): string {
  const rows: string[][] = [];
  const ratioRows: string[][] = [];
  for (const sc of SCENARIOS) {
    const cells = new Map<Engine, Cell>();
    for (const e of ENGINES) {
      const ts = r.trials.filter((t) => t.scenario === sc.id && t.engine === e);
      if (ts.length === 0) continue;
      const c = cell(ts);
      cells.set(e, c);
      rows.push([
        `${sc.id} ${sc.name}`,
        e,
        fmtSummary(c.total),
        fmtSummary(c.downtime),
        fmtSummary(c.mbPerS),
        fmtSummary(c.mbps),
        fmtSummary(c.srcBeyond, 1),
        fmtSummary(c.dstBeyond, 1),
        c.failed ? `${c.failed} failed` : 'ok',
      ]);
    }
    const f = cells.get('ferry');
    const q = cells.get('qemu');
    if (f && q) {
      ratioRows.push([
        `${sc.id} ${sc.name}`,
        ratio(f.total.best, q.total.best),
        ratio(f.downtime.best, q.downtime.best),
        ratio(f.mbPerS.best, q.mbPerS.best),
        ratio(f.srcBeyond.best, q.srcBeyond.best),
        ratio(f.dstBeyond.best, q.dstBeyond.best),
        ratio(f.total.median, q.total.median),
        ratio(f.downtime.median, q.downtime.median),
        ratio(f.mbPerS.median, q.mbPerS.median),
      ]);
    }
  }
  const parts = [
    `precopy migration, unix socket, max-bandwidth ${MAX_BANDWIDTH}, downtime-limit ${DOWNTIME_LIMIT_MS} ms; ` +
      `${r.options.reps} run(s) per engine, ${r.options.warm ? 'warm memory' : 'cold memory'}; best (min..max); memory = peak beyond guest RAM, MiB`,
    table(['scenario', 'engine', 'total ms', 'downtime ms', 'MB/s', 'mbps', 'src MiB', 'dst MiB', 'runs'], rows),
  ];
  if (ratioRows.length > 0) {
    parts.push('', 'ferry/QEMU (best values, then medians: on a noisy host the median says more; lower is better except MB/s)');
    parts.push(table(['scenario', 'total', 'downtime', 'MB/s', 'src mem', 'dst mem', 'med total', 'med downtime', 'med MB/s'], ratioRows));
  }
  parts.push('', 'targets:');
  for (const t of evaluateTargets(r)) parts.push(`  ${t.pass === undefined ? 'N/A ' : t.pass ? 'PASS' : 'MISS'}  ${t.name}: ${t.detail}`);
  const profiled = r.trials.filter((t) => t.profiles);
  if (profiled.length > 0) {
    parts.push('', 'ferry CPU profiles (migration window, self time):');
    for (const t of profiled) {
      for (const role of ['src', 'dst'] as const) {
        const file = t.profiles?.[role];
        if (!file) continue;
        try {
          parts.push(`-- ${t.scenario} #${t.rep} ${role}: ${file}`);
          parts.push(formatProfileSummary(summarizeProfile(file, { window: 'migration' }), 12));
        } catch (err) {
          parts.push(`  (cannot read: ${(err as Error).message})`);
        }
      }
    }
  }
  parts.push('', `wall time ${fmt(r.wallMs / 1000, 1)} s`);
  return parts.join('\n');
}

export function parseArgs(argv: readonly string[]): PrecopyOptions & { json?: string } {
  const o: PrecopyOptions & { json?: string } = { ...DEFAULTS, engines: [...DEFAULTS.engines] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--quick') o.reps = 1;
    else if (a === '--reps') o.reps = Math.max(1, parseInt(val(), 10) || 1);
    else if (a === '--only') o.only = val().split(',');
    else if (a === '--engines') o.engines = val().split(',') as Engine[];
    else if (a === '--profile') o.profileDir = path.resolve(val());
    else if (a === '--json') o.json = val();
    else if (a === '--sample-ms') o.sampleMs = Math.max(5, parseInt(val(), 10) || 20);
    else if (a === '--pause-ms') o.pauseMs = Math.max(0, parseInt(val(), 10) || 0);
    else if (a === '--cold') {
      o.warm = false;
      o.pauseMs = COLD_PAUSE_MS;
    }
    else throw new Error(`unknown option ${a} (--quick, --reps N, --only a,b,c50,c200, --engines ferry,qemu, --profile DIR, --json FILE, --sample-ms N, --pause-ms N, --cold)`);
  }
  for (const e of o.engines) if (!ENGINES.includes(e)) throw new Error(`unknown engine ${e}`);
  for (const s of o.only ?? []) if (!SCENARIOS.some((x) => x.id === s)) throw new Error(`unknown scenario ${s} (a, b, c50, c200)`);
  return o;
}

async function main(argv: string[]): Promise<number> {
  const o = parseArgs(argv);
  console.log(`== precopy: ferry vs QEMU 7.2 live migration (${o.reps} rep(s))`);
  const r = await benchPrecopy(o, (s) => console.log(s));
  console.log(formatPrecopy(r));
  if (o.json) fs.writeFileSync(o.json, JSON.stringify(r, null, 1));
  return r.trials.every((t) => t.ok) ? 0 : 1;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (err) => {
      console.error((err as Error).stack ?? err);
      process.exitCode = 2;
    },
  );
}
