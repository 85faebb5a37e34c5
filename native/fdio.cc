// File-descriptor plumbing Node lacks: readiness polling on an arbitrary fd
// from the main event loop (FdPoller), passing fds over unix sockets
// (recvWithFds / sendWithFds, for QMP `getfd`), and the table of kernel
// constants the addon was built with (`constants`).
//
// FdPoller INVARIANTS
// - It polls its own dup (F_DUPFD_CLOEXEC) of the fd. libuv allows one watcher
//   per fd number; a net.Socket's handle may watch the same number (e.g. for a
//   pending write), and two watchers on one number silently steal each other's
//   events. A dup is a separate epoll registration. Consequences: the poller
//   holds the open file until close() (a socket stays connected, a uffd's
//   context stays alive), and uv_poll_init puts the *shared* file description
//   in O_NONBLOCK mode.
// - The uv_poll_t lives in a heap block freed only in its uv_close callback.
//   While started or closing, the JS object is strongly referenced (Ref) so GC
//   cannot collect it with a callback pending.
// - The callback runs on the JS thread through MakeCallback (microtasks run
//   after it); an exception it throws goes to process 'uncaughtException'.
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <limits.h>
#include <unistd.h>
#include <uv.h>

#include <memory>
#include <vector>

#include "addon.h"
#include "errors.h"
#include "uffd.h"

namespace ferry {
namespace {

constexpr size_t kMaxFds = 253;  // SCM_MAX_FD: the kernel's per-message limit

int ArgInt(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber()) ThrowArgError(info.Env(), (std::string(name) + " must be a number").c_str());
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 2147483647.0) || static_cast<double>(static_cast<int>(d)) != d)
    ThrowArgError(info.Env(), (std::string(name) + " must be a non-negative int32").c_str());
  return static_cast<int>(d);
}

// (pointer, length) of a Uint8Array/Buffer argument; throws if detached.
uint8_t* ArgBytes(const Napi::CallbackInfo& info, size_t i, const char* name, size_t* len) {
  if (!info[i].IsTypedArray()) ThrowArgError(info.Env(), (std::string(name) + " must be a Uint8Array").c_str());
  Napi::TypedArray ta = info[i].As<Napi::TypedArray>();
  *len = ta.ByteLength();
  uint8_t* data = static_cast<uint8_t*>(ta.ArrayBuffer().Data());
  if (data == nullptr && *len > 0) ThrowArgError(info.Env(), (std::string(name) + " is detached").c_str());
  return data == nullptr ? nullptr : data + ta.ByteOffset();
}

