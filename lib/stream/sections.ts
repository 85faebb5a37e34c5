/**
 * Section-level parser of a savevm stream: file header, configuration, then
 * the loop of sections and commands up to EOF, then the optional VM
 * description trailer. It yields one item at a time (async iterator); the
 * consumer reads each section's payload from `parser.reader` (RAM records
 * with RamRecordParser, devices with loadVmState) before asking for the
 * next item, and the parser then checks the section footer.
 *
 * What it validates (as QEMU's loader does): magic and version (v2 is the
 * obsolete format), configuration present, section footers match their
 * section id, PART/END refer to a section opened by START, commands exist and
 * have their table length, every length bounded before use. Unknown section
 * types are errors naming the byte and its position.
 */
import {
  COMMANDS,
  MIG_CMD,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_FILE_VERSION_COMPAT,
  SectionType,
  lookupSpec,
  sectionTypeName,
} from './constants';
import { CONFIGURATION_VMSD, MAX_CONFIG_CAPABILITIES } from './devices';
import { StreamError, printable } from './errors';
import { StreamReader } from './reader';
import { loadVmState, parseVmdesc, type Vmdesc } from './vmstate';
import type { ConfigurationSection } from './writer';

export interface SectionInfo {
  sectionId: number;
  idstr: string;
  instanceId: number;
  version: number;
}

export type StreamItem =
  | { kind: 'header'; version: number; position: number }
  | { kind: 'configuration'; config: ConfigurationSection; position: number }
  | {
      kind: 'section';
      /** SectionType.START | FULL | PART | END. */
      type: number;
      typeName: 'START' | 'FULL' | 'PART' | 'END';
      sectionId: number;
      idstr: string;
      instanceId: number;
      version: number;
      position: number;
    }
  | {
      kind: 'command';
      cmd: number;
      name: string;
      payload: Buffer;
      /** PACKAGED only: length of the embedded stream that follows (consume it before next()). */
      packagedLength?: number;
      position: number;
    }
  | { kind: 'eof'; position: number }
  | { kind: 'vmdesc'; json: string; vmdesc: Vmdesc; position: number };

export interface SectionParserOptions {
  /** Expect magic + version (default true; false for PACKAGED payloads and recovery channels). */
  header?: boolean;
  /** Expect a configuration section after the header (default true; QEMU's send_configuration). */
  configuration?: boolean;
  /** Sections end with a footer (default true; QEMU's send_section_footer). */
  sectionFooter?: boolean;
  /**
   * After EOF, read the VM description trailer if one follows (default true).
   * Set false in postcopy, where the source sends none and keeps the
   * connection open (reading would wait forever).
   */
  vmdesc?: boolean;
  /** Largest VM description accepted (default 64 MiB). */
  maxVmdescSize?: number;
  /** Largest PACKAGED payload readPackaged() accepts (default 1 GiB). */
  maxPackagedSize?: number;
  /** Reject a configuration naming another machine type. */
  expectMachine?: string;
  /**
   * Sections already opened (START/FULL) by an earlier parser of the same
   * migration: a PACKAGED payload or the new main channel after postcopy
   * recovery continues with PART/END of sections started before. Shared, not copied.
   */
  sections?: Map<number, SectionInfo>;
}

type State = 'header' | 'configuration' | 'loop' | 'vmdesc' | 'done';

export class SectionParser implements AsyncIterable<StreamItem> {
  readonly reader: StreamReader;
  /** Sections opened by START/FULL, by section id. */
  readonly sections: Map<number, SectionInfo>;
  /** Set when something other than a VM description followed EOF (QEMU tolerates it). */
  trailerWarning: string | undefined;
  private state: State;
  private readonly opts: Required<Omit<SectionParserOptions, 'expectMachine' | 'sections'>> & { expectMachine?: string };
  private pendingFooter: { sectionId: number; position: number } | undefined;
  private pendingPackaged: number | undefined;

  constructor(reader: StreamReader, opts: SectionParserOptions = {}) {
    this.reader = reader;
    this.sections = opts.sections ?? new Map();
    this.opts = {
      header: opts.header ?? true,
      configuration: opts.configuration ?? true,
      sectionFooter: opts.sectionFooter ?? true,
      vmdesc: opts.vmdesc ?? true,
      maxVmdescSize: opts.maxVmdescSize ?? 64 << 20,
      maxPackagedSize: opts.maxPackagedSize ?? 1 << 30,
      expectMachine: opts.expectMachine,
    };
    this.state = this.opts.header ? 'header' : this.opts.configuration ? 'configuration' : 'loop';
  }

