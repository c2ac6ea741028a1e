"""Shared C preamble for the native extension: headers every fragment relies on.

Every C function in the extension follows one convention: it returns a non-negative
value on success and ``-errno`` on failure (never relies on the caller reading ``errno``
after the call), so ``vmem._native`` can translate every return code in one place.
"""

INCLUDES = """
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/types.h>
"""

TYPES = """
/* The page size the whole extension assumes (x86-64, shmem/memfd without huge pages). */
#define VMEM_PAGE_SIZE ...
"""

FUNCTIONS = ""

CUSTOMIZATIONS = """
#define VMEM_PAGE_SIZE 4096UL
#define VMEM_PAGE_SHIFT 12
"""
