/**
 * `npm run bench`: runs every benchmark in turn and prints its table.
 * `npm run bench -- NAME...` runs only the named ones; `--json` also prints
 * the raw results as one JSON line per benchmark.
 *
 * Benchmarks compare ratios measured in one run (ferry vs QEMU, alternating),
 * never absolute times across runs: the machines are noisy and shared.
 */
import { benchBootAndDirty, DEFAULTS as BOOT_DIRTY_DEFAULTS, formatBootAndDirty } from './boot-and-dirty';
import { benchPrecopy, DEFAULTS as PRECOPY_DEFAULTS, formatPrecopy } from './precopy';

interface Bench {
  name: string;
  description: string;
  run(log: (s: string) => void): Promise<{ table: string; raw: unknown }>;
}

/** Every benchmark, in the order `npm run bench` runs them. Add new ones here. */
export const BENCHES: Bench[] = [
  {
    name: 'boot-and-dirty',
    description: 'boot to "memwriter ready", guest page-write rate, memory beyond guest RAM: ferry vs QEMU 7.2 microvm',
    async run(log) {
      const r = await benchBootAndDirty(BOOT_DIRTY_DEFAULTS, log);
      return { table: formatBootAndDirty(r), raw: r };
    },
  },
  {
    name: 'precopy',
    description: 'precopy live migration ferry->ferry vs QEMU 7.2->QEMU 7.2: total time, downtime, MB/s, memory beyond guest RAM',
    async run(log) {
      const r = await benchPrecopy({ ...PRECOPY_DEFAULTS, reps: process.argv.includes('--quick') ? 1 : PRECOPY_DEFAULTS.reps }, log);
      return { table: formatPrecopy(r), raw: r };
    },
  },
];

async function main(argv: string[]): Promise<number> {
  const json = argv.includes('--json');
  const names = argv.filter((a) => !a.startsWith('--'));
  const unknown = names.filter((n) => !BENCHES.some((b) => b.name === n));
  if (unknown.length) {
    console.error(`unknown benchmark(s): ${unknown.join(', ')}; known: ${BENCHES.map((b) => b.name).join(', ')}`);
    return 2;
  }
  const selected = names.length ? BENCHES.filter((b) => names.includes(b.name)) : BENCHES;
  let failed = 0;
  for (const b of selected) {
    console.log(`== ${b.name}: ${b.description}`);
    try {
      const { table, raw } = await b.run((s) => console.log(s));
      console.log(table);
      if (json) console.log(JSON.stringify({ bench: b.name, result: raw }));
    } catch (e) {
      failed++;
      console.error(`${b.name} failed: ${(e as Error).stack ?? e}`);
    }
    console.log('');
  }
  return failed ? 1 : 0;
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
