/**
 * lib/stream: QEMU's savevm stream (version 3), table-driven.
 *
 * Source side: StreamWriter (+ StreamSink over a socket) encodes header,
 * configuration, section headers/footers, commands, EOF and the vmdesc
 * trailer; RamEncoder encodes RAM records (pages by reference, zero copy);
 * writeDeviceSection() emits a device's FULL section from its vmstate
 * description and returns its vmdesc entry (buildVmdesc + formatVmdescJson
 * produce QEMU's exact JSON text).
 *
 * Destination side: StreamReader pulls from a socket/file at any chunk
 * boundary; SectionParser yields header / configuration / section / command
 * / eof / vmdesc items, the consumer reads each section's payload with
 * RamRecordParser (pages copied straight into guest-memory views) or
 * loadVmState(), and the parser checks the footer before the next item.
 *
 * Every malformed-stream condition is a StreamError (code
 * 'ERR_MIGRATION_STREAM', `position` = absolute byte offset); transport
 * errors from the source surface unchanged (e.g. ECONNRESET).
 */
export * from './constants';
export * from './errors';
export * from './reader';
export * from './writer';
export * from './vmstate';
export * from './devices';
export * from './ram-codec';
export * from './sections';
export * from './commands';
export * from './return-path';
