// Vcpu: one KVM vCPU and the native thread that runs it.
//
// Threading model
// - KVM_RUN loops on a dedicated std::thread (never the libuv pool). Exits
//   that need JS go through a ThreadSafeFunction: onExit(exit) runs on the JS
//   thread while the vCPU thread waits on a condvar; I/O-in data written into
//   exit.data during the callback is what the guest reads.
// - pause() never blocks the JS thread. It sets kvm_run->immediate_exit and
//   sends a real-time signal (no-op handler installed WITHOUT SA_RESTART) to
//   the thread, and returns a promise resolved (through the same TSFN) once
//   the thread is parked. If the thread is waiting for JS to handle an exit
//   (possibly the very callback calling pause()), it parks right after that
//   exit is handled.
// - KVM rule: an I/O or MMIO instruction completes only on the next KVM_RUN.
//   Before parking after such an exit, the thread re-enters KVM_RUN once with
//   immediate_exit=1; KVM finishes the instruction and returns -EINTR without
//   running guest code, so state read after pause() is consistent.
// - State ioctls (regs, sregs, ...) are allowed only while the thread is
//   parked (else ERR_VCPU_RUNNING): issued during KVM_RUN they would block the
//   JS thread on the vCPU mutex.
// - Lifetime: while the thread exists the Vcpu holds a strong reference to
//   itself (dropped by the TSFN finalizer, after the last queued call) and to
//   its Vm (so guest memory stays mapped). An env cleanup hook stops and joins
//   the thread at process/worker exit.
// - SAFETY (state ioctls): each passes a local struct of exactly the type its
//   ioctl number encodes; variable-size ones (MSRs, CPUID, XSAVE) use the C
//   layouts from kvm_abi.h with buffers sized from the count they carry.
// - An exception thrown by onExit is re-raised as an uncaught exception
//   (napi_fatal_exception, i.e. process 'uncaughtException'); the vCPU parks
//   itself so the guest does not run on with a half-handled exit.
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <string>
#include <vector>

#include "addon.h"
#include "errors.h"
#include "kvm_abi.h"
#include "util.h"
#include "vm.h"

namespace ferry {
namespace {

// SIGRTMIN+0..2 may be taken by glibc/other runtimes; Node uses SIGUSR1.
int KickSignal() { return SIGRTMIN + 3; }

void NoopHandler(int) {}

void InstallKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = NoopHandler;
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return -EINTR
    sigemptyset(&sa.sa_mask);
    sigaction(KickSignal(), &sa, nullptr);
  });
}

void NoopFinalize(napi_env, void*, void*) {}

}  // namespace

Napi::Function Vcpu::Class(Napi::Env env) {
  return DefineClass(env, "Vcpu",
                     {
                         InstanceAccessor<&Vcpu::GetFd>("fd"),
                         InstanceAccessor<&Vcpu::GetId>("id"),
                         InstanceAccessor<&Vcpu::GetRunning>("running"),
                         InstanceMethod<&Vcpu::Start>("start"),
                         InstanceMethod<&Vcpu::Pause>("pause"),
                         InstanceMethod<&Vcpu::Resume>("resume"),
                         InstanceMethod<&Vcpu::GetRegs>("getRegs"),
                         InstanceMethod<&Vcpu::SetRegs>("setRegs"),
                         InstanceMethod<&Vcpu::GetSregs>("getSregs"),
                         InstanceMethod<&Vcpu::SetSregs>("setSregs"),
                         InstanceMethod<&Vcpu::GetFpu>("getFpu"),
                         InstanceMethod<&Vcpu::SetFpu>("setFpu"),
                         InstanceMethod<&Vcpu::GetXsave>("getXsave"),
                         InstanceMethod<&Vcpu::SetXsave>("setXsave"),
                         InstanceMethod<&Vcpu::GetXcrs>("getXcrs"),
                         InstanceMethod<&Vcpu::SetXcrs>("setXcrs"),
                         InstanceMethod<&Vcpu::GetMsrs>("getMsrs"),
                         InstanceMethod<&Vcpu::SetMsrs>("setMsrs"),
                         InstanceMethod<&Vcpu::GetLapic>("getLapic"),
                         InstanceMethod<&Vcpu::SetLapic>("setLapic"),
                         InstanceMethod<&Vcpu::GetVcpuEvents>("getVcpuEvents"),
                         InstanceMethod<&Vcpu::SetVcpuEvents>("setVcpuEvents"),
                         InstanceMethod<&Vcpu::GetMpState>("getMpState"),
                         InstanceMethod<&Vcpu::SetMpState>("setMpState"),
                         InstanceMethod<&Vcpu::GetDebugRegs>("getDebugRegs"),
                         InstanceMethod<&Vcpu::SetDebugRegs>("setDebugRegs"),
                         InstanceMethod<&Vcpu::SetCpuid>("setCpuid"),
                         InstanceMethod<&Vcpu::GetTscKhz>("getTscKhz"),
                         InstanceMethod<&Vcpu::Close>("close"),
                     });
}

