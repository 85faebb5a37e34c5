/**
 * Prints a QEMU savevm stream (version 3) section by section.
 *
 *   node dist/scripts/dump-stream.js [--verbose] FILE|-
 *
 * Header, configuration, every section (type, id, idstr, instance, version),
 * RAM sections summarised per block (pages / zero pages; every record with
 * --verbose), device sections decoded through the stream's own VM
 * description when there is one (read from the end of a FILE first), else
 * through the descriptions ferry knows (timer, globalstate), else as hex;
 * commands with decoded payloads (PACKAGED descends into the embedded
 * stream); EOF and the VM description. Works on QEMU 7.2 streams.
 */
import fs from 'node:fs';
import {
  GLOBALSTATE_VMSD,
  MIG_CMD,
  RamRecordParser,
  SectionParser,
  SectionType,
  StreamError,
  StreamReader,
  TIMER_VMSD,
  decodeBe32Payload,
  decodeDiscard,
  decodePostcopyAdvise,
  decodeRecvBitmapCommand,
  loadVmState,
  parseVmdesc,
  type StreamItem,
  type VmStateDescription,
  type VmValue,
  type Vmdesc,
  type VmdescDevice,
  type VmdescVmsd,
} from '../lib/stream';

const KNOWN: Record<string, VmStateDescription> = { timer: TIMER_VMSD, globalstate: GLOBALSTATE_VMSD };

interface Options {
  verbose: boolean;
}

const out = (s: string) => process.stdout.write(s + '\n');

/** Finds the VM description at the end of a file: 0x06, be32 len, JSON up to EOF. */
export function findTrailingVmdesc(path: string): Vmdesc | undefined {
  const fd = fs.openSync(path, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const tailLen = Math.min(size, 16 << 20);
    const tail = Buffer.alloc(tailLen);
    fs.readSync(fd, tail, 0, tailLen, size - tailLen);
    if (tail[tailLen - 1] !== 0x7d /* } */) return undefined;
    for (let p = tailLen - 6; p >= 0; p--) {
      if (tail[p] !== SectionType.VMDESCRIPTION || tail.readUInt32BE(p + 1) !== tailLen - p - 5) continue;
      try {
        return parseVmdesc(tail.toString('utf8', p + 5));
      } catch {
        /* keep looking */
      }
    }
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}

function hex(b: Uint8Array, max: number): string {
  const s = Buffer.from(b.buffer, b.byteOffset, Math.min(b.length, max)).toString('hex').replace(/(..)/g, '$1 ').trim();
  return b.length > max ? `${s} ... (${b.length} bytes)` : s;
}

/** A NUL-padded printable string, or undefined. */
function asText(b: Uint8Array): string | undefined {
  let end = b.indexOf(0);
  if (end < 0) end = b.length;
  for (let i = end; i < b.length; i++) if (b[i] !== 0) return undefined;
  for (let i = 0; i < end; i++) if (b[i]! < 0x20 || b[i]! > 0x7e) return undefined;
  return end > 0 ? JSON.stringify(Buffer.from(b.subarray(0, end)).toString('latin1')) : undefined;
}

function fmtBytes(type: string, b: Uint8Array, verbose: boolean): string {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.length);
  const ints: Record<string, [number, boolean]> = {
    uint8: [1, false], int8: [1, true], bool: [1, false], uint16: [2, false], int16: [2, true],
    uint32: [4, false], int32: [4, true], uint64: [8, false], int64: [8, true], timer: [8, true],
  };
  const t = ints[type];
  if (t && b.length === t[0]) {
    if (type === 'bool') return b[0] ? 'true' : 'false';
    const v = t[0] === 8 ? (t[1] ? buf.readBigInt64BE(0) : buf.readBigUInt64BE(0)) : t[1] ? buf.readIntBE(0, t[0]) : buf.readUIntBE(0, t[0]);
    return `${v} (0x${(typeof v === 'bigint' ? BigInt.asUintN(64, v) : v >>> 0).toString(16)})`;
  }
  if (type === 'unused_buffer') return `(${b.length} unused bytes)`;
  return asText(b) ?? hex(b, verbose ? 1 << 20 : 32);
}

