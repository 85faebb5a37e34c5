// GuestMemory: guest RAM as one host mapping, plus the few tight loops over it
// that JavaScript would do too slowly (zero-page and non-zero scans).
//
// Backing (constructor options):
//   default  mmap(MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)
//   memfd    memfd_create(MFD_CLOEXEC) + ftruncate, MAP_SHARED
//   path     open(O_RDWR|O_CREAT|O_CLOEXEC, 0600), extended with ftruncate
//            if smaller than `size`, MAP_SHARED
//
// INVARIANTS
// - Views are external ArrayBuffers over the mapping (no copy). Each holds a
//   reference on the Mapping and a weak napi_ref lets close() find it.
//   close() detaches every live view (napi_detach_arraybuffer) BEFORE munmap,
//   so JS never sees a buffer over unmapped memory; a detached view reads as
//   length 0. After close() the Mapping record lingers only until the views'
//   finalizers run (they no longer own any memory).
// - Everything here runs on the JS thread of the env that created the object
//   (views, finalizers and close), so the Mapping needs no lock.
// - Other native code (Vm memslots, Uffd) holds the GuestMemory JS object, not
//   the Mapping: after close() they see closed() and must not use base().
#include "memory.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "addon.h"
#include "errors.h"
#include "splice.h"
#include "util.h"

namespace ferry {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kMaxView = 1ULL << 30;  // 1 GiB per view (Node 20 caps external buffers at 4 GiB)

struct ViewRec {
  Mapping* mapping;
  napi_ref weak;  // weak (refcount 0): lets close() detach a live view
  std::list<ViewRec*>::iterator pos;
};

struct Mapping {
  uint8_t* base = nullptr;  // SAFETY: mmap'd for size bytes until Unmap()
  size_t size = 0;
  int fd = -1;              // memfd or backing file, -1 for anonymous
  int pagemap = -1;         // /proc/self/pagemap, opened by the first scan (anonymous only)
  int refs = 1;             // the GuestMemory + one per live view
  std::list<ViewRec*> views;