Napi::Object Vcpu::Create(Napi::Env env, const Init& init, Napi::Object vm) {
  Init copy = init;
  try {
    return ClassRegistry::Get(env, "Vcpu").New({Napi::External<Init>::New(env, &copy), vm});
  } catch (...) {
    if (copy.fd >= 0) close(copy.fd);  // the constructor did not take it
    throw;
  }
}

Vcpu::Vcpu(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Vcpu>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsExternal() || !info[1].IsObject())
    ThrowArgError(env, "Vcpu is created by Vm.createVcpu()");
  Init* init = info[0].As<Napi::External<Init>>().Data();
  fd_ = init->fd;
  init->fd = -1;  // ours now, closed by Shutdown/~Vcpu even if we throw below
  id_ = init->id;
  run_size_ = init->runSize;
  xsave_size_ = init->xsaveSize;
  // SAFETY: kvm_run is shared with the kernel; it stays mapped until Shutdown,
  // which first joins the only thread that runs KVM_RUN on it.
  void* p = mmap(nullptr, run_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    close(fd_);
    fd_ = -1;
    ThrowSystemError(env, err, "mmap", "KVM_RUN mmap");
  }
  run_ = static_cast<kvm_run*>(p);
  vm_ = init->vm;
  vm_ref_ = Napi::Persistent(info[1].As<Napi::Object>());
  env_ = env;
}

Vcpu::~Vcpu() {
  // The thread cannot exist here (self_ref_ keeps us alive while it does),
  // except at env teardown where the cleanup hook already joined it.
  StopThread();
  if (run_ != nullptr) munmap(run_, run_size_);
  run_ = nullptr;
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  if (vm_ != nullptr) vm_->Forget(this);
  vm_ = nullptr;
}

Napi::Value Vcpu::GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }
Napi::Value Vcpu::GetId(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), id_); }

Napi::Value Vcpu::GetRunning(const Napi::CallbackInfo& info) {
  if (!started_) return Napi::Boolean::New(info.Env(), false);
  std::lock_guard<std::mutex> g(mu_);
  return Napi::Boolean::New(info.Env(), want_run_ || !parked_);
}

void Vcpu::CheckPaused(Napi::Env env) {
  if (!started_) return;
  std::lock_guard<std::mutex> g(mu_);
  if (want_run_ || !parked_) ThrowCodeError(env, "ERR_VCPU_RUNNING", "vCPU state is only accessible while paused (await pause())");
}

// ---- run thread -------------------------------------------------------------

