/**
 * The typed face of the native addon: one interface, one loader.
 *
 * The addon is thin: each method does one syscall or ioctl (or one tight loop
 * over memory) and returns raw results. Kernel structs cross the boundary as
 * Buffers holding the exact kernel layout (struct kvm_regs, kvm_sregs, ...);
 * TypeScript decodes the few fields it needs (lib/machine/x86.ts).
 *
 * Every failing call throws a NativeError shaped like Node's system errors.
 */
import path from 'node:path';

/** Error thrown by every native wrapper: shaped like Node's SystemError. */
export interface NativeError extends Error {
  code: string; // 'EBADF'
  errno: number; // negative, as in Node: -9
  syscall: string; // 'ioctl', 'mmap', 'open', ...
  op?: string; // 'KVM_GET_DIRTY_LOG'
}

/** One host mapping of guest RAM (anonymous, memfd or a shared file). */
export interface GuestMemory {
  readonly size: number;
  /** Host virtual address, for diagnostics only. */
  readonly address: bigint;
  /**
   * A zero-copy external ArrayBuffer over [offset, offset+length) of the
   * mapping. length <= 1 GiB. Until close(), a live view keeps the mapping
   * alive even if this object is collected; close() detaches every view.
   */
  view(offset: number, length: number): ArrayBuffer;
  /**
   * madvise(MADV_DONTNEED) on a page-aligned range (postcopy discard); memfd
   * and file backings also get fallocate(PUNCH_HOLE) so the range reads zero.
   */
  discard(offset: number, length: number): void;
  /** Offset (from the start of the mapping) of the first non-zero byte in [offset, offset+length), or -1. */
  findNonZero(offset: number, length: number): number;
  /**
   * Zero-page scan of `pages` 4 KiB pages from offset: fills `out` (one byte
   * per page) with 1 where the page is all zero, 0 otherwise.
   */
  scanZeroPages(offset: number, pages: number, out: Uint8Array): void;
  /**
   * Copies the leading run of complete `PAGE | CONTINUE` RAM records in `src`
   * (be64 offset|flags, 4096 bytes) into the block at [blockOffset,
   * +blockLength) of this mapping. Returns the bytes consumed (a multiple of
   * 4104); stops, consuming nothing more, at a record of another kind, an
   * incomplete one, or one whose offset is outside the block.
   */
  loadPageRecords(src: Uint8Array, blockOffset: number, blockLength: number): number;
  /**
   * Writes RAM records with CONTINUE for up to `pages` consecutive pages from
   * memOffset into out from outPos: ZERO (9 bytes) for a zero page, else PAGE
   * + the page; headers carry blockOffset + i * 4096. Stops when the next
   * record might not fit (out must have room for at least one, 4104 bytes).
   */
  encodePageRecords(memOffset: number, blockOffset: number, pages: number, out: Uint8Array, outPos: number): { pages: number; bytes: number };
  /**
   * The records encodePageRecords would write, sent to the socket `fd`
   * straight from guest memory (sendmsg, MSG_DONTWAIT | MSG_NOSIGNAL): pages
   * are encoded while their records fit in maxBytes (at least one page), and
   * what is not sent (bytes - sent: the socket was full, or every record is
   * a ZERO one and not worth a syscall) is copied to the start of `spill` (at
   * least maxBytes long) for the caller to send next. With sendAllowed false
   * only all-ZERO runs are encoded (into spill); a run with page data is left
   * alone (pages 0) so the caller can send what it holds first. With a
   * splicer (made for `fd`), runs of 16 data pages or more are not copied in
   * this process at all (`spliced` says they went that way).
   */
  sendPageRecords(
    fd: number, memOffset: number, blockOffset: number, pages: number, maxBytes: number, spill: Uint8Array, sendAllowed: boolean,
    splicer?: PageSplicer,
  ): { pages: number; bytes: number; sent: number; spliced?: boolean };
  /**
   * Detach every view, munmap, close the backing fd. Idempotent. Afterwards
   * methods throw ERR_MEMORY_CLOSED; views read as length 0.
   */
  close(): void;
}

export interface GuestMemoryOptions {
  /** Back the mapping with this file (created/extended to size), MAP_SHARED. */
  path?: string;
  /** Use memfd_create (MAP_SHARED) instead of anonymous private memory. */
  memfd?: boolean;
  /** madvise(MADV_HUGEPAGE) on the mapping (transparent huge pages, as QEMU does for guest RAM). Advice only. */
  hugepages?: boolean;
}