  void Unmap() {
    if (base != nullptr) {
      // SAFETY: every view over [base, base+size) has been detached or
      // collected before we get here (see Close / Unref).
      munmap(base, size);
      base = nullptr;
    }
    if (fd >= 0) {
      close(fd);
      fd = -1;
    }
    if (pagemap >= 0) {
      close(pagemap);
      pagemap = -1;
    }
  }
  void Unref() {
    if (--refs == 0) {
      Unmap();
      delete this;
    }
  }
};

static const napi_type_tag kMemoryTag = {0x6665727279676d65ULL, 0x6d6f72792d746167ULL};

Napi::Function GuestMemory::Class(Napi::Env env) {
  return DefineClass(env, "GuestMemory",
                     {
                         InstanceMethod<&GuestMemory::View>("view"),
                         InstanceMethod<&GuestMemory::Discard>("discard"),
                         InstanceMethod<&GuestMemory::FindNonZero>("findNonZero"),
                         InstanceMethod<&GuestMemory::ScanZeroPages>("scanZeroPages"),
                         InstanceMethod<&GuestMemory::LoadPageRecords>("loadPageRecords"),
                         InstanceMethod<&GuestMemory::EncodePageRecords>("encodePageRecords"),
                         InstanceMethod<&GuestMemory::SendPageRecords>("sendPageRecords"),
                         InstanceMethod<&GuestMemory::Close>("close"),
                         InstanceAccessor<&GuestMemory::GetSize>("size"),
                         InstanceAccessor<&GuestMemory::GetAddress>("address"),
                     });
}

GuestMemory* GuestMemory::From(Napi::Value v) {
  if (!HasTag(v.Env(), v, &kMemoryTag)) ThrowArgError(v.Env(), "expected a GuestMemory");
  return Napi::ObjectWrap<GuestMemory>::Unwrap(v.As<Napi::Object>());
}

GuestMemory::GuestMemory(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GuestMemory>(info) {
  Napi::Env env = info.Env();
  uint64_t size = ArgU64(info, 0, "size", 1ULL << 46);
  if (size == 0 || size % kPage != 0) ThrowRangeError(env, "size must be a non-zero multiple of 4096");
  std::string path;
  bool memfd = false;
  bool hugepages = false;
  if (info.Length() > 1 && info[1].IsObject()) {
    Napi::Object o = info[1].As<Napi::Object>();
    Napi::Value p = o.Get("path");
    if (!p.IsUndefined() && !p.IsNull()) {
      if (!p.IsString()) ThrowArgError(env, "options.path must be a string");
      path = p.As<Napi::String>().Utf8Value();
    }
    memfd = o.Get("memfd").ToBoolean();
    if (memfd && !path.empty()) ThrowArgError(env, "options.path and options.memfd are exclusive");
    hugepages = o.Get("hugepages").ToBoolean();
  }

  int fd = -1;
  if (!path.empty()) {
    fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) ThrowSystemError(env, errno, "open", "GuestMemory");
    struct stat st;
    if (fstat(fd, &st) < 0) {
      int err = errno;
      close(fd);
      ThrowSystemError(env, err, "fstat", "GuestMemory");
    }
    if (static_cast<uint64_t>(st.st_size) < size && ftruncate(fd, static_cast<off_t>(size)) < 0) {
      int err = errno;
      close(fd);
      ThrowSystemError(env, err, "ftruncate", "GuestMemory");
    }
  } else if (memfd) {
    fd = memfd_create("ferry-guest-ram", MFD_CLOEXEC);
    if (fd < 0) ThrowSystemError(env, errno, "memfd_create", "GuestMemory");
    if (ftruncate(fd, static_cast<off_t>(size)) < 0) {
      int err = errno;
      close(fd);
      ThrowSystemError(env, err, "ftruncate", "GuestMemory");
    }
  }
  int flags = fd >= 0 ? MAP_SHARED | MAP_NORESERVE : MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  // SAFETY: a fresh mapping owned by this object until Mapping::Unmap.
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    if (fd >= 0) close(fd);
    ThrowSystemError(env, err, "mmap", "GuestMemory");
  }
  // Transparent huge pages for guest RAM (as QEMU does): far fewer first-touch
  // faults and TLB misses. Advice only: a kernel without THP (EINVAL) or with
  // it disabled keeps 4 KiB pages, so the result is deliberately ignored.
  // SAFETY: [p, p+size) is the mapping just created.
  if (hugepages) (void)madvise(p, size, MADV_HUGEPAGE);
  mapping_ = new Mapping();
  mapping_->base = static_cast<uint8_t*>(p);
  mapping_->size = size;
  mapping_->fd = fd;
  base_ = mapping_->base;
  size_ = size;
  TagObject(env, info.This().As<Napi::Object>(), &kMemoryTag);
}

GuestMemory::~GuestMemory() {
  // Backstop: views still alive keep the mapping until they are collected.
  if (mapping_ != nullptr) mapping_->Unref();
  mapping_ = nullptr;
  base_ = nullptr;
}

void GuestMemory::CheckRange(Napi::Env env, uint64_t offset, uint64_t length, bool aligned) const {
  if (closed()) ThrowCodeError(env, "ERR_MEMORY_CLOSED", "GuestMemory is closed");
  if (offset > size_ || length > size_ - offset)
    ThrowRangeError(env, ("range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                          ") is outside the mapping of " + std::to_string(size_) + " bytes")
                             .c_str());
  if (aligned && (offset % kPage != 0 || length % kPage != 0))
    ThrowRangeError(env, "offset and length must be multiples of 4096");
}

static void FinalizeView(napi_env env, void* /*data*/, void* hint) {
  // Runs on the JS thread after the buffer died or was detached.
  ViewRec* rec = static_cast<ViewRec*>(hint);
  Mapping* m = rec->mapping;
  m->views.erase(rec->pos);
  if (env != nullptr) napi_delete_reference(env, rec->weak);
  delete rec;
  m->Unref();
}

