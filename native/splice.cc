// PageSplicer: RAM page records to a unix stream socket without copying the
// pages in the sender. Header and page iovecs are vmspliced into a pipe (the
// pipe then references guest memory) and spliced on to the socket; the
// receiver's read copies straight from guest memory. On the 1 GiB precopy
// bench the source's CPU drops by a third (sendmsg copies every page into
// socket buffers); a page costs a pin instead of a 4 KiB copy.
//
// INVARIANTS
// - Only unix stream sockets: their queued data stays referenced until the
//   peer reads it, and SIOCOUTQ counts it (at least its length) until then.
//   The peer must read with a copy (read/recvmsg, as ferry and QEMU do): a
//   relay that splices the data out of the socket into a pipe of its own
//   ends the count while its pipe still references our memory.
//   TCP over loopback hands referenced pages to the receiver's queue while
//   SIOCOUTQ drops at the ACK, so nothing would say when a page is read.
// - A page may change after it is spliced (the guest runs): the reader then
//   sees a newer copy, which precopy's dirty log covers exactly as it covers
//   a page written during sendmsg's copy (the page is sent again). Once the
//   guest stops, its pages are stable; the engine reports `completed` only
//   once the reader is past the last spliced byte, so a source resumed
//   afterwards cannot change what the destination reads.
// - splice() cannot pass MSG_NOSIGNAL: a closed peer raises SIGPIPE, which
//   Node ignores (it installs SIG_IGN at start).
// - Headers live in a ring of our own (mmap'd, so no allocator reuses it)
//   and a ring segment is written again only once SIOCOUTQ shows fewer bytes
//   unread than were spliced after its last use: the reader is past it.
// - The pipe is empty between calls: what the socket did not take is read
//   back out of it (a copy, in order) for the caller to send next.
// - The socket fd must be O_NONBLOCK (splice then passes MSG_DONTWAIT): the
//   event loop never blocks.
#include "splice.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/sockios.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include "errors.h"
#include "util.h"

namespace ferry {

static const napi_type_tag kSplicerTag = {0x6665727279737063ULL, 0x6c696365722d7467ULL};
constexpr int kPipeBytes = 1 << 20;  // 256 slots: a header and a page take one each

Napi::Function PageSplicer::Class(Napi::Env env) {
  return DefineClass(env, "PageSplicer",
                     {
                         InstanceMethod<&PageSplicer::Unsent>("unsent"),
                         InstanceMethod<&PageSplicer::Close>("close"),
                     });
}

PageSplicer* PageSplicer::FromOrNull(Napi::Value v) {
  if (v.IsUndefined() || v.IsNull()) return nullptr;
  if (!HasTag(v.Env(), v, &kSplicerTag)) ThrowArgError(v.Env(), "expected a PageSplicer");
  PageSplicer* s = Napi::ObjectWrap<PageSplicer>::Unwrap(v.As<Napi::Object>());
  if (s->pipeRead_ < 0) ThrowCodeError(v.Env(), "ERR_SPLICER_CLOSED", "PageSplicer is closed");
  return s;
}

PageSplicer::PageSplicer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PageSplicer>(info) {
  Napi::Env env = info.Env();
  int fd = static_cast<int>(ArgU64(info, 0, "fd", INT_MAX));
  // Optional segment size (tests make the ring wrap sooner); headers of one call need < 4 KiB.
  if (info.Length() > 1 && !info[1].IsUndefined()) segment_ = ArgU64(info, 1, "segmentBytes", 1 << 20);
  if (segment_ < 4096 || segment_ % 4096 != 0) ThrowRangeError(env, "segmentBytes must be a multiple of 4096");
  int domain = 0, type = 0;
  socklen_t len = sizeof domain;
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0) {
    if (errno == ENOTSOCK) ThrowCodeError(env, "ERR_SPLICE_UNSUPPORTED", "PageSplicer needs a socket (fd is a pipe or file)");
    ThrowSystemError(env, errno, "getsockopt", "PageSplicer");
  }
  len = sizeof type;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) ThrowSystemError(env, errno, "getsockopt", "PageSplicer");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0) ThrowSystemError(env, errno, "fcntl", "PageSplicer");
  if (domain != AF_UNIX || type != SOCK_STREAM || !(fl & O_NONBLOCK))
    ThrowCodeError(env, "ERR_SPLICE_UNSUPPORTED", "PageSplicer needs a non-blocking unix stream socket");
  int p[2];
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0) ThrowSystemError(env, errno, "pipe2", "PageSplicer");
  (void)fcntl(p[1], F_SETPIPE_SZ, kPipeBytes);  // advice: a smaller pipe only means shorter batches
  void* ring = mmap(nullptr, kSegments * segment_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ring == MAP_FAILED) {
    int err = errno;
    close(p[0]);
    close(p[1]);
    ThrowSystemError(env, err, "mmap", "PageSplicer");
  }
  sock_ = fd;
  pipeRead_ = p[0];
  pipeWrite_ = p[1];
  ring_ = static_cast<uint8_t*>(ring);
  TagObject(env, info.This().As<Napi::Object>(), &kSplicerTag);
}

