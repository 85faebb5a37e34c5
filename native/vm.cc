// Vm: one KVM VM fd. Memory slots (with per-slot dirty logging switched at
// run time by re-setting the slot's flags), dirty log get/clear, in-kernel
// irqchip and PIT, kvmclock, and vCPU creation.
//
// INVARIANTS
// - A slot keeps a strong reference to its GuestMemory: GC must never unmap
//   RAM that KVM maps into the guest. Deleting the slot (size 0) or close()
//   drops it.
// - KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG write/read the caller's bitmap
//   with a length the KERNEL derives from its memslot, so the bitmap is checked
//   against our record of that slot. For a slot we do not know, the ioctl is
//   still issued (to report the kernel's errno: EBADF, ENOENT...) but with a
//   NULL bitmap, so a kernel slot we did not record can only yield EFAULT.
// - close() stops and joins every vCPU thread first, then closes the VM fd.
// - SAFETY (all fixed-size ioctls here): each passes a local struct of exactly
//   the type its ioctl number encodes (kernel reads/writes only that), and the
//   fd is -1 after close(), so a closed Vm reports EBADF from the kernel.
#include <errno.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "addon.h"
#include "errors.h"
#include "memory.h"
#include "util.h"
#include "vm.h"

namespace ferry {

constexpr uint64_t kPage = 4096;

Napi::Function Vm::Class(Napi::Env env) {
  return DefineClass(env, "Vm",
                     {
                         InstanceAccessor<&Vm::GetFd>("fd"),
                         InstanceMethod<&Vm::SetMemorySlot>("setMemorySlot"),
                         InstanceMethod<&Vm::EnableManualDirtyLogProtect>("enableManualDirtyLogProtect"),
                         InstanceMethod<&Vm::GetDirtyLog>("getDirtyLog"),
                         InstanceMethod<&Vm::ClearDirtyLog>("clearDirtyLog"),
                         InstanceMethod<&Vm::SetTssAddr>("setTssAddr"),
                         InstanceMethod<&Vm::SetIdentityMapAddr>("setIdentityMapAddr"),
                         InstanceMethod<&Vm::CreateIrqchip>("createIrqchip"),
                         InstanceMethod<&Vm::CreatePit2>("createPit2"),
                         InstanceMethod<&Vm::IrqLine>("irqLine"),
                         InstanceMethod<&Vm::GetIrqchip>("getIrqchip"),
                         InstanceMethod<&Vm::SetIrqchip>("setIrqchip"),
                         InstanceMethod<&Vm::GetPit2>("getPit2"),
                         InstanceMethod<&Vm::SetPit2>("setPit2"),
                         InstanceMethod<&Vm::GetClock>("getClock"),
                         InstanceMethod<&Vm::SetClock>("setClock"),
                         InstanceMethod<&Vm::CreateVcpu>("createVcpu"),
                         InstanceMethod<&Vm::Close>("close"),
                     });
}

Napi::Object Vm::Create(Napi::Env env, const Init& init) {
  Init copy = init;
  Napi::Object obj;
  try {
    obj = ClassRegistry::Get(env, "Vm").New({Napi::External<Init>::New(env, &copy)});
  } catch (...) {
    if (copy.fd >= 0) close(copy.fd);  // the constructor did not take it
    throw;
  }
  return obj;
}

Vm::Vm(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Vm>(info) {
  if (info.Length() < 1 || !info[0].IsExternal()) ThrowArgError(info.Env(), "Vm is created by Kvm.createVm()");
  Init* init = info[0].As<Napi::External<Init>>().Data();
  fd_ = init->fd;
  init->fd = -1;  // ours now
  run_size_ = init->runSize;
}

Vm::~Vm() {
  for (Vcpu* v : vcpus_) v->DetachFromVm();
  vcpus_.clear();
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

void Vm::Forget(Vcpu* v) {
  for (auto it = vcpus_.begin(); it != vcpus_.end(); ++it) {
    if (*it == v) {
      vcpus_.erase(it);
      return;
    }
  }
}

Napi::Value Vm::GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_); }

Napi::Value Vm::SetMemorySlot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t slot = ArgU32(info, 0, "slot", 0xffff);
  uint64_t gpa = ArgU64(info, 1, "gpa");
  uint64_t memOffset = ArgU64(info, 3, "memOffset");
  uint64_t size = ArgU64(info, 4, "size");
  uint32_t flags = ArgU32(info, 5, "flags");
  if (gpa % kPage != 0 || size % kPage != 0) ThrowRangeError(env, "gpa and size must be multiples of 4096");