export interface KvmProbe {
  apiVersion: number;
  /** KVM_CHECK_EXTENSION results by capability name (0 = absent). */
  caps: Record<string, number>;
  maxVcpus: number;
  /** KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits (0 = unsupported). */
  manualDirtyLogProtect: number;
  /** Size of struct kvm_xsave as KVM_CAP_XSAVE2 reports (4096 if absent). */
  xsaveSize: number;
}

export interface Kvm {
  readonly fd: number;
  apiVersion(): number;
  checkExtension(cap: number): number;
  probe(): KvmProbe;
  /** KVM_GET_MSR_INDEX_LIST: the MSRs a VMM must save and restore. */
  msrIndexList(): number[];
  /** KVM_GET_SUPPORTED_CPUID as raw struct kvm_cpuid2 bytes (header + entries). */
  supportedCpuid(): Buffer;
  createVm(): Vm;
  close(): void;
}

export interface Vm {
  readonly fd: number;
  /**
   * KVM_SET_USER_MEMORY_REGION. flags: 1 = KVM_MEM_LOG_DIRTY_PAGES.
   * size 0 deletes the slot. The Vm keeps `memory` alive while mapped.
   */
  setMemorySlot(slot: number, gpa: number, memory: GuestMemory, memOffset: number, size: number, flags: number): void;
  /** KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, bits). */
  enableManualDirtyLogProtect(bits: number): void;
  /**
   * KVM_GET_DIRTY_LOG into `bitmap` (one bit per 4 KiB page, little-endian
   * 64-bit words, length >= ceil(pages/64)*8). Read in place by the caller.
   */
  getDirtyLog(slot: number, bitmap: Uint8Array): void;
  /** KVM_CLEAR_DIRTY_LOG for pages [firstPage, firstPage+numPages) set in bitmap. */
  clearDirtyLog(slot: number, firstPage: number, numPages: number, bitmap: Uint8Array): void;
  setTssAddr(gpa: number): void;
  setIdentityMapAddr(gpa: number): void;
  createIrqchip(): void;
  /** KVM_CREATE_PIT2 with flags (0). */
  createPit2(flags: number): void;
  /** KVM_IRQ_LINE. */
  irqLine(irq: number, level: number): void;
  /** KVM_GET_IRQCHIP: chipId 0 = PIC master, 1 = PIC slave, 2 = IOAPIC. Raw struct kvm_irqchip. */
  getIrqchip(chipId: number): Buffer;
  setIrqchip(state: Buffer): void;
  /** KVM_GET_PIT2 / KVM_SET_PIT2: raw struct kvm_pit_state2. */
  getPit2(): Buffer;
  setPit2(state: Buffer): void;
  /** KVM_GET_CLOCK / KVM_SET_CLOCK: raw struct kvm_clock_data. */
  getClock(): Buffer;
  setClock(state: Buffer): void;
  createVcpu(id: number): Vcpu;
  /** Stops and joins every vCPU thread, closes vCPUs and the VM fd, drops memory refs. */
  close(): void;
}

/** An exit the vCPU thread hands to JavaScript. */
export type VcpuExit =
  | {
      reason: 'io';
      /** 0 = in (guest reads: fill `data`), 1 = out. */
      direction: 0 | 1;
      port: number;
      size: 1 | 2 | 4;
      count: number;
      /** View into kvm_run's I/O data area (size*count bytes). Valid only during the callback. */
      data: Uint8Array;
      /** A write to a posted port: the guest did not wait for this callback (data is a copy). */
      posted?: true;
    }
  | {
      reason: 'mmio';
      isWrite: boolean;
      gpa: number;
      len: number;
      /** View into kvm_run.mmio.data (8 bytes). Valid only during the callback. */
      data: Uint8Array;
    }
  | { reason: 'shutdown' }
  | { reason: 'hlt' }
  | { reason: 'internal-error'; suberror: number; data: number[] }
  | { reason: 'fail-entry'; hardwareEntryFailureReason: number; cpu: number }
  | { reason: 'system-event'; type: number }
  | { reason: 'unknown'; exitReason: number }
  /** KVM_RUN failed with an errno other than EINTR/EAGAIN. */
  | { reason: 'error'; error: NativeError };

