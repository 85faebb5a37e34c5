/**
 * Summaries of repeated measurements on a noisy machine: the best value
 * (min for costs, max for rates) and the spread min..max, and a plain-text
 * table printer.
 */

export type Better = 'lower' | 'higher';

export interface Summary {
  best: number;
  min: number;
  max: number;
  /** Middle value (mean of the two middle ones for an even count). */
  median: number;
  n: number;
}

export function summarize(values: readonly number[], better: Better): Summary {
  const v = values.filter((x) => Number.isFinite(x));
  if (v.length === 0) return { best: NaN, min: NaN, max: NaN, median: NaN, n: 0 };
  const min = Math.min(...v);
  const max = Math.max(...v);
  const sorted = [...v].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  return { best: better === 'lower' ? min : max, min, max, median, n: v.length };
}

export function fmt(x: number, digits = 0): string {
  if (!Number.isFinite(x)) return '-';
  return x.toFixed(digits);
}

/** "best (min..max)"; just "best" for a single run. */
export function fmtSummary(s: Summary, digits = 0): string {
  if (s.n === 0) return '-';
  if (s.n === 1 || s.min === s.max) return fmt(s.best, digits);
  return `${fmt(s.best, digits)} (${fmt(s.min, digits)}..${fmt(s.max, digits)})`;
}

export function ratio(a: number, b: number): string {
  if (!Number.isFinite(a) || !Number.isFinite(b) || b === 0) return '-';
  return `${(a / b).toFixed(2)}x`;
}

export const MIB = 1024 * 1024;

/** Left-aligned first column, right-aligned others. */
export function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: readonly string[]) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}