Napi::Value Vcpu::Start(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (run_ == nullptr) ThrowSystemError(env, EBADF, "ioctl", "KVM_RUN");
  if (started_) ThrowCodeError(env, "ERR_VCPU_STARTED", "vCPU thread already started");
  if (!info[0].IsFunction()) ThrowArgError(env, "onExit must be a function");
  bool running = info[1].ToBoolean();
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    if (!info[2].IsArray()) ThrowArgError(env, "postedPorts must be an array of port numbers");
    Napi::Array ports = info[2].As<Napi::Array>();
    posted_ports_.assign(65536, false);
    for (uint32_t i = 0; i < ports.Length(); i++) {
      Napi::Value v = ports.Get(i);
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= 65535) || d != static_cast<double>(static_cast<int>(d))) ThrowArgError(env, "postedPorts: a port is 0..65535");
      posted_ports_[static_cast<size_t>(d)] = true;
    }
  }
  if (info.Length() > 4 && !info[3].IsUndefined()) {
    if (!info[3].IsArray() || !info[4].IsTypedArray() || info[4].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
      ThrowArgError(env, "shadowPorts must be an array of ports and shadow a Uint8Array of 2 bytes per port");
    Napi::Array ports = info[3].As<Napi::Array>();
    Napi::Uint8Array cells = info[4].As<Napi::Uint8Array>();
    if (cells.ElementLength() < 2 * static_cast<size_t>(ports.Length())) ThrowArgError(env, "shadow needs 2 bytes per port");
    if (cells.ArrayBuffer().Data() == nullptr && ports.Length() > 0) ThrowArgError(env, "shadow is detached");
    for (uint32_t i = 0; i < ports.Length(); i++) {
      Napi::Value v = ports.Get(i);
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= 65535) || d != static_cast<double>(static_cast<int>(d))) ThrowArgError(env, "shadowPorts: a port is 0..65535");
      shadow_ports_.push_back(static_cast<uint16_t>(d));
    }
    shadow_ = cells.Data();
    shadow_ref_ = Napi::Persistent(cells);
  }
  InstallKickHandler();

  // The whole kvm_run mapping as one external buffer; exit.data views are
  // Uint8Arrays into it. Detached in Shutdown before munmap.
  napi_value ab;
  if (napi_create_external_arraybuffer(env, run_, run_size_, NoopFinalize, nullptr, &ab) != napi_ok) {
    if (env.IsExceptionPending()) throw env.GetAndClearPendingException();
    ThrowCodeError(env, "ERR_VIEW_FAILED", "cannot wrap kvm_run");
  }
  run_ab_ = Napi::Persistent(Napi::ArrayBuffer(env, ab));

  napi_threadsafe_function tsfn;
  napi_status st = napi_create_threadsafe_function(env, info[0], nullptr, Napi::String::New(env, "ferry:vcpu"), 0, 1,
                                                   this, FinalizeTsfn, this, CallJs, &tsfn);
  if (st != napi_ok) {
    napi_detach_arraybuffer(env, ab);
    run_ab_.Reset();
    ThrowCodeError(env, "ERR_TSFN", "napi_create_threadsafe_function failed");
  }
  tsfn_ = tsfn;
  self_ref_ = Napi::Persistent(Value());  // dropped in FinalizeTsfn
  {
    std::lock_guard<std::mutex> g(mu_);
    want_run_ = running;
    stop_ = false;
    parked_ = true;
    exit_pending_ = false;
    park_posted_ = false;
    needs_completion_ = false;
  }
  try {
    thread_ = std::thread(&Vcpu::ThreadMain, this);
  } catch (const std::system_error& e) {
    napi_release_threadsafe_function(tsfn_, napi_tsfn_abort);
    tsfn_ = nullptr;
    napi_detach_arraybuffer(env, ab);
    run_ab_.Reset();
    ThrowSystemError(env, e.code().value(), "pthread_create", "Vcpu.start");
  }
  tid_ = thread_.native_handle();
  started_ = true;
  napi_add_env_cleanup_hook(env, CleanupHook, this);
  hook_added_ = true;
  return env.Undefined();
}

void Vcpu::ThreadMain() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, KickSignal());
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);

  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    // Run, complete a pending I/O instruction, or park.
    for (;;) {
      if (stop_) return;
      // SAFETY: immediate_exit is written only under mu_ (here and in
      // Pause/StopThread); the kernel reads it at KVM_RUN entry.
      if (want_run_) {
        run_->immediate_exit = 0;
        break;
      }
      if (needs_completion_) {
        run_->immediate_exit = 1;
        break;
      }
      if (!parked_) {
        parked_ = true;
        cv_.notify_all();
      }
      if (pause_waiters_ > 0 && !park_posted_) {
        park_posted_ = true;
        lk.unlock();
        napi_call_threadsafe_function(tsfn_, reinterpret_cast<void*>(kParkedMsg), napi_tsfn_nonblocking);
        lk.lock();
        continue;
      }
      cv_.wait(lk);
    }
    parked_ = false;
    lk.unlock();

    needs_completion_ = false;
    int r = ioctl(fd_, KVM_RUN, 0);
    int err = r < 0 ? errno : 0;
    bool park = false;
    if (r < 0) {
      if (err != EINTR && err != EAGAIN) {
        Deliver(err);
        park = true;
      }
    } else {
      switch (run_->exit_reason) {
        case KVM_EXIT_IO:
          needs_completion_ = true;
          if (!ReadShadow() && !PostWrite()) Deliver(0);
          break;
        case KVM_EXIT_MMIO:
          needs_completion_ = true;
          Deliver(0);
          break;
        case KVM_EXIT_HLT:
          Deliver(0);
          break;
        case KVM_EXIT_INTR:
          break;
        default:  // shutdown, internal error, fail entry, system event, unknown
          Deliver(0);
          park = true;
      }
    }
    lk.lock();
    if (park) want_run_ = false;
  }
}