/**
 * A vCPU. Its KVM_RUN loop runs on its own native thread (never the libuv
 * pool). Exits that need JS arrive through `onExit`, called on the JS thread
 * while the vCPU thread waits; I/O data written into `exit.data` during the
 * callback is what the guest reads. After 'shutdown', 'internal-error',
 * 'fail-entry', 'system-event', 'unknown' or 'error' the thread parks itself
 * (as if paused) until resume() or close(). 'hlt' (no in-kernel irqchip)
 * continues unless the callback pauses.
 *
 * If onExit throws, the vCPU parks itself and the error is re-raised as an
 * uncaught exception (process 'uncaughtException').
 * State getters/setters throw ERR_VCPU_RUNNING unless the vCPU is paused
 * (or not started). A started vCPU keeps the process alive until close().
 * After close(): start/resume and every state method throw EBADF (op names
 * the ioctl, 'KVM_RUN' for start/resume); pause() resolves.
 */
export interface Vcpu {
  readonly fd: number;
  readonly id: number;
  /** Start the run thread; the vCPU starts paused unless `running` is true. */
  /**
   * postedPorts: OUT to these ports is handed to onExit without the guest
   * waiting for it (in order with every other exit); use for writes whose
   * effects the guest can only observe through a later exit.
   * shadowPorts/shadow: a 1-byte IN from shadowPorts[i] is answered by the
   * vCPU thread with shadow[2i+1] while shadow[2i] is 1 (JS keeps both
   * current), without an exit to JS.
   */
  start(onExit: (exit: VcpuExit) => void, running: boolean, postedPorts?: number[], shadowPorts?: number[], shadow?: Uint8Array): void;
  /**
   * Stop KVM_RUN (immediate_exit + signal), completing any pending I/O
   * instruction so that the state read afterwards is consistent. Resolves when
   * the thread is parked and quiescent (within milliseconds).
   */
  pause(): Promise<void>;
  resume(): void;
  readonly running: boolean;
  getRegs(): Buffer; // struct kvm_regs
  setRegs(b: Buffer): void;
  getSregs(): Buffer; // struct kvm_sregs
  setSregs(b: Buffer): void;
  getFpu(): Buffer; // struct kvm_fpu
  setFpu(b: Buffer): void;
  getXsave(): Buffer; // struct kvm_xsave (KVM_GET_XSAVE2 when available)
  setXsave(b: Buffer): void;
  getXcrs(): Buffer; // struct kvm_xcrs
  setXcrs(b: Buffer): void;
  /**
   * KVM_GET_MSRS for the given indices; returns the values read (as BigInt).
   * If the kernel reads fewer, throws ERR_KVM_MSR_UNREADABLE with `index`
   * (the first MSR it refused) and `read` (how many it read).
   */
  getMsrs(indices: number[]): bigint[];
  /** KVM_SET_MSRS; returns the number of MSRs the kernel accepted. */
  setMsrs(indices: number[], values: bigint[]): number;
  getLapic(): Buffer; // struct kvm_lapic_state
  setLapic(b: Buffer): void;
  getVcpuEvents(): Buffer; // struct kvm_vcpu_events
  setVcpuEvents(b: Buffer): void;
  getMpState(): number;
  setMpState(state: number): void;
  getDebugRegs(): Buffer; // struct kvm_debugregs
  setDebugRegs(b: Buffer): void;
  /** KVM_SET_CPUID2 with raw struct kvm_cpuid2 bytes. */
  setCpuid(b: Buffer): void;
  /** KVM_GET_TSC_KHZ. */
  getTscKhz(): number;
  /** Stop and join the thread, close the fd. */
  close(): void;
}

export interface UffdApi {
  /**
   * UFFD_FEATURE_* bits the kernel reports. The kernel reports every feature
   * it supports (not only the requested ones); only the requested features
   * are enabled on this fd. So api(0n) on a fresh Uffd is the feature probe.
   */
  features: bigint;
  /** Ioctls available (bitmask of 1n << _UFFDIO_* bit numbers, see constants). */
  ioctls: bigint;
}

/**
 * Thrown by Uffd.api when the kernel lacks requested features: code 'EINVAL',
 * errno -22, syscall 'ioctl', op 'UFFDIO_API', plus the bits involved.
 */
export interface UffdFeatureError extends NativeError {
  requestedFeatures: bigint;
  availableFeatures: bigint;
  missingFeatures: bigint;
}

