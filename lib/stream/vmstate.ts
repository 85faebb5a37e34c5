/**
 * vmstate-style device state descriptions: one declarative list of fields
 * per device drives saving (encoding onto a StreamWriter), loading (from a
 * StreamReader, every peer-supplied length bounded before use) and the VM
 * description JSON that QEMU appends to a stream (vmdesc, the input of
 * scripts/analyze-migration.py).
 *
 * Semantics follow QEMU's migration/vmstate.c (facts, not code):
 *  - fields are saved in order; a field with `version` > the section version
 *    is absent (VMSTATE_*_V); `exists()` overrides that check;
 *  - arrays have a fixed `count` or take their length from an earlier field
 *    (`countField`, bounded by `maxCount`);
 *  - subsections follow the fields, each as 0x05, u8 name length, name,
 *    be32 version, fields, nested subsections; a subsection is sent when its
 *    `needed(state)` says so; on load the parser peeks for 0x05 and a name
 *    prefixed with the parent's name (otherwise the bytes belong to the
 *    caller), and an unknown subsection with our prefix is an error;
 *  - subsections share the parent's state object (as QEMU's share `opaque`);
 *  - vmdesc: {vmsd_name, version, fields:[{name, [array_len|index], type,
 *    [struct], size}], [subsections:[...]]}; arrays whose element layout is
 *    fixed are described once with `array_len`, others once per element with
 *    `index`; duplicate field names get a `[n]` suffix; `size` is the bytes
 *    actually written for the element.
 *
 * Value representation: 8/16/32-bit integers are numbers, 64-bit integers
 * and timers are bigints, bool is boolean, buffers are Uint8Array, arrays are
 * JS arrays, structs are nested state objects.
 */
import { SectionType } from './constants';
import { StreamError, printable } from './errors';
import type { StreamReader } from './reader';
import { StreamWriter } from './writer';

export type VmScalarType = 'uint8' | 'uint16' | 'uint32' | 'uint64' | 'int8' | 'int16' | 'int32' | 'int64' | 'bool' | 'timer';

export type VmValue = number | bigint | boolean | string | Uint8Array | VmState | VmValue[] | undefined;
export interface VmState {
  [field: string]: VmValue;
}

interface FieldCommon {
  name: string;
  /** Field present from this section version on (QEMU's VMSTATE_*_V); default 0. */
  version?: number;
  /** Overrides the version check (QEMU's field_exists). */
  exists?: (state: VmState, version: number) => boolean;
}

interface ArrayCommon {
  /** Fixed number of elements (VMSTATE_ARRAY). */
  count?: number;
  /** Number of elements taken from an earlier integer field (VMSTATE_VARRAY_*). */
  countField?: string;
  /** Upper bound for a countField value received from the peer (default 65536). */
  maxCount?: number;
}

export interface ScalarField extends FieldCommon, ArrayCommon {
  type: VmScalarType;
}
/** Fixed-size byte buffer (VMSTATE_BUFFER); JSON type "buffer". */
export interface BufferField extends FieldCommon {
  type: 'buffer';
  size: number;
}
/** Byte buffer sized by an earlier field (VMSTATE_VBUFFER*); JSON type "buffer". */
export interface VBufferField extends FieldCommon {
  type: 'vbuffer';
  sizeField: string;
  /** Upper bound for the size received from the peer. */
  maxSize: number;
}
/** Reserved bytes (VMSTATE_UNUSED): zeros on save, skipped on load. */
export interface UnusedField extends FieldCommon {
  type: 'unused_buffer';
  size: number;
}
/** Nested vmstate (VMSTATE_STRUCT*): value is a nested state object. */
export interface StructField extends FieldCommon, ArrayCommon {
  type: 'struct';
  vmsd: VmStateDescription;
}
/** A type with its own encoding (QEMU's VMStateInfo), e.g. "capability". */
export interface CustomField extends FieldCommon, ArrayCommon {
  type: 'custom';
  info: VmCustomInfo;
}

export interface VmCustomInfo {
  /** Name used as "type" in vmdesc. */
  name: string;
  save(w: StreamWriter, value: VmValue): void;
  load(r: StreamReader, what: string): Promise<VmValue>;
}

export type VmField = ScalarField | BufferField | VBufferField | UnusedField | StructField | CustomField;

export interface VmStateDescription {
  name: string;
  version: number;
  /** Oldest incoming version accepted (QEMU's minimum_version_id; default 1). */
  minimumVersion?: number;
  fields: VmField[];
  subsections?: VmStateDescription[];
  /** For subsections: whether to send it for this state. */
  needed?: (state: VmState) => boolean;
  /** Adjusts state before saving (QEMU's pre_save). */
  preSave?: (state: VmState) => void;
  /** Validates/derives after loading; throw to reject the stream. */
  postLoad?: (state: VmState, version: number) => void;
}

