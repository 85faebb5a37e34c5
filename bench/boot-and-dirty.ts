/**
 * Benchmark: ferry vs QEMU 7.2 (-M microvm -accel kvm) on the same memwriter
 * image and RAM size.
 *
 *   ready     process start -> "memwriter ready" on the serial file
 *   rate      the guest's page writes per second at rate=0 (from its own
 *             tick lines: TSC-timed, so host polling does not blur it)
 *   beyond    resident memory of the process beyond guest RAM: the sum of
 *             Rss over /proc/PID/smaps minus the Rss of the guest-RAM mapping
 *             (the anonymous mapping exactly RAM-sized); the guest touches
 *             only its image and a small working set (fill=zero)
 *
 * Engines alternate (ferry, qemu, qemu, ferry, ...) for `rounds` rounds;
 * reported: best and spread (max - min) per engine, and ferry/qemu ratios.
 * Targets: ready no later than QEMU, write rate within 10 %, beyond <= 64 MiB.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

import { guestPath } from '../lib/guests';
import { QmpClient } from '../lib/qmp/client';
import { Proc, TempDir, memwriterTicks, readText, sleep, spawnFerryRun, waitFor } from '../test/integration/helpers/ferry';

export interface BootDirtyOptions {
  ramMiB: number;
  append: string;
  rounds: number;
  /** Tick lines to average the write rate over. */
  rateTicks: number;
}

export const DEFAULTS: BootDirtyOptions = { ramMiB: 1024, append: 'ws=32M rate=0 fill=zero', rounds: 3, rateTicks: 15 };

type Engine = 'ferry' | 'qemu';

export interface Sample {
  engine: Engine;
  readyMs: number;
  pagesPerSec: number;
  beyondMiB: number;
  rssMiB: number;
}

export interface BootDirtyResult {
  options: BootDirtyOptions;
  samples: Sample[];
  qemuAvailable: boolean;
}