  [Symbol.asyncIterator](): AsyncIterator<StreamItem> {
    return {
      next: async () => {
        const item = await this.next();
        return item ? { value: item, done: false } : { value: undefined, done: true };
      },
    };
  }

  /** The next item, or undefined when the stream is complete. */
  async next(): Promise<StreamItem | undefined> {
    const r = this.reader;
    if (this.pendingPackaged !== undefined) {
      throw new StreamError(`PACKAGED payload of ${this.pendingPackaged} bytes was not consumed`, r.position);
    }
    if (this.pendingFooter) await this.readFooter();
    switch (this.state) {
      case 'header':
        return this.readHeader();
      case 'configuration':
        return this.readConfiguration();
      case 'loop':
        return this.readItem();
      case 'vmdesc':
        return this.readVmdesc();
      case 'done':
        return undefined;
    }
  }

  /**
   * After a PACKAGED command item: reads the embedded stream and returns a
   * parser over it (no header, no configuration, no vmdesc), positioned at
   * its absolute offset in this stream.
   */
  async readPackaged(): Promise<SectionParser> {
    const len = this.pendingPackaged;
    if (len === undefined) throw new Error('readPackaged() without a pending PACKAGED command');
    const r = this.reader;
    const base = r.position;
    const buf = await r.bytes(len, 'PACKAGED payload');
    this.pendingPackaged = undefined;
    return new SectionParser(StreamReader.fromBuffer(buf, base), {
      header: false,
      configuration: false,
      sectionFooter: this.opts.sectionFooter,
      vmdesc: false,
      sections: this.sections,
    });
  }

  /** Skips a pending PACKAGED payload (dump tools that do not descend). */
  async skipPackaged(): Promise<void> {
    const len = this.pendingPackaged;
    if (len === undefined) return;
    await this.reader.skipBytes(len, 'PACKAGED payload');
    this.pendingPackaged = undefined;
  }

  // ---- states ----

  private async readHeader(): Promise<StreamItem> {
    const r = this.reader;
    const position = r.position;
    const magic = await r.be32('file magic');
    if (magic !== QEMU_VM_FILE_MAGIC) {
      throw r.error(`not a migration stream: magic 0x${hex32(magic)}, expected 0x${hex32(QEMU_VM_FILE_MAGIC)} ("QEVM")`, position);
    }
    const version = await r.be32('file version');
    if (version === QEMU_VM_FILE_VERSION_COMPAT) {
      throw r.error('stream version 2 is the obsolete SaveVM v2 format, not supported', position + 4);
    }
    if (version !== QEMU_VM_FILE_VERSION) {
      throw r.error(`unsupported stream version ${version} (expected ${QEMU_VM_FILE_VERSION})`, position + 4);
    }
    this.state = this.opts.configuration ? 'configuration' : 'loop';
    return { kind: 'header', version, position };
  }

  private async readConfiguration(): Promise<StreamItem> {
    const r = this.reader;
    const position = r.position;
    const t = await r.u8('configuration section type');
    if (t !== SectionType.CONFIGURATION) {
      throw r.error(`configuration section missing: got section type ${sectionTypeName(t)}`, position);
    }
    const s = await loadVmState(r, CONFIGURATION_VMSD, CONFIGURATION_VMSD.version);
    const config: ConfigurationSection = { machine: Buffer.from(s.name as Uint8Array).toString('latin1') };
    if (s.target_page_bits !== undefined) config.targetPageBits = s.target_page_bits as number;
    if (Array.isArray(s.capabilities)) {
      if (s.capabilities.length > MAX_CONFIG_CAPABILITIES) throw r.error('too many capabilities', position);
      config.capabilities = s.capabilities as string[];
    }
    if (s.uuid instanceof Uint8Array) config.uuid = s.uuid;
    if (this.opts.expectMachine !== undefined && config.machine !== this.opts.expectMachine) {
      throw r.error(`machine type received is '${printable(config.machine)}' and local is '${this.opts.expectMachine}'`, position);
    }
    this.state = 'loop';
    return { kind: 'configuration', config, position };
  }

