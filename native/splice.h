// PageSplicer: zero-copy sending of RAM page records to a unix stream socket.
#pragma once
#include <napi.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ferry {

class PageSplicer : public Napi::ObjectWrap<PageSplicer> {
 public:
  static Napi::Function Class(Napi::Env env);
  // The PageSplicer wrapped by `v`; nullptr for undefined or null; throws a TypeError otherwise.
  static PageSplicer* FromOrNull(Napi::Value v);
  explicit PageSplicer(const Napi::CallbackInfo& info);
  ~PageSplicer();

  // `len` (<= a segment) bytes of header space nothing has referenced since
  // the socket's reader consumed it, or nullptr when that is not known yet
  // (the caller then copies instead).
  uint8_t* Reserve(size_t len);
  // Hands the iovecs (headers from Reserve, pages from guest memory) to the
  // socket through the pipe, as far as the socket takes them without
  // blocking. Returns the bytes sent; the rest is copied to `out`, in order.
  // Throws a Node-style error (the pipe is emptied first).
  uint64_t Send(Napi::Env env, std::vector<struct iovec>& iov, uint8_t* out);


 private:
  Napi::Value Unsent(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  bool Consumed(size_t segment);
  void Discard();
  void Release();

  static constexpr size_t kSegments = 16;
  size_t segment_ = 64 << 10;  // bytes per ring segment
  int sock_ = -1;  // not owned: the caller keeps it open while this is open
  int pipeRead_ = -1;
  int pipeWrite_ = -1;
  uint8_t* ring_ = nullptr;  // kSegments * segment_ bytes, mmap'd
  size_t pos_ = 0;           // next free byte of the ring, in segment cur_
  size_t cur_ = 0;
  uint64_t spliced_ = 0;               // bytes this splicer handed to the socket
  uint64_t lastUse_[kSegments] = {};  // spliced_ after the last send with headers in the segment
};

}  // namespace ferry
