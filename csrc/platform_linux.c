/*
 * platform_linux.c - the few calls whose availability differs between systems.
 *
 * Builds on any POSIX system; on systems without MADV_POPULATE_READ the populate call reports
 * -EINVAL and the caller falls back to touching pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

#if defined(__linux__) && !defined(MADV_POPULATE_READ)
#define MADV_POPULATE_READ 22 /* Linux 5.14; older headers lack it. */
#endif

int zc__plat_online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 4096 ? 4096 : (int)n);
}

size_t zc__plat_page_size(void) {
    long n = sysconf(_SC_PAGESIZE);
    return n > 0 ? (size_t)n : 4096u;
}

int zc__plat_populate_read(void *addr, size_t len) {
#if defined(MADV_POPULATE_READ)
    for (;;) {
        if (madvise(addr, len, MADV_POPULATE_READ) == 0) return 0;
        if (errno != EINTR) return -errno;
    }
#else
    (void)addr;
    (void)len;
    return -EINVAL;
#endif
}
