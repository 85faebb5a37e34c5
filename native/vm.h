// Vm and Vcpu declarations shared by kvm.cc (creates Vm), vm.cc (creates
// Vcpu) and vcpu.cc.
#pragma once
#include <linux/kvm.h>
#include <napi.h>
#include <pthread.h>

#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace ferry {
class GuestMemory;
class Vcpu;

class Vm : public Napi::ObjectWrap<Vm> {
 public:
  struct Init {
    int fd;           // owned by the new Vm from the constructor on
    size_t runSize;   // KVM_GET_VCPU_MMAP_SIZE
  };
  static Napi::Function Class(Napi::Env env);
  // Wraps a fresh VM fd (closes it if wrapping fails).
  static Napi::Object Create(Napi::Env env, const Init& init);
  explicit Vm(const Napi::CallbackInfo& info);
  ~Vm();

  int fd() const { return fd_; }
  void Forget(Vcpu* v);  // a Vcpu being destroyed unregisters itself

 private:
  struct Slot {
    uint64_t gpa, size, memOffset;
    uint32_t flags;
    GuestMemory* memory;          // INVARIANT: alive while `ref` holds it
    Napi::ObjectReference ref;    // keeps GC from unmapping guest RAM under KVM
  };
  Napi::Value GetFd(const Napi::CallbackInfo& info);
  Napi::Value SetMemorySlot(const Napi::CallbackInfo& info);
  Napi::Value EnableManualDirtyLogProtect(const Napi::CallbackInfo& info);
  Napi::Value GetDirtyLog(const Napi::CallbackInfo& info);
  Napi::Value ClearDirtyLog(const Napi::CallbackInfo& info);
  Napi::Value SetTssAddr(const Napi::CallbackInfo& info);
  Napi::Value SetIdentityMapAddr(const Napi::CallbackInfo& info);
  Napi::Value CreateIrqchip(const Napi::CallbackInfo& info);
  Napi::Value CreatePit2(const Napi::CallbackInfo& info);
  Napi::Value IrqLine(const Napi::CallbackInfo& info);
  Napi::Value GetIrqchip(const Napi::CallbackInfo& info);
  Napi::Value SetIrqchip(const Napi::CallbackInfo& info);
  Napi::Value GetPit2(const Napi::CallbackInfo& info);
  Napi::Value SetPit2(const Napi::CallbackInfo& info);
  Napi::Value GetClock(const Napi::CallbackInfo& info);
  Napi::Value SetClock(const Napi::CallbackInfo& info);
  Napi::Value CreateVcpu(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  void DoClose();

  int fd_ = -1;
  size_t run_size_ = 0;
  std::map<uint32_t, Slot> slots_;
  // Vcpus created here (raw: each Vcpu holds this Vm strongly and unregisters
  // itself in its destructor; ~Vm clears their back pointers).
  std::vector<Vcpu*> vcpus_;
};

class Vcpu : public Napi::ObjectWrap<Vcpu> {
 public:
  struct Init {
    int fd;            // owned by the new Vcpu from the constructor on
    uint32_t id;
    size_t runSize;
    size_t xsaveSize;  // KVM_CAP_XSAVE2 on the VM (0 = use KVM_GET_XSAVE, 4096 bytes)
    Vm* vm;
  };
  static Napi::Function Class(Napi::Env env);
  static Napi::Object Create(Napi::Env env, const Init& init, Napi::Object vm);
  explicit Vcpu(const Napi::CallbackInfo& info);
  ~Vcpu();

  // Stop and join the thread, unmap kvm_run, close the fd. Idempotent.
  void Shutdown(Napi::Env env);
  void DetachFromVm() { vm_ = nullptr; }

 private:
  enum Msg : intptr_t { kExitMsg = 1, kParkedMsg = 2 };
  // A port write handed to JS without waiting (any other TSFN message value is one of these).
  struct PostedWrite {
    uint16_t port;
    uint8_t size;
    uint32_t count;
    uint8_t data[8];
  };