class FdPoller : public Napi::ObjectWrap<FdPoller> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "FdPoller",
                       {
                           InstanceAccessor<&FdPoller::GetFd>("fd"),
                           InstanceMethod<&FdPoller::Start>("start"),
                           InstanceMethod<&FdPoller::Stop>("stop"),
                           InstanceMethod<&FdPoller::Close>("close"),
                       });
  }

  explicit FdPoller(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FdPoller>(info) {
    Napi::Env env = info.Env();
    int fd = ArgInt(info, 0, "fd");
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr)
      ThrowSystemError(env, EINVAL, "napi_get_uv_event_loop", "FdPoller");
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) ThrowSystemError(env, errno, "fcntl", "F_DUPFD_CLOEXEC");
    auto* h = new Handle();
    h->fd = dup;
    // SAFETY: h->poll stays allocated until OnClose runs (uv_close contract).
    int rc = uv_poll_init(loop, &h->poll, dup);
    if (rc < 0) {
      ::close(dup);
      delete h;
      ThrowSystemError(env, -rc, "uv_poll_init", "FdPoller");
    }
    h->poll.data = h;
    h->owner = this;
    h_ = h;
    ctx_ = std::make_unique<Napi::AsyncContext>(env, "ferry.FdPoller");
  }

  ~FdPoller() override {
    // Finalizer backstop (unreachable, so not started; or env teardown while
    // closing). Detach the handle from this object; libuv frees it.
    if (h_ != nullptr) {
      h_->owner = nullptr;
      if (!closing_) uv_close(reinterpret_cast<uv_handle_t*>(&h_->poll), OnClose);
      h_ = nullptr;
    }
  }

 private:
  struct Handle {
    uv_poll_t poll;
    FdPoller* owner = nullptr;  // null once the JS object is gone
    int fd = -1;                // our dup, closed in OnClose
  };

  void CheckOpen(const char* op) {
    if (h_ == nullptr || closing_) ThrowSystemError(Env(), EBADF, "uv_poll", op);
  }

  void Pin() {
    if (!pinned_) {
      Ref();
      pinned_ = true;
    }
  }
  void Unpin() {
    if (pinned_) {
      Unref();
      pinned_ = false;
    }
  }

  static void OnPoll(uv_poll_t* p, int status, int events) {
    Handle* h = static_cast<Handle*>(p->data);
    FdPoller* self = h->owner;
    if (self == nullptr || self->cb_.IsEmpty()) return;
    Napi::Env env = self->Env();
    Napi::HandleScope scope(env);
    try {
      self->cb_.MakeCallback(self->Value(), {Napi::Number::New(env, status), Napi::Number::New(env, events)},
                             *self->ctx_);
    } catch (const Napi::Error& e) {
      napi_fatal_exception(env, e.Value());
    }
  }

  static void OnClose(uv_handle_t* handle) {
    Handle* h = static_cast<Handle*>(handle->data);
    ::close(h->fd);
    FdPoller* self = h->owner;
    delete h;
    if (self != nullptr) {
      self->h_ = nullptr;
      self->cb_.Reset();
      self->Unpin();
    }
  }

  Napi::Value GetFd(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), h_ == nullptr || closing_ ? -1 : h_->fd);
  }

  // start(events, cb): events 1 = readable, 2 = writable (UV_READABLE/WRITABLE).
  Napi::Value Start(const Napi::CallbackInfo& info) {
    CheckOpen("FdPoller.start");
    int events = ArgInt(info, 0, "events");
    if (!info[1].IsFunction()) ThrowArgError(info.Env(), "cb must be a function");
    int rc = uv_poll_start(&h_->poll, events, OnPoll);
    if (rc < 0) ThrowSystemError(info.Env(), -rc, "uv_poll_start", "FdPoller.start");
    cb_ = Napi::Persistent(info[1].As<Napi::Function>());
    Pin();
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    CheckOpen("FdPoller.stop");
    uv_poll_stop(&h_->poll);
    cb_.Reset();
    Unpin();
    return info.Env().Undefined();
  }

  // Idempotent. The dup is closed when libuv has released the handle.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (h_ != nullptr && !closing_) {
      uv_poll_stop(&h_->poll);
      cb_.Reset();
      Pin();  // released in OnClose
      closing_ = true;
      uv_close(reinterpret_cast<uv_handle_t*>(&h_->poll), OnClose);
    }
    return info.Env().Undefined();
  }

  Handle* h_ = nullptr;  // INVARIANT: valid until OnClose (or our destructor) detaches it
  bool closing_ = false;  // uv_close called, OnClose pending or done
  bool pinned_ = false;
  Napi::FunctionReference cb_;
  std::unique_ptr<Napi::AsyncContext> ctx_;
};

// Runs a non-blocking syscall, retrying EINTR: the byte count, null on
// EAGAIN, or a Node-style error naming `syscall` and `op`.
template <typename F>
Napi::Value CountOrNull(Napi::Env env, const char* syscall, const char* op, F call) {
  ssize_t n;
  do {
    n = call();
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) return env.Null();
    ThrowSystemError(env, err, syscall, op);
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

// sendPieces(fd, pieces, offset) -> bytes sent | null on EAGAIN (nothing sent).
// One sendmsg (MSG_DONTWAIT | MSG_NOSIGNAL) over the pieces, the first one
// from `offset`; at most IOV_MAX pieces per call.
Napi::Value SendPieces(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0, "fd");
  if (!info[1].IsArray()) ThrowArgError(env, "pieces must be an array of Uint8Arrays");
  Napi::Array arr = info[1].As<Napi::Array>();
  int offset = ArgInt(info, 2, "offset");
  uint32_t n = arr.Length() < IOV_MAX ? arr.Length() : IOV_MAX;
  std::vector<struct iovec> iov;
  iov.reserve(n);
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsTypedArray()) ThrowArgError(env, "pieces must be an array of Uint8Arrays");
    Napi::TypedArray ta = v.As<Napi::TypedArray>();
    auto* base = static_cast<uint8_t*>(ta.ArrayBuffer().Data());
    size_t len = ta.ByteLength();
    if (base == nullptr && len > 0) ThrowArgError(env, "a piece is detached");
    size_t skip = i == 0 ? static_cast<size_t>(offset) : 0;
    if (skip > len) ThrowArgError(env, "offset is past the first piece");
    if (len - skip > 0) iov.push_back({base + ta.ByteOffset() + skip, len - skip});
  }
  if (iov.empty()) return Napi::Number::New(env, 0);
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = iov.data();
  msg.msg_iovlen = iov.size();
  return CountOrNull(env, "sendmsg", "sendPieces", [&] { return sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL); });
}

