/**
 * `ferry run` options: parseRunOptions(argv) turns the words after `run` into
 * a validated RunOptions or throws a CliUsageError (exit code 2) whose message
 * names the option, what was wrong and what is accepted. The help text comes
 * from the commander definition in run-cmd.ts, loaded only for --help:
 * commander takes ~15 ms to load, a tenth of the time to a booted guest.
 *
 * QEMU spellings work too, so a QEMU command line needs few edits:
 * -m, -smp, -S, -qmp, -serial, -append, -incoming, -machine / -M, -mem-path,
 * -kernel (= --guest). They are rewritten to the long options, and only where
 * an option is expected (never inside a value such as `--append -S`).
 *
 * Validation that needs the world (does the guest image exist?) goes through
 * RunOptionsEnv so tests can replace it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors';
import { QmpAddressError, parseQmpAddress, type QmpAddress } from '../qmp/protocol';
import { SizeError, parseSize } from '../util/size';
import type * as RunCmdModule from './run-cmd';

export const ERR_USAGE = 'ERR_USAGE';

/** A command-line mistake: print the message and exit with `exitCode` (2). */
export class CliUsageError extends FerryError {
  readonly exitCode = 2;
  /** The subcommand whose --help the user should read ('run'), or '' for the program. */
  readonly command: string;
  constructor(message: string, command = 'run') {
    super(ERR_USAGE, message);
    this.name = 'CliUsageError';
    this.command = command;
  }
}

/** `--help` was asked for: `text` is the help to print (exit code 0). */
export class CliHelpRequested extends FerryError {
  readonly text: string;
  constructor(text: string) {
    super('ERR_HELP_REQUESTED', 'help requested');
    this.text = text;
  }
}

export type SerialConfig = { type: 'stdio' } | { type: 'none' } | { type: 'file'; path: string };

export type IncomingConfig = { type: 'defer' } | { type: 'uri'; uri: string };

export type MachineType = 'pvh' | 'none';

export interface GuestImage {
  /** The built-in guest's name, when given by name. */
  name?: string;
  /** Absolute path of the PVH ELF image. */
  path: string;
}

/** Everything `ferry run` was asked to do, validated. */
export interface RunOptions {
  machine: MachineType;
  /** Guest RAM in bytes (a multiple of 4 KiB). */
  memory: number;
  /** Number of vCPUs. */
  cpus: number;
  /** Absent only with --machine none, or with --incoming (the stream brings the state). */
  guest?: GuestImage;
  /** Guest kernel command line ('' when not given). */
  append: string;
  serial: SerialConfig;
  /** QMP servers to listen on (may be empty). */
  qmp: QmpAddress[];
  /** Start with the vCPUs stopped (QEMU -S); `cont` starts them. */
  paused: boolean;
  /** Wait for an incoming migration instead of booting. */
  incoming?: IncomingConfig;
  /** Back guest RAM with this file (absolute path), shared. */
  memPath?: string;
}

export const DEFAULT_MEMORY = 128 * 1024 * 1024; // QEMU's default -m
/** Values of the options not given (as words, before validation). */
export const RUN_DEFAULTS = { memory: '128M', cpus: '1', serial: 'stdio', machine: 'pvh' } as const;
export const MAX_CPUS = 255;

/** What parseRunOptions asks of the outside world (replaceable in tests). */
export interface RunOptionsEnv {
  /** Built-in guests: name and absolute image path (and whether it was built). */
  listGuests(): { name: string; path: string; built?: boolean }[];
  /** Is there a regular file at this absolute path? */
  isFile(p: string): boolean;
  /** Validates a migration URI; throws with a message when it does not parse. */
  checkMigrationUri(uri: string): void;
  cwd(): string;
}

export const defaultRunOptionsEnv: RunOptionsEnv = {
  listGuests: () => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const mod = require('../guests') as { listGuests(): { name: string; path: string; built?: boolean }[] };
    return mod.listGuests();
  },
  isFile: (p) => {
    try {
      return fs.statSync(p).isFile();
    } catch {
      return false;
    }
  },
  checkMigrationUri: (uri) => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const mod = require('../transport/address') as { parseMigrationUri(u: string): unknown };
    mod.parseMigrationUri(uri);
  },
  cwd: () => process.cwd(),
};