/** Decodes fields exactly as the vmdesc entry says they were written (sizes are exact). */
async function dumpByVmdesc(r: StreamReader, d: VmdescVmsd, indent: string, opts: Options): Promise<void> {
  for (const f of d.fields) {
    const n = f.array_len ?? 1;
    for (let i = 0; i < n; i++) {
      const label = f.array_len ? `${f.name}[${i}]` : f.index !== undefined ? `${f.name}[${f.index}]` : f.name;
      if (f.type === 'struct' && f.struct) {
        out(`${indent}${label}: struct ${f.struct.vmsd_name} v${f.struct.version}`);
        await dumpByVmdesc(r, f.struct, indent + '  ', opts);
      } else {
        if (f.size > 64 << 20) throw r.error(`field ${f.name} of ${f.size} bytes in vmdesc is implausible`);
        const b = await r.bytes(f.size, `${d.vmsd_name}.${f.name}`);
        out(`${indent}${label} = ${fmtBytes(f.type, b, opts.verbose)}  [${f.type}]`);
      }
    }
  }
  for (const sub of d.subsections ?? []) {
    const pos = r.position;
    const t = await r.u8('subsection marker');
    const name = await r.countedString('subsection name');
    const version = await r.be32('subsection version');
    if (t !== SectionType.SUBSECTION || name !== sub.vmsd_name) {
      throw r.error(`expected subsection '${sub.vmsd_name}', got marker 0x${t.toString(16)} '${name}'`, pos);
    }
    out(`${indent}subsection ${name} v${version}`);
    await dumpByVmdesc(r, sub, indent + '  ', opts);
  }
}

function fmtValue(v: VmValue, verbose: boolean): string {
  if (v instanceof Uint8Array) return asText(v) ?? hex(v, verbose ? 1 << 20 : 32);
  if (Array.isArray(v)) return `[${v.map((x) => fmtValue(x, verbose)).join(', ')}]`;
  if (typeof v === 'bigint') return `${v} (0x${BigInt.asUintN(64, v).toString(16)})`;
  if (v && typeof v === 'object') return JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x));
  return String(v);
}

/** Without a description: collect bytes up to the section's footer (0x7e + be32 id). */
async function dumpUntilFooter(r: StreamReader, sectionId: number, indent: string, opts: Options): Promise<void> {
  const bytes: number[] = [];
  for (;;) {
    await r.need(5, `section ${sectionId} payload (looking for its footer)`);
    if (r.peekU8(0) === SectionType.FOOTER && r.peekBe32(1) === sectionId) break;
    bytes.push(r.peekU8(0));
    r.skip(1);
  }
  out(`${indent}(no description) ${bytes.length} bytes: ${hex(Uint8Array.from(bytes), opts.verbose ? 1 << 20 : 64)}`);
}

interface RamStats {
  pages: number;
  zero: number;
}