function haveQemu(): boolean {
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Total Rss and the guest-RAM mapping's Rss (kB) from /proc/PID/smaps. */
export function smapsRss(pid: number, ramKiB: number): { totalKiB: number; ramRssKiB: number } {
  const text = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8');
  let total = 0;
  let ram = 0;
  let size = 0;
  let anon = false;
  let best = { size: 0, rss: 0 };
  for (const line of text.split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+(?:\s+(.*))?$/.exec(line);
    if (head) {
      anon = !head[1] || head[1].trim() === '';
      continue;
    }
    const m = /^(Size|Rss):\s+(\d+) kB/.exec(line);
    if (!m) continue;
    const v = Number(m[2]);
    if (m[1] === 'Size') size = v;
    else {
      total += v;
      if (anon && size === ramKiB) ram += v;
      if (anon && size > best.size) best = { size, rss: v };
    }
  }
  // No exactly RAM-sized mapping (split VMAs): fall back to the largest anonymous one.
  if (ram === 0 && best.size >= ramKiB / 2) ram = best.rss;
  return { totalKiB: total, ramRssKiB: ram };
}

async function runOnce(engine: Engine, opts: BootDirtyOptions, dir: TempDir, round: number): Promise<Sample> {
  const serial = dir.file(`${engine}${round}.serial`);
  const qmpPath = dir.file(`${engine}${round}.qmp`);
  const image = guestPath('memwriter');
  const t0 = performance.now();
  const proc =
    engine === 'ferry'
      ? spawnFerryRun(['--guest', 'memwriter', '--memory', `${opts.ramMiB}M`, '--append', opts.append, '--serial', `file:${serial}`, '--qmp', `unix:${qmpPath}`], 'ferry')
      : new Proc(
          'qemu-system-x86_64',
          ['-M', 'microvm', '-accel', 'kvm', '-m', `${opts.ramMiB}M`, '-smp', '1', '-nodefaults', '-display', 'none',
            '-serial', `file:${serial}`, '-qmp', `unix:${qmpPath},server=on,wait=off`, '-kernel', image, '-append', opts.append],
          'qemu',
        );
  let qmp: QmpClient | undefined;
  try {
    await waitFor(
      'memwriter ready',
      60_000,
      () => {
        if (!proc.running) throw new Error(`${engine} exited early\n${proc.tail()}`);
        return readText(serial).includes('memwriter ready');
      },
      () => proc.tail(),
      2,
    );
    const readyMs = performance.now() - t0;
    const ticks = await waitFor(`${opts.rateTicks + 2} ticks`, 60_000, () => {
      const t = memwriterTicks(serial);
      return t.length >= opts.rateTicks + 2 ? t : undefined;
    }, () => proc.tail());
    // Skip the first tick (it may cover the end of the fill).
    const a = ticks[1]!;
    const b = ticks[opts.rateTicks + 1]!;
    const pagesPerSec = (b.writes - a.writes) / ((b.n - a.n) * 0.1);
    if (ticks.some((t) => t.errors !== 0)) throw new Error(`${engine}: memwriter reported errors`);
    const { totalKiB, ramRssKiB } = smapsRss(proc.pid, opts.ramMiB * 1024);
    qmp = await QmpClient.connect(`unix:${qmpPath}`, { timeoutMs: 5000 });
    await qmp.execute('quit').catch(() => undefined);
    await proc.waitExit(10_000);
    return { engine, readyMs, pagesPerSec, beyondMiB: (totalKiB - ramRssKiB) / 1024, rssMiB: totalKiB / 1024 };
  } finally {
    qmp?.destroy();
    await proc.kill();
  }
}

export async function benchBootAndDirty(opts: BootDirtyOptions = DEFAULTS, log: (s: string) => void = () => {}): Promise<BootDirtyResult> {
  if (!fs.existsSync(guestPath('memwriter'))) throw new Error('memwriter is not built (npm run build:guests)');
  const qemuAvailable = haveQemu();
  const dir = new TempDir('ferry-bench-');
  const samples: Sample[] = [];
  try {
    for (let r = 0; r < opts.rounds; r++) {
      const order: Engine[] = !qemuAvailable ? ['ferry'] : r % 2 === 0 ? ['ferry', 'qemu'] : ['qemu', 'ferry'];
      for (const e of order) {
        const s = await runOnce(e, opts, dir, r);
        samples.push(s);
        log(`  round ${r + 1} ${e.padEnd(5)} ready ${s.readyMs.toFixed(0)} ms, ${(s.pagesPerSec / 1e6).toFixed(3)} M pages/s, beyond guest RAM ${s.beyondMiB.toFixed(1)} MiB (RSS ${s.rssMiB.toFixed(1)} MiB)`);
        await sleep(200);
      }
    }
  } finally {
    dir.cleanup();
  }
  return { options: opts, samples, qemuAvailable };
}

interface Stat {
  best: number;
  spread: number;
}

function stat(values: number[], higherIsBetter: boolean): Stat {
  const best = higherIsBetter ? Math.max(...values) : Math.min(...values);
  return { best, spread: Math.max(...values) - Math.min(...values) };
}

/** The side-by-side table, with target verdicts. */
export function formatBootAndDirty(res: BootDirtyResult): string {
  const by = (e: Engine) => res.samples.filter((s) => s.engine === e);
  const f = by('ferry');
  const q = by('qemu');
  const rows: { name: string; key: keyof Sample; hi: boolean; fmt: (v: number) => string; target: (fv: number, qv: number | undefined) => string }[] = [
    { name: 'ready (ms)', key: 'readyMs', hi: false, fmt: (v) => v.toFixed(0), target: (fv, qv) => (qv === undefined ? 'n/a' : fv <= qv ? 'ok (<= qemu)' : 'MISSED (> qemu)') },
    {
      name: 'page writes/s',
      key: 'pagesPerSec',
      hi: true,
      fmt: (v) => `${(v / 1e6).toFixed(3)}M`,
      target: (fv, qv) => (qv === undefined ? 'n/a' : fv >= 0.9 * qv ? 'ok (>= 90% of qemu)' : 'MISSED (< 90% of qemu)'),
    },
    { name: 'beyond guest RAM (MiB)', key: 'beyondMiB', hi: false, fmt: (v) => v.toFixed(1), target: (fv) => (fv <= 64 ? 'ok (<= 64 MiB)' : 'MISSED (> 64 MiB)') },
    { name: 'total RSS (MiB)', key: 'rssMiB', hi: false, fmt: (v) => v.toFixed(1), target: () => '' },
  ];
  const o = res.options;
  const lines = [
    `boot-and-dirty: memwriter '${o.append}', ${o.ramMiB} MiB RAM, ${o.rounds} rounds alternating; best (spread)`,
    `${'metric'.padEnd(24)}${'ferry'.padEnd(22)}${'qemu 7.2 microvm'.padEnd(22)}${'ferry/qemu'.padEnd(12)}target`,
  ];
  for (const r of rows) {
    const fs_ = stat(f.map((s) => s[r.key] as number), r.hi);
    const qs = q.length ? stat(q.map((s) => s[r.key] as number), r.hi) : undefined;
    const cell = (s: Stat | undefined) => (s ? `${r.fmt(s.best)} (±${r.fmt(s.spread)})` : 'n/a');
    const ratio = qs ? (fs_.best / qs.best).toFixed(2) : 'n/a';
    lines.push(`${r.name.padEnd(24)}${cell(fs_).padEnd(22)}${cell(qs).padEnd(22)}${ratio.padEnd(12)}${r.target(fs_.best, qs?.best)}`);
  }
  if (!res.qemuAvailable) lines.push('(qemu-system-x86_64 not found: ferry only)');
  return lines.join('\n');
}

if (require.main === module) {
  benchBootAndDirty(DEFAULTS, (s) => console.log(s))
    .then((r) => console.log(formatBootAndDirty(r)))
    .catch((e: unknown) => {
      console.error(e);
      process.exitCode = 1;
    });
}
