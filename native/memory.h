// GuestMemory: one host mapping of guest RAM, shared by Vm (memslots) and Uffd.
#pragma once
#include <napi.h>
#include <cstddef>
#include <cstdint>

namespace ferry {
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
  // Throws RangeError unless [offset, offset+length) lies inside the mapping
  // and (if aligned) both are 4 KiB aligned.
  void CheckRange(Napi::Env env, uint64_t offset, uint64_t length, bool aligned) const;

 private:
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Discard(const Napi::CallbackInfo& info);
  Napi::Value FindNonZero(const Napi::CallbackInfo& info);
  Napi::Value ScanZeroPages(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetAddress(const Napi::CallbackInfo& info);
  void Unmap();

  uint8_t* base_ = nullptr;  // SAFETY: valid for size_ bytes until Unmap()
  size_t size_ = 0;
  int fd_ = -1;              // backing file or memfd, -1 for anonymous
  // External ArrayBuffers handed to JS hold a native refcount on the mapping;
  // munmap happens only when close() was called AND no view is alive
  // (views keep the memory valid: never unmap under a live ArrayBuffer).
  struct Mapping* mapping_ = nullptr;
};
}  // namespace ferry
