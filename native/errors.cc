// Node-style system errors: { code: 'EBADF', errno: -9, syscall: 'ioctl',
// op: 'KVM_GET_REGS' }. The errno name comes from glibc (strerrorname_np,
// glibc >= 2.32), so codes match the ones Node's libuv reports.
#include <errno.h>
#include <string.h>

#include <string>

#include "addon.h"
#include "errors.h"

namespace ferry {

Napi::Error SystemError(Napi::Env env, int err, const char* syscall, const char* op) {
  const char* name = strerrorname_np(err);
  std::string code = name != nullptr ? name : ("E" + std::to_string(err));
  std::string message = std::string(op) + ": " + strerror(err) + " (" + syscall + ")";
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  e.Set("op", Napi::String::New(env, op));
  return e;
}

void ThrowSystemError(Napi::Env env, int err, const char* syscall, const char* op) {
  throw SystemError(env, err, syscall, op);
}

void ThrowArgError(Napi::Env env, const char* message) {
  Napi::TypeError e = Napi::TypeError::New(env, message);
  e.Set("code", Napi::String::New(env, "ERR_INVALID_ARG_VALUE"));
  throw e;
}

void ThrowRangeError(Napi::Env env, const char* message) {
  Napi::RangeError e = Napi::RangeError::New(env, message);
  e.Set("code", Napi::String::New(env, "ERR_OUT_OF_RANGE"));
  throw e;
}

void ThrowCodeError(Napi::Env env, const char* code, const char* message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  throw e;
}

void InitErrors(Napi::Env env, Napi::Object exports) {}

}  // namespace ferry