Napi::Value GuestMemory::View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t offset = ArgU64(info, 0, "offset");
  uint64_t length = ArgU64(info, 1, "length");
  if (length > kMaxView) ThrowRangeError(env, "view length must be <= 1 GiB");
  CheckRange(env, offset, length, false);

  ViewRec* rec = new ViewRec{mapping_, nullptr, {}};
  mapping_->refs++;
  rec->pos = mapping_->views.insert(mapping_->views.end(), rec);
  napi_value ab = nullptr;
  // The C API, not Napi::ArrayBuffer::New: on failure Node runs the finalizer
  // itself (node-addon-api 8.9.2 would then free its hint twice). If the
  // finalizer did run, `rec` is gone; we tell by the mapping's view list.
  napi_status st = napi_create_external_arraybuffer(env, base_ + offset, length, FinalizeView, rec, &ab);
  if (st != napi_ok) {
    bool still_listed = false;
    for (ViewRec* r : mapping_->views) still_listed |= (r == rec);
    if (still_listed) {
      mapping_->views.erase(rec->pos);
      delete rec;
      mapping_->refs--;
    }
    if (env.IsExceptionPending()) throw env.GetAndClearPendingException();
    ThrowCodeError(env, "ERR_VIEW_FAILED", "napi_create_external_arraybuffer failed");
  }
  if (napi_create_reference(env, ab, 0, &rec->weak) != napi_ok) rec->weak = nullptr;
  return Napi::Value(env, ab);
}

Napi::Value GuestMemory::Discard(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t offset = ArgU64(info, 0, "offset");
  uint64_t length = ArgU64(info, 1, "length");
  CheckRange(env, offset, length, true);
  if (length == 0) return env.Undefined();
  // Shared backings keep pages in the page cache: punch them out too, so the
  // range reads as zero and counts as missing for userfaultfd.
  if (mapping_->fd >= 0 &&
      fallocate(mapping_->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                static_cast<off_t>(length)) < 0)
    ThrowSystemError(env, errno, "fallocate", "FALLOC_FL_PUNCH_HOLE");
  // SAFETY: page-aligned range inside our own mapping (checked above).
  if (madvise(base_ + offset, length, MADV_DONTNEED) < 0) ThrowSystemError(env, errno, "madvise", "MADV_DONTNEED");
  return env.Undefined();
}

// Offset of the first non-zero byte in [p, p+n), or n. Word loop on the
// aligned middle, four words per step.
static size_t FirstNonZero(const uint8_t* p, size_t n) {
  size_t i = 0;
  while (i < n && (reinterpret_cast<uintptr_t>(p + i) & 7) != 0) {
    if (p[i] != 0) return i;
    i++;
  }
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p + i);
  size_t words = (n - i) / 8;
  size_t k = 0;
  for (; k + 4 <= words; k += 4) {
    if ((w[k] | w[k + 1] | w[k + 2] | w[k + 3]) != 0) break;
  }
  for (; k < words; k++) {
    if (w[k] != 0) break;
  }
  i += k * 8;
  for (; i < n; i++) {
    if (p[i] != 0) return i;
  }
  return n;
}

static bool PageIsZero(const uint8_t* page) {
  // page is 4 KiB aligned: 512 words, checked 8 at a time with early exit.
  const uint64_t* w = reinterpret_cast<const uint64_t*>(page);
  for (size_t k = 0; k < kPage / 8; k += 8) {
    uint64_t acc = w[k] | w[k + 1] | w[k + 2] | w[k + 3] | w[k + 4] | w[k + 5] | w[k + 6] | w[k + 7];
    if (acc != 0) return false;
  }
  return true;
}

// Residency shortcut for the scans below. In a private anonymous mapping a
// page that is neither present nor swapped out has never been written since
// it was mapped or discarded (MADV_DONTNEED): it reads as zero, so a scan
// need not touch it. Touching it would map the zero page (a fault per page or
// per huge page) only to read zeros: on an idle 4 GiB guest that was most of
// a migration's scan time. /proc/self/pagemap gives one u64 per page (bit 63
// present, bit 62 swapped), opened once per mapping and closed with it. Not
// for shared (memfd/file) mappings, whose absent pages may hold data.
// Fills absent[i] for `pages` pages from p (page aligned); false if pagemap
// cannot be read (then callers scan every page).
constexpr uint64_t kPagemapPresent = 1ULL << 63;
constexpr uint64_t kPagemapSwapped = 1ULL << 62;

