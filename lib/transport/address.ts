/**
 * Migration addresses: QEMU's URI syntax (`migrate uri=...`, `-incoming URI`) and QEMU's newer
 * `channels` form (qapi/migration.json `MigrationChannel` / `MigrationAddress`, QEMU 8.2+), both
 * parsed into one internal type that mirrors the QAPI JSON shape (a flat union on `transport`,
 * then on `type` for sockets), so a bound address can be reported back in QEMU's own format.
 *
 * URI forms (QEMU's migrate_uri_parse / socket_parse / inet_parse / file_parse_offset):
 *   tcp:HOST:PORT[,to=PORT][,ipv4[=on|off]][,ipv6[=on|off]][,keep-alive[=on|off]]
 *       HOST may be empty (any address when listening), a name, IPv4, or [IPv6] in brackets.
 *       PORT 0 when listening means "pick one"; the listener reports the one it got.
 *   unix:PATH              fd:NUMBER | fd:NAME     exec:COMMAND (run as /bin/sh -c COMMAND)
 *   file:PATH[,offset=N]   N takes QEMU's size suffixes (K, M, G, T, P, E; powers of 1024)
 * Not supported by ferry (rejected here with a clear message): vsock:, rdma:.
 * Difference from QEMU: PORT must be numeric (QEMU also takes service names such as 'http').
 */
import { MigrationUriError } from './errors';

export interface InetAddress {
  transport: 'socket';
  type: 'inet';
  host: string;
  /** A decimal string, as in QAPI. */
  port: string;
  /** Highest port to try when listening (QEMU's `to=`). */
  to?: number;
  ipv4?: boolean;
  ipv6?: boolean;
  numeric?: boolean;
  'keep-alive'?: boolean;
}

export interface UnixAddress {
  transport: 'socket';
  type: 'unix';
  path: string;
  /** Linux abstract namespace (no file). */
  abstract?: boolean;
  /** Only meaningful with abstract; Node always binds the tight form. */
  tight?: boolean;
}

export interface FdAddress {
  transport: 'socket';
  type: 'fd';
  /** A decimal fd number, or a name given to QMP `getfd`. */
  str: string;
}

export interface ExecAddress {
  transport: 'exec';
  /** argv; the URI form gives ['/bin/sh', '-c', COMMAND]. */
  args: string[];
}

export interface FileAddress {
  transport: 'file';
  filename: string;
  /** Byte offset where the stream starts. */
  offset: number;
}

export type SocketAddress = InetAddress | UnixAddress | FdAddress;
export type MigrationAddress = SocketAddress | ExecAddress | FileAddress;

/** sun_path is 108 bytes on Linux, one of them the terminating NUL. */
export const UNIX_PATH_MAX = 107;

function bad(uri: string, why: string): MigrationUriError {
  return new MigrationUriError(`invalid migration URI '${uri}': ${why}`);
}

const TCP_FORM = 'expected tcp:HOST:PORT';

function parsePort(uri: string, s: string, what: string): number {
  if (!/^[0-9]{1,5}$/.test(s) || Number(s) > 65535) {
    throw bad(uri, `${what} '${s}' is not a number between 0 and 65535 (${TCP_FORM})`);
  }
  return Number(s);
}

function parseFlag(uri: string, name: string, value: string | undefined): boolean {
  if (value === undefined || value === 'on' || value === 'yes' || value === 'true') return true;
  if (value === 'off' || value === 'no' || value === 'false') return false;
  throw bad(uri, `option '${name}' takes on or off, not '${value}'`);
}

