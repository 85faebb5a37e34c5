// KVM uapi fixes for C++ and constants newer than Debian 12's 6.1 headers.
//
// Kernel-header quirk (linux-libc-dev 6.1, seen with g++ 12): structs whose
// last member is __DECLARE_FLEX_ARRAY (kvm_msrs, kvm_msr_list, kvm_cpuid2,
// kvm_xsave) wrap the array in an anonymous struct beginning with an EMPTY
// struct. An empty struct is 0 bytes in C but 1 byte in C++, so in C++ these
// structs are larger, their `entries` sit at the wrong offset, and every
// ioctl number that encodes sizeof() (KVM_GET_MSRS, KVM_SET_CPUID2,
// KVM_GET_XSAVE2, ...) differs from the kernel's: the kernel answers EINVAL.
// So C++ code here never uses those structs: it uses the C layouts below and
// ioctl numbers rebuilt from them (values checked against gcc: see
// test/native/kvm.test.ts, which exercises each of them).
#pragma once
#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace ferry::abi {

// struct kvm_msrs as C lays it out: header, then kvm_msr_entry[nmsrs].
struct MsrsHeader {
  uint32_t nmsrs;
  uint32_t pad;
};
static_assert(sizeof(MsrsHeader) == 8);
static_assert(sizeof(kvm_msr_entry) == 16);

// struct kvm_msr_list: header, then uint32 indices[nmsrs].
struct MsrListHeader {
  uint32_t nmsrs;
};

// struct kvm_cpuid2: header, then kvm_cpuid_entry2[nent] (40 bytes each).
struct Cpuid2Header {
  uint32_t nent;
  uint32_t padding;
};
static_assert(sizeof(kvm_cpuid_entry2) == 40);

// struct kvm_xsave without its flexible tail (KVM_GET_XSAVE2 may write more:
// as many bytes as KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd says).
struct XsaveFixed {
  uint32_t region[1024];
};
constexpr size_t kXsaveSize = sizeof(XsaveFixed);  // 4096

constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, MsrListHeader);
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, Cpuid2Header);
constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, MsrsHeader);
constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, MsrsHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, Cpuid2Header);
constexpr unsigned long kGetXsave = _IOR(KVMIO, 0xa4, XsaveFixed);
constexpr unsigned long kSetXsave = _IOW(KVMIO, 0xa5, XsaveFixed);
constexpr unsigned long kGetXsave2 = _IOR(KVMIO, 0xcf, XsaveFixed);

static_assert(kGetMsrs == 0xc008ae88UL);
static_assert(kSetCpuid2 == 0x4008ae90UL);
static_assert(kGetXsave2 == 0x9000aecfUL);

}  // namespace ferry::abi

// Capabilities newer than the 6.1 headers (kernel uapi numbers).
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223  // 6.1
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225  // 6.3
#endif
