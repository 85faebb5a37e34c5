// Small helpers shared by kvm.cc, vm.cc, vcpu.cc and memory.cc: argument
// parsing, raw struct <-> Buffer copies, the per-env class registry for
// objects created from C++ (Vm, Vcpu), and type tags for safe unwrapping.
#pragma once
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "errors.h"

namespace ferry {

// A non-negative integer argument (Number <= 2^53-1, or BigInt) <= max.
inline uint64_t ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name,
                       uint64_t max = UINT64_MAX) {
  Napi::Value v = info[i];
  uint64_t out = 0;
  if (v.IsBigInt()) {
    bool lossless = false;
    out = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) ThrowArgError(info.Env(), (std::string(name) + " must fit in 64 bits").c_str());
  } else if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 9007199254740991.0 || std::floor(d) != d)
      ThrowArgError(info.Env(), (std::string(name) + " must be a non-negative integer").c_str());
    out = static_cast<uint64_t>(d);
  } else {
    ThrowArgError(info.Env(), (std::string(name) + " must be a non-negative integer").c_str());
  }
  if (out > max) ThrowRangeError(info.Env(), (std::string(name) + " is out of range").c_str());
  return out;
}

inline uint32_t ArgU32(const Napi::CallbackInfo& info, size_t i, const char* name,
                       uint32_t max = UINT32_MAX) {
  return static_cast<uint32_t>(ArgU64(info, i, name, max));
}

// Bytes of a TypedArray/Buffer argument. INVARIANT: the pointer is valid only
// until JS runs again (no GC moves external or backing-store memory, but JS
// could detach it).
inline std::pair<uint8_t*, size_t> ArgBytes(const Napi::CallbackInfo& info, size_t i,
                                            const char* name) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray()) ThrowArgError(info.Env(), (std::string(name) + " must be a Uint8Array or Buffer").c_str());
  Napi::TypedArray ta = v.As<Napi::TypedArray>();
  size_t len = ta.ByteLength();
  uint8_t* data = static_cast<uint8_t*>(ta.ArrayBuffer().Data());
  if (data == nullptr && len > 0) ThrowArgError(info.Env(), (std::string(name) + " is detached").c_str());
  return {data == nullptr ? nullptr : data + ta.ByteOffset(), len};
}

// A kernel struct argument: exactly sizeof(T) bytes (or at least min_size),
// copied out so the ioctl never reads JS memory that could change under it.
template <typename T>
T ArgStruct(const Napi::CallbackInfo& info, size_t i, const char* name) {
  auto [data, len] = ArgBytes(info, i, name);
  if (len != sizeof(T))
    ThrowRangeError(info.Env(), (std::string(name) + " must be " + std::to_string(sizeof(T)) + " bytes").c_str());
  T out;
  std::memcpy(&out, data, sizeof(T));
  return out;
}

template <typename T>
Napi::Buffer<uint8_t> StructBuffer(Napi::Env env, const T& v) {
  return Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(&v), sizeof(T));
}

// Per-env constructors of classes that only C++ instantiates (Vm, Vcpu are
// not exported; Kvm.createVm and Vm.createVcpu make them).
class ClassRegistry {
 public:
  static void Set(Napi::Env env, const char* name, Napi::Function ctor) {
    std::lock_guard<std::mutex> g(mu());
    auto& slot = map()[{static_cast<napi_env>(env), name}];
    if (slot == nullptr) {
      slot = new Napi::FunctionReference();
      // The env dies with its references: drop ours first.
      napi_env e = env;
      std::string n = name;
      env.AddCleanupHook([e, n]() {
        std::lock_guard<std::mutex> g(mu());
        auto it = map().find({e, n});
        if (it != map().end()) {
          it->second->Reset();
          delete it->second;
          map().erase(it);
        }
      });
    }
    *slot = Napi::Persistent(ctor);
  }
  static Napi::Function Get(Napi::Env env, const char* name) {
    std::lock_guard<std::mutex> g(mu());
    auto it = map().find({static_cast<napi_env>(env), name});
    if (it == map().end()) throw Napi::Error::New(env, std::string("class not registered: ") + name);
    return it->second->Value();
  }

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::map<std::pair<napi_env, std::string>, Napi::FunctionReference*>& map() {
    static auto* m = new std::map<std::pair<napi_env, std::string>, Napi::FunctionReference*>();
    return *m;
  }
};

// Type tags: only objects we constructed unwrap as our classes.
inline void TagObject(Napi::Env env, Napi::Object obj, const napi_type_tag* tag) {
  napi_status st = napi_type_tag_object(env, obj, tag);
  if (st != napi_ok) throw Napi::Error::New(env, "napi_type_tag_object failed");
}
inline bool HasTag(Napi::Env env, Napi::Value v, const napi_type_tag* tag) {
  if (!v.IsObject()) return false;
  bool ok = false;
  if (napi_check_object_type_tag(env, v, tag, &ok) != napi_ok) return false;
  return ok;
}

}  // namespace ferry