  private async readItem(): Promise<StreamItem | undefined> {
    const r = this.reader;
    const position = r.position;
    if (!this.opts.header && (await r.atEnd())) {
      // An embedded (PACKAGED) stream may simply end.
      this.state = 'done';
      return undefined;
    }
    const t = await r.u8('section type');
    switch (t) {
      case SectionType.START:
      case SectionType.FULL: {
        const sectionId = await r.be32('section id');
        const idstr = await r.countedString('section idstr');
        const instanceId = await r.be32('instance id');
        const version = await r.be32('section version');
        const info: SectionInfo = { sectionId, idstr, instanceId, version };
        this.sections.set(sectionId, info);
        this.expectFooter(sectionId, position);
        return { kind: 'section', type: t, typeName: t === SectionType.START ? 'START' : 'FULL', ...info, position };
      }
      case SectionType.PART:
      case SectionType.END: {
        const sectionId = await r.be32('section id');
        const info = this.sections.get(sectionId);
        if (!info) throw r.error(`${sectionTypeName(t)} for unknown section id ${sectionId}`, position);
        this.expectFooter(sectionId, position);
        return { kind: 'section', type: t, typeName: t === SectionType.PART ? 'PART' : 'END', ...info, position };
      }
      case SectionType.COMMAND:
        return this.readCommand(position);
      case SectionType.EOF:
        this.state = this.opts.vmdesc ? 'vmdesc' : 'done';
        return { kind: 'eof', position };
      default:
        throw r.error(`unknown section type ${sectionTypeName(t)}`, position);
    }
  }

  private async readCommand(position: number): Promise<StreamItem> {
    const r = this.reader;
    const cmd = await r.be16('command id');
    const len = await r.be16('command length');
    const spec = lookupSpec(COMMANDS, cmd);
    if (!spec || cmd === MIG_CMD.INVALID) throw r.error(`unknown or invalid migration command ${cmd}`, position);
    if (spec.len >= 0 && len !== spec.len) {
      throw r.error(`command ${spec.name} has length ${len}, expected ${spec.len}`, position);
    }
    const payload = await r.bytes(len, `command ${spec.name} payload`);
    const item: StreamItem = { kind: 'command', cmd, name: spec.name, payload, position };
    if (cmd === MIG_CMD.PACKAGED) {
      const plen = payload.readUInt32BE(0);
      if (plen > this.opts.maxPackagedSize) {
        throw r.error(`PACKAGED payload of ${plen} bytes exceeds the limit of ${this.opts.maxPackagedSize}`, position);
      }
      item.packagedLength = plen;
      this.pendingPackaged = plen;
    }
    return item;
  }

  private async readVmdesc(): Promise<StreamItem | undefined> {
    const r = this.reader;
    this.state = 'done';
    if (await r.atEnd()) return undefined;
    const position = r.position;
    const t = r.peekU8(0);
    if (t !== SectionType.VMDESCRIPTION) {
      this.trailerWarning = `expected VM description after EOF, got section type ${sectionTypeName(t)} at byte ${position}`;
      return undefined;
    }
    r.skip(1);
    const len = await r.be32('VM description length');
    if (len > this.opts.maxVmdescSize) {
      throw r.error(`VM description of ${len} bytes exceeds the limit of ${this.opts.maxVmdescSize}`, position);
    }
    const json = (await r.bytes(len, 'VM description')).toString('utf8');
    return { kind: 'vmdesc', json, vmdesc: parseVmdesc(json, position), position };
  }

  private expectFooter(sectionId: number, position: number): void {
    if (this.opts.sectionFooter) this.pendingFooter = { sectionId, position };
  }

  private async readFooter(): Promise<void> {
    const r = this.reader;
    const { sectionId } = this.pendingFooter!;
    this.pendingFooter = undefined;
    const position = r.position;
    const t = await r.u8(`footer of section ${sectionId}`);
    if (t !== SectionType.FOOTER) {
      throw r.error(`missing footer of section ${sectionId}: got byte 0x${t.toString(16).padStart(2, '0')}`, position);
    }
    const id = await r.be32(`footer of section ${sectionId}`);
    if (id !== sectionId) throw r.error(`footer for section ${id} does not match section ${sectionId}`, position);
  }
}

function hex32(v: number): string {
  return v.toString(16).padStart(8, '0');
}
