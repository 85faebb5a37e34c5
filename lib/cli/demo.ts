/**
 * `ferry demo`: the README's main job. Starts a source `memwriter` and a
 * destination waiting for it (two ferry processes), migrates live over a
 * unix socket with a progress bar, prints the summary, then checks the guest
 * on the destination: ticks continue from the source's last tick, errors=0.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseGuestOutput } from '../guests';
import { QmpClient } from '../qmp/client';
import { waitFor } from '../util/wait';
import { ferryArgv } from './launch';
import { formatSummary, runMigrate } from './migrate';

export interface DemoOptions {
  memory: string;
  append: string;
  keep?: boolean;
}

function startFerry(args: string[], log: string): ChildProcess {
  const out = fs.openSync(log, 'a');
  const child = spawn(process.execPath, ferryArgv(['run', ...args]), { stdio: ['ignore', out, out] });
  fs.closeSync(out);
  return child;
}

function ticks(file: string) {
  const text = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
  return parseGuestOutput(text).filter((l) => l.kind === 'memwriter-tick') as Extract<ReturnType<typeof parseGuestOutput>[number], { kind: 'memwriter-tick' }>[];
}

async function quit(qmp: string, child: ChildProcess): Promise<void> {
  try {
    const c = await QmpClient.connect(qmp, { timeoutMs: 2000 });
    await c.execute('quit').catch(() => undefined);
    await c.close();
  } catch {
    child.kill('SIGTERM');
  }
  if (child.exitCode === null) await new Promise((r) => child.once('exit', r));
}

export async function runDemo(opts: DemoOptions): Promise<number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-demo-'));
  const f = (n: string) => path.join(dir, n);
  const common = ['--guest', 'memwriter', '--memory', opts.memory, '--append', opts.append];
  const say = (s: string) => process.stdout.write(`${s}\n`);
  say(`ferry demo: memwriter, ${opts.memory} RAM, '${opts.append}'; logs in ${dir}`);
  const src = startFerry([...common, '--serial', `file:${f('src.serial')}`, '--qmp', `unix:${f('src.qmp')}`], f('src.log'));
  const dst = startFerry([...common, '--serial', `file:${f('dst.serial')}`, '--qmp', `unix:${f('dst.qmp')}`, '--incoming', `unix:${f('migrate.sock')}`], f('dst.log'));
  let code = 1;
  try {
    await waitFor('the source guest to be ready', 30_000, () => (ticks(f('src.serial')).length >= 3 ? true : undefined));
    await waitFor('the destination to listen', 10_000, () => (fs.existsSync(f('migrate.sock')) ? true : undefined));
    say('source guest is ticking; migrating live...');
    const summary = await runMigrate({ qmp: `unix:${f('src.qmp')}`, to: `unix:${f('migrate.sock')}`, caps: { 'return-path': true }, params: { 'max-bandwidth': 0 } });
    say(formatSummary(summary));
    if (summary.status !== 'completed') return 1;
    const last = ticks(f('src.serial')).at(-1)!;
    const after = await waitFor('ticks on the destination', 15_000, () => {
      const t = ticks(f('dst.serial'));
      return t.length >= 3 ? t : undefined;
    });
    const first = after[0]!;
    const lastDst = after.at(-1)!;
    const continued = first.n === last.n + 1;
    const clean = after.every((t) => t.errors === 0) && last.errors === 0;
    const growing = lastDst.writes > first.writes || opts.append.includes('ws=0');
    say(
      `guest check: source's last tick ${last.n}, destination's first tick ${first.n} (${continued ? 'continues' : 'DOES NOT continue'}), ` +
        `errors=${lastDst.errors}, writes ${first.writes} -> ${lastDst.writes}`,
    );
    code = continued && clean && growing ? 0 : 1;
    say(code === 0 ? 'ferry demo: OK, the guest kept running on the destination with its memory intact' : 'ferry demo: FAILED');
    return code;
  } finally {
    await Promise.all([quit(`unix:${f('src.qmp')}`, src), quit(`unix:${f('dst.qmp')}`, dst)]);
    if (!opts.keep && code === 0) fs.rmSync(dir, { recursive: true, force: true });
  }
}