static bool AbsentPages(Mapping* m, const uint8_t* p, size_t pages, std::vector<uint8_t>& absent) {
  if (m->fd >= 0) return false;
  if (m->pagemap < 0) m->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  int fd = m->pagemap;
  if (fd < 0) return false;
  absent.assign(pages, 0);
  constexpr size_t kBatch = 4096;  // entries per pread (32 KiB)
  std::vector<uint64_t> e(kBatch < pages ? kBatch : pages);
  bool ok = true;
  const uint64_t first = reinterpret_cast<uintptr_t>(p) / kPage;
  for (size_t i = 0; i < pages && ok;) {
    size_t n = pages - i < kBatch ? pages - i : kBatch;
    size_t want = n * sizeof(uint64_t);
    ssize_t got = pread(fd, e.data(), want, static_cast<off_t>((first + i) * sizeof(uint64_t)));
    if (got != static_cast<ssize_t>(want)) {
      ok = false;
      break;
    }
    for (size_t k = 0; k < n; k++) absent[i + k] = (e[k] & (kPagemapPresent | kPagemapSwapped)) == 0;
    i += n;
  }
  return ok;
}

Napi::Value GuestMemory::FindNonZero(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t offset = ArgU64(info, 0, "offset");
  uint64_t length = ArgU64(info, 1, "length");
  CheckRange(env, offset, length, false);
  std::vector<uint8_t> absent;
  if (offset % kPage == 0 && length % kPage == 0 && length >= 16 * kPage &&
      AbsentPages(mapping_, base_ + offset, length / kPage, absent)) {
    // Page by page, reading only present pages (runs of them in one scan).
    uint64_t pages = length / kPage;
    for (uint64_t i = 0; i < pages;) {
      if (absent[i]) {
        i++;
        continue;
      }
      uint64_t j = i;
      while (j < pages && !absent[j]) j++;
      size_t n = (j - i) * kPage;
      size_t at = FirstNonZero(base_ + offset + i * kPage, n);
      if (at < n) return Napi::Number::New(env, static_cast<double>(offset + i * kPage + at));
      i = j;
    }
    return Napi::Number::New(env, -1);
  }
  size_t at = FirstNonZero(base_ + offset, length);
  if (at == length) return Napi::Number::New(env, -1);
  return Napi::Number::New(env, static_cast<double>(offset + at));
}

Napi::Value GuestMemory::ScanZeroPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t offset = ArgU64(info, 0, "offset");
  uint64_t pages = ArgU64(info, 1, "pages", size_ / kPage);
  auto [out, outLen] = ArgBytes(info, 2, "out");
  if (outLen < pages) ThrowRangeError(env, "out is shorter than pages");
  CheckRange(env, offset, pages * kPage, true);
  const uint8_t* p = base_ + offset;
  std::vector<uint8_t> absent;
  if (AbsentPages(mapping_, p, pages, absent)) {  // see EncodePageRecords
    for (uint64_t i = 0; i < pages; i++) out[i] = absent[i] || PageIsZero(p + i * kPage) ? 1 : 0;
    return env.Undefined();
  }
  for (uint64_t i = 0; i < pages; i++) out[i] = PageIsZero(p + i * kPage) ? 1 : 0;
  return env.Undefined();
}

// The destination's hot loop (profiled at ~40% of its CPU in JS): a run of
// QEMU RAM records "be64 (offset | PAGE | CONTINUE), 4096 bytes" copied into
// one block. Stops at the first record that is incomplete, of another kind,
// or outside the block, and leaves it to the JavaScript parser, which owns
// every error message; so this loop needs no error path of its own.
Napi::Value GuestMemory::LoadPageRecords(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto [src, srcLen] = ArgBytes(info, 0, "src");
  uint64_t blockOffset = ArgU64(info, 1, "blockOffset");
  uint64_t blockLength = ArgU64(info, 2, "blockLength");
  CheckRange(env, blockOffset, blockLength, true);
  constexpr uint64_t kFlagsMask = kPage - 1;
  constexpr uint64_t kPageContinue = 0x08 | 0x20;  // RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
  constexpr size_t kRecord = 8 + kPage;
  uint8_t* block = base_ + blockOffset;
  size_t at = 0;
  while (srcLen - at >= kRecord) {
    uint64_t word = 0;
    for (int i = 0; i < 8; i++) word = (word << 8) | src[at + i];
    uint64_t offset = word & ~kFlagsMask;
    if ((word & kFlagsMask) != kPageContinue || offset >= blockLength) break;
    // SAFETY: offset is page-aligned and below blockLength, and the block
    // lies inside the mapping (CheckRange), so the page is guest RAM.
    memcpy(block + offset, src + at + 8, kPage);
    at += kRecord;
  }
  return Napi::Number::New(env, static_cast<double>(at));
}

