/*
 * PVH boot ABI (public Xen ABI, arch-x86/hvm/start_info.h): the VMM passes
 * the physical address of an hvm_start_info in ebx at the PHYS32 entry.
 */
#ifndef GUEST_START_INFO_H
#define GUEST_START_INFO_H

#include <stdint.h>

#define HVM_START_MAGIC 0x336ec578u

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;        /* memmap fields are valid from version 1 */
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;  /* NUL-terminated */
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;   /* array of hvm_memmap_table_entry */
	uint32_t memmap_entries;
	uint32_t reserved;
};

struct hvm_memmap_table_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;           /* 1 = RAM (E820 types) */
	uint32_t reserved;
};

#define HVM_MEMMAP_TYPE_RAM 1

#endif
