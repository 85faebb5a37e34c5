// Uffd: one userfaultfd, registered over ranges of GuestMemory mappings.
//
// Thin by design: each method is one ioctl (or one non-blocking read) and
// returns what the kernel returned. Which pages to place, when to wake, how to
// batch: TypeScript (lib/migration/postcopy, background snapshot).
//
// INVARIANTS
// - The fd is O_CLOEXEC | O_NONBLOCK; readEvents never blocks (poll it with an
//   FdPoller). After close() every method throws EBADF (errno -9) with the
//   syscall and ioctl name, except close() itself, which is idempotent.
// - Every GuestMemory passed to register() stays referenced from JS until
//   close(), so GC cannot unmap a registered range under a faulting thread.
//   (unregister() keeps the reference: ranges may be partially unregistered.)
// - Closing the fd releases the kernel context only when no other fd refers
//   to it: an FdPoller polls a dup, so close the poller too; then threads still
//   blocked in a fault are woken and retry without the userfaultfd.
//
// Kernel quirks (6.18, kvm_pvm host):
// - UFFDIO_API reports in `features` every feature the kernel supports, not
//   the subset requested; only the requested ones are enabled on this fd.
//   A failed UFFDIO_API zeroes the struct, so the missing bits are recomputed
//   here from a throwaway fd (see Api()).
// - UFFDIO_COPY/ZEROPAGE/CONTINUE fail with EAGAIN after a partial copy (the count is
//   written back) or when the address space is changing (count -EAGAIN);
//   both return the bytes placed (maybe 0) so the caller retries the rest.
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include "addon.h"
#include "errors.h"
#include "memory.h"
#include "uffd.h"

namespace ferry {
namespace {

constexpr uint64_t kPage = 4096;
constexpr double kMaxSafeInteger = 9007199254740991.0;

// A non-negative integer argument given as a Number (<= 2^53-1) or a BigInt.
uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Value v = info[i];
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t x = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowArgError(info.Env(), (std::string(name) + " must fit in 64 bits").c_str());
    return x;
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= kMaxSafeInteger && std::floor(d) == d) return static_cast<uint64_t>(d);
  }
  ThrowArgError(info.Env(), (std::string(name) + " must be a non-negative integer").c_str());
}

// Opens a userfaultfd, from the syscall or from /dev/userfaultfd. Returns the
// fd or -errno; *syscallName names the step that failed.
int OpenUffd(bool useDevice, bool* userModeOnly, const char** syscallName) {
  const int flags = O_CLOEXEC | O_NONBLOCK;
  *userModeOnly = false;
  if (useDevice) {
    *syscallName = "open";
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -errno;
    *syscallName = "ioctl";
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and
    // returns a fresh fd; `dev` is ours and closed right after.
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
  }
  *syscallName = "userfaultfd";
  int fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
  if (fd < 0 && errno == EPERM) {
    // vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: only user-mode
    // faults are allowed. Faults taken by the kernel on our behalf (KVM's
    // get_user_pages for a vCPU) then fail with EFAULT instead of waiting,
    // so postcopy needs the device or the capability; userModeOnly says so.
    fd = static_cast<int>(syscall(SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY));
    if (fd >= 0) *userModeOnly = true;
  }
  return fd < 0 ? -errno : fd;
}