/** The part after `tcp:`. */
function parseInet(uri: string, rest: string): InetAddress {
  let host: string;
  let after: string;
  if (rest.startsWith('[')) {
    const close = rest.indexOf(']');
    if (close < 0) throw bad(uri, `unterminated '[' in IPv6 address (expected tcp:[ADDRESS]:PORT)`);
    host = rest.slice(1, close);
    if (!host.includes(':')) throw bad(uri, `'${host}' in brackets is not an IPv6 address (expected tcp:[ADDRESS]:PORT)`);
    after = rest.slice(close + 1);
    if (!after.startsWith(':')) throw bad(uri, `missing ':PORT' after ']' (expected tcp:[ADDRESS]:PORT)`);
    after = after.slice(1);
  } else {
    const colon = rest.indexOf(':');
    if (colon < 0) throw bad(uri, TCP_FORM);
    host = rest.slice(0, colon);
    after = rest.slice(colon + 1);
    const comma = after.indexOf(',');
    if ((comma < 0 ? after : after.slice(0, comma)).includes(':')) {
      throw bad(uri, `IPv6 addresses must be in brackets (expected tcp:[ADDRESS]:PORT)`);
    }
  }
  const [portStr, ...opts] = after.split(',');
  if (portStr === '') throw bad(uri, `missing port (${TCP_FORM})`);
  const port = parsePort(uri, portStr!, 'port');
  const addr: InetAddress = { transport: 'socket', type: 'inet', host, port: String(port) };
  for (const opt of opts) {
    const eq = opt.indexOf('=');
    const name = eq < 0 ? opt : opt.slice(0, eq);
    const value = eq < 0 ? undefined : opt.slice(eq + 1);
    switch (name) {
      case 'to': {
        if (value === undefined) throw bad(uri, `option 'to' needs a port (to=PORT)`);
        const to = parsePort(uri, value, "option 'to'");
        if (to < port) throw bad(uri, `option 'to=${to}' is below the port ${port}`);
        addr.to = to;
        break;
      }
      case 'ipv4':
      case 'ipv6':
      case 'keep-alive':
        addr[name] = parseFlag(uri, name, value);
        break;
      default:
        throw bad(uri, `unknown option '${name}' (known: to, ipv4, ipv6, keep-alive)`);
    }
  }
  if (addr.ipv4 === false && addr.ipv6 === false) throw bad(uri, 'ipv4=off and ipv6=off leave no address family');
  return addr;
}

/**
 * QEMU's qemu_strtosz: decimal (a fraction only with a suffix) or 0x hex, then an optional
 * suffix B/K/M/G/T/P/E (powers of 1024, case-insensitive). The result must be a whole number
 * of bytes no larger than Number.MAX_SAFE_INTEGER (the largest offset Node's fs takes).
 */
export function parseSize(s: string): number | undefined {
  const m = /^(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)([bBkKmMgGtTpPeE]?)$/.exec(s);
  if (!m) return undefined;
  const [, num, suffix] = m;
  const isHex = /^0[xX]/.test(num!);
  if (num!.includes('.') && !suffix) return undefined;
  if (isHex && suffix && suffix.toUpperCase() !== 'B') return undefined;
  const unit = 1024 ** Math.max(0, 'BKMGTPE'.indexOf((suffix || 'B').toUpperCase()));
  const bytes = isHex ? Number(BigInt(num!)) * unit : Number(num) * unit;
  if (!Number.isSafeInteger(bytes)) return undefined;
  return bytes;
}

const OFFSET_OPTION = ',offset=';

/**
 * Parses a QEMU migration URI. Throws MigrationUriError (code ERR_MIGRATION_URI) with a
 * message naming the URI and the expected form.
 */