// ---- vmdesc JSON shapes (key order = QEMU's) ----

export interface VmdescField {
  name: string;
  array_len?: number;
  index?: number;
  type: string;
  struct?: VmdescVmsd;
  size: number;
}
export interface VmdescVmsd {
  vmsd_name: string;
  version: number;
  fields: VmdescField[];
  subsections?: VmdescVmsd[];
}
export interface VmdescDevice {
  name: string;
  instance_id: number;
  vmsd_name: string;
  version: number;
  fields: VmdescField[];
  subsections?: VmdescVmsd[];
}
export interface Vmdesc {
  page_size: number;
  devices: VmdescDevice[];
  [other: string]: unknown;
}

const DEFAULT_MAX_COUNT = 65536;

function fieldExists(f: VmField, state: VmState, version: number): boolean {
  return f.exists ? f.exists(state, version) : (f.version ?? 0) <= version;
}

function jsonType(f: VmField): string {
  switch (f.type) {
    case 'vbuffer':
      return 'buffer';
    case 'custom':
      return f.info.name;
    default:
      return f.type;
  }
}

/** Whether an array of this field may be described once (QEMU: vmsd_can_compress). */
function canCompress(f: VmField): boolean {
  if (f.exists) return false;
  if (f.type === 'struct') {
    if (f.vmsd.subsections && f.vmsd.subsections.length > 0) return false;
    return f.vmsd.fields.every(canCompress);
  }
  return true;
}

function hasCount(f: VmField): f is ScalarField | StructField | CustomField {
  return f.type !== 'buffer' && f.type !== 'vbuffer' && f.type !== 'unused_buffer';
}

function isArrayField(f: VmField): boolean {
  return hasCount(f) && (f.count !== undefined || f.countField !== undefined);
}

function descName(vmsd: VmStateDescription, f: VmField): string {
  const same = vmsd.fields.filter((x) => x.name === f.name);
  if (same.length <= 1) return f.name;
  return `${f.name}[${same.indexOf(f)}]`;
}

function toSafeCount(v: VmValue, what: string): number {
  const n = typeof v === 'bigint' ? Number(v) : typeof v === 'number' ? v : typeof v === 'boolean' ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < 0) throw new TypeError(`${what}: count/size field holds ${String(v)}`);
  return n;
}

// ---- save ----

function saveScalar(w: StreamWriter, type: VmScalarType, v: VmValue, what: string): void {
  switch (type) {
    case 'bool':
      w.put8(v ? 1 : 0);
      return;
    case 'uint8':
    case 'int8':
      w.put8(Number(v ?? 0));
      return;
    case 'uint16':
    case 'int16':
      w.put16(Number(v ?? 0));
      return;
    case 'uint32':
    case 'int32':
      w.put32(Number(v ?? 0) >>> 0);
      return;
    case 'uint64':
    case 'int64':
    case 'timer': {
      const b = typeof v === 'bigint' ? v : BigInt(typeof v === 'number' ? v : 0);
      w.put64(b);
      return;
    }
    default:
      throw new TypeError(`${what}: unknown scalar type ${String(type)}`);
  }
}

function saveElement(w: StreamWriter, f: VmField, v: VmValue, state: VmState, what: string, desc: VmdescField | undefined): void {
  switch (f.type) {
    case 'buffer':
    case 'unused_buffer': {
      const out = new Uint8Array(f.size);
      if (f.type === 'buffer' && v instanceof Uint8Array) out.set(v.subarray(0, f.size));
      w.putBytes(out);
      return;
    }
    case 'vbuffer': {
      const size = toSafeCount(state[f.sizeField], `${what} size`);
      const out = new Uint8Array(size);
      if (v instanceof Uint8Array) out.set(v.subarray(0, size));
      w.putBytes(out);
      return;
    }
    case 'struct': {
      const sub = (v && typeof v === 'object' && !(v instanceof Uint8Array) && !Array.isArray(v) ? v : {}) as VmState;
      const d = saveVmStateInto(w, f.vmsd, sub, f.vmsd.version, desc !== undefined);
      if (desc && d) desc.struct = d;
      return;
    }
    case 'custom':
      f.info.save(w, v);
      return;
    default:
      saveScalar(w, f.type, v, what);
  }
}