PageSplicer::~PageSplicer() { Release(); }

void PageSplicer::Release() {
  if (pipeRead_ >= 0) close(pipeRead_);
  if (pipeWrite_ >= 0) close(pipeWrite_);
  pipeRead_ = pipeWrite_ = -1;
  // Pages the socket still references stay alive (pinned) after munmap, and
  // nothing can reuse them: unmapping is safe with data in flight.
  if (ring_ != nullptr) munmap(ring_, kSegments * segment_);
  ring_ = nullptr;
}

bool PageSplicer::Consumed(size_t segment) {
  if (lastUse_[segment] == 0) return true;
  int unread = 0;
  if (ioctl(sock_, SIOCOUTQ, &unread) < 0) return false;
  return unread == 0 || static_cast<uint64_t>(unread) < spliced_ - lastUse_[segment];
}

uint8_t* PageSplicer::Reserve(size_t len) {
  if (len > segment_) return nullptr;
  if (pos_ + len > (cur_ + 1) * segment_) {
    size_t next = (cur_ + 1) % kSegments;
    if (!Consumed(next)) return nullptr;
    cur_ = next;
    pos_ = next * segment_;
  }
  uint8_t* p = ring_ + pos_;
  pos_ += len;
  return p;
}

// Moves `first` past n bytes of iov (splitting a partly done iovec).
static void Advance(std::vector<struct iovec>& iov, size_t& first, size_t n) {
  while (first < iov.size() && n >= iov[first].iov_len) n -= iov[first++].iov_len;
  if (first < iov.size() && n > 0) {
    iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + n;
    iov[first].iov_len -= n;
  }
}

void PageSplicer::Discard() {
  uint8_t buf[4096];
  for (;;) {
    ssize_t r = read(pipeRead_, buf, sizeof buf);
    if (r > 0 || (r < 0 && errno == EINTR)) continue;
    return;  // empty (EAGAIN)
  }
}

uint64_t PageSplicer::Send(Napi::Env env, std::vector<struct iovec>& iov, uint8_t* out) {
  size_t first = 0;
  uint64_t inPipe = 0;
  while (first < iov.size()) {
    size_t n = std::min<size_t>(iov.size() - first, IOV_MAX);
    ssize_t r = vmsplice(pipeWrite_, iov.data() + first, n, SPLICE_F_NONBLOCK);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) break;  // pipe full: the rest is copied below
    if (r < 0) {
      int err = errno;
      Discard();
      ThrowSystemError(env, err, "vmsplice", "sendPageRecords");
    }
    inPipe += static_cast<uint64_t>(r);
    Advance(iov, first, static_cast<size_t>(r));
  }
  uint64_t sent = 0;
  while (sent < inPipe) {
    ssize_t r = splice(pipeRead_, nullptr, sock_, nullptr, inPipe - sent, SPLICE_F_NONBLOCK);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (r < 0) {
      int err = errno;
      Discard();
      ThrowSystemError(env, err, "splice", "sendPageRecords");
    }
    if (r == 0) break;
    sent += static_cast<uint64_t>(r);
  }
  if (sent > 0) {  // headers that went back out through the pipe are no longer referenced
    spliced_ += sent;
    lastUse_[cur_] = spliced_;
  }
  // What the socket did not take: out of the pipe, then the iovecs never spliced.
  uint8_t* o = out;
  for (uint64_t left = inPipe - sent; left > 0;) {
    ssize_t r = read(pipeRead_, o, left);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      int err = r < 0 ? errno : EIO;
      Discard();
      ThrowSystemError(env, err, "read", "sendPageRecords");
    }
    o += r;
    left -= static_cast<uint64_t>(r);
  }
  for (size_t i = first; i < iov.size(); i++) {
    memcpy(o, iov[i].iov_base, iov[i].iov_len);
    o += iov[i].iov_len;
  }
  return sent;
}

// unsent() -> bytes queued on the socket its reader has not consumed (SIOCOUTQ).
Napi::Value PageSplicer::Unsent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (pipeRead_ < 0) ThrowCodeError(env, "ERR_SPLICER_CLOSED", "PageSplicer is closed");
  int unread = 0;
  if (ioctl(sock_, SIOCOUTQ, &unread) < 0) ThrowSystemError(env, errno, "ioctl", "SIOCOUTQ");
  return Napi::Number::New(env, unread);
}

Napi::Value PageSplicer::Close(const Napi::CallbackInfo& info) {
  Release();
  return info.Env().Undefined();
}

void InitSplice(Napi::Env env, Napi::Object exports) { exports.Set("PageSplicer", PageSplicer::Class(env)); }

}  // namespace ferry