export type UffdEvent =
  | {
      type: 'pagefault';
      /** Faulting address (page-aligned unless UFFD_FEATURE_EXACT_ADDRESS). */
      address: bigint;
      /** Offset of `address` in `memory`, the registered mapping containing it (-1/null if none). */
      offset: number;
      memory: GuestMemory | null;
      /** UFFD_PAGEFAULT_FLAG_* bits, decoded below. */
      flags: number;
      write: boolean;
      wp: boolean;
      minor: boolean;
      /** Faulting thread id; 0 unless UFFD_FEATURE_THREAD_ID was enabled. */
      tid: number;
    }
  /** Non-fault events: the raw 32-byte struct uffd_msg. A 'fork' message carries a new uffd the caller must close. */
  | { type: 'remove' | 'unmap' | 'fork' | 'remap' | 'unknown'; event: number; raw: Buffer };

/**
 * userfaultfd over GuestMemory mappings; offsets are relative to the mapping
 * passed to each call. Every method except close() throws EBADF after close().
 * The Uffd keeps every GuestMemory it registered alive until close().
 */
export interface Uffd {
  /** -1 after close(). */
  readonly fd: number;
  /**
   * True when the syscall was restricted (vm.unprivileged_userfaultfd=0
   * without CAP_SYS_PTRACE) and the fd was created with UFFD_USER_MODE_ONLY:
   * faults the kernel takes for us (a KVM vCPU touching guest RAM) then fail
   * instead of waiting. Use useDevice=true (/dev/userfaultfd) in that case.
   */
  readonly userModeOnly: boolean;
  /** UFFDIO_API with the requested features; throws (UffdFeatureError when bits are missing) if the kernel refuses. Once per fd. */
  api(features: bigint): UffdApi;
  /** UFFDIO_REGISTER. mode bits: 1 = MISSING, 2 = WP, 4 = MINOR. Returns the ioctls bitmask for the range. */
  register(memory: GuestMemory, offset: number, length: number, mode: number): bigint;
  unregister(memory: GuestMemory, offset: number, length: number): void;
  /** Non-blocking read of up to max (<= 1024) pending events (empty array on EAGAIN). */
  readEvents(max: number): UffdEvent[];
  /**
   * UFFDIO_COPY `src` into the mapping at offset. mode: 1 = DONTWAKE, 2 = WP.
   * Returns bytes placed: less than src.length (maybe 0) after EAGAIN, retry
   * the rest. A page already present throws code 'EEXIST'.
   */
  copy(memory: GuestMemory, offset: number, src: Uint8Array, mode: number): number;
  /** UFFDIO_ZEROPAGE (mode 1 = DONTWAKE). Returns bytes placed, as copy. */
  zeropage(memory: GuestMemory, offset: number, length: number, mode: number): number;
  /** UFFDIO_WRITEPROTECT: protect = true sets WP, false clears it (and wakes unless dontWake). */
  writeProtect(memory: GuestMemory, offset: number, length: number, protect: boolean, dontWake: boolean): void;
  /**
   * UFFDIO_CONTINUE after a MINOR fault: map the page already in the page
   * cache (shmem/memfd/hugetlbfs). mode: 1 = DONTWAKE, 2 = WP. Returns bytes mapped, as copy.
   */
  continue(memory: GuestMemory, offset: number, length: number, mode: number): number;
  /** UFFDIO_WAKE. */
  wake(memory: GuestMemory, offset: number, length: number): void;
  /** Idempotent. Drops the GuestMemory references. */
  close(): void;
}

/**
 * uv_poll on a dup of an fd, driving a callback on the JS thread. Polling a
 * dup keeps it from clashing with libuv's own watcher on the same fd number
 * (a net.Socket's handle), but holds the open file until close(): close the
 * poller with the fd's owner (a uffd's waiting faults are released, a socket's
 * peer sees EOF, only when the poller is closed too). uv_poll_init makes the
 * shared file description O_NONBLOCK.
 */
export interface FdPoller {
  /** The polled dup, -1 after close(). */
  readonly fd: number;
  /** events: 1 = readable, 2 = writable. cb gets (status, events); status < 0 is a negative errno. */
  start(events: number, cb: (status: number, events: number) => void): void;
  stop(): void;
  /** Idempotent; the dup is closed once libuv releases the handle. */
  close(): void;
}

