/**
 * Run states with QEMU's names (qapi/run-state.json) and the transitions
 * ferry allows between them. The table mirrors the behaviour of QEMU's
 * runstate transition check (softmmu/runstate.c): a transition not listed
 * is a programming error and throws ERR_INVALID_RUNSTATE_TRANSITION.
 */
import { FerryError } from '../errors';

export const RUN_STATES = [
  'debug',
  'inmigrate',
  'internal-error',
  'io-error',
  'paused',
  'postmigrate',
  'prelaunch',
  'finish-migrate',
  'restore-vm',
  'running',
  'save-vm',
  'shutdown',
  'suspended',
  'watchdog',
  'guest-panicked',
  'colo',
] as const;

export type RunState = (typeof RUN_STATES)[number];

const T: Record<RunState, readonly RunState[]> = {
  debug: ['running', 'finish-migrate', 'prelaunch'],
  inmigrate: ['internal-error', 'io-error', 'paused', 'running', 'shutdown', 'suspended', 'watchdog', 'guest-panicked', 'prelaunch', 'postmigrate', 'finish-migrate', 'colo'],
  'internal-error': ['paused', 'finish-migrate', 'prelaunch'],
  'io-error': ['running', 'finish-migrate', 'prelaunch'],
  paused: ['running', 'finish-migrate', 'postmigrate', 'prelaunch', 'colo', 'save-vm', 'restore-vm', 'shutdown', 'internal-error'],
  postmigrate: ['running', 'finish-migrate', 'prelaunch', 'paused'],
  prelaunch: ['running', 'finish-migrate', 'inmigrate', 'paused', 'restore-vm', 'shutdown', 'internal-error'],
  'finish-migrate': ['running', 'paused', 'postmigrate', 'colo', 'internal-error', 'shutdown'],
  'restore-vm': ['running', 'prelaunch', 'paused'],
  running: ['debug', 'internal-error', 'io-error', 'paused', 'finish-migrate', 'restore-vm', 'save-vm', 'shutdown', 'watchdog', 'guest-panicked', 'colo', 'suspended'],
  'save-vm': ['running', 'paused'],
  shutdown: ['paused', 'finish-migrate', 'prelaunch'],
  suspended: ['running', 'finish-migrate', 'prelaunch', 'colo'],
  watchdog: ['running', 'finish-migrate', 'prelaunch'],
  'guest-panicked': ['running', 'finish-migrate', 'prelaunch'],
  colo: ['running', 'shutdown'],
};

export function isRunState(s: string): s is RunState {
  return (RUN_STATES as readonly string[]).includes(s);
}

export function canTransition(from: RunState, to: RunState): boolean {
  return from === to || T[from].includes(to);
}

export function checkTransition(from: RunState, to: RunState): void {
  if (!canTransition(from, to)) {
    throw new FerryError('ERR_INVALID_RUNSTATE_TRANSITION', `invalid runstate transition: '${from}' -> '${to}'`);
  }
}

/** States from which `cont` is refused until a system_reset (QEMU's runstate_needs_reset). */
export function needsReset(s: RunState): boolean {
  return s === 'internal-error' || s === 'shutdown' || s === 'guest-panicked';
}