// readInto(fd, buf) -> bytes read (0 = EOF) | null on EAGAIN. For readers
// that recycle their buffers (Node's socket reads allocate one per read).
Napi::Value ReadInto(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0, "fd");
  size_t len = 0;
  uint8_t* buf = ArgBytes(info, 1, "buf", &len);
  return CountOrNull(env, "read", "readInto", [&] { return ::read(fd, buf, len); });
}

// setSocketBuffer(fd, send, bytes) -> the size the kernel settled on
// (SO_SNDBUF when send, else SO_RCVBUF; capped by net.core.[wr]mem_max, and
// reported doubled, as Linux keeps room for its own bookkeeping).
Napi::Value SetSocketBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0, "fd");
  int opt = info[1].ToBoolean() ? SO_SNDBUF : SO_RCVBUF;
  int bytes = ArgInt(info, 2, "bytes");
  if (setsockopt(fd, SOL_SOCKET, opt, &bytes, sizeof bytes) < 0) ThrowSystemError(env, errno, "setsockopt", "setSocketBuffer");
  int now = 0;
  socklen_t len = sizeof now;
  if (getsockopt(fd, SOL_SOCKET, opt, &now, &len) < 0) ThrowSystemError(env, errno, "getsockopt", "setSocketBuffer");
  return Napi::Number::New(env, now);
}

// recvWithFds(fd, buf) -> { bytes, fds, truncated? } | null on EAGAIN
Napi::Value RecvWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0, "fd");
  size_t len = 0;
  uint8_t* data = ArgBytes(info, 1, "buf", &len);
  struct iovec iov = {data, len};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  // SAFETY: iov covers exactly the caller's buffer; control is sized for the
  // kernel's per-message fd limit. Received fds are O_CLOEXEC from birth.
  Napi::Value got = CountOrNull(env, "recvmsg", "recvWithFds", [&] { return recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
  if (got.IsNull()) return got;
  ssize_t n = static_cast<ssize_t>(got.As<Napi::Number>().Int64Value());
  std::vector<int> fds;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int f;
      memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
      fds.push_back(f);
    }
  }
  // From here on the fds belong to the caller (they are in the result).
  Napi::Object r = Napi::Object::New(env);
  r.Set("bytes", Napi::Number::New(env, static_cast<double>(n)));
  Napi::Array arr = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) arr.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  r.Set("fds", arr);
  // MSG_CTRUNC: the kernel dropped (and closed) ancillary data that did not fit.
  if (msg.msg_flags & MSG_CTRUNC) r.Set("truncated", Napi::Boolean::New(env, true));
  return r;
}

// sendWithFds(fd, data, fds) -> bytes sent | null on EAGAIN (nothing sent)
Napi::Value SendWithFds(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt(info, 0, "fd");
  size_t len = 0;
  uint8_t* data = ArgBytes(info, 1, "data", &len);
  if (!info[2].IsArray()) ThrowArgError(env, "fds must be an array of fds");
  Napi::Array arr = info[2].As<Napi::Array>();
  if (arr.Length() > kMaxFds) ThrowArgError(env, "at most 253 fds per message");
  // A stream socket drops ancillary data sent with zero bytes.
  if (arr.Length() > 0 && len == 0) ThrowArgError(env, "data must not be empty when sending fds");
  std::vector<int> fds;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsNumber()) ThrowArgError(env, "fds must be an array of fds");
    fds.push_back(v.As<Napi::Number>().Int32Value());
  }
  struct iovec iov = {data, len};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  struct msghdr msg = {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  // SAFETY: iov covers the caller's bytes; control holds fds.size() ints.
  return CountOrNull(env, "sendmsg", "sendWithFds", [&] { return sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL); });
}

Napi::Object Constants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
  auto set = [&](const char* name, double v) { c.Set(name, Napi::Number::New(env, v)); };