export function parseMigrationUri(uri: string): MigrationAddress {
  if (typeof uri !== 'string') throw new MigrationUriError(`migration URI must be a string, not ${typeof uri}`);
  const colon = uri.indexOf(':');
  const scheme = colon < 0 ? '' : uri.slice(0, colon);
  const rest = uri.slice(colon + 1);
  switch (scheme) {
    case 'tcp':
      return parseInet(uri, rest);
    case 'unix': {
      if (rest === '') throw bad(uri, 'expected unix:PATH');
      if (Buffer.byteLength(rest) > UNIX_PATH_MAX) {
        throw bad(uri, `socket path is ${Buffer.byteLength(rest)} bytes, longer than ${UNIX_PATH_MAX}`);
      }
      return { transport: 'socket', type: 'unix', path: rest };
    }
    case 'fd': {
      if (rest === '') throw bad(uri, 'expected fd:NUMBER or fd:NAME');
      checkFdName(rest, (why) => bad(uri, why));
      return { transport: 'socket', type: 'fd', str: rest };
    }
    case 'exec': {
      if (rest.trim() === '') throw bad(uri, 'expected exec:COMMAND');
      return { transport: 'exec', args: ['/bin/sh', '-c', rest] };
    }
    case 'file': {
      // Like QEMU: the first ",offset=" splits; everything after it is the size.
      const at = rest.indexOf(OFFSET_OPTION);
      const filename = at < 0 ? rest : rest.slice(0, at);
      if (filename === '') throw bad(uri, 'expected file:PATH[,offset=N]');
      let offset = 0;
      if (at >= 0) {
        const s = rest.slice(at + OFFSET_OPTION.length);
        const n = parseSize(s);
        if (n === undefined) throw bad(uri, `bad offset '${s}' (expected a byte count, optionally with K, M, G, T, P or E)`);
        offset = n;
      }
      return { transport: 'file', filename, offset };
    }
    case 'vsock':
    case 'rdma':
      throw bad(uri, `the ${scheme} transport is not supported by ferry`);
    default:
      throw new MigrationUriError(`unknown migration protocol: ${uri}`);
  }
}

/** QEMU's monitor_fd_param: a leading digit means a number, anything else a getfd name. */
function checkFdName(str: string, fail: (why: string) => Error): void {
  if (/^[0-9]/.test(str) && !/^[0-9]+$/.test(str)) throw fail(`invalid file descriptor number '${str}'`);
  if (/^[0-9]+$/.test(str) && !Number.isSafeInteger(Number(str))) throw fail(`invalid file descriptor number '${str}'`);
}

// ---------------------------------------------------------------------------------------------
// channels (QMP migrate / migrate-incoming `channels` argument)

type Json = Record<string, unknown>;

function chanErr(msg: string): MigrationUriError {
  return new MigrationUriError(msg);
}

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** QAPI-like member checks: `path` names the member for messages ("channels[0].addr.port"). */
class Members {
  constructor(
    private readonly obj: Json,
    private readonly path: string,
    allowed: readonly string[],
  ) {
    for (const k of Object.keys(obj)) {
      if (!allowed.includes(k)) throw chanErr(`Parameter '${this.at(k)}' is unexpected`);
    }
  }
  at(k: string): string {
    return this.path ? `${this.path}.${k}` : k;
  }
  str(k: string): string;
  str(k: string, optional: true): string | undefined;
  str(k: string, optional?: true): string | undefined {
    const v = this.obj[k];
    if (v === undefined) {
      if (optional) return undefined;
      throw chanErr(`Parameter '${this.at(k)}' is missing`);
    }
    if (typeof v !== 'string') throw chanErr(`Invalid parameter type for '${this.at(k)}', expected: string`);
    return v;
  }
  bool(k: string): boolean | undefined {
    const v = this.obj[k];
    if (v === undefined) return undefined;
    if (typeof v !== 'boolean') throw chanErr(`Invalid parameter type for '${this.at(k)}', expected: boolean`);
    return v;
  }
  uint(k: string, max: number, optional: boolean): number | undefined {
    const v = this.obj[k];
    if (v === undefined) {
      if (optional) return undefined;
      throw chanErr(`Parameter '${this.at(k)}' is missing`);
    }
    if (typeof v !== 'number' || !Number.isInteger(v)) {
      throw chanErr(`Invalid parameter type for '${this.at(k)}', expected: integer`);
    }
    if (v < 0 || v > max) throw chanErr(`Parameter '${this.at(k)}' is out of range (0..${max})`);
    return v;
  }
}

