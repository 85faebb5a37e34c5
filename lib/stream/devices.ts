/**
 * vmstate descriptions QEMU 7.2 sends for a `-M none` machine (timer,
 * globalstate) and the configuration section, as data for vmstate.ts.
 * Layouts checked against QEMU's softmmu/cpu-timers.c (vmstate_timers),
 * migration/global_state.c (vmstate_globalstate) and migration/savevm.c
 * (vmstate_configuration) and against a stream captured from QEMU 7.2.
 */
import { isRunState, RUN_STATES } from '../machine/runstate';
import { StreamError, printable } from './errors';
import { countedStringInfo, type VmState, type VmStateDescription } from './vmstate';

const has = (...names: string[]) => (s: VmState) => names.every((n) => s[n] !== undefined);

/**
 * timer/icount/* subsections: sent by QEMU only with -icount (TCG), never
 * with KVM; described so such streams still load. There are no other timer
 * or globalstate subsections in 7.2.
 */
const ICOUNT_WARP_TIMER: VmStateDescription = {
  name: 'timer/icount/warp_timer',
  version: 1,
  minimumVersion: 1,
  needed: has('vm_clock_warp_start'),
  fields: [
    { name: 'vm_clock_warp_start', type: 'int64' },
    { name: 'icount_warp_timer', type: 'timer' },
  ],
};

const ICOUNT_TIMERS: VmStateDescription = {
  name: 'timer/icount/timers',
  version: 1,
  minimumVersion: 1,
  needed: has('icount_rt_timer'),
  fields: [
    { name: 'icount_rt_timer', type: 'timer' },
    { name: 'icount_vm_timer', type: 'timer' },
  ],
};

const ICOUNT_SHIFT: VmStateDescription = {
  name: 'timer/icount/shift',
  // Version 1 (older QEMUs) lacks last_delta; accept both.
  version: 2,
  minimumVersion: 1,
  needed: has('icount_time_shift'),
  fields: [
    { name: 'icount_time_shift', type: 'int16' },
    { name: 'last_delta', type: 'int64', version: 2 },
  ],
};

const ICOUNT: VmStateDescription = {
  name: 'timer/icount',
  version: 1,
  minimumVersion: 1,
  needed: has('qemu_icount_bias'),
  fields: [
    { name: 'qemu_icount_bias', type: 'int64' },
    { name: 'qemu_icount', type: 'int64' },
  ],
  subsections: [ICOUNT_WARP_TIMER, ICOUNT_TIMERS, ICOUNT_SHIFT],
};

/**
 * QEMU's "timer" section (version 2): the virtual clock's offsets. Values:
 * cpu_ticks_offset (host TSC units) and cpu_clock_offset (ns) as bigints,
 * both "the guest-visible value at stop" while the VM is stopped.
 */
export const TIMER_VMSD: VmStateDescription = {
  name: 'timer',
  version: 2,
  minimumVersion: 1,
  fields: [
    { name: 'cpu_ticks_offset', type: 'int64' },
    { name: 'unused', type: 'unused_buffer', size: 8 },
    { name: 'cpu_clock_offset', type: 'int64', version: 2 },
  ],
  subsections: [ICOUNT],
};

export interface TimerState extends VmState {
  cpu_ticks_offset: bigint;
  cpu_clock_offset: bigint;
}

export function timerState(cpuTicksOffset: bigint = 0n, cpuClockOffset: bigint = 0n): TimerState {
  return { cpu_ticks_offset: cpuTicksOffset, cpu_clock_offset: cpuClockOffset };
}

/** QAPI RunState names QEMU 7.2 accepts in globalstate (one list, kept with the run states). */
export { RUN_STATES };

const RUNSTATE_BUF = 100;

/**
 * QEMU's "globalstate" section (version 1): the source's run state as a
 * NUL-padded string in a 100-byte buffer, `size` = strlen + 1 (informative;
 * the loader uses the NUL). The destination starts the guest when it says
 * "running" (and autostart is on), else adopts the state (e.g. "paused").
 */