// An OUT to a posted port: JS gets a copy through the same (ordered) queue as
// every other exit and the guest runs on at once. A later exit, a pause or a
// state read is handled after it, so JS sees the device's writes in order.
bool Vcpu::PostWrite() {
  const auto& io = run_->io;
  size_t len = static_cast<size_t>(io.size) * io.count;
  if (io.direction != KVM_EXIT_IO_OUT || posted_ports_.empty() || !posted_ports_[io.port] || len > sizeof(PostedWrite::data) ||
      io.data_offset + len > run_size_)
    return false;
  auto* w = new PostedWrite{io.port, io.size, io.count, {}};
  memcpy(w->data, reinterpret_cast<uint8_t*>(run_) + io.data_offset, len);
  if (napi_call_threadsafe_function(tsfn_, w, napi_tsfn_blocking) != napi_ok) delete w;  // closing
  return true;
}

// A 1-byte IN from a shadowed port while JS marks the shadow valid: answered
// here. JS keeps value and flag current after every change of the register,
// and clears the flag while reads have effects or must follow earlier posted
// writes (e.g. UART loopback); those reads go to JS, in order.
bool Vcpu::ReadShadow() {
  const auto& io = run_->io;
  if (shadow_ == nullptr || io.direction != KVM_EXIT_IO_IN || io.size != 1 || io.count != 1 || io.data_offset + 1 > run_size_) return false;
  for (size_t i = 0; i < shadow_ports_.size(); i++) {
    if (shadow_ports_[i] != io.port) continue;
    if (__atomic_load_n(&shadow_[2 * i], __ATOMIC_ACQUIRE) != 1) return false;
    reinterpret_cast<uint8_t*>(run_)[io.data_offset] = __atomic_load_n(&shadow_[2 * i + 1], __ATOMIC_RELAXED);
    return true;
  }
  return false;
}

// Hands the current exit to JS and waits until onExit returned (or close).
bool Vcpu::Deliver(int err) {
  std::unique_lock<std::mutex> lk(mu_);
  if (stop_) return false;
  exit_pending_ = true;
  exit_errno_ = err;
  lk.unlock();
  napi_status st = napi_call_threadsafe_function(tsfn_, reinterpret_cast<void*>(kExitMsg), napi_tsfn_blocking);
  lk.lock();
  if (st != napi_ok) {  // closing: nobody will answer
    exit_pending_ = false;
    want_run_ = false;
    return false;
  }
  cv_.wait(lk, [this] { return !exit_pending_ || stop_; });
  exit_pending_ = false;
  return !stop_;
}

void Vcpu::CallJs(napi_env env, napi_value cb, void* ctx, void* data) {
  intptr_t msg = reinterpret_cast<intptr_t>(data);
  bool posted = msg != kExitMsg && msg != kParkedMsg;
  if (env == nullptr) {  // TSFN torn down with calls still queued
    if (posted) delete static_cast<PostedWrite*>(data);
    return;
  }
  Vcpu* self = static_cast<Vcpu*>(ctx);
  Napi::Env e(env);
  Napi::HandleScope scope(e);
  if (msg == kExitMsg) {
    self->HandleExit(e, Napi::Function(env, cb));
  } else if (msg == kParkedMsg) {
    self->HandleParked(e);
  } else {
    self->HandlePosted(e, Napi::Function(env, cb), static_cast<PostedWrite*>(data));
  }
}

void Vcpu::HandlePosted(Napi::Env env, Napi::Function cb, PostedWrite* w) {
  std::unique_ptr<PostedWrite> owned(w);
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) return;
  }
  try {
    Napi::Object ex = Napi::Object::New(env);
    ex.Set("reason", "io");
    ex.Set("direction", KVM_EXIT_IO_OUT);
    ex.Set("port", w->port);
    ex.Set("size", w->size);
    ex.Set("count", w->count);
    ex.Set("data", Napi::Buffer<uint8_t>::Copy(env, w->data, static_cast<size_t>(w->size) * w->count));
    ex.Set("posted", true);
    cb.Call(Value(), {ex});
  } catch (const Napi::Error& e) {
    napi_fatal_exception(env, e.Value());
    std::lock_guard<std::mutex> g(mu_);
    want_run_ = false;  // as for a failed exit: the guest does not run on
    if (!parked_) {
      run_->immediate_exit = 1;
      pthread_kill(tid_, KickSignal());
    }
  }
}

