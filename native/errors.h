// Node-style system errors for every native wrapper.
//
// INVARIANT: errno is captured by the caller immediately after the failing
// syscall (pass it in), never re-read after other calls that may clobber it.
#pragma once
#include <napi.h>

namespace ferry {
// Builds an Error with code ('EBADF'), errno (negative), syscall ('ioctl') and
// op ('KVM_GET_DIRTY_LOG'), message "<op>: <strerror> (<syscall>)".
Napi::Error SystemError(Napi::Env env, int err, const char* syscall, const char* op);
// Throws SystemError as a JS exception (C++ exceptions are enabled).
[[noreturn]] void ThrowSystemError(Napi::Env env, int err, const char* syscall, const char* op);
// Throws a TypeError/RangeError with code ERR_INVALID_ARG_VALUE for bad arguments.
[[noreturn]] void ThrowArgError(Napi::Env env, const char* message);
// Throws a RangeError with code ERR_OUT_OF_RANGE (offsets, lengths, sizes).
[[noreturn]] void ThrowRangeError(Napi::Env env, const char* message);
// Throws an Error with a stable code (ERR_VCPU_RUNNING, ERR_MEMORY_CLOSED...).
[[noreturn]] void ThrowCodeError(Napi::Env env, const char* code, const char* message);
}  // namespace ferry