interface OptSpec {
  /** The canonical long option. */
  long: string;
  short?: string;
  /** Other spellings accepted (QEMU's single-dash forms, aliases). */
  aliases: string[];
  /** Placeholder for the value, or undefined for a flag. */
  value?: string;
}

/** Every option `ferry run` knows, for the rewrite pass and typo suggestions. */
const SPECS: OptSpec[] = [
  { long: '--memory', short: '-m', aliases: ['-memory'], value: 'SIZE' },
  { long: '--cpus', aliases: ['--smp', '-smp', '-cpus'], value: 'N' },
  { long: '--guest', aliases: ['-kernel', '--kernel', '-guest'], value: 'NAME|PATH' },
  { long: '--append', aliases: ['-append'], value: 'STRING' },
  { long: '--serial', aliases: ['-serial'], value: 'DEST' },
  { long: '--qmp', aliases: ['-qmp'], value: 'ADDRESS' },
  { long: '--paused', short: '-S', aliases: ['-paused'] },
  { long: '--incoming', aliases: ['-incoming'], value: 'URI|defer' },
  { long: '--machine', short: '-M', aliases: ['-machine'], value: 'TYPE' },
  { long: '--mem-path', aliases: ['-mem-path'], value: 'FILE' },
  { long: '--help', short: '-h', aliases: ['-help'] },
];

/** Optimal string alignment distance (Levenshtein plus transpositions). */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** The closest candidate within a small edit distance, or undefined. */
export function closest(word: string, candidates: string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const c of candidates) {
    const d = editDistance(word.toLowerCase(), c.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = c;
    }
  }
  const limit = Math.max(1, Math.min(3, Math.floor(word.length / 3)));
  return bestD <= limit ? best : undefined;
}

/** Finds the spec for an option word (any accepted spelling). */
function specFor(word: string): OptSpec | undefined {
  return SPECS.find((s) => s.long === word || s.short === word || s.aliases.includes(word));
}

function suggestOption(word: string): string | undefined {
  const bare = word.replace(/^-+/, '');
  const names: [string, OptSpec][] = [];
  for (const s of SPECS) {
    for (const n of [s.long, ...s.aliases]) names.push([n.replace(/^-+/, ''), s]);
  }
  const hit = closest(
    bare,
    names.map(([n]) => n),
  );
  if (hit !== undefined) return names.find(([n]) => n === hit)![1].long;
  // An abbreviation: --mem -> --memory or --mem-path.
  const longs = [...new Set(names.filter(([n]) => bare.length >= 2 && n.startsWith(bare)).map(([, s]) => s.long))];
  if (longs.length > 0 && longs.length <= 3) return longs.join(' or ');
  return undefined;
}

/**
 * Rewrites QEMU spellings to the long options, splits `--opt=value`, and
 * rejects unknown options, missing values and stray arguments.
 */
function normalise(argv: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i];
    if (word === '--') {
      if (i + 1 < argv.length) throw new CliUsageError(`ferry run: unexpected argument '${argv[i + 1]}' (ferry run takes only options)`);
      break;
    }
    if (!word.startsWith('-') || word === '-') {
      throw new CliUsageError(`ferry run: unexpected argument '${word}' (ferry run takes only options; see ferry run --help)`);
    }
    let name = word;
    let inline: string | undefined;
    const eq = word.indexOf('=');
    if (word.startsWith('--') && eq > 0) {
      name = word.slice(0, eq);
      inline = word.slice(eq + 1);
    } else if (/^-[A-Za-z]./.test(word) && !specFor(word)) {
      // A short option with its value attached: -m256M.
      const short = specFor(word.slice(0, 2));
      if (short?.short === word.slice(0, 2) && short.value !== undefined) {
        name = word.slice(0, 2);
        inline = word.slice(2);
      }
    }
    const spec = specFor(name);
    if (!spec) {
      const hint = suggestOption(name);
      throw new CliUsageError(`ferry run: unknown option '${name}'${hint ? ` (did you mean ${hint}?)` : ''}`);
    }
    if (spec.value === undefined) {
      if (inline !== undefined) throw new CliUsageError(`ferry run: ${spec.long} takes no value (got '${word}')`);
      out.push(spec.long);
      continue;
    }
    let value = inline;
    if (value === undefined) {
      const next = argv[i + 1];
      if (next === undefined || (next.startsWith('-') && specFor(next.split('=')[0]) !== undefined && spec.long !== '--append')) {
        throw new CliUsageError(`ferry run: ${spec.long} needs a value (${spec.value})`);
      }
      value = next;
      i++;
    }
    out.push(`${spec.long}=${value}`);
  }
  return out;
}