void Vcpu::HandleExit(Napi::Env env, Napi::Function cb) {
  int err;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!exit_pending_ || stop_) return;  // cancelled by close()
    err = exit_errno_;
  }
  // The vCPU thread is blocked in Deliver: kvm_run is stable and mapped.
  bool threw = false;
  try {
    Napi::Object ex = Napi::Object::New(env);
    Napi::ArrayBuffer ab = run_ab_.Value();
    auto* base = reinterpret_cast<uint8_t*>(run_);
    if (err != 0) {
      ex.Set("reason", "error");
      ex.Set("error", SystemError(env, err, "ioctl", "KVM_RUN").Value());
    } else {
      switch (run_->exit_reason) {
        case KVM_EXIT_IO: {
          size_t len = static_cast<size_t>(run_->io.size) * run_->io.count;
          ex.Set("reason", "io");
          ex.Set("direction", run_->io.direction);
          ex.Set("port", run_->io.port);
          ex.Set("size", run_->io.size);
          ex.Set("count", run_->io.count);
          if (run_->io.data_offset + len <= run_size_) {
            ex.Set("data", Napi::Uint8Array::New(env, len, ab, run_->io.data_offset));
          } else {
            ex.Set("data", Napi::Uint8Array::New(env, 0));
          }
          break;
        }
        case KVM_EXIT_MMIO: {
          ex.Set("reason", "mmio");
          ex.Set("isWrite", run_->mmio.is_write != 0);
          ex.Set("gpa", static_cast<double>(run_->mmio.phys_addr));
          ex.Set("len", run_->mmio.len);
          size_t off = reinterpret_cast<uint8_t*>(run_->mmio.data) - base;
          ex.Set("data", Napi::Uint8Array::New(env, sizeof run_->mmio.data, ab, off));
          break;
        }
        case KVM_EXIT_SHUTDOWN:
          ex.Set("reason", "shutdown");
          break;
        case KVM_EXIT_HLT:
          ex.Set("reason", "hlt");
          break;
        case KVM_EXIT_INTERNAL_ERROR: {
          ex.Set("reason", "internal-error");
          ex.Set("suberror", run_->internal.suberror);
          uint32_t n = run_->internal.ndata;
          if (n > 16) n = 16;
          Napi::Array d = Napi::Array::New(env, n);
          for (uint32_t i = 0; i < n; i++) d.Set(i, static_cast<double>(run_->internal.data[i]));
          ex.Set("data", d);
          break;
        }
        case KVM_EXIT_FAIL_ENTRY:
          ex.Set("reason", "fail-entry");
          ex.Set("hardwareEntryFailureReason", static_cast<double>(run_->fail_entry.hardware_entry_failure_reason));
          ex.Set("cpu", run_->fail_entry.cpu);
          break;
        case KVM_EXIT_SYSTEM_EVENT:
          ex.Set("reason", "system-event");
          ex.Set("type", run_->system_event.type);
          break;
        default:
          ex.Set("reason", "unknown");
          ex.Set("exitReason", run_->exit_reason);
      }
    }
    cb.Call(Value(), {ex});
  } catch (const Napi::Error& e) {
    threw = true;
    // Node 20 would swallow it: make it an uncaught exception instead.
    napi_fatal_exception(env, e.Value());
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    exit_pending_ = false;
    if (threw) want_run_ = false;
  }
  cv_.notify_all();
}

void Vcpu::HandleParked(Napi::Env env) {
  {
    std::lock_guard<std::mutex> g(mu_);
    park_posted_ = false;
    if (!(parked_ && !want_run_)) return;  // resumed meanwhile: the next park answers
    pause_waiters_ = 0;
  }
  ResolvePauses(env);
}

void Vcpu::ResolvePauses(Napi::Env env) {
  std::vector<Napi::Promise::Deferred> ds;
  ds.swap(pauses_);
  for (auto& d : ds) d.Resolve(env.Undefined());
}

void Vcpu::FinalizeTsfn(napi_env env, void* data, void* hint) {
  // Last queued call has run: nothing refers to the Vcpu from the TSFN now.
  Vcpu* self = static_cast<Vcpu*>(data);
  self->self_ref_.Reset();
}