class Uffd : public Napi::ObjectWrap<Uffd> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "Uffd",
                       {
                           InstanceAccessor<&Uffd::GetFd>("fd"),
                           InstanceAccessor<&Uffd::GetUserModeOnly>("userModeOnly"),
                           InstanceMethod<&Uffd::Api>("api"),
                           InstanceMethod<&Uffd::Register>("register"),
                           InstanceMethod<&Uffd::Unregister>("unregister"),
                           InstanceMethod<&Uffd::ReadEvents>("readEvents"),
                           InstanceMethod<&Uffd::Copy>("copy"),
                           InstanceMethod<&Uffd::Zeropage>("zeropage"),
                           InstanceMethod<&Uffd::WriteProtect>("writeProtect"),
                           InstanceMethod<&Uffd::Continue>("continue"),
                           InstanceMethod<&Uffd::Wake>("wake"),
                           InstanceMethod<&Uffd::Close>("close"),
                       });
  }

  explicit Uffd(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Uffd>(info) {
    device_ = info.Length() > 0 && info[0].ToBoolean().Value();
    const char* sc = "userfaultfd";
    int fd = OpenUffd(device_, &userModeOnly_, &sc);
    if (fd < 0) ThrowSystemError(info.Env(), -fd, sc, device_ ? "USERFAULTFD_IOC_NEW" : "userfaultfd");
    fd_ = fd;
  }

  ~Uffd() override {
    // Finalizer backstop only; owners call close().
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  struct Held {
    GuestMemory* memory;           // INVARIANT: alive while `ref` is held
    Napi::ObjectReference ref;
  };

  void CheckOpen(const char* syscallName, const char* op) {
    if (fd_ < 0) ThrowSystemError(Env(), EBADF, syscallName, op);
  }

  // The GuestMemory argument, open, with [off, off+len) inside it.
  GuestMemory* Range(const Napi::CallbackInfo& info, uint64_t off, uint64_t len, bool aligned) {
    GuestMemory* m = GuestMemory::From(info[0]);
    m->CheckRange(info.Env(), off, len, aligned);  // also ERR_MEMORY_CLOSED
    return m;
  }

  static uint64_t Addr(GuestMemory* m, uint64_t off) {
    return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(m->base())) + off;
  }

  void Hold(GuestMemory* m, Napi::Object obj) {
    for (auto& h : held_)
      if (h.memory == m) return;
    held_.push_back(Held{m, Napi::Persistent(obj)});
  }

  Napi::Value GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }
  Napi::Value GetUserModeOnly(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), userModeOnly_);
  }

  // Features this kernel supports, from UFFDIO_API(0) on a throwaway fd.
  bool ProbeAvailable(uint64_t* features) {
    bool umo;
    const char* sc;
    int fd = OpenUffd(device_, &umo, &sc);
    if (fd < 0) return false;
    struct uffdio_api a = {};
    a.api = UFFD_API;
    // SAFETY: the kernel reads and writes exactly one struct uffdio_api.
    bool ok = ioctl(fd, UFFDIO_API, &a) == 0;
    ::close(fd);
    *features = a.features;
    return ok;
  }

  // api(features: bigint) -> { features, ioctls }
  Napi::Value Api(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen("ioctl", "UFFDIO_API");
    uint64_t want = ArgU64(info, 0, "features");
    struct uffdio_api a = {};
    a.api = UFFD_API;
    a.features = want;
    // SAFETY: the kernel reads and writes exactly one struct uffdio_api.
    if (ioctl(fd_, UFFDIO_API, &a) < 0) {
      int err = errno;
      uint64_t avail = 0;
      if (err == EINVAL && ProbeAvailable(&avail) && (want & ~avail) != 0) {
        // Say which bits are missing instead of a bare EINVAL.
        Napi::Error e = SystemError(env, err, "ioctl", "UFFDIO_API");
        Napi::Object o = e.Value();
        char msg[160];
        snprintf(msg, sizeof msg,
                 "UFFDIO_API: kernel lacks requested userfaultfd features 0x%llx (requested 0x%llx, available 0x%llx)",
                 static_cast<unsigned long long>(want & ~avail), static_cast<unsigned long long>(want),
                 static_cast<unsigned long long>(avail));
        std::string stack = o.Get("stack").ToString().Utf8Value();
        size_t nl = stack.find('\n');
        o.Set("message", msg);
        o.Set("stack", std::string("Error: ") + msg + (nl == std::string::npos ? "" : stack.substr(nl)));
        o.Set("requestedFeatures", Napi::BigInt::New(env, want));
        o.Set("availableFeatures", Napi::BigInt::New(env, avail));
        o.Set("missingFeatures", Napi::BigInt::New(env, want & ~avail));
        throw e;
      }
      ThrowSystemError(env, err, "ioctl", "UFFDIO_API");
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("features", Napi::BigInt::New(env, static_cast<uint64_t>(a.features)));
    r.Set("ioctls", Napi::BigInt::New(env, static_cast<uint64_t>(a.ioctls)));
    return r;
  }

  // register(memory, offset, length, mode) -> ioctls bigint
  Napi::Value Register(const Napi::CallbackInfo& info) {
    CheckOpen("ioctl", "UFFDIO_REGISTER");
    uint64_t off = ArgU64(info, 1, "offset"), len = ArgU64(info, 2, "length");
    uint64_t mode = ArgU64(info, 3, "mode");
    GuestMemory* m = Range(info, off, len, true);
    struct uffdio_register r = {};
    r.range.start = Addr(m, off);
    r.range.len = len;
    r.mode = mode;
    // SAFETY: the range lies inside m's live mapping (Range() checked it);
    // the kernel writes back r.ioctls only.
    if (ioctl(fd_, UFFDIO_REGISTER, &r) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "UFFDIO_REGISTER");
    Hold(m, info[0].As<Napi::Object>());
    return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(r.ioctls));
  }

  Napi::Value Unregister(const Napi::CallbackInfo& info) {
    CheckOpen("ioctl", "UFFDIO_UNREGISTER");
    uint64_t off = ArgU64(info, 1, "offset"), len = ArgU64(info, 2, "length");
    GuestMemory* m = Range(info, off, len, true);
    struct uffdio_range r = {Addr(m, off), len};
    // SAFETY: range inside m's mapping; the kernel only reads it.
    if (ioctl(fd_, UFFDIO_UNREGISTER, &r) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "UFFDIO_UNREGISTER");
    return info.Env().Undefined();
  }

  // The registered mapping containing addr, or nullptr.
  const Held* Owner(uint64_t addr) const {
    for (auto& h : held_) {
      if (h.memory->closed()) continue;
      uint64_t base = Addr(h.memory, 0);
      if (addr >= base && addr - base < h.memory->size()) return &h;
    }
    return nullptr;
  }

  // readEvents(max) -> UffdEvent[] (empty on EAGAIN)
  Napi::Value ReadEvents(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen("read", "readEvents");
    uint64_t max = ArgU64(info, 0, "max");
    if (max > 1024) max = 1024;
    Napi::Array out = Napi::Array::New(env);
    if (max == 0) return out;
    std::vector<struct uffd_msg> msgs(max);
    ssize_t n;
    do {
      n = read(fd_, msgs.data(), max * sizeof(struct uffd_msg));
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      int err = errno;
      if (err == EAGAIN) return out;
      ThrowSystemError(env, err, "read", "readEvents");
    }
    size_t count = static_cast<size_t>(n) / sizeof(struct uffd_msg);
    for (size_t i = 0; i < count; i++) {
      const struct uffd_msg& m = msgs[i];
      Napi::Object ev = Napi::Object::New(env);
      if (m.event == UFFD_EVENT_PAGEFAULT) {
        uint64_t addr = m.arg.pagefault.address;
        uint64_t flags = m.arg.pagefault.flags;
        const Held* h = Owner(addr);
        ev.Set("type", "pagefault");
        ev.Set("address", Napi::BigInt::New(env, addr));
        ev.Set("offset", Napi::Number::New(env, h ? static_cast<double>(addr - Addr(h->memory, 0)) : -1));
        ev.Set("memory", h ? h->ref.Value() : env.Null());
        ev.Set("flags", Napi::Number::New(env, static_cast<double>(flags)));
        ev.Set("write", Napi::Boolean::New(env, flags & UFFD_PAGEFAULT_FLAG_WRITE));
        ev.Set("wp", Napi::Boolean::New(env, flags & UFFD_PAGEFAULT_FLAG_WP));
        ev.Set("minor", Napi::Boolean::New(env, flags & UFFD_PAGEFAULT_FLAG_MINOR));
        ev.Set("tid", Napi::Number::New(env, m.arg.pagefault.feat.ptid));  // 0 without THREAD_ID
      } else {
        const char* type = m.event == UFFD_EVENT_REMOVE  ? "remove"
                           : m.event == UFFD_EVENT_UNMAP ? "unmap"
                           : m.event == UFFD_EVENT_FORK  ? "fork"
                           : m.event == UFFD_EVENT_REMAP ? "remap"
                                                         : "unknown";
        ev.Set("type", type);
        ev.Set("event", Napi::Number::New(env, m.event));
        ev.Set("raw", Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(&m), sizeof m));
      }
      out.Set(static_cast<uint32_t>(i), ev);
    }
    return out;
  }

  // copy(memory, offset, src, mode) -> bytes placed (0 on EAGAIN with none)
  Napi::Value Copy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen("ioctl", "UFFDIO_COPY");
    uint64_t off = ArgU64(info, 1, "offset");
    if (!info[2].IsTypedArray()) ThrowArgError(env, "src must be a Uint8Array");
    Napi::TypedArray src = info[2].As<Napi::TypedArray>();
    uint64_t mode = ArgU64(info, 3, "mode");
    uint64_t len = src.ByteLength();
    GuestMemory* m = Range(info, off, len, true);
    uint8_t* data = static_cast<uint8_t*>(src.ArrayBuffer().Data());
    if (data == nullptr && len > 0) ThrowArgError(env, "src is detached");
    struct uffdio_copy c = {};
    c.dst = Addr(m, off);
    c.src = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(data + src.ByteOffset()));
    c.len = len;
    c.mode = mode;
    // SAFETY: dst range is inside m's mapping; src points at len readable
    // bytes owned by the (synchronously held) typed array; the kernel writes
    // back c.copy only.
    if (ioctl(fd_, UFFDIO_COPY, &c) == 0) return Napi::Number::New(env, static_cast<double>(c.copy));
    int err = errno;
    if (err == EAGAIN) return Napi::Number::New(env, c.copy > 0 ? static_cast<double>(c.copy) : 0);
    ThrowSystemError(env, err, "ioctl", "UFFDIO_COPY");
  }

  Napi::Value Zeropage(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen("ioctl", "UFFDIO_ZEROPAGE");
    uint64_t off = ArgU64(info, 1, "offset"), len = ArgU64(info, 2, "length");
    uint64_t mode = ArgU64(info, 3, "mode");
    GuestMemory* m = Range(info, off, len, true);
    struct uffdio_zeropage z = {};
    z.range.start = Addr(m, off);
    z.range.len = len;
    z.mode = mode;
    // SAFETY: range inside m's mapping; the kernel writes back z.zeropage.
    if (ioctl(fd_, UFFDIO_ZEROPAGE, &z) == 0) return Napi::Number::New(env, static_cast<double>(z.zeropage));
    int err = errno;
    if (err == EAGAIN) return Napi::Number::New(env, z.zeropage > 0 ? static_cast<double>(z.zeropage) : 0);
    ThrowSystemError(env, err, "ioctl", "UFFDIO_ZEROPAGE");
  }

  // writeProtect(memory, offset, length, protect, dontWake)
  Napi::Value WriteProtect(const Napi::CallbackInfo& info) {
    CheckOpen("ioctl", "UFFDIO_WRITEPROTECT");
    uint64_t off = ArgU64(info, 1, "offset"), len = ArgU64(info, 2, "length");
    bool protect = info[3].ToBoolean().Value();
    bool dontWake = info[4].ToBoolean().Value();
    GuestMemory* m = Range(info, off, len, true);
    struct uffdio_writeprotect w = {};
    w.range.start = Addr(m, off);
    w.range.len = len;
    w.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) | (dontWake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0);
    // SAFETY: range inside m's mapping; the kernel only reads the struct.
    if (ioctl(fd_, UFFDIO_WRITEPROTECT, &w) < 0)
      ThrowSystemError(info.Env(), errno, "ioctl", "UFFDIO_WRITEPROTECT");
    return info.Env().Undefined();
  }

  // continue(memory, offset, length, mode): UFFDIO_CONTINUE maps the page
  // already in the page cache after a MINOR fault. mode 1 = DONTWAKE, 2 = WP.
  Napi::Value Continue(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen("ioctl", "UFFDIO_CONTINUE");
    uint64_t off = ArgU64(info, 1, "offset"), len = ArgU64(info, 2, "length");
    uint64_t mode = ArgU64(info, 3, "mode");
    GuestMemory* m = Range(info, off, len, true);
    struct uffdio_continue c = {};
    c.range.start = Addr(m, off);
    c.range.len = len;
    c.mode = mode;
    // SAFETY: range inside m's mapping; the kernel writes back c.mapped.
    if (ioctl(fd_, UFFDIO_CONTINUE, &c) == 0) return Napi::Number::New(env, static_cast<double>(c.mapped));
    int err = errno;
    if (err == EAGAIN) return Napi::Number::New(env, c.mapped > 0 ? static_cast<double>(c.mapped) : 0);
    ThrowSystemError(env, err, "ioctl", "UFFDIO_CONTINUE");
  }

  Napi::Value Wake(const Napi::CallbackInfo& info) {
    CheckOpen("ioctl", "UFFDIO_WAKE");
    uint64_t off = ArgU64(info, 1, "offset"), len = ArgU64(info, 2, "length");
    GuestMemory* m = Range(info, off, len, true);
    struct uffdio_range r = {Addr(m, off), len};
    // SAFETY: range inside m's mapping; the kernel only reads it.
    if (ioctl(fd_, UFFDIO_WAKE, &r) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "UFFDIO_WAKE");
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
    }
    held_.clear();
    return info.Env().Undefined();
  }

  int fd_ = -1;
  bool device_ = false;
  bool userModeOnly_ = false;
  std::vector<Held> held_;
};