export const GLOBALSTATE_VMSD: VmStateDescription = {
  name: 'globalstate',
  version: 1,
  minimumVersion: 1,
  fields: [
    { name: 'size', type: 'uint32' },
    { name: 'runstate', type: 'buffer', size: RUNSTATE_BUF },
  ],
  preSave(s) {
    const buf = s.runstate instanceof Uint8Array ? s.runstate : new Uint8Array(RUNSTATE_BUF);
    const nul = buf.indexOf(0);
    s.size = (nul < 0 ? buf.length : nul) + 1;
  },
  postLoad(s) {
    const buf = s.runstate as Uint8Array;
    const nul = buf.indexOf(0);
    if (nul < 0) throw new Error('runstate is not NUL-terminated');
    const name = Buffer.from(buf.buffer, buf.byteOffset, nul).toString('latin1');
    if (!isRunState(name)) throw new Error(`unknown runstate '${printable(name, 40)}'`);
    s.runstateName = name;
  },
};

export interface GlobalState extends VmState {
  size: number;
  runstate: Uint8Array;
  /** Decoded by postLoad / set by globalState(). */
  runstateName?: string;
}

export function globalState(runstate: string): GlobalState {
  if (!isRunState(runstate)) throw new RangeError(`unknown runstate '${runstate}'`);
  const buf = new Uint8Array(RUNSTATE_BUF);
  buf.set(Buffer.from(runstate, 'latin1'));
  return { size: runstate.length + 1, runstate: buf, runstateName: runstate };
}

/** The run state a loaded globalstate carries. */
export function runstateOf(s: VmState): string {
  if (typeof s.runstateName === 'string') return s.runstateName;
  const buf = s.runstate;
  if (!(buf instanceof Uint8Array)) throw new StreamError('globalstate without runstate');
  const nul = buf.indexOf(0);
  return Buffer.from(buf.buffer, buf.byteOffset, nul < 0 ? buf.length : nul).toString('latin1');
}

/** Machine type names longer than this are rejected on load. */
export const MAX_MACHINE_NAME = 256;
/** At most this many capabilities in configuration/capabilities. */
export const MAX_CONFIG_CAPABILITIES = 64;

/**
 * The configuration section's vmstate (QEMU_VM_CONFIGURATION payload). State:
 * {len, name: Uint8Array, target_page_bits?, caps_count?, capabilities?: string[], uuid?}.
 */
export const CONFIGURATION_VMSD: VmStateDescription = {
  name: 'configuration',
  version: 1,
  minimumVersion: 1,
  preSave(s) {
    if (s.name instanceof Uint8Array) s.len = s.name.length;
    if (Array.isArray(s.capabilities)) s.caps_count = s.capabilities.length;
  },
  fields: [
    { name: 'len', type: 'uint32' },
    { name: 'name', type: 'vbuffer', sizeField: 'len', maxSize: MAX_MACHINE_NAME },
  ],
  subsections: [
    {
      name: 'configuration/target-page-bits',
      version: 1,
      minimumVersion: 1,
      needed: has('target_page_bits'),
      fields: [{ name: 'target_page_bits', type: 'uint32' }],
    },
    {
      name: 'configuration/capabilities',
      version: 1,
      minimumVersion: 1,
      needed: (s) => Array.isArray(s.capabilities) && s.capabilities.length > 0,
      fields: [
        { name: 'caps_count', type: 'uint32', version: 1 },
        {
          name: 'capabilities',
          type: 'custom',
          info: countedStringInfo('capability'),
          countField: 'caps_count',
          maxCount: MAX_CONFIG_CAPABILITIES,
          version: 1,
        },
      ],
    },
    {
      name: 'configuration/uuid',
      version: 1,
      minimumVersion: 1,
      needed: has('uuid'),
      fields: [{ name: 'uuid', type: 'buffer', size: 16 }],
    },
  ],
};
