/**
 * Wire-format tables for QEMU's savevm stream (version 3), its RAM encoding
 * and the return path. Values are facts of the format (see
 * /work/shared/docs/qemu-wire-format.md); everything else in lib/stream is
 * driven from these tables so a value lives in exactly one place.
 */

export const QEMU_VM_FILE_MAGIC = 0x5145564d; // "QEVM"
export const QEMU_VM_FILE_VERSION_COMPAT = 0x00000002; // obsolete, rejected
export const QEMU_VM_FILE_VERSION = 0x00000003;

/** Target page size on x86: RAM records carry whole 4 KiB pages. */
export const TARGET_PAGE_SIZE = 4096;
export const TARGET_PAGE_BITS = 12;

/** Top-level section / record type bytes of the main stream. */
export const SectionType = {
  EOF: 0x00,
  START: 0x01,
  PART: 0x02,
  END: 0x03,
  FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  FOOTER: 0x7e,
} as const;
export type SectionTypeName = keyof typeof SectionType;

const sectionTypeNames = new Map<number, SectionTypeName>(
  Object.entries(SectionType).map(([k, v]) => [v, k as SectionTypeName]),
);
export function sectionTypeName(type: number): string {
  return sectionTypeNames.get(type) ?? `0x${type.toString(16).padStart(2, '0')}`;
}

/** A table row: `len` -1 = variable length, 0..n = exact payload length. */
export interface MessageSpec {
  readonly id: number;
  readonly name: string;
  readonly len: number;
}

/** QEMU_VM_COMMAND sub-commands (be16 cmd, be16 len, payload). 0 is never valid. */
export const MIG_CMD = {
  INVALID: 0,
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
} as const;

export const COMMANDS: readonly MessageSpec[] = [
  { id: MIG_CMD.INVALID, name: 'INVALID', len: 0 },
  { id: MIG_CMD.OPEN_RETURN_PATH, name: 'OPEN_RETURN_PATH', len: 0 },
  { id: MIG_CMD.PING, name: 'PING', len: 4 },
  // 0 bytes when only dirty-bitmap postcopy is advised, 16 with postcopy-ram:
  // variable here, the handler checks for one of the two lengths.
  { id: MIG_CMD.POSTCOPY_ADVISE, name: 'POSTCOPY_ADVISE', len: -1 },
  { id: MIG_CMD.POSTCOPY_LISTEN, name: 'POSTCOPY_LISTEN', len: 0 },
  { id: MIG_CMD.POSTCOPY_RUN, name: 'POSTCOPY_RUN', len: 0 },
  { id: MIG_CMD.POSTCOPY_RAM_DISCARD, name: 'POSTCOPY_RAM_DISCARD', len: -1 },
  { id: MIG_CMD.PACKAGED, name: 'PACKAGED', len: 4 },
  { id: MIG_CMD.ENABLE_COLO, name: 'ENABLE_COLO', len: 0 },
  { id: MIG_CMD.POSTCOPY_RESUME, name: 'POSTCOPY_RESUME', len: 0 },
  { id: MIG_CMD.RECV_BITMAP, name: 'RECV_BITMAP', len: -1 },
];

/** Largest PACKAGED payload (the embedded stream following the command). */
export const MAX_VM_CMD_PACKAGED_SIZE = 0xffffffff;
/** Version byte leading every POSTCOPY_RAM_DISCARD payload. */
export const POSTCOPY_RAM_DISCARD_VERSION = 0;
/** Most (start, length) ranges QEMU puts in one discard command. */
export const MAX_DISCARDS_PER_COMMAND = 12;

/** Return-path messages, destination -> source (be16 type, be16 len, payload). */
export const MIG_RP_MSG = {
  INVALID: 0,
  SHUT: 1,
  PONG: 2,
  REQ_PAGES_ID: 3,
  REQ_PAGES: 4,
  RECV_BITMAP: 5,
  RESUME_ACK: 6,
  SWITCHOVER_ACK: 7,
} as const;

export const RP_MESSAGES: readonly MessageSpec[] = [
  { id: MIG_RP_MSG.INVALID, name: 'INVALID', len: 0 },
  { id: MIG_RP_MSG.SHUT, name: 'SHUT', len: 4 },
  { id: MIG_RP_MSG.PONG, name: 'PONG', len: 4 },
  { id: MIG_RP_MSG.REQ_PAGES_ID, name: 'REQ_PAGES_ID', len: -1 },
  { id: MIG_RP_MSG.REQ_PAGES, name: 'REQ_PAGES', len: 12 },
  { id: MIG_RP_MSG.RECV_BITMAP, name: 'RECV_BITMAP', len: -1 },
  { id: MIG_RP_MSG.RESUME_ACK, name: 'RESUME_ACK', len: 4 },
  { id: MIG_RP_MSG.SWITCHOVER_ACK, name: 'SWITCHOVER_ACK', len: 0 },
];

/** The source's return-path receive buffer: no RP message may be longer. */
export const MAX_RP_MESSAGE_LEN = 512;
/** Value RESUME_ACK must carry. */
export const MIGRATION_RESUME_ACK_VALUE = 1;
/** End mark after a RECV_BITMAP bitmap body. */
export const RAMBLOCK_RECV_BITMAP_ENDING = 0x0123456789abcdefn;

/** Looks up a command/RP table row; undefined for ids outside the table. */
export function lookupSpec(table: readonly MessageSpec[], id: number): MessageSpec | undefined {
  const spec = table[id];
  return spec && spec.id === id ? spec : undefined;
}

/** RAM record flags: the low bits of each record's be64 (offset | flags). */
export const RAM_FLAG = {
  FULL: 0x01, // obsolete
  ZERO: 0x02,
  MEM_SIZE: 0x04,
  PAGE: 0x08,
  EOS: 0x10,
  CONTINUE: 0x20,
  XBZRLE: 0x40,
  HOOK: 0x80, // RDMA
  COMPRESS_PAGE: 0x100, // multi-thread compression, removed in 9.1
  MULTIFD_FLUSH: 0x200,
} as const;

/** Every flag bit QEMU has defined; anything else in a record header is garbage. */
export const RAM_FLAGS_ALL = 0x3ff;
/** Mask separating flags from the page offset (flags live below the target page). */
export const RAM_FLAGS_MASK = TARGET_PAGE_SIZE - 1;
/** XBZRLE encoding byte following an XBZRLE record header. */
export const ENCODING_FLAG_XBZRLE = 0x01;

/** Version the RAM handler registers with (ram.c: register_savevm_live("ram", 0, 4, ...)). */
export const RAM_SECTION_IDSTR = 'ram';
export const RAM_SECTION_VERSION = 4;

/** Counted strings (idstr, block names) have a u8 length. */
export const MAX_IDSTR_LEN = 255;
