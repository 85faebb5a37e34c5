// Module entry: registers each kernel-object wrapper.
#include "addon.h"

static Napi::Object InitFerry(Napi::Env env, Napi::Object exports) {
  ferry::InitErrors(env, exports);
  ferry::InitMemory(env, exports);
  ferry::InitKvm(env, exports);
  ferry::InitVm(env, exports);
  ferry::InitVcpu(env, exports);
  ferry::InitUffd(env, exports);
  ferry::InitFdio(env, exports);
  ferry::InitSplice(env, exports);
  ferry::InitBitmap(env, exports);
  return exports;
}

NODE_API_MODULE(ferry, InitFerry)