function parseAddr(addr: unknown, path: string): MigrationAddress {
  if (!isObject(addr)) throw chanErr(`Invalid parameter type for '${path}', expected: object`);
  const transport = addr['transport'];
  if (transport === undefined) throw chanErr(`Parameter '${path}.transport' is missing`);
  switch (transport) {
    case 'socket': {
      const type = addr['type'];
      if (type === undefined) throw chanErr(`Parameter '${path}.type' is missing`);
      switch (type) {
        case 'inet': {
          const m = new Members(addr, path, ['transport', 'type', 'host', 'port', 'numeric', 'to', 'ipv4', 'ipv6', 'keep-alive', 'mptcp']);
          const host = m.str('host');
          const portStr = m.str('port');
          if (!/^[0-9]{1,5}$/.test(portStr) || Number(portStr) > 65535) {
            throw chanErr(`Parameter '${path}.port' ('${portStr}') is not a number between 0 and 65535`);
          }
          const port = String(Number(portStr));
          const out: InetAddress = { transport: 'socket', type: 'inet', host, port };
          const to = m.uint('to', 65535, true);
          if (to !== undefined) {
            if (to < Number(port)) throw chanErr(`Parameter '${path}.to' (${to}) is below the port ${port}`);
            out.to = to;
          }
          for (const k of ['ipv4', 'ipv6', 'numeric', 'keep-alive'] as const) {
            const b = m.bool(k);
            if (b !== undefined) out[k] = b;
          }
          if (m.bool('mptcp')) throw chanErr(`Parameter '${path}.mptcp': multipath TCP is not supported by ferry`);
          if (out.ipv4 === false && out.ipv6 === false) throw chanErr(`'${path}': ipv4 and ipv6 both off leave no address family`);
          return out;
        }
        case 'unix': {
          const m = new Members(addr, path, ['transport', 'type', 'path', 'abstract', 'tight']);
          const p = m.str('path');
          if (p === '') throw chanErr(`Parameter '${path}.path' is empty`);
          if (Buffer.byteLength(p) > UNIX_PATH_MAX) {
            throw chanErr(`Parameter '${path}.path' is ${Buffer.byteLength(p)} bytes, longer than ${UNIX_PATH_MAX}`);
          }
          const out: UnixAddress = { transport: 'socket', type: 'unix', path: p };
          const abs = m.bool('abstract');
          const tight = m.bool('tight');
          if (abs !== undefined) out.abstract = abs;
          if (tight !== undefined) out.tight = tight;
          return out;
        }
        case 'fd': {
          const m = new Members(addr, path, ['transport', 'type', 'str']);
          const str = m.str('str');
          if (str === '') throw chanErr(`Parameter '${path}.str' is empty`);
          checkFdName(str, (why) => chanErr(`Parameter '${path}.str': ${why}`));
          return { transport: 'socket', type: 'fd', str };
        }
        case 'vsock':
          throw chanErr(`'${path}': the vsock transport is not supported by ferry`);
        default:
          throw chanErr(`Parameter '${path}.type' does not accept value '${String(type)}' (inet, unix, fd)`);
      }
    }
    case 'exec': {
      const m = new Members(addr, path, ['transport', 'args']);
      const args = addr['args'];
      if (args === undefined) throw chanErr(`Parameter '${m.at('args')}' is missing`);
      if (!Array.isArray(args) || !args.every((a) => typeof a === 'string')) {
        throw chanErr(`Invalid parameter type for '${path}.args', expected: array of strings`);
      }
      if (args.length === 0 || args[0] === '') throw chanErr(`Parameter '${path}.args' needs a command`);
      return { transport: 'exec', args: [...(args as string[])] };
    }
    case 'file': {
      const m = new Members(addr, path, ['transport', 'filename', 'offset']);
      const filename = m.str('filename');
      if (filename === '') throw chanErr(`Parameter '${path}.filename' is empty`);
      // QAPI makes offset mandatory; ferry takes a missing one as 0.
      const offset = m.uint('offset', Number.MAX_SAFE_INTEGER, true) ?? 0;
      return { transport: 'file', filename, offset };
    }
    case 'rdma':
      throw chanErr(`'${path}': the rdma transport is not supported by ferry`);
    default:
      throw chanErr(`Parameter '${path}.transport' does not accept value '${String(transport)}' (socket, exec, file)`);
  }
}

