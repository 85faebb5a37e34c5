/**
 * Summary of a V8 .cpuprofile (node --cpu-prof): self and inclusive time per
 * function, optionally restricted to the migration window (first to last
 * sample inside the engine's transfer/complete (source) or load (destination)
 * in lib/migration/), so the boot and the idle wait before `migrate` do not
 * drown the hot spots.
 *
 *   node dist/bench/lib/cpuprofile.js FILE.cpuprofile [--all] [--top N]
 */
import fs from 'node:fs';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface FunctionTime {
  name: string;
  selfMs: number;
  totalMs: number;
}

export interface ProfileSummary {
  file: string;
  windowMs: number;
  idleMs: number;
  gcMs: number;
  programMs: number;
  functions: FunctionTime[];
}

/** Window selection: 'migration' (default) or 'all'. */
export interface SummarizeOptions {
  window?: 'migration' | 'all';
}

const MIGRATION_FILE = /\/lib\/migration\/(source|destination|ram)\.js$/;
const MIGRATION_FN = /^(transfer|complete|load|loadSection|encodeSome)$/;

function label(cf: CallFrame): string {
  const name = cf.functionName || '(anonymous)';
  if (!cf.url) return name;
  const m = /\/((?:lib|bench|test)\/.*)$/.exec(cf.url);
  const file = m ? m[1] : cf.url.split('/').pop();
  return `${name} ${file}:${cf.lineNumber + 1}`;
}

export function summarizeProfile(file: string, opts: SummarizeOptions = {}): ProfileSummary {
  const prof = JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of prof.nodes) byId.set(n.id, n);
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

  // Per node: its label and whether its stack touches the migration code.
  const stackOf = new Map<number, string[]>();
  const inMigration = new Map<number, boolean>();
  const stack = (id: number): string[] => {
    let s = stackOf.get(id);
    if (s) return s;
    const n = byId.get(id)!;
    const p = parent.get(id);
    const up = p === undefined ? [] : stack(p);
    s = [...up, label(n.callFrame)];
    stackOf.set(id, s);
    const cf = n.callFrame;
    inMigration.set(id, (p !== undefined && inMigration.get(p) === true) || (MIGRATION_FILE.test(cf.url) && MIGRATION_FN.test(cf.functionName)));
    return s;
  };

  const samples = prof.samples;
  // timeDeltas[i] is the gap before sample i; a sample "costs" the gap after it.
  const cost = samples.map((_, i) => (prof.timeDeltas[i + 1] ?? 0) / 1000);
  let first = 0;
  let last = samples.length - 1;
  if ((opts.window ?? 'migration') === 'migration') {
    first = -1;
    for (let i = 0; i < samples.length; i++) {
      stack(samples[i]!);
      if (inMigration.get(samples[i]!)) {
        if (first < 0) first = i;
        last = i;
      }
    }
    if (first < 0) {
      first = 0;
      last = samples.length - 1;
    }
  }

  const self = new Map<string, number>();
  const total = new Map<string, number>();
  let windowMs = 0;
  let idleMs = 0;
  let gcMs = 0;
  let programMs = 0;
  for (let i = first; i <= last; i++) {
    const id = samples[i]!;
    const c = cost[i]!;
    windowMs += c;
    const s = stack(id);
    const leaf = byId.get(id)!.callFrame.functionName;
    if (leaf === '(idle)') {
      idleMs += c;
      continue;
    }
    if (leaf === '(garbage collector)') gcMs += c;
    if (leaf === '(program)') programMs += c;
    const top = s[s.length - 1]!;
    self.set(top, (self.get(top) ?? 0) + c);
    for (const f of new Set(s)) total.set(f, (total.get(f) ?? 0) + c);
  }
  const functions = [...total.entries()]
    .map(([name, totalMs]) => ({ name, totalMs, selfMs: self.get(name) ?? 0 }))
    .filter((f) => f.name !== '(root)');
  return { file, windowMs, idleMs, gcMs, programMs, functions };
}

export function formatProfileSummary(s: ProfileSummary, top = 15): string {
  const busy = s.windowMs - s.idleMs;
  const pct = (ms: number) => `${((100 * ms) / Math.max(busy, 1e-9)).toFixed(1)}%`;
  const lines = [
    `   window ${s.windowMs.toFixed(0)} ms, busy ${busy.toFixed(0)} ms (idle ${s.idleMs.toFixed(0)} ms), GC ${pct(s.gcMs)}, (program) ${pct(s.programMs)} of busy`,
    '   self      incl.     function',
  ];
  const bySelf = [...s.functions].sort((a, b) => b.selfMs - a.selfMs).slice(0, top);
  for (const f of bySelf) lines.push(`   ${pct(f.selfMs).padStart(6)}   ${pct(f.totalMs).padStart(6)}   ${f.name}`);
  return lines.join('\n');
}

/** Inclusive-time view (callers of the hot spots). */
export function formatInclusive(s: ProfileSummary, top = 15): string {
  const busy = s.windowMs - s.idleMs;
  const pct = (ms: number) => `${((100 * ms) / Math.max(busy, 1e-9)).toFixed(1)}%`;
  const byTotal = [...s.functions].sort((a, b) => b.totalMs - a.totalMs).slice(0, top);
  return ['   incl.     self      function', ...byTotal.map((f) => `   ${pct(f.totalMs).padStart(6)}   ${pct(f.selfMs).padStart(6)}   ${f.name}`)].join('\n');
}

if (require.main === module) {
  const args = process.argv.slice(2);
  const all = args.includes('--all');
  const topAt = args.indexOf('--top');
  const top = topAt >= 0 ? parseInt(args[topAt + 1] ?? '15', 10) : 15;
  for (const f of args.filter((a, i) => !a.startsWith('--') && (topAt < 0 || i !== topAt + 1))) {
    const s = summarizeProfile(f, { window: all ? 'all' : 'migration' });
    console.log(`== ${f}`);
    console.log(formatProfileSummary(s, top));
    console.log(formatInclusive(s, top));
  }
}