function saveVmStateInto(w: StreamWriter, vmsd: VmStateDescription, state: VmState, version: number, describe: boolean): VmdescVmsd | undefined {
  vmsd.preSave?.(state);
  const desc: VmdescVmsd | undefined = describe ? { vmsd_name: vmsd.name, version, fields: [] } : undefined;
  for (const f of vmsd.fields) {
    if (!fieldExists(f, state, version)) continue;
    const what = `${vmsd.name}.${f.name}`;
    const array = isArrayField(f);
    let n = 1;
    if (array && hasCount(f)) n = f.count ?? toSafeCount(state[f.countField!], `${what} count`);
    const value = state[f.name];
    const compress = canCompress(f);
    let describing = describe;
    for (let i = 0; i < n; i++) {
      const v = array ? (Array.isArray(value) ? value[i] : undefined) : value;
      let fd: VmdescField | undefined;
      if (describing) {
        fd = { name: descName(vmsd, f) } as VmdescField;
        if (n > 1) {
          if (compress) fd.array_len = n;
          else fd.index = i;
        }
        fd.type = jsonType(f);
      }
      const before = w.totalBytes;
      saveElement(w, f, v, state, what, fd);
      if (fd) {
        fd.size = w.totalBytes - before;
        desc!.fields.push(fd);
      }
      if (describing && compress) describing = false;
    }
  }
  const subs: VmdescVmsd[] = [];
  for (const sub of vmsd.subsections ?? []) {
    if (sub.needed && !sub.needed(state)) continue;
    w.subsectionHeader(sub.name, sub.version);
    const d = saveVmStateInto(w, sub, state, sub.version, describe);
    if (d) subs.push(d);
  }
  if (desc && subs.length > 0) desc.subsections = subs;
  return desc;
}

/**
 * Encodes `state` per `vmsd` (fields then needed subsections) and returns its
 * vmdesc entry. Encoding problems latch on the writer.
 */
export function saveVmState(w: StreamWriter, vmsd: VmStateDescription, state: VmState): VmdescVmsd {
  try {
    return saveVmStateInto(w, vmsd, state, vmsd.version, true)!;
  } catch (err) {
    w.setError(err as Error);
    return { vmsd_name: vmsd.name, version: vmsd.version, fields: [] };
  }
}

/** The vmdesc entry `state` would produce, without a stream. */
export function describeVmState(vmsd: VmStateDescription, state: VmState): VmdescVmsd {
  const w = new StreamWriter({ chunkSize: 4096 });
  const d = saveVmState(w, vmsd, state);
  if (w.error) throw w.error;
  return d;
}

/** A device's FULL section: what the savevm loop needs to emit it. */
export interface DeviceSection {
  sectionId: number;
  idstr: string;
  instanceId: number;
  vmsd: VmStateDescription;
  state: VmState;
}

/** FULL section header, vmstate, footer; returns the device's vmdesc entry. */
export function writeDeviceSection(w: StreamWriter, dev: DeviceSection): VmdescDevice {
  w.sectionStart(SectionType.FULL, dev.sectionId, dev.idstr, dev.instanceId, dev.vmsd.version);
  const d = saveVmState(w, dev.vmsd, dev.state);
  w.footer(dev.sectionId);
  return { name: dev.idstr, instance_id: dev.instanceId, ...d };
}

// ---- load ----

async function loadScalar(r: StreamReader, type: VmScalarType, what: string): Promise<VmValue> {
  switch (type) {
    case 'bool':
      return (await r.u8(what)) !== 0;
    case 'uint8':
      return r.u8(what);
    case 'int8':
      return ((await r.u8(what)) << 24) >> 24;
    case 'uint16':
      return r.be16(what);
    case 'int16':
      return ((await r.be16(what)) << 16) >> 16;
    case 'uint32':
      return r.be32(what);
    case 'int32':
      return (await r.be32(what)) | 0;
    case 'uint64':
      return r.be64(what);
    case 'int64':
    case 'timer':
      return BigInt.asIntN(64, await r.be64(what));
  }
}

async function loadElement(r: StreamReader, f: VmField, state: VmState, what: string): Promise<VmValue> {
  switch (f.type) {
    case 'buffer':
      return r.bytes(f.size, what);
    case 'unused_buffer':
      await r.skipBytes(f.size, what);
      return undefined;
    case 'vbuffer': {
      const size = Number(state[f.sizeField] ?? NaN);
      if (!Number.isSafeInteger(size) || size < 0 || size > f.maxSize) {
        throw r.error(`${what}: size ${String(state[f.sizeField])} out of range (max ${f.maxSize})`);
      }
      return r.bytes(size, what);
    }
    case 'struct': {
      const sub: VmState = {};
      await loadVmState(r, f.vmsd, f.vmsd.version, sub);
      return sub;
    }
    case 'custom':
      return f.info.load(r, what);
    default:
      return loadScalar(r, f.type, what);
  }
}

/**
 * Loads `vmsd` at incoming `version` into `state` (fields, then subsections)
 * and returns it. Any problem is a StreamError with the byte position.
 */