// zeroRecordRun(src, blockLength, max) -> how many of src's leading records
// are `ZERO | CONTINUE` with fill byte 0 for consecutive pages inside the
// block (at most max). An idle guest's stream is mostly these: a million per
// 4 GiB, too many to parse one by one in JavaScript. Like loadPageRecords it
// stops at anything else and has no error path.
static Napi::Value ZeroRecordRun(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto [src, srcLen] = ArgBytes(info, 0, "src");
  uint64_t blockLength = ArgU64(info, 1, "blockLength");
  uint64_t max = ArgU64(info, 2, "max");
  constexpr uint64_t kFlagsMask = kPage - 1;
  constexpr uint64_t kZeroContinue = 0x02 | 0x20;  // RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
  constexpr size_t kRecord = 9;
  uint64_t count = 0, first = 0;
  for (size_t at = 0; srcLen - at >= kRecord && count < max; at += kRecord, count++) {
    uint64_t word = 0;
    for (int i = 0; i < 8; i++) word = (word << 8) | src[at + i];
    uint64_t offset = word & ~kFlagsMask;
    if ((word & kFlagsMask) != kZeroContinue || src[at + 8] != 0 || offset >= blockLength || blockLength - offset < kPage) break;
    if (count == 0) first = offset;
    else if (offset != first + count * kPage) break;
  }
  return Napi::Number::New(env, static_cast<double>(count));
}

// Source side: QEMU RAM records with CONTINUE for consecutive pages (the
// caller has named the block already): a zero page as ZERO (9 bytes), any
// other as PAGE + its 4096 bytes.
constexpr uint64_t kRecordMax = 8 + kPage;
constexpr uint64_t kSpliceMinPages = 16;  // fewer data pages in a call go by copy

// Which of up to `pages` pages from `src` are zero, for as many pages as
// records surely fit in `capacity` bytes (a page record each: 4104). Returns
// that count; `bytes` is what their records take.
static uint64_t ClassifyPages(Mapping* m, const uint8_t* src, uint64_t pages, uint64_t capacity,
                              std::vector<uint8_t>& isZero, uint64_t& bytes) {
  // Always ask the page map: reading a never-touched page maps THP's huge zero
  // page over its whole 2 MiB, and later scans would then read all of it.
  std::vector<uint8_t> absent;
  bool haveAbsent = AbsentPages(m, src, pages, absent);
  isZero.clear();
  bytes = 0;
  uint64_t n = 0;
  for (; n < pages && bytes + kRecordMax <= capacity; n++) {
    bool zero = (haveAbsent && absent[n]) || PageIsZero(src + n * kPage);
    isZero.push_back(zero);
    bytes += zero ? 9 : kRecordMax;
  }
  return n;
}

// The be64 header of page `i`'s record (plus the ZERO record's fill byte) at o;
// returns its length.
static size_t PutHeader(uint8_t* o, uint64_t blockOffset, uint64_t i, bool zero) {
  uint64_t word = (blockOffset + i * kPage) | (zero ? 0x02 | 0x20 : 0x08 | 0x20);  // ZERO or PAGE, | CONTINUE
  for (int b = 7; b >= 0; b--, word >>= 8) o[b] = static_cast<uint8_t>(word);
  if (!zero) return 8;
  o[8] = 0;
  return 9;
}

// The records of the first isZero.size() pages from src, written at o (which
// has room for them); returns the end.
static uint8_t* WriteRecords(uint8_t* o, const uint8_t* src, uint64_t blockOffset, const std::vector<uint8_t>& isZero) {
  for (uint64_t i = 0; i < isZero.size(); i++) {
    o += PutHeader(o, blockOffset, i, isZero[i]);
    if (!isZero[i]) {
      // SAFETY: the page lies in the mapping (callers CheckRange); o has room (ClassifyPages).
      memcpy(o, src + i * kPage, kPage);
      o += kPage;
    }
  }
  return o;
}