// ---------------------------------------------------------------------------
// testTouch: TEST-ONLY. Accesses guest memory from a fresh native thread, so a
// test can take a real userfault without a guest: the thread blocks in the
// fault while the JS thread (free to run) resolves it. Never use it in
// product code: the thread is detached and waits as long as the fault does.
//
// testTouch(memory, offset, write, value = 0, pages = 1)
//   -> Promise<{ tid, values: number[], ns: number[] }>
// touches `pages` pages at offset, offset+4096, ...: writes `value` first if
// `write`, then reads the byte back; ns[i] is the time that access took.
struct TouchJob {
  TouchJob(Napi::Env env, Napi::Object memory)
      : deferred(Napi::Promise::Deferred::New(env)), memoryRef(Napi::Persistent(memory)) {}
  Napi::Promise::Deferred deferred;
  Napi::ObjectReference memoryRef;  // keeps the mapping's owner alive
  volatile uint8_t* addr = nullptr;  // SAFETY: inside the mapping, pages*4096 apart
  uint32_t pages = 1;
  bool write = false;
  uint8_t value = 0;
  long tid = 0;
  std::vector<uint8_t> values;
  std::vector<double> ns;
};

double NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

Napi::Value TestTouch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  GuestMemory* m = GuestMemory::From(info[0]);
  uint64_t off = ArgU64(info, 1, "offset");
  bool write = info[2].ToBoolean().Value();
  uint64_t value = info.Length() > 3 && !info[3].IsUndefined() ? ArgU64(info, 3, "value") : 0;
  uint64_t pages = info.Length() > 4 && !info[4].IsUndefined() ? ArgU64(info, 4, "pages") : 1;
  if (pages < 1 || pages > 65536) ThrowArgError(env, "pages must be in 1..65536");
  m->CheckRange(env, off, (pages - 1) * kPage + 1, false);

  auto* job = new TouchJob(env, info[0].As<Napi::Object>());
  job->addr = m->base() + off;
  job->pages = static_cast<uint32_t>(pages);
  job->write = write;
  job->value = static_cast<uint8_t>(value);
  Napi::Promise promise = job->deferred.Promise();
  auto tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}),
                                            "ferry.testTouch", 0, 1);
  std::thread([job, tsfn]() mutable {
    job->tid = syscall(SYS_gettid);
    for (uint32_t i = 0; i < job->pages; i++) {
      volatile uint8_t* p = job->addr + static_cast<size_t>(i) * kPage;
      double t0 = NowNs();
      if (job->write) *p = job->value;
      uint8_t v = *p;
      job->ns.push_back(NowNs() - t0);
      job->values.push_back(v);
    }
    tsfn.BlockingCall(job, [](Napi::Env env, Napi::Function, TouchJob* j) {
      Napi::Object r = Napi::Object::New(env);
      Napi::Array values = Napi::Array::New(env, j->values.size());
      Napi::Array ns = Napi::Array::New(env, j->ns.size());
      for (size_t i = 0; i < j->values.size(); i++) {
        values.Set(static_cast<uint32_t>(i), Napi::Number::New(env, j->values[i]));
        ns.Set(static_cast<uint32_t>(i), Napi::Number::New(env, j->ns[i]));
      }
      r.Set("tid", Napi::Number::New(env, static_cast<double>(j->tid)));
      r.Set("values", values);
      r.Set("ns", ns);
      j->deferred.Resolve(r);
      delete j;
    });
    tsfn.Release();
  }).detach();
  return promise;
}

}  // namespace

void InitUffd(Napi::Env env, Napi::Object exports) {
  exports.Set("Uffd", Uffd::Class(env));
  exports.Set("testTouch", Napi::Function::New(env, TestTouch, "testTouch"));
}

}  // namespace ferry
