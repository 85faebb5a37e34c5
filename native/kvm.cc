// Kvm: the /dev/kvm system fd. API version, capability probe, host-wide
// queries (MSR index list, supported CPUID) and VM creation.
//
// Capabilities newer than Debian 12's 6.1 uapi headers are defined below with
// the kernel's numbers; the running kernel (6.18 here) is probed, never
// assumed. Every fd is O_CLOEXEC (KVM itself creates VM and vCPU fds with it).
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "addon.h"
#include "errors.h"
#include "kvm_abi.h"
#include "util.h"
#include "vm.h"


namespace ferry {
namespace {

struct CapName {
  const char* name;
  int cap;
};
// The capabilities a VMM doing live migration cares about, by name.
const CapName kCaps[] = {
    {"IRQCHIP", KVM_CAP_IRQCHIP},
    {"HLT", KVM_CAP_HLT},
    {"USER_MEMORY", KVM_CAP_USER_MEMORY},
    {"SET_TSS_ADDR", KVM_CAP_SET_TSS_ADDR},
    {"EXT_CPUID", KVM_CAP_EXT_CPUID},
    {"CLOCKSOURCE", KVM_CAP_CLOCKSOURCE},
    {"NR_VCPUS", KVM_CAP_NR_VCPUS},
    {"MAX_VCPUS", KVM_CAP_MAX_VCPUS},
    {"MAX_VCPU_ID", KVM_CAP_MAX_VCPU_ID},
    {"NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS},
    {"PIT", KVM_CAP_PIT},
    {"PIT2", KVM_CAP_PIT2},
    {"PIT_STATE2", KVM_CAP_PIT_STATE2},
    {"MP_STATE", KVM_CAP_MP_STATE},
    {"SYNC_MMU", KVM_CAP_SYNC_MMU},
    {"SET_IDENTITY_MAP_ADDR", KVM_CAP_SET_IDENTITY_MAP_ADDR},
    {"ADJUST_CLOCK", KVM_CAP_ADJUST_CLOCK},
    {"INTERNAL_ERROR_DATA", KVM_CAP_INTERNAL_ERROR_DATA},
    {"VCPU_EVENTS", KVM_CAP_VCPU_EVENTS},
    {"DEBUGREGS", KVM_CAP_DEBUGREGS},
    {"XSAVE", KVM_CAP_XSAVE},
    {"XSAVE2", KVM_CAP_XSAVE2},
    {"XCRS", KVM_CAP_XCRS},
    {"ENABLE_CAP", KVM_CAP_ENABLE_CAP},
    {"ENABLE_CAP_VM", KVM_CAP_ENABLE_CAP_VM},
    {"TSC_CONTROL", KVM_CAP_TSC_CONTROL},
    {"VM_TSC_CONTROL", KVM_CAP_VM_TSC_CONTROL},
    {"GET_TSC_KHZ", KVM_CAP_GET_TSC_KHZ},
    {"TSC_DEADLINE_TIMER", KVM_CAP_TSC_DEADLINE_TIMER},
    {"IRQ_ROUTING", KVM_CAP_IRQ_ROUTING},
    {"IRQFD", KVM_CAP_IRQFD},
    {"IOEVENTFD", KVM_CAP_IOEVENTFD},
    {"READONLY_MEM", KVM_CAP_READONLY_MEM},
    {"IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT},
    {"MULTI_ADDRESS_SPACE", KVM_CAP_MULTI_ADDRESS_SPACE},
    {"SPLIT_IRQCHIP", KVM_CAP_SPLIT_IRQCHIP},
    {"X2APIC_API", KVM_CAP_X2APIC_API},
    {"GET_MSR_FEATURES", KVM_CAP_GET_MSR_FEATURES},
    {"EXCEPTION_PAYLOAD", KVM_CAP_EXCEPTION_PAYLOAD},
    {"MANUAL_DIRTY_LOG_PROTECT2", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2},
    {"DIRTY_LOG_RING", KVM_CAP_DIRTY_LOG_RING},
    {"DIRTY_LOG_RING_ACQ_REL", KVM_CAP_DIRTY_LOG_RING_ACQ_REL},
    {"DIRTY_LOG_RING_WITH_BITMAP", KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP},
    {"SREGS2", KVM_CAP_SREGS2},
    {"X86_USER_SPACE_MSR", KVM_CAP_X86_USER_SPACE_MSR},
    {"X86_MSR_FILTER", KVM_CAP_X86_MSR_FILTER},
    {"SYSTEM_EVENT_DATA", KVM_CAP_SYSTEM_EVENT_DATA},
    {"X86_TRIPLE_FAULT_EVENT", KVM_CAP_X86_TRIPLE_FAULT_EVENT},
    {"NOP_IO_DELAY", KVM_CAP_NOP_IO_DELAY},
    {"KVMCLOCK_CTRL", KVM_CAP_KVMCLOCK_CTRL},
    {"SET_GUEST_DEBUG", KVM_CAP_SET_GUEST_DEBUG},
    {"BINARY_STATS_FD", KVM_CAP_BINARY_STATS_FD},
};

class Kvm : public Napi::ObjectWrap<Kvm> {
 public:
  static Napi::Function Class(Napi::Env env) {
    return DefineClass(env, "Kvm",
                       {
                           InstanceAccessor<&Kvm::GetFd>("fd"),
                           InstanceMethod<&Kvm::ApiVersion>("apiVersion"),
                           InstanceMethod<&Kvm::CheckExtension>("checkExtension"),
                           InstanceMethod<&Kvm::Probe>("probe"),
                           InstanceMethod<&Kvm::MsrIndexList>("msrIndexList"),
                           InstanceMethod<&Kvm::SupportedCpuid>("supportedCpuid"),
                           InstanceMethod<&Kvm::CreateVm>("createVm"),
                           InstanceMethod<&Kvm::Close>("close"),
                       });
  }

  explicit Kvm(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Kvm>(info) {
    std::string path = "/dev/kvm";
    if (info.Length() > 0 && !info[0].IsUndefined()) {
      if (!info[0].IsString()) ThrowArgError(info.Env(), "path must be a string");
      path = info[0].As<Napi::String>().Utf8Value();
    }
    fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ < 0) ThrowSystemError(info.Env(), errno, "open", "KVM_OPEN");
  }
  ~Kvm() {
    if (fd_ >= 0) close(fd_);
  }

 private:
  // INVARIANT: fd_ is -1 after close(); ioctls on it then fail with EBADF,
  // which is exactly the error a closed object must report.
  // EINTR is retried: KVM_CREATE_VM can be interrupted by any signal (seen
  // with the CPU profiler's SIGPROF), as QEMU's loop around it knows.
  int Ioctl(Napi::Env env, unsigned long req, unsigned long arg, const char* op) {
    int r;
    do {
      r = ioctl(fd_, req, arg);
    } while (r < 0 && errno == EINTR);
    if (r < 0) ThrowSystemError(env, errno, "ioctl", op);
    return r;
  }
  int Check(Napi::Env env, int cap) { return Ioctl(env, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION"); }

  Napi::Value GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }

  Napi::Value ApiVersion(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), Ioctl(info.Env(), KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION"));
  }

  Napi::Value CheckExtension(const Napi::CallbackInfo& info) {
    uint32_t cap = ArgU32(info, 0, "cap");
    return Napi::Number::New(info.Env(), Check(info.Env(), static_cast<int>(cap)));
  }

  Napi::Value Probe(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object out = Napi::Object::New(env);
    out.Set("apiVersion", Ioctl(env, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION"));
    Napi::Object caps = Napi::Object::New(env);
    for (const CapName& c : kCaps) caps.Set(c.name, Check(env, c.cap));
    out.Set("caps", caps);
    int maxVcpus = Check(env, KVM_CAP_MAX_VCPUS);
    if (maxVcpus == 0) maxVcpus = Check(env, KVM_CAP_NR_VCPUS);
    if (maxVcpus == 0) maxVcpus = 4;  // the documented default when neither answers
    out.Set("maxVcpus", maxVcpus);
    out.Set("manualDirtyLogProtect", Check(env, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    int xsave2 = Check(env, KVM_CAP_XSAVE2);
    out.Set("xsaveSize", xsave2 > static_cast<int>(abi::kXsaveSize) ? xsave2 : static_cast<int>(abi::kXsaveSize));
    return out;
  }

  Napi::Value MsrIndexList(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    // First ask with room for none: the kernel answers E2BIG and the count.
    // buf[0] is the nmsrs header, indices follow (C layout, see kvm_abi.h).
    std::vector<uint32_t> buf(1 + 256);
    for (;;) {
      buf[0] = static_cast<uint32_t>(buf.size() - 1);
      if (ioctl(fd_, abi::kGetMsrIndexList, buf.data()) == 0) break;
      int err = errno;
      if (err != E2BIG || buf[0] <= buf.size() - 1) ThrowSystemError(env, err, "ioctl", "KVM_GET_MSR_INDEX_LIST");
      buf.resize(1 + buf[0]);
    }
    uint32_t n = buf[0];
    Napi::Array out = Napi::Array::New(env, n);
    for (uint32_t i = 0; i < n; i++) out.Set(i, Napi::Number::New(env, buf[1 + i]));
    return out;
  }

  Napi::Value SupportedCpuid(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    for (uint32_t nent = 128; nent <= 4096; nent *= 2) {
      size_t bytes = sizeof(abi::Cpuid2Header) + nent * sizeof(kvm_cpuid_entry2);
      std::vector<uint64_t> buf(bytes / 8);  // 8-byte aligned storage
      auto* c = reinterpret_cast<abi::Cpuid2Header*>(buf.data());
      c->nent = nent;
      if (ioctl(fd_, abi::kGetSupportedCpuid, c) == 0) {
        size_t len = sizeof(abi::Cpuid2Header) + c->nent * sizeof(kvm_cpuid_entry2);
        return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(buf.data()), len);
      }
      int err = errno;
      if (err != E2BIG) ThrowSystemError(env, err, "ioctl", "KVM_GET_SUPPORTED_CPUID");
    }
    ThrowSystemError(env, E2BIG, "ioctl", "KVM_GET_SUPPORTED_CPUID");
  }

  Napi::Value CreateVm(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int vmfd = Ioctl(env, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
    int run_size = ioctl(fd_, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0) {
      int err = errno;
      close(vmfd);
      ThrowSystemError(env, err, "ioctl", "KVM_GET_VCPU_MMAP_SIZE");
    }
    return Vm::Create(env, Vm::Init{vmfd, static_cast<size_t>(run_size)});
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    return info.Env().Undefined();
  }

  int fd_ = -1;
};

}  // namespace

void InitKvm(Napi::Env env, Napi::Object exports) {
  // Kernel constants are exported by fdio.cc (`constants`).
  exports.Set("Kvm", Kvm::Class(env));
}

}  // namespace ferry