  kvm_userspace_memory_region r{};
  r.slot = slot;
  r.flags = flags;
  r.guest_phys_addr = gpa;
  r.memory_size = size;
  GuestMemory* mem = nullptr;
  if (size > 0) {
    mem = GuestMemory::From(info[2]);
    mem->CheckRange(env, memOffset, size, true);
    // SAFETY: [base+memOffset, +size) is inside the live mapping (checked), and
    // the slot below keeps the GuestMemory referenced while KVM maps it.
    r.userspace_addr = reinterpret_cast<uintptr_t>(mem->base() + memOffset);
  }
  if (ioctl(fd_, KVM_SET_USER_MEMORY_REGION, &r) < 0) ThrowSystemError(env, errno, "ioctl", "KVM_SET_USER_MEMORY_REGION");
  if (size == 0) {
    slots_.erase(slot);
  } else {
    Slot& s = slots_[slot];
    s.gpa = gpa;
    s.size = size;
    s.memOffset = memOffset;
    s.flags = flags;
    s.memory = mem;
    s.ref = Napi::Persistent(info[2].As<Napi::Object>());
  }
  return env.Undefined();
}

Napi::Value Vm::EnableManualDirtyLogProtect(const Napi::CallbackInfo& info) {
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
  cap.args[0] = ArgU64(info, 0, "bits");
  if (ioctl(fd_, KVM_ENABLE_CAP, &cap) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_ENABLE_CAP");
  return info.Env().Undefined();
}

Napi::Value Vm::GetDirtyLog(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t slot = ArgU32(info, 0, "slot", 0xffff);
  auto [bitmap, len] = ArgBytes(info, 1, "bitmap");
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = nullptr;
  auto it = slots_.find(slot);
  if (it != slots_.end()) {
    uint64_t pages = it->second.size / kPage;
    uint64_t need = (pages + 63) / 64 * 8;
    if (len < need) ThrowRangeError(env, ("bitmap must be at least " + std::to_string(need) + " bytes").c_str());
    // SAFETY: the kernel writes ceil(pages/64)*8 bytes; the bitmap has them.
    log.dirty_bitmap = bitmap;
  }
  if (ioctl(fd_, KVM_GET_DIRTY_LOG, &log) < 0) ThrowSystemError(env, errno, "ioctl", "KVM_GET_DIRTY_LOG");
  return env.Undefined();
}

Napi::Value Vm::ClearDirtyLog(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t slot = ArgU32(info, 0, "slot", 0xffff);
  uint64_t first = ArgU64(info, 1, "firstPage");
  uint32_t num = ArgU32(info, 2, "numPages");
  auto [bitmap, len] = ArgBytes(info, 3, "bitmap");
  kvm_clear_dirty_log c{};
  c.slot = slot;
  c.first_page = first;
  c.num_pages = num;
  c.dirty_bitmap = nullptr;
  if (slots_.count(slot) != 0) {
    uint64_t need = (static_cast<uint64_t>(num) + 63) / 64 * 8;
    if (len < need) ThrowRangeError(env, ("bitmap must be at least " + std::to_string(need) + " bytes").c_str());
    // SAFETY: the kernel reads ALIGN(num_pages, 64)/8 bytes; the bitmap has them.
    c.dirty_bitmap = bitmap;
  }
  if (ioctl(fd_, KVM_CLEAR_DIRTY_LOG, &c) < 0) ThrowSystemError(env, errno, "ioctl", "KVM_CLEAR_DIRTY_LOG");
  return env.Undefined();
}

Napi::Value Vm::SetTssAddr(const Napi::CallbackInfo& info) {
  uint64_t gpa = ArgU64(info, 0, "gpa", 0xffffffffULL);
  if (ioctl(fd_, KVM_SET_TSS_ADDR, static_cast<unsigned long>(gpa)) < 0)
    ThrowSystemError(info.Env(), errno, "ioctl", "KVM_SET_TSS_ADDR");
  return info.Env().Undefined();
}

Napi::Value Vm::SetIdentityMapAddr(const Napi::CallbackInfo& info) {
  uint64_t gpa = ArgU64(info, 0, "gpa", 0xffffffffULL);
  if (ioctl(fd_, KVM_SET_IDENTITY_MAP_ADDR, &gpa) < 0)
    ThrowSystemError(info.Env(), errno, "ioctl", "KVM_SET_IDENTITY_MAP_ADDR");
  return info.Env().Undefined();
}

Napi::Value Vm::CreateIrqchip(const Napi::CallbackInfo& info) {
  if (ioctl(fd_, KVM_CREATE_IRQCHIP, 0) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_CREATE_IRQCHIP");
  return info.Env().Undefined();
}

Napi::Value Vm::CreatePit2(const Napi::CallbackInfo& info) {
  kvm_pit_config cfg{};
  cfg.flags = info.Length() > 0 && !info[0].IsUndefined() ? ArgU32(info, 0, "flags") : 0;
  if (ioctl(fd_, KVM_CREATE_PIT2, &cfg) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_CREATE_PIT2");
  return info.Env().Undefined();
}

Napi::Value Vm::IrqLine(const Napi::CallbackInfo& info) {
  kvm_irq_level l{};
  l.irq = ArgU32(info, 0, "irq");
  l.level = ArgU32(info, 1, "level");
  if (ioctl(fd_, KVM_IRQ_LINE, &l) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_IRQ_LINE");
  return info.Env().Undefined();
}

Napi::Value Vm::GetIrqchip(const Napi::CallbackInfo& info) {
  kvm_irqchip chip{};
  chip.chip_id = ArgU32(info, 0, "chipId");
  if (ioctl(fd_, KVM_GET_IRQCHIP, &chip) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_GET_IRQCHIP");
  return StructBuffer(info.Env(), chip);
}

Napi::Value Vm::SetIrqchip(const Napi::CallbackInfo& info) {
  kvm_irqchip chip = ArgStruct<kvm_irqchip>(info, 0, "state");
  if (ioctl(fd_, KVM_SET_IRQCHIP, &chip) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_SET_IRQCHIP");
  return info.Env().Undefined();
}

Napi::Value Vm::GetPit2(const Napi::CallbackInfo& info) {
  kvm_pit_state2 s{};
  if (ioctl(fd_, KVM_GET_PIT2, &s) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_GET_PIT2");
  return StructBuffer(info.Env(), s);
}

Napi::Value Vm::SetPit2(const Napi::CallbackInfo& info) {
  kvm_pit_state2 s = ArgStruct<kvm_pit_state2>(info, 0, "state");
  if (ioctl(fd_, KVM_SET_PIT2, &s) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_SET_PIT2");
  return info.Env().Undefined();
}

Napi::Value Vm::GetClock(const Napi::CallbackInfo& info) {
  kvm_clock_data c{};
  if (ioctl(fd_, KVM_GET_CLOCK, &c) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_GET_CLOCK");
  return StructBuffer(info.Env(), c);
}

Napi::Value Vm::SetClock(const Napi::CallbackInfo& info) {
  kvm_clock_data c = ArgStruct<kvm_clock_data>(info, 0, "state");
  if (ioctl(fd_, KVM_SET_CLOCK, &c) < 0) ThrowSystemError(info.Env(), errno, "ioctl", "KVM_SET_CLOCK");
  return info.Env().Undefined();
}

Napi::Value Vm::CreateVcpu(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t id = ArgU32(info, 0, "id");
  int vcpufd = ioctl(fd_, KVM_CREATE_VCPU, static_cast<unsigned long>(id));
  if (vcpufd < 0) ThrowSystemError(env, errno, "ioctl", "KVM_CREATE_VCPU");
  // The XSAVE size depends on the guest's enabled features: ask the VM.
  int xsave2 = ioctl(fd_, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
  Vcpu::Init init{vcpufd, id, run_size_, xsave2 > 0 ? static_cast<size_t>(xsave2) : 0, this};
  Napi::Object obj = Vcpu::Create(env, init, info.This().As<Napi::Object>());
  vcpus_.push_back(Napi::ObjectWrap<Vcpu>::Unwrap(obj));
  return obj;
}

void Vm::DoClose() {
  Napi::Env env = Env();
  std::vector<Vcpu*> vcpus;
  vcpus.swap(vcpus_);
  for (Vcpu* v : vcpus) {
    v->Shutdown(env);
    v->DetachFromVm();
  }
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  slots_.clear();  // drops the GuestMemory references
}

Napi::Value Vm::Close(const Napi::CallbackInfo& info) {
  DoClose();
  return info.Env().Undefined();
}

void InitVm(Napi::Env env, Napi::Object exports) {
  // Not exported: Kvm.createVm() is the only way to make one.
  ClassRegistry::Set(env, "Vm", Vm::Class(env));
}

}  // namespace ferry