Napi::Value Vcpu::Pause(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Promise::Deferred d = Napi::Promise::Deferred::New(env);
  if (!started_) {
    d.Resolve(env.Undefined());
    return d.Promise();
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    want_run_ = false;
    if (!parked_) {
      run_->immediate_exit = 1;
      pthread_kill(tid_, KickSignal());
      pause_waiters_++;
      pauses_.push_back(d);
      return d.Promise();
    }
  }
  d.Resolve(env.Undefined());
  return d.Promise();
}

Napi::Value Vcpu::Resume(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (run_ == nullptr) ThrowSystemError(env, EBADF, "ioctl", "KVM_RUN");
  if (!started_) ThrowCodeError(env, "ERR_VCPU_NOT_STARTED", "call start() first");
  {
    std::lock_guard<std::mutex> g(mu_);
    want_run_ = true;
  }
  cv_.notify_all();
  return env.Undefined();
}

// No JS here: callable from the env cleanup hook.
void Vcpu::StopThread() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
    want_run_ = false;
    if (run_ != nullptr) run_->immediate_exit = 1;
    pthread_kill(tid_, KickSignal());
  }
  cv_.notify_all();
  thread_.join();
  if (tsfn_ != nullptr) napi_release_threadsafe_function(tsfn_, napi_tsfn_release);
  tsfn_ = nullptr;
}

void Vcpu::CleanupHook(void* arg) {
  Vcpu* self = static_cast<Vcpu*>(arg);
  self->hook_added_ = false;
  self->StopThread();
}

void Vcpu::Shutdown(Napi::Env env) {
  if (hook_added_) napi_remove_env_cleanup_hook(env, CleanupHook, this);
  hook_added_ = false;
  StopThread();
  if (started_) {
    started_ = false;
    {
      std::lock_guard<std::mutex> g(mu_);
      pause_waiters_ = 0;
      parked_ = true;
    }
    ResolvePauses(env);  // a closed vCPU is as paused as it gets
  }
  if (!run_ab_.IsEmpty()) {
    napi_detach_arraybuffer(env, run_ab_.Value());
    run_ab_.Reset();
  }
  if (run_ != nullptr) munmap(run_, run_size_);
  run_ = nullptr;
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  vm_ref_.Reset();
}

Napi::Value Vcpu::Close(const Napi::CallbackInfo& info) {
  Shutdown(info.Env());
  return info.Env().Undefined();
}

// ---- state ------------------------------------------------------------------

template <typename T>
Napi::Value Vcpu::GetState(const Napi::CallbackInfo& info, unsigned long req, const char* op) {
  CheckPaused(info.Env());
  T s{};
  if (ioctl(fd_, req, &s) < 0) ThrowSystemError(info.Env(), errno, "ioctl", op);
  return StructBuffer(info.Env(), s);
}

template <typename T>
Napi::Value Vcpu::SetState(const Napi::CallbackInfo& info, unsigned long req, const char* op) {
  CheckPaused(info.Env());
  T s = ArgStruct<T>(info, 0, "state");
  if (ioctl(fd_, req, &s) < 0) ThrowSystemError(info.Env(), errno, "ioctl", op);
  return info.Env().Undefined();
}

