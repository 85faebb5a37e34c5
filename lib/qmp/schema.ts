/**
 * Declarative argument schemas for QMP commands, checked before a handler
 * runs, with the error messages QEMU 7.2's QAPI input visitor gives (checked
 * against qemu-system-x86_64 7.2 on this machine):
 *
 *   Parameter 'val' is missing
 *   Parameter 'y' is unexpected
 *   Invalid parameter type for 'val', expected: integer
 *   Parameter 'downtime-limit' expects uint64        (uintN, size)
 *   Parameter 'capability' does not accept value 'x'  (enums: the leaf name only, 'null' in a list, as QEMU)
 *
 * Nested members are named as QEMU names them: `capabilities[0].state`.
 *
 * A schema maps member names to types; a trailing '?' marks an optional member:
 *   { val: 'int', size: 'int', filename: 'str', 'cpu-index?': 'int' }
 * Types: 'int' (int64), 'int32', 'uint8', 'uint16', 'uint32', 'uint64', 'size',
 * 'number', 'str', 'bool', 'any', 'object' (any JSON object), 'array' (any
 * array), { enum: [...] }, { array: Type }, { object: Schema }.
 *
 * JSON numbers are JavaScript doubles here: integers beyond 2^53 lose
 * precision (QEMU keeps 64 bits).
 */

export type ScalarType =
  | 'int'
  | 'int32'
  | 'uint8'
  | 'uint16'
  | 'uint32'
  | 'uint64'
  | 'size'
  | 'number'
  | 'str'
  | 'bool'
  | 'any'
  | 'object'
  | 'array';

export type ArgType =
  | ScalarType
  | { enum: readonly string[] }
  | { array: ArgType }
  | { object: ArgSchema };

export type ArgSchema = { readonly [member: string]: ArgType };

/** A failed check: the QEMU-style message (class GenericError). */
export class SchemaError extends Error {
  override readonly name = 'SchemaError';
}

const INT_RANGES: Record<string, [number, number, string]> = {
  int32: [-(2 ** 31), 2 ** 31 - 1, 'int32'],
  uint8: [0, 255, 'uint8'],
  uint16: [0, 65535, 'uint16'],
  uint32: [0, 2 ** 32 - 1, 'uint32'],
  uint64: [0, 2 ** 64, 'uint64'],
  size: [0, 2 ** 64, 'uint64'],
};

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function typeError(name: string, expected: string): SchemaError {
  return new SchemaError(`Invalid parameter type for '${name}', expected: ${expected}`);
}

function checkValue(type: ArgType, value: unknown, name: string, leaf: string): void {
  if (typeof type === 'string') {
    switch (type) {
      case 'any':
        return;
      case 'int':
        // QEMU: anything that is not an integer in int64 range, including 1.5 and 2^64.
        if (typeof value !== 'number' || !Number.isInteger(value) || Math.abs(value) > 2 ** 63) throw typeError(name, 'integer');
        return;
      case 'number':
        if (typeof value !== 'number') throw typeError(name, 'number');
        return;
      case 'str':
        if (typeof value !== 'string') throw typeError(name, 'string');
        return;
      case 'bool':
        if (typeof value !== 'boolean') throw typeError(name, 'boolean');
        return;
      case 'object':
        if (!isPlainObject(value)) throw typeError(name, 'object');
        return;
      case 'array':
        if (!Array.isArray(value)) throw typeError(name, 'array');
        return;
      default: {
        const [lo, hi, label] = INT_RANGES[type];
        if (typeof value !== 'number') {
          // uint64/size: QEMU reports the value form for every non-number too.
          if (type === 'uint64' || type === 'size') throw new SchemaError(`Parameter '${name}' expects ${label}`);
          throw typeError(name, 'integer');
        }
        if (!Number.isInteger(value) || value < lo || value >= (hi === 2 ** 64 ? hi : hi + 1)) {
          throw new SchemaError(`Parameter '${name}' expects ${label}`);
        }
        return;
      }
    }
  }
  if ('enum' in type) {
    if (typeof value !== 'string') throw typeError(name, 'string');
    if (!type.enum.includes(value)) throw new SchemaError(`Parameter '${leaf}' does not accept value '${value}'`);
    return;
  }
  if ('array' in type) {
    if (!Array.isArray(value)) throw typeError(name, 'array');
    // QEMU 7.2 names a list element 'null' in enum errors (the visitor has no name for it).
    value.forEach((item, i) => checkValue(type.array, item, `${name}[${i}]`, 'null'));
    return;
  }
  if (!isPlainObject(value)) throw typeError(name, 'object');
  checkMembers(type.object, value, `${name}.`);
}

function checkMembers(schema: ArgSchema, obj: Record<string, unknown>, prefix: string): void {
  const known = new Set<string>();
  for (const [key, type] of Object.entries(schema)) {
    const optional = key.endsWith('?');
    const member = optional ? key.slice(0, -1) : key;
    known.add(member);
    const name = prefix + member;
    if (!Object.prototype.hasOwnProperty.call(obj, member)) {
      if (!optional) throw new SchemaError(`Parameter '${name}' is missing`);
      continue;
    }
    checkValue(type, obj[member], name, member);
  }
  for (const key of Object.keys(obj)) {
    if (!known.has(key)) throw new SchemaError(`Parameter '${prefix}${key}' is unexpected`);
  }
}

/**
 * Checks `args` (the command's "arguments" object, {} when absent) against
 * `schema`; throws SchemaError with QEMU's message for the first problem.
 * Without a schema any arguments are accepted.
 */
export function validateArgs(schema: ArgSchema | undefined, args: Record<string, unknown>): void {
  if (schema === undefined) return;
  checkMembers(schema, args, '');
}

/** The member names a schema declares (without the '?' marks). */
export function schemaMembers(schema: ArgSchema): string[] {
  return Object.keys(schema).map((k) => (k.endsWith('?') ? k.slice(0, -1) : k));
}
