/**
 * QMP wire shapes and the checks QEMU applies to each input message before
 * dispatch (QEMU docs/interop/qmp-spec, and QEMU 7.2's replies observed on
 * this machine):
 *
 *   greeting  {"QMP": {"version": {"qemu": {"micro", "minor", "major"}, "package"}, "capabilities": ["oob"]}}
 *   command   {"execute": NAME, "arguments"?: {...}, "id"?: ANY}   ("exec-oob" once OOB is enabled)
 *   success   {"return": VALUE, "id"?: ANY}
 *   error     {"id"?: ANY, "error": {"class": CLASS, "desc": TEXT}}
 *   event     {"timestamp": {"seconds", "microseconds"}, "event": NAME, "data"?: {...}}
 *
 * Members are emitted in QEMU's order (clients must not care, but diffs are easier).
 */
import { FerryError } from '../errors';

export const ERR_QMP_COMMAND = 'ERR_QMP_COMMAND';
export const ERR_QMP_DISCONNECTED = 'ERR_QMP_DISCONNECTED';
export const ERR_QMP_PROTOCOL = 'ERR_QMP_PROTOCOL';
export const ERR_QMP_TIMEOUT = 'ERR_QMP_TIMEOUT';
export const ERR_QMP_ADDRESS = 'ERR_QMP_ADDRESS';

/** QEMU's QapiErrorClass values. */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound'
  | 'KVMMissingCap';

export interface QmpVersion {
  qemu: { micro: number; minor: number; major: number };
  package: string;
}

export interface QmpGreeting {
  QMP: { version: QmpVersion; capabilities: string[] };
}

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: QmpTimestamp;
}

export interface QmpSuccess {
  return: unknown;
  id?: unknown;
}

export interface QmpErrorReply {
  error: { class: string; desc: string };
  id?: unknown;
}

/** The version ferry reports: the QEMU release whose protocol and stream it speaks. */
export const FERRY_QMP_VERSION: QmpVersion = {
  qemu: { micro: 22, minor: 2, major: 7 },
  package: 'ferry 0.1.0',
};

/** Capabilities advertised in the greeting (and accepted by qmp_capabilities' enable). */
export const QMP_CAPABILITIES = ['oob'] as const;

/**
 * An error a QMP command reports: handlers throw it (or any Error, which
 * becomes GenericError) and QmpClient.execute rejects with it.
 */
export class QmpError extends FerryError {
  /** QEMU's error class ('GenericError', 'CommandNotFound', ...). */
  readonly errorClass: string;
  /** The desc text, exactly as on the wire. */
  readonly desc: string;
  /** The command that failed, when known (client side). */
  command?: string;

  constructor(errorClass: string, desc: string, options?: { cause?: unknown; command?: string }) {
    super(ERR_QMP_COMMAND, options?.command ? `${options.command}: ${desc}` : desc, options);
    this.name = 'QmpError';
    this.errorClass = errorClass;
    this.desc = desc;
    if (options?.command) this.command = options.command;
  }
}

/** The QMP error class for anything a handler threw. */
export function errorClassOf(e: unknown): string {
  if (e instanceof QmpError) return e.errorClass;
  const c = (e as { qmpClass?: unknown } | null)?.qmpClass;
  return typeof c === 'string' ? c : 'GenericError';
}

/** The desc for anything a handler threw. */
export function errorDescOf(e: unknown): string {
  if (e instanceof QmpError) return e.desc;
  if (e instanceof Error) return e.message;
  return String(e);
}

/** Current wall-clock time in QEMU's event timestamp shape. */
export function qmpTimestamp(nowMs: number = performance.timeOrigin + performance.now()): QmpTimestamp {
  const us = Math.floor(nowMs * 1000);
  return { seconds: Math.floor(us / 1e6), microseconds: us % 1e6 };
}

export function successReply(value: unknown, id: unknown): QmpSuccess {
  return id === undefined ? { return: value } : { return: value, id };
}

export function errorReply(errorClass: string, desc: string, id: unknown): QmpErrorReply {
  const error = { class: errorClass, desc };
  return id === undefined ? { error } : ({ id, error } as QmpErrorReply);
}

export function eventMessage(name: string, data?: Record<string, unknown>, timestamp = qmpTimestamp()): QmpEvent {
  return data === undefined ? ({ timestamp, event: name } as QmpEvent) : ({ timestamp, event: name, data } as QmpEvent);
}

/** A QMP input that passed the member checks. */
export interface QmpRequest {
  command: string;
  args: Record<string, unknown>;
  /** Absent when the client sent none (then the reply has none either). */
  id?: unknown;
  /** Sent with "exec-oob". */
  oob: boolean;
}

/** The result of checking one input value: a request, or the error reply to send. */
export type CheckedInput = { ok: true; request: QmpRequest } | { ok: false; id?: unknown; desc: string };

/**
 * QEMU's qmp_dispatch member checks (before the command is looked up):
 * must be an object; only execute / exec-oob / arguments / id; execute a
 * string; arguments an object. `oobEnabled`: exec-oob is only a known member
 * once the client enabled the oob capability.
 */