  Napi::Value GetFd(const Napi::CallbackInfo& info);
  Napi::Value GetId(const Napi::CallbackInfo& info);
  Napi::Value GetRunning(const Napi::CallbackInfo& info);
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Pause(const Napi::CallbackInfo& info);
  Napi::Value Resume(const Napi::CallbackInfo& info);
  Napi::Value GetRegs(const Napi::CallbackInfo& info);
  Napi::Value SetRegs(const Napi::CallbackInfo& info);
  Napi::Value GetSregs(const Napi::CallbackInfo& info);
  Napi::Value SetSregs(const Napi::CallbackInfo& info);
  Napi::Value GetFpu(const Napi::CallbackInfo& info);
  Napi::Value SetFpu(const Napi::CallbackInfo& info);
  Napi::Value GetXsave(const Napi::CallbackInfo& info);
  Napi::Value SetXsave(const Napi::CallbackInfo& info);
  Napi::Value GetXcrs(const Napi::CallbackInfo& info);
  Napi::Value SetXcrs(const Napi::CallbackInfo& info);
  Napi::Value GetMsrs(const Napi::CallbackInfo& info);
  Napi::Value SetMsrs(const Napi::CallbackInfo& info);
  Napi::Value GetLapic(const Napi::CallbackInfo& info);
  Napi::Value SetLapic(const Napi::CallbackInfo& info);
  Napi::Value GetVcpuEvents(const Napi::CallbackInfo& info);
  Napi::Value SetVcpuEvents(const Napi::CallbackInfo& info);
  Napi::Value GetMpState(const Napi::CallbackInfo& info);
  Napi::Value SetMpState(const Napi::CallbackInfo& info);
  Napi::Value GetDebugRegs(const Napi::CallbackInfo& info);
  Napi::Value SetDebugRegs(const Napi::CallbackInfo& info);
  Napi::Value SetCpuid(const Napi::CallbackInfo& info);
  Napi::Value GetTscKhz(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  template <typename T>
  Napi::Value GetState(const Napi::CallbackInfo& info, unsigned long req, const char* op);
  template <typename T>
  Napi::Value SetState(const Napi::CallbackInfo& info, unsigned long req, const char* op);
  void CheckPaused(Napi::Env env);  // throws ERR_VCPU_RUNNING

  // vCPU thread side.
  void ThreadMain();
  bool Deliver(int err);
  // JS thread side of the ThreadSafeFunction.
  static void CallJs(napi_env env, napi_value cb, void* ctx, void* data);
  static void FinalizeTsfn(napi_env env, void* data, void* hint);
  static void CleanupHook(void* arg);
  void HandleExit(Napi::Env env, Napi::Function cb);
  void HandleParked(Napi::Env env);
  void HandlePosted(Napi::Env env, Napi::Function cb, PostedWrite* w);
  bool PostWrite();  // vCPU thread: queue the current OUT exit for JS; false if it must be delivered
  bool ReadShadow();  // vCPU thread: answer the current 1-byte IN from a JS-kept shadow; false if JS must
  void StopThread();  // no JS: sets stop, kicks, joins, releases the TSFN
  void ResolvePauses(Napi::Env env);

  int fd_ = -1;
  uint32_t id_ = 0;
  kvm_run* run_ = nullptr;  // SAFETY: mmap of fd_ for run_size_ bytes until Shutdown()
  size_t run_size_ = 0;
  size_t xsave_size_ = 0;
  Vm* vm_ = nullptr;               // cleared by ~Vm
  Napi::ObjectReference vm_ref_;  // strong: the VM (and its memory slots) outlive this vCPU

  // Thread and handshake. Fields marked (mu_) are shared with the vCPU thread.
  std::thread thread_;
  pthread_t tid_{};
  bool started_ = false;          // JS thread only
  bool hook_added_ = false;       // JS thread only
  napi_env env_ = nullptr;
  napi_threadsafe_function tsfn_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  bool want_run_ = false;         // (mu_) JS wants the guest running
  bool stop_ = false;             // (mu_) close requested
  bool parked_ = true;            // (mu_) thread will not enter KVM_RUN until want_run_ or must-complete
  bool exit_pending_ = false;     // (mu_) an exit waits for JS
  int exit_errno_ = 0;            // (mu_) errno of a failed KVM_RUN for the pending exit
  bool park_posted_ = false;      // (mu_) a kParkedMsg is queued
  int pause_waiters_ = 0;         // (mu_) pause() promises not yet resolved
  bool needs_completion_ = false; // thread only: an IO/MMIO exit awaits its KVM_RUN re-entry
  std::vector<bool> posted_ports_; // set by start(), then read-only: OUT to these ports does not wait for JS
  // set by start(), then read-only: IN from shadow_ports_[i] reads shadow_[2i+1] while shadow_[2i] is 1
  std::vector<uint16_t> shadow_ports_;
  uint8_t* shadow_ = nullptr;                 // SAFETY: kept alive by shadow_ref_ (a non-resizable buffer)
  Napi::Reference<Napi::Uint8Array> shadow_ref_;
  std::vector<Napi::Promise::Deferred> pauses_;  // JS thread only
  Napi::ObjectReference self_ref_;               // strong while the thread exists (TSFN finalizer drops it)
  Napi::Reference<Napi::ArrayBuffer> run_ab_;    // external buffer over kvm_run, detached at Shutdown
};
}  // namespace ferry
