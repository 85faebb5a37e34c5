// GuestMemory: one host mapping of guest RAM, shared by Vm (memslots) and Uffd.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <list>

namespace ferry {
struct Mapping;

class GuestMemory : public Napi::ObjectWrap<GuestMemory> {
 public:
  static Napi::Function Class(Napi::Env env);
  // Returns the GuestMemory wrapped by `v`, or throws a TypeError.
  static GuestMemory* From(Napi::Value v);
  explicit GuestMemory(const Napi::CallbackInfo& info);
  ~GuestMemory();

  uint8_t* base() const { return base_; }
  size_t size() const { return size_; }
  bool closed() const { return base_ == nullptr; }
  // Throws RangeError (ERR_OUT_OF_RANGE) unless [offset, offset+length) lies
  // inside the mapping and (if aligned) both are 4 KiB aligned; throws
  // ERR_MEMORY_CLOSED after close().
  void CheckRange(Napi::Env env, uint64_t offset, uint64_t length, bool aligned) const;

 private:
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Discard(const Napi::CallbackInfo& info);
  Napi::Value FindNonZero(const Napi::CallbackInfo& info);
  Napi::Value ScanZeroPages(const Napi::CallbackInfo& info);
  Napi::Value LoadPageRecords(const Napi::CallbackInfo& info);
  Napi::Value EncodePageRecords(const Napi::CallbackInfo& info);
  Napi::Value SendPageRecords(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetAddress(const Napi::CallbackInfo& info);

  uint8_t* base_ = nullptr;  // SAFETY: valid for size_ bytes until close()
  size_t size_ = 0;
  // Owns the mapping and the backing fd. JS views (external ArrayBuffers) each
  // hold a reference; close() detaches every live view and unmaps at once, so
  // no JS object can reach unmapped memory and closing really frees it. Without
  // close(), the mapping goes when this object and every view are collected.
  Mapping* mapping_ = nullptr;
};
}  // namespace ferry
