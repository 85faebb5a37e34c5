/**
 * STOP-GAP: a private file format holding a stopped machine's complete
 * state and RAM, for the save/restore test until QEMU-style
 * `migrate "file:PATH"` / `-incoming` replace it. Used only by the
 * x-ferry-save-state / x-ferry-load-state QMP commands; nothing else should
 * depend on it.
 *
 * Layout: "FERRYSNP", u32 LE version (1), u32 LE header length, header JSON
 * ({state, blocks: [{idstr, size, chunks: [[blockOffset, length, fileOffset]]}]}),
 * then the non-zero 1 MiB chunks of every RAM block at 4 KiB-aligned file
 * offsets. Zero chunks are not stored (a fresh machine's RAM is zero; the
 * loader zeroes whatever non-zero data it finds where the file has none).
 */
import fs from 'node:fs/promises';

import { FerryError } from '../errors';
import type { Machine } from './machine';
import type { MachineState, RestoreReport } from './state';

const MAGIC = 'FERRYSNP';
const VERSION = 1;
const CHUNK = 1 << 20;
const ALIGN = 4096;
const MAX_HEADER = 64 << 20;

interface BlockEntry {
  idstr: string;
  size: number;
  /** [block offset, length, file offset] */
  chunks: [number, number, number][];
}

interface Header {
  state: MachineState;
  blocks: BlockEntry[];
}

const align = (n: number) => Math.ceil(n / ALIGN) * ALIGN;

/** Write `machine`'s state and RAM to `filename` (the machine must be stopped). Returns bytes of RAM data written. */
export async function saveSnapshotFile(machine: Machine, filename: string): Promise<number> {
  const state = machine.captureState();
  const blocks: BlockEntry[] = machine.ramBlocks.map((b) => {
    const chunks: [number, number, number][] = [];
    for (let off = 0; off < b.size; off += CHUNK) {
      const len = Math.min(CHUNK, b.size - off);
      if (b.memory.findNonZero(off, len) >= 0) chunks.push([off, len, 0]);
    }
    return { idstr: b.idstr, size: b.size, chunks };
  });
  // The header grows only by the digits of the file offsets: reserve room for them, then lay out.
  let json = JSON.stringify({ state, blocks } satisfies Header);
  const dataStart = align(16 + Buffer.byteLength(json) + 24 * blocks.reduce((n, b) => n + b.chunks.length, 0) + ALIGN);
  let pos = dataStart;
  for (const b of blocks) for (const c of b.chunks) (c[2] = pos), (pos += align(c[1]));
  json = JSON.stringify({ state, blocks } satisfies Header);
  if (16 + Buffer.byteLength(json) > dataStart) throw new FerryError('ERR_SNAPSHOT_FILE', 'snapshot header layout overflow');
  const fh = await fs.open(filename, 'w');
  let written = 0;
  try {
    const head = Buffer.alloc(16 + Buffer.byteLength(json));
    head.write(MAGIC, 0, 'latin1');
    head.writeUInt32LE(VERSION, 8);
    head.writeUInt32LE(Buffer.byteLength(json), 12);
    head.write(json, 16, 'utf8');
    await fh.write(head, 0, head.length, 0);
    for (let i = 0; i < blocks.length; i++) {
      const rb = machine.ramBlocks[i]!;
      for (const [off, len, at] of blocks[i]!.chunks) {
        const v = rb.view(off, len);
        let done = 0;
        while (done < len) done += (await fh.write(v, done, len - done, at + done)).bytesWritten;
        written += len;
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return written;
}

/** Load a snapshot written by saveSnapshotFile into `machine` (stopped, same shape). */
export async function loadSnapshotFile(machine: Machine, filename: string): Promise<RestoreReport> {
  const fh = await fs.open(filename, 'r');
  try {
    const head = Buffer.alloc(16);
    await fh.read(head, 0, 16, 0);
    if (head.toString('latin1', 0, 8) !== MAGIC) throw new FerryError('ERR_SNAPSHOT_FILE', `${filename} is not a ferry snapshot`);
    if (head.readUInt32LE(8) !== VERSION) throw new FerryError('ERR_SNAPSHOT_FILE', `unsupported snapshot version ${head.readUInt32LE(8)}`);
    const hlen = head.readUInt32LE(12);
    if (hlen > MAX_HEADER) throw new FerryError('ERR_SNAPSHOT_FILE', 'snapshot header too large');
    const hb = Buffer.alloc(hlen);
    const { bytesRead } = await fh.read(hb, 0, hlen, 16);
    if (bytesRead !== hlen) throw new FerryError('ERR_SNAPSHOT_FILE', 'snapshot header truncated');
    const header = JSON.parse(hb.toString('utf8')) as Header;
    const blocks = header.blocks;
    if (!Array.isArray(blocks) || blocks.length !== machine.ramBlocks.length) throw new FerryError('ERR_STATE_MISMATCH', 'snapshot RAM blocks do not match this machine');
    blocks.forEach((b, i) => {
      const rb = machine.ramBlocks[i]!;
      if (b.idstr !== rb.idstr || b.size !== rb.size) throw new FerryError('ERR_STATE_MISMATCH', `snapshot RAM block ${b.idstr}:${b.size}, this machine has ${rb.idstr}:${rb.size}`);
      for (const [off, len] of b.chunks) {
        if (!Number.isSafeInteger(off) || !Number.isSafeInteger(len) || off < 0 || len <= 0 || off + len > rb.size) {
          throw new FerryError('ERR_SNAPSHOT_FILE', 'snapshot chunk outside its RAM block');
        }
      }
    });
    // CPU/device state first: it validates the machine's shape before RAM is touched.
    const report = machine.restoreState(header.state);
    for (let i = 0; i < blocks.length; i++) {
      const rb = machine.ramBlocks[i]!;
      const stored = new Map(blocks[i]!.chunks.map((c) => [c[0], c]));
      for (let off = 0; off < rb.size; off += CHUNK) {
        const len = Math.min(CHUNK, rb.size - off);
        const c = stored.get(off);
        if (c) {
          const v = rb.view(off, len);
          let done = 0;
          while (done < len) {
            const r = await fh.read(v, done, len - done, c[2] + done);
            if (r.bytesRead === 0) throw new FerryError('ERR_SNAPSHOT_FILE', 'snapshot RAM data truncated');
            done += r.bytesRead;
          }
        } else if (rb.memory.findNonZero(off, len) >= 0) {
          rb.fill(off, len, 0);
        }
      }
    }
    return report;
  } finally {
    await fh.close();
  }
}