export function checkInput(value: unknown, oobEnabled: boolean): CheckedInput {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return { ok: false, desc: 'QMP input must be a JSON object' };
  }
  const msg = value as Record<string, unknown>;
  const id = Object.prototype.hasOwnProperty.call(msg, 'id') ? msg.id : undefined;
  const fail = (desc: string): CheckedInput => ({ ok: false, id, desc });
  for (const key of Object.keys(msg)) {
    if (key === 'execute' || key === 'arguments' || key === 'id') continue;
    if (key === 'exec-oob' && oobEnabled) continue;
    return fail(`QMP input member '${key}' is unexpected`);
  }
  const hasExec = Object.prototype.hasOwnProperty.call(msg, 'execute');
  const hasOob = Object.prototype.hasOwnProperty.call(msg, 'exec-oob');
  if (hasExec && hasOob) return fail("QMP input member 'execute' clashes with 'exec-oob'");
  if (!hasExec && !hasOob) return fail("QMP input lacks member 'execute'");
  const key = hasExec ? 'execute' : 'exec-oob';
  const command = msg[key];
  if (typeof command !== 'string') return fail(`QMP input member '${key}' must be a string`);
  let args: Record<string, unknown> = {};
  if (Object.prototype.hasOwnProperty.call(msg, 'arguments')) {
    const a = msg.arguments;
    if (typeof a !== 'object' || a === null || Array.isArray(a)) return fail("QMP input member 'arguments' must be an object");
    args = a as Record<string, unknown>;
  }
  const request: QmpRequest = { command, args, oob: hasOob };
  if (id !== undefined) request.id = id;
  return { ok: true, request };
}

/** A QMP address that does not parse; `reason` is the explanation without the address. */
export class QmpAddressError extends FerryError {
  readonly input: string;
  readonly reason: string;
  constructor(input: string, reason: string) {
    super(ERR_QMP_ADDRESS, `invalid QMP address '${input}': ${reason}`);
    this.name = 'QmpAddressError';
    this.input = input;
    this.reason = reason;
  }
}

/** QMP listen/connect addresses: `unix:PATH` or `tcp:HOST:PORT`. */
export type QmpAddress = { type: 'unix'; path: string } | { type: 'tcp'; host: string; port: number };

/**
 * Parses `unix:PATH` / `tcp:HOST:PORT` (IPv6 hosts in brackets). QEMU's
 * chardev flags `server`, `server=on`, `wait=off`, `nowait` are accepted and
 * ignored, so a QEMU -qmp argument can be reused; `wait=on` is refused
 * (ferry never blocks start-up for a client). Throws QmpAddressError
 * (code ERR_QMP_ADDRESS) saying what was wrong.
 */
export function parseQmpAddress(text: string): QmpAddress {
  const bad = (why: string): QmpAddressError => new QmpAddressError(text, why);
  const parts = text.split(',');
  let main = parts[0];
  for (const flag of parts.slice(1)) {
    if (['server', 'server=on', 'wait=off', 'nowait', 'server=true', 'wait=false'].includes(flag)) continue;
    if (flag === 'wait=on' || flag === 'wait' || flag === 'wait=true') throw bad("wait=on is not supported (ferry never waits for a QMP client)");
    if (flag === 'server=off' || flag === 'server=false') throw bad('ferry only listens (server=off is not supported)');
    throw bad(`unknown flag '${flag}' (expected server, server=on, wait=off)`);
  }
  if (main.startsWith('unix:')) {
    const path = main.slice(5);
    if (path === '') throw bad('empty unix socket path');
    if (Buffer.byteLength(path) > 107) throw bad('unix socket path longer than 107 bytes');
    return { type: 'unix', path };
  }
  if (main.startsWith('tcp:')) {
    main = main.slice(4);
    const m = /^(\[[^\]]*\]|[^:]*):([^:]*)$/.exec(main);
    if (!m) throw bad('expected tcp:HOST:PORT');
    const host = m[1].startsWith('[') ? m[1].slice(1, -1) : m[1];
    if (!/^[0-9]+$/.test(m[2])) throw bad(`port '${m[2]}' is not a number`);
    const port = Number(m[2]);
    if (port > 65535) throw bad(`port ${port} is out of range (0-65535)`);
    return { type: 'tcp', host, port };
  }
  throw bad('expected unix:PATH or tcp:HOST:PORT');
}

export function formatQmpAddress(a: QmpAddress): string {
  if (a.type === 'unix') return `unix:${a.path}`;
  return a.host.includes(':') ? `tcp:[${a.host}]:${a.port}` : `tcp:${a.host}:${a.port}`;
}

/**
 * Serialises like QEMU's JSON writer: `{"a": 1, "b": [2, 3]}` (a space after
 * ':' and ','), every non-ASCII character as an upper-case \uXXXX escape.
 * Non-finite numbers (which JSON lacks) become null. Object members in
 * insertion order; undefined members are skipped, as JSON.stringify does.
 */
export function toQmpJson(value: unknown): string {
  switch (typeof value) {
    case 'string':
      return quote(value);
    case 'number':
      return Number.isFinite(value) ? String(value) : 'null';
    case 'boolean':
      return value ? 'true' : 'false';
    case 'bigint':
      return value.toString();
    case 'object': {
      if (value === null) return 'null';
      const withJson = value as { toJSON?: () => unknown };
      if (typeof withJson.toJSON === 'function') return toQmpJson(withJson.toJSON());
      if (Array.isArray(value)) return `[${value.map((v) => (v === undefined ? 'null' : toQmpJson(v))).join(', ')}]`;
      const parts: string[] = [];
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        if (v === undefined || typeof v === 'function') continue;
        parts.push(`${quote(k)}: ${toQmpJson(v)}`);
      }
      return `{${parts.join(', ')}}`;
    }
    default:
      return 'null';
  }
}

const ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function quote(s: string): string {
  // Fast path: printable ASCII without quotes or backslashes.
  if (/^[\x20-\x21\x23-\x5b\x5d-\x7f]*$/.test(s)) return `"${s}"`;
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i];
    const code = s.charCodeAt(i);
    if (ESCAPES[ch] !== undefined) out += ESCAPES[ch];
    else if (code >= 0x20 && code <= 0x7f) out += ch;
    else out += `\\u${code.toString(16).toUpperCase().padStart(4, '0')}`;
  }
  return out + '"';
}