/**
 * Zero-copy page sending to a non-blocking unix stream socket (for
 * GuestMemory.sendPageRecords): records are vmspliced into a pipe and
 * spliced on to the socket, so the peer's read copies straight from guest
 * memory. A page changed before the peer reads it arrives changed: only for
 * memory whose later writes are tracked (the dirty log) or stopped. The
 * constructor throws ERR_SPLICE_UNSUPPORTED for any other fd; the fd must
 * stay open while the splicer is.
 */
export interface PageSplicer {
  /** Bytes queued on the socket that its reader has not consumed yet (SIOCOUTQ). */
  unsent(): number;
  /** Closes the pipe; data in flight stays valid. Idempotent. */
  close(): void;
}

/** Result of testTouch (test-only). */
export interface TouchResult {
  /** Thread id of the touching thread (matches a pagefault event's tid with UFFD_FEATURE_THREAD_ID). */
  tid: number;
  /** Byte read at each touched page (after the write, if any). */
  values: number[];
  /** Nanoseconds each access took (fault wait included). */
  ns: number[];
}

export interface Binding {
  Kvm: new (path?: string) => Kvm;
  GuestMemory: new (size: number, options?: GuestMemoryOptions) => GuestMemory;
  /** flags: O_CLOEXEC | O_NONBLOCK are always added. useDevice: open /dev/userfaultfd instead of the syscall. */
  Uffd: new (useDevice?: boolean) => Uffd;
  FdPoller: new (fd: number) => FdPoller;
  /** segmentBytes: the header ring's segment size (16 segments; default 64 KiB; tests make it wrap sooner). */
  PageSplicer: new (socketFd: number, segmentBytes?: number) => PageSplicer;
  /**
   * SO_SNDBUF (send) or SO_RCVBUF of a socket fd; returns what the kernel
   * settled on (capped by net.core.wmem_max/rmem_max, reported doubled).
   */
  setSocketBuffer(fd: number, send: boolean, bytes: number): number;
  /** Set bits in `bytes` (a dirty-log bitmap). */
  bitmapCount(bytes: Uint8Array): number;
  /** dst |= src over the shorter of the two. */
  bitmapOr(dst: Uint8Array, src: Uint8Array): void;
  /**
   * How many of src's leading RAM records are `ZERO | CONTINUE` (fill byte 0,
   * 9 bytes each) for consecutive pages below blockLength, at most max.
   */
  zeroRecordRun(src: Uint8Array, blockLength: number, max: number): number;
  /** sendmsg (MSG_DONTWAIT | MSG_NOSIGNAL) of the pieces, the first from `offset`, at most IOV_MAX of them: bytes sent, null on EAGAIN. */
  sendPieces(fd: number, pieces: readonly Uint8Array[], offset: number): number | null;
  /** read(2) on a non-blocking fd into buf: bytes read (0 = EOF), null on EAGAIN. */
  readInto(fd: number, buf: Uint8Array): number | null;
  /** recvmsg on a non-blocking socket fd: bytes read into buf and any SCM_RIGHTS fds (O_CLOEXEC). null on EAGAIN; bytes 0 = EOF. */
  recvWithFds(fd: number, buf: Uint8Array): { bytes: number; fds: number[]; truncated?: true } | null;
  /**
   * sendmsg with SCM_RIGHTS (MSG_DONTWAIT | MSG_NOSIGNAL): bytes sent, or null
   * on EAGAIN (nothing sent). data must be non-empty when fds are sent; at
   * most 253 fds.
   */
  sendWithFds(fd: number, data: Uint8Array, fds: number[]): number | null;
  /**
   * TEST-ONLY: access `pages` pages of memory from a fresh native thread
   * (write `value` first if write), so tests can take real userfaults. The
   * promise settles when every access completed.
   */
  testTouch(memory: GuestMemory, offset: number, write: boolean, value?: number, pages?: number): Promise<TouchResult>;
  /** Numbers of kernel constants the addon was built with, for probing and tests. */
  constants: Record<string, number>;
}

let cached: Binding | undefined;

/** Load the addon once (node-gyp-build finds build/Release or a prebuild). */
export function native(): Binding {
  if (!cached) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const load = require('node-gyp-build') as (dir: string) => Binding;
    cached = load(path.join(__dirname, '..', '..'));
  }
  return cached;
}