/**
 * Converts QMP's `channels` list into the address of its one 'main' channel. Throws
 * MigrationUriError for a malformed list, for no or several 'main' channels, and for channel
 * types ferry does not implement ('cpr').
 */
export function parseChannels(channels: unknown): MigrationAddress {
  if (!Array.isArray(channels)) throw chanErr(`Invalid parameter type for 'channels', expected: array`);
  if (channels.length === 0) throw chanErr(`Parameter 'channels' has no 'main' channel`);
  let main: MigrationAddress | undefined;
  channels.forEach((ch: unknown, i) => {
    const path = `channels[${i}]`;
    if (!isObject(ch)) throw chanErr(`Invalid parameter type for '${path}', expected: object`);
    const m = new Members(ch, path, ['channel-type', 'addr']);
    const type = m.str('channel-type');
    if (type === 'cpr') throw chanErr(`'${path}': channel type 'cpr' is not supported by ferry`);
    if (type !== 'main') throw chanErr(`Parameter '${path}.channel-type' does not accept value '${type}' (main)`);
    if (ch['addr'] === undefined) throw chanErr(`Parameter '${path}.addr' is missing`);
    const addr = parseAddr(ch['addr'], `${path}.addr`);
    if (main) throw chanErr(`Parameter 'channels' has more than one 'main' channel (${path})`);
    main = addr;
  });
  return main!;
}

/**
 * The QMP rule for migrate / migrate-incoming: exactly one of `uri` and `channels`.
 */
export function resolveMigrationTarget(uri: unknown, channels: unknown): MigrationAddress {
  if ((uri === undefined) === (channels === undefined)) {
    throw new MigrationUriError(`need either 'uri' or 'channels' argument`);
  }
  if (uri !== undefined) {
    if (typeof uri !== 'string') throw new MigrationUriError(`Invalid parameter type for 'uri', expected: string`);
    return parseMigrationUri(uri);
  }
  return parseChannels(channels);
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_\-+=./:@%,]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The address as a QEMU URI (for messages and describe()); inverse of parseMigrationUri. */
export function formatMigrationAddress(addr: MigrationAddress): string {
  switch (addr.transport) {
    case 'socket':
      switch (addr.type) {
        case 'inet': {
          let s = `tcp:${addr.host.includes(':') ? `[${addr.host}]` : addr.host}:${addr.port}`;
          if (addr.to !== undefined) s += `,to=${addr.to}`;
          if (addr.ipv4 !== undefined) s += `,ipv4=${addr.ipv4 ? 'on' : 'off'}`;
          if (addr.ipv6 !== undefined) s += `,ipv6=${addr.ipv6 ? 'on' : 'off'}`;
          if (addr['keep-alive'] !== undefined) s += `,keep-alive=${addr['keep-alive'] ? 'on' : 'off'}`;
          return s;
        }
        case 'unix':
          return addr.abstract ? `unix:@${addr.path}` : `unix:${addr.path}`;
        case 'fd':
          return `fd:${addr.str}`;
      }
      break;
    case 'exec': {
      const a = addr.args;
      if (a.length === 3 && a[0] === '/bin/sh' && a[1] === '-c') return `exec:${a[2]}`;
      return `exec:${a.map(shellQuote).join(' ')}`;
    }
    case 'file':
      return addr.offset ? `file:${addr.filename},offset=${addr.offset}` : `file:${addr.filename}`;
  }
  throw new MigrationUriError(`not a migration address: ${JSON.stringify(addr)}`);
}
