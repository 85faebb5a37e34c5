/**
 * Commander definitions of `ferry migrate` and `ferry demo`; the work is in
 * migrate.ts and demo.ts. Bad values are usage errors (exit 2) naming the
 * option, what was wrong and what is accepted.
 */
import { Command, InvalidArgumentError } from 'commander';
import type * as MigrateModule from './migrate';

// Loaded on use: `ferry run` goes through main.ts too and must start fast.
/* eslint-disable @typescript-eslint/no-require-imports */
const migrate = () => require('./migrate') as typeof MigrateModule;
const parseQmpAddress = (s: string) => (require('../qmp/protocol') as typeof import('../qmp/protocol')).parseQmpAddress(s);
const parseMigrationUri = (s: string) => (require('../transport/address') as typeof import('../transport/address')).parseMigrationUri(s);
const parseSize = (s: string) => (require('../util/size') as typeof import('../util/size')).parseSize(s);
/* eslint-enable @typescript-eslint/no-require-imports */

function capOption(value: string, prev: Record<string, boolean>): Record<string, boolean> {
  const m = /^([a-z][a-z0-9-]*)=(on|off|true|false)$/.exec(value);
  if (!m) throw new InvalidArgumentError(`'${value}' is not NAME=on|off (e.g. --cap return-path=on)`);
  return { ...prev, [m[1]!]: m[2] === 'on' || m[2] === 'true' };
}

function paramOption(value: string, prev: Record<string, unknown>): Record<string, unknown> {
  const m = /^([a-z][a-z0-9-]*)=(.+)$/.exec(value);
  if (!m) throw new InvalidArgumentError(`'${value}' is not NAME=VALUE (e.g. --param max-bandwidth=0)`);
  return { ...prev, [m[1]!]: migrate().parseParamValue(m[2]!) };
}

function qmpOption(value: string): string {
  try {
    parseQmpAddress(value);
  } catch (e) {
    throw new InvalidArgumentError((e as Error).message);
  }
  return value;
}

function uriOption(value: string): string {
  try {
    parseMigrationUri(value);
  } catch (e) {
    throw new InvalidArgumentError(`${(e as Error).message} (expected tcp:HOST:PORT, unix:PATH, fd:NAME, exec:COMMAND or file:PATH[,offset=N])`);
  }
  return value;
}

export function createMigrateCommand(setExit: (code: number) => void): Command {
  return new Command('migrate')
    .description('migrate the guest of a running ferry (or QEMU) to another, over QMP, with progress and a summary')
    .requiredOption('--qmp <addr>', "the source's QMP socket: unix:PATH or tcp:HOST:PORT", qmpOption)
    .requiredOption('--to <uri>', 'destination: tcp:HOST:PORT, unix:PATH, fd:NAME, exec:COMMAND or file:PATH[,offset=N]', uriOption)
    .option('--cap <name=on|off>', 'set a migration capability (repeatable), e.g. return-path=on', capOption, {})
    .option('--param <name=value>', 'set a migration parameter (repeatable), e.g. max-bandwidth=0 downtime-limit=300', paramOption, {})
    .option('--plain', 'log lines instead of a progress bar')
    .helpOption('-h, --help', 'show this help')
    .action(async (o: { qmp: string; to: string; cap: Record<string, boolean>; param: Record<string, unknown>; plain?: boolean }) => {
      const { runMigrate, formatSummary } = migrate();
      const s = await runMigrate({ qmp: o.qmp, to: o.to, caps: o.cap, params: o.param, plain: o.plain });
      process.stdout.write(`${formatSummary(s)}\n`);
      setExit(s.status === 'completed' ? 0 : 1);
    });
}

export function createDemoCommand(setExit: (code: number) => void): Command {
  return new Command('demo')
    .description('start a source and a destination memwriter, migrate live, print the summary and check the guest')
    .option('-m, --memory <size>', 'guest RAM', (v) => {
      try {
        parseSize(v);
      } catch (e) {
        throw new InvalidArgumentError((e as Error).message);
      }
      return v;
    }, '1G')
    .option('--append <args>', 'memwriter parameters', 'ws=256M rate=50M fill=random')
    .option('--keep', 'keep the logs and serial files')
    .helpOption('-h, --help', 'show this help')
    .action(async (o: { memory: string; append: string; keep?: boolean }) => {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const { runDemo } = require('./demo') as typeof import('./demo');
      setExit(await runDemo({ memory: o.memory, append: o.append, keep: o.keep }));
    });
}
