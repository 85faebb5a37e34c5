// Dirty-log bitmap passes that run over every word of a RAM block's bitmap
// at each sync (32K words per 4 GiB): counting set bits and OR-ing one
// bitmap into another. In JavaScript (ferry runs without TurboFan) they cost
// ~2.5 ms per 4 GiB inside the downtime; here they are memory-speed.
#include <napi.h>

#include <cstdint>
#include <cstring>

#include "addon.h"
#include "util.h"

namespace ferry {
namespace {

// bitmapCount(bytes) -> number of set bits.
Napi::Value BitmapCount(const Napi::CallbackInfo& info) {
  auto [p, len] = ArgBytes(info, 0, "bytes");
  uint64_t n = 0;
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);  // the view may be unaligned
    n += static_cast<uint64_t>(__builtin_popcountll(w));
  }
  for (; i < len; i++) n += static_cast<uint64_t>(__builtin_popcount(p[i]));
  return Napi::Number::New(info.Env(), static_cast<double>(n));
}

// bitmapOr(dst, src): dst |= src over the shorter length.
Napi::Value BitmapOr(const Napi::CallbackInfo& info) {
  auto [d, dlen] = ArgBytes(info, 0, "dst");
  auto [s, slen] = ArgBytes(info, 1, "src");
  size_t len = dlen < slen ? dlen : slen;
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t a, b;
    memcpy(&a, d + i, 8);
    memcpy(&b, s + i, 8);
    a |= b;
    memcpy(d + i, &a, 8);
  }
  for (; i < len; i++) d[i] |= s[i];
  return info.Env().Undefined();
}

}  // namespace

void InitBitmap(Napi::Env env, Napi::Object exports) {
  exports.Set("bitmapCount", Napi::Function::New(env, BitmapCount, "bitmapCount"));
  exports.Set("bitmapOr", Napi::Function::New(env, BitmapOr, "bitmapOr"));
}

}  // namespace ferry