static Napi::Object PageResult(Napi::Env env, uint64_t pages, uint64_t bytes) {
  Napi::Object r = Napi::Object::New(env);
  r.Set("pages", Napi::Number::New(env, static_cast<double>(pages)));
  r.Set("bytes", Napi::Number::New(env, static_cast<double>(bytes)));
  return r;
}

// The source's hot loop into a buffer: records for up to `pages` pages from
// memOffset, written into out from outPos, as many as surely fit (a zero page
// takes 9 bytes, so a chunk holds many more of those than of pages).
// Returns { pages, bytes }.
Napi::Value GuestMemory::EncodePageRecords(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t memOffset = ArgU64(info, 0, "memOffset");
  uint64_t blockOffset = ArgU64(info, 1, "blockOffset", 1ULL << 52);
  uint64_t pages = ArgU64(info, 2, "pages", size_ / kPage);
  auto [out, outLen] = ArgBytes(info, 3, "out");
  uint64_t outPos = ArgU64(info, 4, "outPos");
  CheckRange(env, memOffset, pages * kPage, true);
  if (blockOffset % kPage != 0) ThrowRangeError(env, "blockOffset must be a multiple of 4096");
  if (outPos > outLen || (pages > 0 && outLen - outPos < kRecordMax)) ThrowRangeError(env, "out has no room for a page record (4104 bytes)");
  const uint8_t* src = base_ + memOffset;
  std::vector<uint8_t> isZero;
  uint64_t bytes;
  uint64_t n = ClassifyPages(mapping_, src, pages, outLen - outPos, isZero, bytes);
  WriteRecords(out + outPos, src, blockOffset, isZero);
  return PageResult(env, n, bytes);
}

// The same records sent to a socket straight from guest memory (sendmsg over
// header and page iovecs: the kernel's copy is the only one), as many as
// surely fit in maxBytes. Whatever is not sent (the socket was full, or the
// records are all ZERO ones, not worth a syscall) is copied into `spill`
// (maxBytes or more) for the caller to send next, in order. With sendAllowed
// false (the caller has bytes to send first) a run with page data is left
// alone: nothing is consumed and pages is 0. With a PageSplicer (a unix
// socket) the pages go without even the kernel's copy in the sender
// (splice.cc). Returns { pages, bytes, sent, spliced? }: spliced when the
// sent bytes went by splice.
Napi::Value GuestMemory::SendPageRecords(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = static_cast<int>(ArgU64(info, 0, "fd", 0x7fffffff));
  uint64_t memOffset = ArgU64(info, 1, "memOffset");
  uint64_t blockOffset = ArgU64(info, 2, "blockOffset", 1ULL << 52);
  uint64_t pages = ArgU64(info, 3, "pages", size_ / kPage);
  uint64_t maxBytes = ArgU64(info, 4, "maxBytes", 1ULL << 30);
  auto [spill, spillLen] = ArgBytes(info, 5, "spill");
  bool sendAllowed = info[6].ToBoolean();
  PageSplicer* splicer = PageSplicer::FromOrNull(info[7]);
  CheckRange(env, memOffset, pages * kPage, true);
  if (blockOffset % kPage != 0) ThrowRangeError(env, "blockOffset must be a multiple of 4096");
  if (maxBytes < kRecordMax || spillLen < maxBytes) ThrowRangeError(env, "maxBytes must be at least 4104 and spill at least maxBytes long");
  const uint8_t* src = base_ + memOffset;
  std::vector<uint8_t> isZero;
  uint64_t bytes;
  uint64_t n = ClassifyPages(mapping_, src, pages, maxBytes, isZero, bytes);
  bool anyPage = bytes > 9 * n;
  Napi::Object res;
  if (!anyPage) {  // only ZERO records: back to the caller's buffer of small records
    WriteRecords(spill, src, blockOffset, isZero);
    res = PageResult(env, n, bytes);
    res.Set("sent", Napi::Number::New(env, 0));
    return res;
  }
  if (!sendAllowed) {
    res = PageResult(env, 0, 0);
    res.Set("sent", Napi::Number::New(env, 0));
    return res;
  }
  // Headers in one buffer (it must not move once iovecs point into it);
  // consecutive ZERO records are contiguous there and share an iovec. With a
  // splicer the buffer is its ring, which outlives the call.
  // Splice dense runs only: a lone page is cheap to copy, and copied bytes need not be waited
  // for before the guest may run again.
  uint64_t dataPages = (bytes - 9 * n) / (kRecordMax - 9);
  if (dataPages < kSpliceMinPages) splicer = nullptr;
  uint8_t* hdr = splicer != nullptr ? splicer->Reserve(9 * n) : nullptr;
  if (hdr == nullptr) splicer = nullptr;  // ring space not known free yet: copy this time
  std::vector<uint8_t> own;
  if (hdr == nullptr) {
    own.resize(9 * n);
    hdr = own.data();
  }
  std::vector<struct iovec> iov;
  iov.reserve(2 * n);
  size_t h = 0;
  for (uint64_t i = 0; i < n; i++) {
    size_t len = PutHeader(hdr + h, blockOffset, i, isZero[i]);
    if (!iov.empty() && static_cast<uint8_t*>(iov.back().iov_base) + iov.back().iov_len == hdr + h)
      iov.back().iov_len += len;
    else
      iov.push_back({hdr + h, len});
    h += len;
    // SAFETY: the page lies in the mapping (CheckRange); the kernel only reads it.
    if (!isZero[i]) iov.push_back({const_cast<uint8_t*>(src + i * kPage), kPage});
  }
  if (splicer != nullptr) {
    uint64_t spliced = splicer->Send(env, iov, spill);
    res = PageResult(env, n, bytes);
    res.Set("sent", Napi::Number::New(env, static_cast<double>(spliced)));
    res.Set("spliced", Napi::Boolean::New(env, spliced > 0));
    return res;
  }
  uint64_t sent = 0;
  size_t first = 0;
  while (first < iov.size()) {
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov.data() + first;
    msg.msg_iovlen = iov.size() - first < IOV_MAX ? iov.size() - first : IOV_MAX;
    ssize_t r = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (r < 0) ThrowSystemError(env, errno, "sendmsg", "sendPageRecords");
    sent += static_cast<uint64_t>(r);
    size_t k = static_cast<size_t>(r);
    while (first < iov.size() && k >= iov[first].iov_len) k -= iov[first++].iov_len;
    if (first < iov.size() && k > 0) {  // a partly sent iovec
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + k;
      iov[first].iov_len -= k;
    }
  }
  // The unsent tail, copied out in order (the pages may change after we return).
  uint8_t* o = spill;
  for (size_t i = first; i < iov.size(); i++) {
    memcpy(o, iov[i].iov_base, iov[i].iov_len);
    o += iov[i].iov_len;
  }
  res = PageResult(env, n, bytes);
  res.Set("sent", Napi::Number::New(env, static_cast<double>(sent)));
  return res;
}