async function dumpStream(parser: SectionParser, vmdesc: Vmdesc | undefined, indent: string, opts: Options, ram: RamRecordParser | undefined): Promise<void> {
  const r = parser.reader;
  const totals = new Map<string, RamStats>();
  let item: StreamItem | undefined;
  while ((item = await parser.next())) {
    const at = `@${item.position}`;
    switch (item.kind) {
      case 'header':
        out(`${indent}${at} header: QEVM version ${item.version}`);
        break;
      case 'configuration': {
        const c = item.config;
        const extra = [
          c.capabilities ? `capabilities=${c.capabilities.join(',')}` : '',
          c.uuid ? `uuid=${Buffer.from(c.uuid).toString('hex')}` : '',
          c.targetPageBits !== undefined ? `target-page-bits=${c.targetPageBits}` : '',
        ].filter(Boolean);
        out(`${indent}${at} configuration: machine '${c.machine}'${extra.length ? ' ' + extra.join(' ') : ''}`);
        break;
      }
      case 'section': {
        out(`${indent}${at} ${item.typeName} id=${item.sectionId} '${item.idstr}' instance=${item.instanceId} version=${item.version}`);
        const sub = indent + '    ';
        if (item.idstr === 'ram') {
          ram ??= new RamRecordParser(r);
          const per = new Map<string, RamStats>();
          const counts = await ram.readUntilEos({
            onRecord(rec) {
              if (rec.kind === 'memsize') {
                out(`${sub}MEM_SIZE total=${rec.total}: ${rec.blocks.map((b) => `'${b.idstr}' ${b.usedLength}`).join(', ')}`);
              } else if (rec.kind === 'page' || rec.kind === 'zero') {
                const s = per.get(rec.block.idstr) ?? { pages: 0, zero: 0 };
                if (rec.kind === 'page') s.pages++;
                else s.zero++;
                per.set(rec.block.idstr, s);
                if (opts.verbose) out(`${sub}${rec.kind.toUpperCase()} '${rec.block.idstr}' 0x${rec.offset.toString(16)}`);
              } else if (rec.kind === 'flush') {
                out(`${sub}MULTIFD_FLUSH`);
              }
            },
          });
          for (const [b, s] of per) {
            out(`${sub}block '${b}': ${s.pages} pages, ${s.zero} zero pages`);
            const t = totals.get(b) ?? { pages: 0, zero: 0 };
            t.pages += s.pages;
            t.zero += s.zero;
            totals.set(b, t);
          }
          out(`${sub}EOS (${counts.records} records)`);
        } else if (item.typeName === 'FULL' || item.typeName === 'START') {
          const { idstr, instanceId } = item;
          const dev: VmdescDevice | undefined = vmdesc?.devices.find((d) => d.name === idstr && d.instance_id === instanceId);
          const known = KNOWN[item.idstr];
          if (dev) {
            await dumpByVmdesc(r, dev, sub, opts);
          } else if (known && item.version <= known.version) {
            const state = await loadVmState(r, known, item.version);
            for (const [k, v] of Object.entries(state)) if (v !== undefined) out(`${sub}${k} = ${fmtValue(v, opts.verbose)}`);
          } else {
            await dumpUntilFooter(r, item.sectionId, sub, opts);
          }
        } else {
          await dumpUntilFooter(r, item.sectionId, sub, opts);
        }
        break;
      }
      case 'command': {
        let detail = '';
        const p = item.payload;
        switch (item.cmd) {
          case MIG_CMD.PING:
            detail = ` value=${decodeBe32Payload(p, 'PING', item.position)}`;
            break;
          case MIG_CMD.POSTCOPY_ADVISE: {
            const a = decodePostcopyAdvise(p, item.position);
            detail = a ? ` ram-pagesize-summary=${a.ramPagesizeSummary} target-page-size=${a.targetPageSize}` : ' (dirty bitmaps only)';
            break;
          }
          case MIG_CMD.POSTCOPY_RAM_DISCARD: {
            const d = decodeDiscard(p, item.position);
            detail = ` '${d.block}' ${d.ranges.map(([s, l]) => `0x${s.toString(16)}+0x${l.toString(16)}`).join(' ')}`;
            break;
          }
          case MIG_CMD.RECV_BITMAP:
            detail = ` '${decodeRecvBitmapCommand(p, item.position)}'`;
            break;
          case MIG_CMD.PACKAGED:
            detail = ` length=${item.packagedLength}`;
            break;
          default:
            if (p.length) detail = ` payload ${hex(p, 64)}`;
        }
        out(`${indent}${at} COMMAND ${item.name}${detail}`);
        if (item.cmd === MIG_CMD.PACKAGED) {
          const inner = await parser.readPackaged();
          await dumpStream(inner, vmdesc, indent + '  | ', opts, ram);
        }
        break;
      }
      case 'eof':
        out(`${indent}${at} EOF`);
        break;
      case 'vmdesc':
        out(`${indent}${at} VMDESCRIPTION ${item.json.length} bytes`);
        out(JSON.stringify(item.vmdesc, null, 2));
        break;
    }
  }
  for (const [b, s] of totals) out(`${indent}total RAM '${b}': ${s.pages} pages, ${s.zero} zero pages`);
  if (parser.trailerWarning) out(`${indent}warning: ${parser.trailerWarning}`);
}

export async function main(argv: string[]): Promise<number> {
  const args = argv.filter((a) => !a.startsWith('--'));
  const opts: Options = { verbose: argv.includes('--verbose') || argv.includes('-v') };
  const file = args.find((a) => a !== '-v') ?? '-';
  if (argv.includes('--help') || args.length > 1) {
    process.stderr.write('usage: dump-stream [--verbose] FILE|-\n');
    return 2;
  }
  const vmdesc = file !== '-' ? findTrailingVmdesc(file) : undefined;
  const source = file === '-' ? process.stdin : fs.createReadStream(file, { highWaterMark: 1 << 20 });
  const reader = StreamReader.fromReadable(source);
  try {
    await dumpStream(new SectionParser(reader), vmdesc, '', opts, undefined);
    return 0;
  } catch (err) {
    if (err instanceof StreamError) {
      process.stderr.write(`dump-stream: ${err.message}\n`);
      return 1;
    }
    throw err;
  } finally {
    if (file !== '-') (source as fs.ReadStream).destroy();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (err) => {
      process.stderr.write(`dump-stream: ${(err as Error).stack}\n`);
      process.exitCode = 1;
    },
  );
}