#define K(name) set(#name, static_cast<double>(name))
  // userfaultfd: API, features, ioctl bit numbers, modes, events, fault flags.
  K(UFFD_API);
  K(UFFD_USER_MODE_ONLY);
  K(UFFD_FEATURE_PAGEFAULT_FLAG_WP);
  K(UFFD_FEATURE_EVENT_FORK);
  K(UFFD_FEATURE_EVENT_REMAP);
  K(UFFD_FEATURE_EVENT_REMOVE);
  K(UFFD_FEATURE_MISSING_HUGETLBFS);
  K(UFFD_FEATURE_MISSING_SHMEM);
  K(UFFD_FEATURE_EVENT_UNMAP);
  K(UFFD_FEATURE_SIGBUS);
  K(UFFD_FEATURE_THREAD_ID);
  K(UFFD_FEATURE_MINOR_HUGETLBFS);
  K(UFFD_FEATURE_MINOR_SHMEM);
  K(UFFD_FEATURE_EXACT_ADDRESS);
  K(UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
  K(UFFD_FEATURE_WP_UNPOPULATED);
  K(UFFD_FEATURE_POISON);
  K(UFFD_FEATURE_WP_ASYNC);
  K(UFFD_FEATURE_MOVE);
  // Bit numbers in the `ioctls` masks returned by api() and register().
  K(_UFFDIO_REGISTER);
  K(_UFFDIO_UNREGISTER);
  K(_UFFDIO_WAKE);
  K(_UFFDIO_COPY);
  K(_UFFDIO_ZEROPAGE);
  K(_UFFDIO_MOVE);
  K(_UFFDIO_WRITEPROTECT);
  K(_UFFDIO_CONTINUE);
  K(_UFFDIO_POISON);
  K(_UFFDIO_API);
  K(UFFDIO_REGISTER_MODE_MISSING);
  K(UFFDIO_REGISTER_MODE_WP);
  K(UFFDIO_REGISTER_MODE_MINOR);
  K(UFFDIO_COPY_MODE_DONTWAKE);
  K(UFFDIO_COPY_MODE_WP);
  K(UFFDIO_ZEROPAGE_MODE_DONTWAKE);
  K(UFFDIO_WRITEPROTECT_MODE_WP);
  K(UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
  K(UFFDIO_CONTINUE_MODE_DONTWAKE);
  K(UFFDIO_CONTINUE_MODE_WP);
  K(UFFD_EVENT_PAGEFAULT);
  K(UFFD_EVENT_FORK);
  K(UFFD_EVENT_REMAP);
  K(UFFD_EVENT_REMOVE);
  K(UFFD_EVENT_UNMAP);
  K(UFFD_PAGEFAULT_FLAG_WRITE);
  K(UFFD_PAGEFAULT_FLAG_WP);
  K(UFFD_PAGEFAULT_FLAG_MINOR);
  // KVM: memslot flags, dirty-log protect bits, and capabilities tests probe.
  K(KVM_API_VERSION);
  K(KVM_MEM_LOG_DIRTY_PAGES);
  K(KVM_MEM_READONLY);
  K(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
  K(KVM_DIRTY_LOG_INITIALLY_SET);
  K(KVM_CAP_IRQCHIP);
  K(KVM_CAP_USER_MEMORY);
  K(KVM_CAP_SET_TSS_ADDR);
  K(KVM_CAP_EXT_CPUID);
  K(KVM_CAP_NR_MEMSLOTS);
  K(KVM_CAP_PIT2);
  K(KVM_CAP_ADJUST_CLOCK);
  K(KVM_CAP_VCPU_EVENTS);
  K(KVM_CAP_DEBUGREGS);
  K(KVM_CAP_XSAVE);
  K(KVM_CAP_XCRS);
  K(KVM_CAP_TSC_CONTROL);
  K(KVM_CAP_GET_TSC_KHZ);
  K(KVM_CAP_IMMEDIATE_EXIT);
  K(KVM_CAP_MAX_VCPUS);
  K(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  K(KVM_CAP_DIRTY_LOG_RING);
  K(KVM_CAP_XSAVE2);
  // uv_poll events for FdPoller.start.
  K(UV_READABLE);
  K(UV_WRITABLE);
  K(UV_DISCONNECT);
  K(UV_PRIORITIZED);
#undef K
  set("SCM_MAX_FD", kMaxFds);
  c.Freeze();
  return c;
}

}  // namespace

void InitFdio(Napi::Env env, Napi::Object exports) {
  exports.Set("FdPoller", FdPoller::Class(env));
  exports.Set("setSocketBuffer", Napi::Function::New(env, SetSocketBuffer, "setSocketBuffer"));
  exports.Set("sendPieces", Napi::Function::New(env, SendPieces, "sendPieces"));
  exports.Set("readInto", Napi::Function::New(env, ReadInto, "readInto"));
  exports.Set("recvWithFds", Napi::Function::New(env, RecvWithFds, "recvWithFds"));
  exports.Set("sendWithFds", Napi::Function::New(env, SendWithFds, "sendWithFds"));
  exports.Set("constants", Constants(env));
}

}  // namespace ferry