interface RawOpts {
  memory: string;
  cpus: string;
  guest?: string;
  append?: string;
  serial: string;
  qmp?: string[];
  paused?: boolean;
  incoming?: string;
  machine: string;
  memPath?: string;
}

/** The normalised words (`--long=value`, `--flag`) as options, with the defaults; the last value wins, --qmp repeats. */
function rawOptions(words: string[]): RawOpts {
  const raw: RawOpts = { ...RUN_DEFAULTS };
  for (const w of words) {
    const eq = w.indexOf('=');
    const name = eq < 0 ? w : w.slice(0, eq);
    const value = eq < 0 ? '' : w.slice(eq + 1);
    switch (name) {
      case '--memory': raw.memory = value; break;
      case '--cpus': raw.cpus = value; break;
      case '--guest': raw.guest = value; break;
      case '--append': raw.append = value; break;
      case '--serial': raw.serial = value; break;
      case '--qmp': (raw.qmp ??= []).push(value); break;
      case '--paused': raw.paused = true; break;
      case '--incoming': raw.incoming = value; break;
      case '--machine': raw.machine = value; break;
      case '--mem-path': raw.memPath = value; break;
    }
  }
  return raw;
}

function usage(option: string, value: string, why: string): CliUsageError {
  return new CliUsageError(`ferry run: ${option} '${value}': ${why}`);
}

function parseMemory(text: string): number {
  let v = text;
  if (v.startsWith('size=')) v = v.slice(5);
  if (v.includes(',')) throw usage('--memory', text, 'memory hotplug options (slots=, maxmem=) are not supported (expected a SIZE such as 256M)');
  let bytes: number;
  try {
    bytes = parseSize(v, { defaultUnit: 'M' });
  } catch (e) {
    if (e instanceof SizeError) throw usage('--memory', text, e.reason);
    throw e;
  }
  if (bytes < 1 << 20) throw usage('--memory', text, 'too small (at least 1M)');
  if (bytes % 4096 !== 0) throw usage('--memory', text, 'not a multiple of 4K (the page size)');
  return bytes;
}

function parseCpus(text: string): number {
  const v = text.startsWith('cpus=') ? text.slice(5) : text;
  if (v.includes(',')) throw usage('--cpus', text, 'CPU topology (sockets=, cores=, threads=, maxcpus=) is not supported (expected a number of vCPUs)');
  if (!/^[0-9]+$/.test(v)) throw usage('--cpus', text, `not a whole number (expected 1-${MAX_CPUS})`);
  const n = Number(v);
  if (n < 1 || n > MAX_CPUS) throw usage('--cpus', text, `out of range (expected 1-${MAX_CPUS})`);
  return n;
}

function parseSerial(text: string, env: RunOptionsEnv): SerialConfig {
  if (text === 'stdio') return { type: 'stdio' };
  if (text === 'none' || text === 'null') return { type: 'none' };
  if (text.startsWith('file:')) {
    const p = text.slice(5);
    if (p === '') throw usage('--serial', text, 'empty file name (expected file:PATH)');
    return { type: 'file', path: path.resolve(env.cwd(), p) };
  }
  throw usage('--serial', text, 'unknown destination (expected stdio, file:PATH or none)');
}

function parseMachine(text: string): MachineType {
  const v = text.split(',')[0];
  if (v !== text) throw usage('--machine', text, 'machine properties are not supported (expected pvh or none)');
  if (v === 'pvh' || v === 'microvm') return 'pvh';
  if (v === 'none') return 'none';
  const hint = closest(v, ['pvh', 'none', 'microvm']);
  throw usage('--machine', text, `unknown machine type (expected pvh or none)${hint ? `; did you mean ${hint}?` : ''}`);
}