Napi::Value GuestMemory::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (mapping_ == nullptr) return env.Undefined();
  // Detach every live view first: after this no JS object points into the
  // mapping, so munmap below cannot leave a dangling buffer.
  for (ViewRec* rec : mapping_->views) {
    if (rec->weak == nullptr) continue;
    napi_value v = nullptr;
    if (napi_get_reference_value(env, rec->weak, &v) == napi_ok && v != nullptr) {
      bool detached = false;
      napi_is_detached_arraybuffer(env, v, &detached);
      if (!detached && napi_detach_arraybuffer(env, v) != napi_ok) {
        // Not detachable (should not happen for our external buffers): keep
        // the mapping alive for it rather than unmap under it.
        base_ = nullptr;
        size_ = 0;
        Mapping* m = mapping_;
        mapping_ = nullptr;
        m->Unref();
        ThrowCodeError(env, "ERR_VIEW_NOT_DETACHABLE", "a view could not be detached; mapping kept until it is collected");
      }
    }
  }
  mapping_->Unmap();
  Mapping* m = mapping_;
  mapping_ = nullptr;
  base_ = nullptr;
  size_ = 0;
  m->Unref();
  return env.Undefined();
}

Napi::Value GuestMemory::GetSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(size_));
}

Napi::Value GuestMemory::GetAddress(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(reinterpret_cast<uintptr_t>(base_)));
}

void InitMemory(Napi::Env env, Napi::Object exports) {
  exports.Set("GuestMemory", GuestMemory::Class(env));
  exports.Set("zeroRecordRun", Napi::Function::New(env, ZeroRecordRun, "zeroRecordRun"));
}

}  // namespace ferry