export async function loadVmState(r: StreamReader, vmsd: VmStateDescription, version: number, state: VmState = {}): Promise<VmState> {
  const start = r.position;
  if (version > vmsd.version) {
    throw r.error(`${vmsd.name}: incoming version ${version} is too new for local version ${vmsd.version}`, start);
  }
  if (version < (vmsd.minimumVersion ?? 1)) {
    throw r.error(`${vmsd.name}: incoming version ${version} is too old for local minimum version ${vmsd.minimumVersion ?? 1}`, start);
  }
  for (const f of vmsd.fields) {
    if (!fieldExists(f, state, version)) continue;
    const what = `${vmsd.name}.${f.name}`;
    if (isArrayField(f) && hasCount(f)) {
      let n = f.count;
      if (n === undefined) {
        const raw = state[f.countField!];
        n = typeof raw === 'bigint' ? Number(raw) : Number(raw ?? NaN);
        const max = f.maxCount ?? DEFAULT_MAX_COUNT;
        if (!Number.isSafeInteger(n) || n < 0 || n > max) {
          throw r.error(`${what}: element count ${String(raw)} out of range (max ${max})`);
        }
      }
      const arr: VmValue[] = [];
      for (let i = 0; i < n; i++) arr.push(await loadElement(r, f, state, `${what}[${i}]`));
      state[f.name] = arr;
    } else {
      const v = await loadElement(r, f, state, what);
      if (f.type !== 'unused_buffer') state[f.name] = v;
    }
  }
  await loadSubsections(r, vmsd, state);
  if (vmsd.postLoad) {
    try {
      vmsd.postLoad(state, version);
    } catch (err) {
      if (err instanceof StreamError) throw err;
      throw new StreamError(`${vmsd.name}: ${(err as Error).message} (section data at byte ${start})`, start, { cause: err });
    }
  }
  return state;
}

async function loadSubsections(r: StreamReader, vmsd: VmStateDescription, state: VmState): Promise<void> {
  for (;;) {
    const head = await r.peek(2);
    if (head.length < 2 || head[0] !== SectionType.SUBSECTION) return;
    const len = head[1]!;
    // A name must be "<parent>/<x>": anything shorter is not ours.
    if (len < vmsd.name.length + 1) return;
    const full = await r.peek(2 + len);
    if (full.length < 2 + len) return;
    const name = Buffer.from(full.buffer, full.byteOffset + 2, len).toString('latin1');
    if (!name.startsWith(vmsd.name)) return;
    const pos = r.position;
    const sub = vmsd.subsections?.find((s) => s.name === name);
    if (!sub) throw r.error(`${vmsd.name}: unknown subsection '${printable(name)}'`, pos);
    r.skip(2 + len);
    const version = await r.be32(`${name} version`);
    await loadVmState(r, sub, version, state);
  }
}

// ---- vmdesc JSON ----

/** Builds the top-level VM description (QEMU key order: page_size, devices). */
export function buildVmdesc(devices: VmdescDevice[], pageSize = 4096): Vmdesc {
  return { page_size: pageSize, devices };
}

/**
 * Serializes JSON the way QEMU's JSON writer does (", " and ": " separators,
 * no newlines), so a ferry vmdesc is byte-comparable with QEMU's.
 */
export function formatVmdescJson(v: unknown): string {
  if (v === null || v === undefined) return 'null';
  if (Array.isArray(v)) return `[${v.map(formatVmdescJson).join(', ')}]`;
  if (typeof v === 'object') {
    const parts: string[] = [];
    for (const [k, x] of Object.entries(v as Record<string, unknown>)) {
      if (x === undefined) continue;
      parts.push(`${JSON.stringify(k)}: ${formatVmdescJson(x)}`);
    }
    return `{${parts.join(', ')}}`;
  }
  if (typeof v === 'bigint') return v.toString();
  return JSON.stringify(v);
}

/** Parses and shape-checks a vmdesc JSON text (throws StreamError on nonsense). */
export function parseVmdesc(json: string, position = -1): Vmdesc {
  let v: unknown;
  try {
    v = JSON.parse(json);
  } catch (err) {
    // No `cause`: its raw message (bytes of the stream) would be appended to error-desc.
    throw new StreamError(`VM description is not valid JSON: ${printable((err as Error).message, 160)}`, position);
  }
  const o = v as Vmdesc;
  if (!o || typeof o !== 'object' || !Array.isArray(o.devices)) {
    throw new StreamError('VM description has no "devices" array', position);
  }
  for (const d of o.devices) {
    if (!d || typeof d !== 'object' || typeof d.name !== 'string' || !Array.isArray(d.fields)) {
      throw new StreamError('VM description has a malformed device entry', position);
    }
  }
  return o;
}

/** A custom info for a u8-counted string (QEMU's "capability" VMStateInfo). */
export const countedStringInfo = (name: string): VmCustomInfo => ({
  name,
  save(w, v) {
    w.putCountedString(typeof v === 'string' ? v : '');
  },
  async load(r, what) {
    return r.countedString(what);
  },
});
