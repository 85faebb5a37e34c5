/**
 * Memory of a VMM process beyond its guest RAM, sampled from /proc.
 *
 * Guest RAM is one (or a few) large anonymous mappings; everything else a
 * VMM keeps resident (heap, buffers, code, stacks) is "beyond guest RAM". A
 * sample reads /proc/PID/smaps once and splits the resident set into the
 * guest RAM mapping(s) and the rest; /proc/PID/status VmRSS is read just
 * after as a cross-check. The split comes from one smaps read because VmRSS
 * read before or after it is skewed by however much RAM a destination
 * received in between (hundreds of MB/s): Σ Rss(other mappings) is the same
 * quantity as VmRSS − Rss(guest RAM) without that skew.
 *
 * Guest RAM mappings are identified by size (QEMU names none of them; ferry's
 * is a plain anonymous mapping too): both VMMs map a single-block guest's RAM
 * as one mapping of exactly the RAM size (QEMU trims its alignment slack), so
 * the mapping(s) of RAM size up to a little slack are guest RAM.
 */
import fs from 'node:fs';

export interface MemSample {
  /** ms since the sampler started. */
  t: number;
  /** Σ Rss of the guest RAM mapping(s), bytes. */
  ramRss: number;
  /** Σ Rss of every other mapping, bytes. */
  beyond: number;
  /** VmRSS from /proc/PID/status, bytes (cross-check). */
  vmRss: number;
}

export interface MemSummary {
  samples: number;
  /** Peak of `beyond` (bytes) and when (ms). */
  peakBeyond: number;
  peakAt: number;
  /** `beyond` at the first sample (before the migration started). */
  firstBeyond: number;
  /** Peak of VmRSS − ramRss with VmRSS from status (bytes); close to peakBeyond. */
  peakStatusBeyond: number;
  /** Peak guest RAM Rss (bytes). */
  peakRamRss: number;
  /** Number of guest RAM mappings found. */
  ramMappings: number;
  /** Mean wall time of one sample (ms): the sampler's own cost. */
  meanSampleMs: number;
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) /;
/** Slack above the RAM size still taken for a RAM mapping (alignment, guard). */
const SLACK = 4 << 20;

/**
 * Parses smaps text into (guest RAM Rss, other Rss): RAM mappings are those
 * of `minBlock` to `ramBytes` + slack bytes (default: exactly the RAM size).
 */
export function splitSmaps(text: string, ramBytes: number, minBlock = ramBytes): { ramRss: number; other: number; ramMappings: number } {
  let ramRss = 0;
  let other = 0;
  let ramMappings = 0;
  let inRam = false;
  let pos = 0;
  const n = text.length;
  while (pos < n) {
    let eol = text.indexOf('\n', pos);
    if (eol < 0) eol = n;
    const c = text.charCodeAt(pos);
    if (c === 82 /* R */ && text.startsWith('Rss:', pos)) {
      const kb = parseInt(text.slice(pos + 4, eol), 10);
      if (inRam) ramRss += kb * 1024;
      else other += kb * 1024;
    } else if ((c >= 48 && c <= 57) || (c >= 97 && c <= 102)) {
      const m = HEADER.exec(text.slice(pos, Math.min(eol, pos + 40)));
      if (m) {
        const size = parseInt(m[2]!, 16) - parseInt(m[1]!, 16);
        inRam = size >= minBlock && size <= ramBytes + SLACK;
        if (inRam) ramMappings++;
      }
    }
    pos = eol + 1;
  }
  return { ramRss, other, ramMappings };
}

/** CPU time (user + system, all threads) of a process so far, ms. */
export function cpuTimeMs(pid: number): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return ((+f[11]! + +f[12]!) * 1000) / CLK_TCK;
  } catch {
    return NaN;
  }
}

/** USER_HZ: 100 on every Linux this runs on. */
const CLK_TCK = 100;

function readVmRss(pid: number): number {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'latin1');
  const m = /VmRSS:\s+(\d+) kB/.exec(s);
  return m ? +m[1]! * 1024 : 0;
}

/** Samples one process every `intervalMs` until stop(). */
export class MemSampler {
  private readonly samples: MemSample[] = [];
  private timer: NodeJS.Timeout | undefined;
  private readonly t0 = performance.now();
  private sampleMs = 0;
  private ramMappings = 0;
  private failed: Error | undefined;

  constructor(
    readonly pid: number,
    readonly ramBytes: number,
    readonly intervalMs = 20,
  ) {}

  start(): void {
    this.sample();
    this.timer = setInterval(() => this.sample(), this.intervalMs);
  }

  /** One sample now (also usable without start()). */
  sample(): MemSample | undefined {
    if (this.failed) return undefined;
    const a = performance.now();
    try {
      const text = fs.readFileSync(`/proc/${this.pid}/smaps`, 'latin1');
      const vmRss = readVmRss(this.pid);
      const s = splitSmaps(text, this.ramBytes);
      this.ramMappings = Math.max(this.ramMappings, s.ramMappings);
      const sample: MemSample = { t: a - this.t0, ramRss: s.ramRss, beyond: s.other, vmRss };
      this.samples.push(sample);
      this.sampleMs += performance.now() - a;
      return sample;
    } catch (err) {
      // The process exited (ENOENT/ESRCH): keep what we have.
      this.failed = err as Error;
      return undefined;
    }
  }

  stop(): MemSummary {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.sample();
    const s = this.samples;
    let peak = s[0];
    let peakStatus = 0;
    let peakRam = 0;
    for (const x of s) {
      if (!peak || x.beyond > peak.beyond) peak = x;
      peakStatus = Math.max(peakStatus, x.vmRss - x.ramRss);
      peakRam = Math.max(peakRam, x.ramRss);
    }
    return {
      samples: s.length,
      peakBeyond: peak?.beyond ?? NaN,
      peakAt: peak?.t ?? NaN,
      firstBeyond: s[0]?.beyond ?? NaN,
      peakStatusBeyond: peakStatus,
      peakRamRss: peakRam,
      ramMappings: this.ramMappings,
      meanSampleMs: s.length > 0 ? this.sampleMs / s.length : NaN,
    };
  }
}