Napi::Value Vcpu::GetRegs(const Napi::CallbackInfo& i) { return GetState<kvm_regs>(i, KVM_GET_REGS, "KVM_GET_REGS"); }
Napi::Value Vcpu::SetRegs(const Napi::CallbackInfo& i) { return SetState<kvm_regs>(i, KVM_SET_REGS, "KVM_SET_REGS"); }
Napi::Value Vcpu::GetSregs(const Napi::CallbackInfo& i) { return GetState<kvm_sregs>(i, KVM_GET_SREGS, "KVM_GET_SREGS"); }
Napi::Value Vcpu::SetSregs(const Napi::CallbackInfo& i) { return SetState<kvm_sregs>(i, KVM_SET_SREGS, "KVM_SET_SREGS"); }
Napi::Value Vcpu::GetFpu(const Napi::CallbackInfo& i) { return GetState<kvm_fpu>(i, KVM_GET_FPU, "KVM_GET_FPU"); }
Napi::Value Vcpu::SetFpu(const Napi::CallbackInfo& i) { return SetState<kvm_fpu>(i, KVM_SET_FPU, "KVM_SET_FPU"); }
Napi::Value Vcpu::GetXcrs(const Napi::CallbackInfo& i) { return GetState<kvm_xcrs>(i, KVM_GET_XCRS, "KVM_GET_XCRS"); }
Napi::Value Vcpu::SetXcrs(const Napi::CallbackInfo& i) { return SetState<kvm_xcrs>(i, KVM_SET_XCRS, "KVM_SET_XCRS"); }
Napi::Value Vcpu::GetLapic(const Napi::CallbackInfo& i) { return GetState<kvm_lapic_state>(i, KVM_GET_LAPIC, "KVM_GET_LAPIC"); }
Napi::Value Vcpu::SetLapic(const Napi::CallbackInfo& i) { return SetState<kvm_lapic_state>(i, KVM_SET_LAPIC, "KVM_SET_LAPIC"); }
Napi::Value Vcpu::GetVcpuEvents(const Napi::CallbackInfo& i) {
  return GetState<kvm_vcpu_events>(i, KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS");
}
Napi::Value Vcpu::SetVcpuEvents(const Napi::CallbackInfo& i) {
  return SetState<kvm_vcpu_events>(i, KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS");
}
Napi::Value Vcpu::GetDebugRegs(const Napi::CallbackInfo& i) {
  return GetState<kvm_debugregs>(i, KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS");
}
Napi::Value Vcpu::SetDebugRegs(const Napi::CallbackInfo& i) {
  return SetState<kvm_debugregs>(i, KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS");
}

Napi::Value Vcpu::GetXsave(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckPaused(env);
  bool v2 = xsave_size_ > 0;
  size_t size = v2 && xsave_size_ > abi::kXsaveSize ? xsave_size_ : abi::kXsaveSize;
  std::vector<uint64_t> buf((size + 7) / 8);
  // SAFETY: KVM_GET_XSAVE2 writes KVM_CAP_XSAVE2 bytes (size), XSAVE 4096.
  if (ioctl(fd_, v2 ? abi::kGetXsave2 : abi::kGetXsave, buf.data()) < 0)
    ThrowSystemError(env, errno, "ioctl", v2 ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE");
  return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(buf.data()), size);
}

Napi::Value Vcpu::SetXsave(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckPaused(env);
  auto [data, len] = ArgBytes(info, 0, "state");
  size_t need = xsave_size_ > abi::kXsaveSize ? xsave_size_ : abi::kXsaveSize;
  if (len < abi::kXsaveSize) ThrowRangeError(env, "state must be at least 4096 bytes");
  // The kernel reads its own uabi size, which may exceed what we were given:
  // copy into a buffer at least that large (zero tail).
  std::vector<uint64_t> buf((std::max(len, need) + 7) / 8, 0);
  memcpy(buf.data(), data, len);
  // SAFETY: the kernel reads its uabi size (<= need) from buf.
  if (ioctl(fd_, abi::kSetXsave, buf.data()) < 0) ThrowSystemError(env, errno, "ioctl", "KVM_SET_XSAVE");
  return env.Undefined();
}

// struct kvm_msrs in its C layout (kvm_abi.h): 8-byte header + entries.
struct MsrBuf {
  std::vector<uint64_t> storage;
  explicit MsrBuf(size_t n) : storage((sizeof(abi::MsrsHeader) + n * sizeof(kvm_msr_entry)) / 8, 0) {
    header()->nmsrs = static_cast<uint32_t>(n);
  }
  abi::MsrsHeader* header() { return reinterpret_cast<abi::MsrsHeader*>(storage.data()); }
  kvm_msr_entry* entries() { return reinterpret_cast<kvm_msr_entry*>(storage.data() + 1); }
};

static std::vector<uint32_t> ArgIndices(const Napi::CallbackInfo& info, size_t i) {
  if (!info[i].IsArray()) ThrowArgError(info.Env(), "indices must be an array of numbers");
  Napi::Array a = info[i].As<Napi::Array>();
  std::vector<uint32_t> out(a.Length());
  for (uint32_t k = 0; k < a.Length(); k++) {
    Napi::Value v = a.Get(k);
    if (!v.IsNumber()) ThrowArgError(info.Env(), "indices must be an array of numbers");
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 4294967295.0 || d != static_cast<double>(static_cast<uint32_t>(d)))
      ThrowArgError(info.Env(), "MSR index must be a uint32");
    out[k] = static_cast<uint32_t>(d);
  }
  return out;
}

Napi::Value Vcpu::GetMsrs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckPaused(env);
  std::vector<uint32_t> idx = ArgIndices(info, 0);
  MsrBuf m(idx.size());
  for (size_t k = 0; k < idx.size(); k++) m.entries()[k].index = idx[k];
  int r = ioctl(fd_, abi::kGetMsrs, m.header());
  if (r < 0) ThrowSystemError(env, errno, "ioctl", "KVM_GET_MSRS");
  if (static_cast<size_t>(r) < idx.size()) {
    char msg[96];
    snprintf(msg, sizeof msg, "KVM_GET_MSRS read %d of %zu MSRs; MSR 0x%x failed", r, idx.size(), idx[r]);
    Napi::Error e = Napi::Error::New(env, msg);
    e.Set("code", "ERR_KVM_MSR_UNREADABLE");
    e.Set("index", static_cast<double>(idx[r]));
    e.Set("read", Napi::Number::New(env, r));
    throw e;
  }
  Napi::Array out = Napi::Array::New(env, idx.size());
  for (size_t k = 0; k < idx.size(); k++) out.Set(k, Napi::BigInt::New(env, static_cast<uint64_t>(m.entries()[k].data)));
  return out;
}

Napi::Value Vcpu::SetMsrs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckPaused(env);
  std::vector<uint32_t> idx = ArgIndices(info, 0);
  if (!info[1].IsArray() || info[1].As<Napi::Array>().Length() != idx.size())
    ThrowArgError(env, "values must be an array as long as indices");
  Napi::Array vals = info[1].As<Napi::Array>();
  MsrBuf m(idx.size());
  for (size_t k = 0; k < idx.size(); k++) {
    Napi::Value v = vals.Get(static_cast<uint32_t>(k));
    if (!v.IsBigInt()) ThrowArgError(env, "MSR values must be bigints");
    bool lossless = false;
    m.entries()[k].index = idx[k];
    m.entries()[k].data = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowArgError(env, "MSR value must fit in 64 bits");
  }
  int r = ioctl(fd_, abi::kSetMsrs, m.header());
  if (r < 0) ThrowSystemError(env, errno, "ioctl", "KVM_SET_MSRS");
  return Napi::Number::New(env, r);
}

Napi::Value Vcpu::GetMpState(const Napi::CallbackInfo& info) {
  CheckPaused(info.Env());
  kvm_mp_state s{};
  if (ioctl(fd_, KVM_GET_MP_STATE, &s) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_GET_MP_STATE");
  return Napi::Number::New(info.Env(), s.mp_state);
}

Napi::Value Vcpu::SetMpState(const Napi::CallbackInfo& info) {
  CheckPaused(info.Env());
  kvm_mp_state s{};
  s.mp_state = ArgU32(info, 0, "state");
  if (ioctl(fd_, KVM_SET_MP_STATE, &s) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_SET_MP_STATE");
  return info.Env().Undefined();
}

Napi::Value Vcpu::SetCpuid(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  CheckPaused(env);
  auto [data, len] = ArgBytes(info, 0, "cpuid");
  if (len < sizeof(abi::Cpuid2Header)) ThrowRangeError(env, "cpuid must hold a struct kvm_cpuid2 header");
  uint32_t nent;
  memcpy(&nent, data, sizeof nent);
  size_t need = sizeof(abi::Cpuid2Header) + static_cast<size_t>(nent) * sizeof(kvm_cpuid_entry2);
  if (len < need) ThrowRangeError(env, "cpuid is shorter than its nent entries");
  std::vector<uint64_t> buf((need + 7) / 8);
  memcpy(buf.data(), data, need);
  if (ioctl(fd_, abi::kSetCpuid2, buf.data()) < 0) ThrowSystemError(env, errno, "ioctl", "KVM_SET_CPUID2");
  return env.Undefined();
}

Napi::Value Vcpu::GetTscKhz(const Napi::CallbackInfo& info) {
  CheckPaused(info.Env());
  int r = ioctl(fd_, KVM_GET_TSC_KHZ, 0);
  if (r < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_GET_TSC_KHZ");
  return Napi::Number::New(info.Env(), r);
}

void InitVcpu(Napi::Env env, Napi::Object exports) {
  // Not exported: Vm.createVcpu() is the only way to make one.
  ClassRegistry::Set(env, "Vcpu", Vcpu::Class(env));
}

}  // namespace ferry
