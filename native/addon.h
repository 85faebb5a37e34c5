// Registration entry points, one per kernel object file.
#pragma once
#include <napi.h>

namespace ferry {
void InitErrors(Napi::Env env, Napi::Object exports);
void InitKvm(Napi::Env env, Napi::Object exports);      // kvm.cc: Kvm
void InitVm(Napi::Env env, Napi::Object exports);       // vm.cc: Vm
void InitVcpu(Napi::Env env, Napi::Object exports);     // vcpu.cc: Vcpu
void InitMemory(Napi::Env env, Napi::Object exports);   // memory.cc: GuestMemory
void InitUffd(Napi::Env env, Napi::Object exports);     // uffd.cc: Uffd
void InitFdio(Napi::Env env, Napi::Object exports);     // fdio.cc: FdPoller, recvWithFds
void InitSplice(Napi::Env env, Napi::Object exports);   // splice.cc: PageSplicer
void InitBitmap(Napi::Env env, Napi::Object exports);   // bitmap.cc: dirty-log bitmap passes
}  // namespace ferry