function parseGuest(text: string, env: RunOptionsEnv): GuestImage {
  if (text === '') throw usage('--guest', text, 'empty (expected a built-in guest name or a path to a PVH ELF image)');
  const looksLikePath = text.includes('/') || text.endsWith('.elf');
  if (!looksLikePath) {
    const guests = env.listGuests();
    const g = guests.find((x) => x.name === text);
    if (g) {
      if (g.built === false || !env.isFile(g.path)) {
        throw usage('--guest', text, `the image ${g.path} has not been built (run: npm run build:guests)`);
      }
      return { name: g.name, path: g.path };
    }
    const abs = path.resolve(env.cwd(), text);
    if (env.isFile(abs)) return { path: abs };
    const names = guests.map((x) => x.name);
    const hint = closest(text, names);
    throw usage(
      '--guest',
      text,
      `no built-in guest of that name${hint ? ` (did you mean ${hint}?)` : ''}; expected one of ${names.join(', ')} or the path of a PVH ELF image`,
    );
  }
  const abs = path.resolve(env.cwd(), text);
  if (!env.isFile(abs)) throw usage('--guest', text, `no such file (${abs})`);
  return { path: abs };
}

function parseIncoming(text: string, env: RunOptionsEnv): IncomingConfig {
  if (text === 'defer') return { type: 'defer' };
  try {
    env.checkMigrationUri(text);
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    throw usage('--incoming', text, `${msg.replace(/^invalid migration URI '.*?': /, '')} (or defer)`);
  }
  return { type: 'uri', uri: text };
}

/**
 * Parses the words after `ferry run` into RunOptions. Throws CliUsageError
 * (exit code 2) for anything wrong, CliHelpRequested for -h/--help.
 */
export function parseRunOptions(argv: string[], env: RunOptionsEnv = defaultRunOptionsEnv): RunOptions {
  const words = normalise(argv);
  if (words.includes('--help')) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { runHelpText } = require('./run-cmd') as typeof RunCmdModule;
    throw new CliHelpRequested(runHelpText());
  }
  const raw = rawOptions(words);
  const machine = parseMachine(raw.machine);
  const opts: RunOptions = {
    machine,
    memory: parseMemory(raw.memory),
    cpus: parseCpus(raw.cpus),
    append: raw.append ?? '',
    serial: parseSerial(raw.serial, env),
    qmp: (raw.qmp ?? []).map((a) => {
      try {
        return parseQmpAddress(a);
      } catch (e) {
        if (e instanceof QmpAddressError) throw usage('--qmp', a, e.reason);
        throw e;
      }
    }),
    paused: raw.paused === true,
  };
  if (raw.incoming !== undefined) opts.incoming = parseIncoming(raw.incoming, env);
  if (raw.memPath !== undefined) {
    if (raw.memPath === '') throw usage('--mem-path', raw.memPath, 'empty file name');
    opts.memPath = path.resolve(env.cwd(), raw.memPath);
  }
  if (raw.guest !== undefined) {
    if (machine === 'none') throw new CliUsageError('ferry run: --guest cannot be used with --machine none (that machine has no vCPUs)');
    opts.guest = parseGuest(raw.guest, env);
  } else if (machine === 'pvh' && opts.incoming === undefined) {
    throw new CliUsageError(
      "ferry run: --guest is required with --machine pvh (a built-in name from 'ferry guests' or a PVH ELF path), unless --incoming is given",
    );
  }
  if (raw.append !== undefined && machine === 'none') throw new CliUsageError('ferry run: --append needs a guest; --machine none has none');
  const seen = new Set<string>();
  for (const q of opts.qmp) {
    const key = q.type === 'unix' ? `unix:${q.path}` : `tcp:${q.host}:${q.port}`;
    if (seen.has(key) && !(q.type === 'tcp' && q.port === 0)) throw usage('--qmp', key, 'given twice');
    seen.add(key);
  }
  return opts;
}
