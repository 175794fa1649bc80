/*
 * mapping.c - memory management of a mapped arena: prefaulting, write protection and the
 * fault handler that names the tensor a stray write hit.
 *
 * The registry of protected ranges is a fixed array of slots.  Threads change it under a mutex;
 * the signal handler reads it without locks: a slot is published by an atomic state change, and
 * a slot is only freed once no handler is reading it (readers count, sequentially consistent).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

#define ZC__MAX_PROTECT 256
#define ZC__MSG_NAME_MAX 512

enum { SLOT_FREE = 0, SLOT_BUSY = 1, SLOT_ACTIVE = 2 };

typedef struct prot_range {
    uintptr_t start;
    size_t len;
    const char *name; /* Into the slot's names block; not NUL-terminated. */
    uint32_t name_len;
} prot_range;

typedef struct prot_slot {
    atomic_int state;
    atomic_int readers;
    uint64_t id;
    uintptr_t lo, hi; /* The protected pages. */
    size_t n;
    prot_range *ranges;
    char *names;
} prot_slot;

static prot_slot g_slots[ZC__MAX_PROTECT];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_next_id = 1;

static pthread_mutex_t g_handler_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int g_handler_installed;
static struct sigaction g_prev_segv, g_prev_bus;

size_t zc_page_size(void) { return zc__plat_page_size(); }

/* ---- populate ------------------------------------------------------------ */

typedef struct populate_job {
    unsigned char *base;
    size_t len, slice, page;
    int nparts;
    int rcs[ZC__MAX_THREADS];
} populate_job;

static void populate_part(void *arg, int part) {
    populate_job *job = (populate_job *)arg;
    size_t start = (size_t)part * job->slice, n;
    int rc;
    if (start >= job->len) {
        job->rcs[part] = 0;
        return;
    }
    n = part == job->nparts - 1 || job->len - start < job->slice ? job->len - start : job->slice;
    rc = zc__plat_populate_read(job->base + start, n);
    if (rc == -EINVAL) {
        /* Older kernels, or mappings MADV_POPULATE_READ refuses: read one byte per page. */
        const volatile unsigned char *p = job->base + start;
        unsigned char sink = 0;
        for (size_t off = 0; off < n; off += job->page) sink ^= p[off];
        (void)sink;
        rc = 0;
    }
    job->rcs[part] = rc;
}

int zc_populate(const void *addr, size_t len, int nthreads) {
    populate_job job;
    size_t page = zc_page_size();
    uintptr_t lo, hi;
    int nparts, rc;

    if (len == 0) return 0;
    if (!addr) return ZC_EINVAL;
    lo = (uintptr_t)addr & ~(uintptr_t)(page - 1);
    if (__builtin_add_overflow((uintptr_t)addr, len, &hi) || __builtin_add_overflow(hi, page - 1, &hi))
        return ZC_EINVAL;
    hi &= ~(uintptr_t)(page - 1);

    job.base = (unsigned char *)lo;
    job.len = hi - lo;
    job.page = page;
    nparts = zc__resolve_threads(nthreads);
    if ((size_t)nparts > job.len / ZC__MIN_CHUNK) nparts = (int)(job.len / ZC__MIN_CHUNK);
    if (nparts < 1) nparts = 1;
    job.slice = (job.len / (size_t)nparts + page - 1) & ~(page - 1);
    job.nparts = nparts;
    rc = nparts == 1 ? (populate_part(&job, 0), 0) : zc__run_parallel(nparts, populate_part, &job);
    for (int i = 0; i < nparts; i++)
        if (job.rcs[i]) return job.rcs[i];
    return rc;
}

/* ---- protection registry -------------------------------------------------- */

static void free_slot_data(prot_slot *s) {
    free(s->ranges);
    free(s->names);
    s->ranges = NULL;
    s->names = NULL;
    s->n = 0;
}

int zc_protect(void *addr, size_t len, const zc_named_range *ranges, size_t n, uint64_t *out_id) {
    size_t page = zc_page_size(), names_size = 0, pos = 0;
    uintptr_t lo, hi, end;
    prot_slot *slot = NULL;
    prot_range *copy = NULL;
    char *names = NULL;
    int rc = 0;

    if (!out_id || (!addr && len) || (n && !ranges)) return ZC_EINVAL;
    *out_id = 0;
    if (__builtin_add_overflow((uintptr_t)addr, len, &end)) return ZC_EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (ranges[i].name_len && !ranges[i].name) return ZC_EINVAL;
        names_size += ranges[i].name_len;
    }
    if (__builtin_add_overflow((uintptr_t)addr, page - 1, &lo)) return ZC_EINVAL;
    lo &= ~(uintptr_t)(page - 1);
    hi = end & ~(uintptr_t)(page - 1);
    if (lo >= hi) return 0;

    copy = n ? (prot_range *)calloc(n, sizeof *copy) : NULL;
    names = (char *)malloc(names_size ? names_size : 1);
    if ((n && !copy) || !names) {
        rc = ZC_ENOMEM;
        goto cleanup;
    }
    for (size_t i = 0; i < n; i++) {
        copy[i].start = ranges[i].start;
        copy[i].len = ranges[i].len;
        copy[i].name = names + pos;
        copy[i].name_len = ranges[i].name_len;
        if (ranges[i].name_len) memcpy(names + pos, ranges[i].name, ranges[i].name_len);
        pos += ranges[i].name_len;
    }

    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < ZC__MAX_PROTECT && !slot; i++)
        if (atomic_load(&g_slots[i].state) == SLOT_FREE) slot = &g_slots[i];
    if (slot) {
        atomic_store(&slot->state, SLOT_BUSY);
        slot->id = g_next_id++;
        slot->lo = lo;
        slot->hi = hi;
        slot->n = n;
        slot->ranges = copy;
        slot->names = names;
        copy = NULL;
        names = NULL;
        /* Published before the pages turn read-only, so every fault finds its names. */
        atomic_store(&slot->state, SLOT_ACTIVE);
        if (mprotect((void *)lo, hi - lo, PROT_READ) != 0) {
            rc = -errno;
            atomic_store(&slot->state, SLOT_BUSY);
            while (atomic_load(&slot->readers) != 0) sched_yield();
            free_slot_data(slot);
            atomic_store(&slot->state, SLOT_FREE);
        } else {
            *out_id = slot->id;
        }
    } else {
        rc = ZC_ENOMEM;
    }
    pthread_mutex_unlock(&g_lock);

cleanup:
    free(copy);
    free(names);
    return rc;
}

/* Makes [lo, hi) writable again except the pages another active slot still protects.
 * Called with g_lock held.  Returns 0 or -errno of the first failure. */
static int restore_pages(uintptr_t lo, uintptr_t hi) {
    uintptr_t ivs[ZC__MAX_PROTECT][2];
    uintptr_t pos = lo;
    int n = 0, rc = 0;

    for (int i = 0; i < ZC__MAX_PROTECT; i++) {
        prot_slot *s = &g_slots[i];
        int k;
        if (atomic_load(&s->state) != SLOT_ACTIVE || s->hi <= lo || s->lo >= hi) continue;
        /* Insertion sort by start. */
        for (k = n; k > 0 && ivs[k - 1][0] > s->lo; k--) {
            ivs[k][0] = ivs[k - 1][0];
            ivs[k][1] = ivs[k - 1][1];
        }
        ivs[k][0] = s->lo;
        ivs[k][1] = s->hi;
        n++;
    }
    for (int i = 0; i <= n; i++) {
        uintptr_t stop = i < n ? (ivs[i][0] < hi ? ivs[i][0] : hi) : hi;
        if (stop > pos && mprotect((void *)pos, stop - pos, PROT_READ | PROT_WRITE) != 0 && rc == 0) rc = -errno;
        if (i < n && ivs[i][1] > pos) pos = ivs[i][1];
    }
    return rc;
}

int zc_unprotect(uint64_t id) {
    prot_slot *slot = NULL;
    int rc;

    if (id == 0) return 0;
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < ZC__MAX_PROTECT && !slot; i++)
        if (atomic_load(&g_slots[i].state) == SLOT_ACTIVE && g_slots[i].id == id) slot = &g_slots[i];
    if (!slot) {
        pthread_mutex_unlock(&g_lock);
        return ZC_EINVAL;
    }
    atomic_store(&slot->state, SLOT_BUSY);
    rc = restore_pages(slot->lo, slot->hi);
    while (atomic_load(&slot->readers) != 0) sched_yield();
    free_slot_data(slot);
    atomic_store(&slot->state, SLOT_FREE);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* ---- lookups (async-signal-safe) ------------------------------------------ */

/* Finds the protected slot holding addr and the tensor range holding it.  Copies at most
 * name_cap bytes of the name into name and sets *name_len (0 if no tensor matches).
 * Returns 1 if addr is protected.  Uses only atomics and plain reads. */
static int lookup(uintptr_t addr, char *name, size_t name_cap, size_t *name_len) {
    int found = 0;
    *name_len = 0;
    for (int i = 0; i < ZC__MAX_PROTECT && !found; i++) {
        prot_slot *s = &g_slots[i];
        if (atomic_load(&s->state) != SLOT_ACTIVE) continue;
        atomic_fetch_add(&s->readers, 1);
        if (atomic_load(&s->state) == SLOT_ACTIVE && addr >= s->lo && addr < s->hi) {
            found = 1;
            for (size_t k = 0; k < s->n; k++) {
                const prot_range *r = &s->ranges[k];
                if (addr >= r->start && addr - r->start < r->len) {
                    size_t m = r->name_len < name_cap ? r->name_len : name_cap;
                    memcpy(name, r->name, m);
                    *name_len = m;
                    break;
                }
            }
        }
        atomic_fetch_sub(&s->readers, 1);
    }
    return found;
}

int zc_describe_address(uintptr_t addr, char *msg, size_t msg_cap) {
    char name[ZC_MAX_NAME];
    size_t n;
    int found = lookup(addr, name, sizeof name, &n);
    if (msg && msg_cap) {
        if (n >= msg_cap) n = msg_cap - 1;
        memcpy(msg, name, n);
        msg[n] = '\0';
    }
    return found;
}

/* ---- fault handler --------------------------------------------------------- */

static size_t append(char *dst, size_t pos, size_t cap, const char *src, size_t n) {
    for (size_t i = 0; i < n && pos < cap; i++) dst[pos++] = src[i];
    return pos;
}

static size_t append_str(char *dst, size_t pos, size_t cap, const char *s) {
    return append(dst, pos, cap, s, strlen(s));
}

static size_t append_hex(char *dst, size_t pos, size_t cap, uintptr_t v) {
    char tmp[2 * sizeof v];
    size_t n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    while (n > 0 && pos < cap) dst[pos++] = tmp[--n];
    return pos;
}

static void write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        buf += w;
        n -= (size_t)w;
    }
}

/* Puts back the dispositions found at install time (async-signal-safe). */
static void restore_previous(void) {
    sigaction(SIGSEGV, &g_prev_segv, NULL);
    sigaction(SIGBUS, &g_prev_bus, NULL);
    atomic_store(&g_handler_installed, 0);
}

static void on_fault(int sig, siginfo_t *si, void *uctx) {
    const struct sigaction *prev = sig == SIGBUS ? &g_prev_bus : &g_prev_segv;
    int saved_errno = errno;
    int from_kernel = si && si->si_code > 0;

    /* A read of a lazy region's absent chunk (convert.c): make it, then re-execute the read. */
    if (from_kernel && sig == SIGSEGV && si->si_code == SEGV_ACCERR &&
        zc__lazy_fault((uintptr_t)si->si_addr, uctx)) {
        errno = saved_errno;
        return;
    }

    if (from_kernel && (sig == SIGBUS || si->si_code == SEGV_ACCERR)) {
        char name[ZC__MSG_NAME_MAX], out[ZC__MSG_NAME_MAX + 256];
        size_t name_len, pos = 0;
        uintptr_t addr = (uintptr_t)si->si_addr;
        if (lookup(addr, name, sizeof name, &name_len)) {
            pos = append_str(out, pos, sizeof out, "ray_zerocopy: write to shared read-only ");
            if (name_len) {
                pos = append_str(out, pos, sizeof out, "weight '");
                pos = append(out, pos, sizeof out, name, name_len);
                pos = append_str(out, pos, sizeof out, "'");
            } else {
                pos = append_str(out, pos, sizeof out, "memory inside a protected arena");
            }
            pos = append_str(out, pos, sizeof out, " at 0x");
            pos = append_hex(out, pos, sizeof out, addr);
            pos = append_str(out, pos, sizeof out,
                             ": shared weights are read-only in workers; load with writable=True to get a "
                             "private copy\n");
            write_all(STDERR_FILENO, out, pos);
            /* Returning re-executes the write, which faults again under the previous disposition. */
            restore_previous();
            errno = saved_errno;
            return;
        }
    }

    /* Not ours: behave as if the previous disposition had been there all along. */
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction) prev->sa_sigaction(sig, si, uctx);
    } else if (prev->sa_handler == SIG_DFL || prev->sa_handler == SIG_IGN) {
        restore_previous();
        /* A fault re-raises itself on return; a signal sent by kill() must be raised again. */
        if (!from_kernel && prev->sa_handler == SIG_DFL) (void)raise(sig);
    } else {
        prev->sa_handler(sig);
    }
    errno = saved_errno;
}

int zc_install_fault_handler(void) {
    struct sigaction sa;
    int rc = 0;

    if (atomic_load(&g_handler_installed)) return 0;
    pthread_mutex_lock(&g_handler_lock);
    if (!atomic_load(&g_handler_installed)) {
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &g_prev_segv) != 0) {
            rc = -errno;
        } else if (sigaction(SIGBUS, &sa, &g_prev_bus) != 0) {
            rc = -errno;
            sigaction(SIGSEGV, &g_prev_segv, NULL);
        } else {
            atomic_store(&g_handler_installed, 1);
        }
    }
    pthread_mutex_unlock(&g_handler_lock);
    return rc;
}

int zc__fault_handler_current(void) {
    struct sigaction cur, sa;
    int rc = 0;

    if (!atomic_load(&g_handler_installed)) return zc_install_fault_handler();
    pthread_mutex_lock(&g_handler_lock);
    if (sigaction(SIGSEGV, NULL, &cur) != 0) {
        rc = -errno;
    } else if (!(cur.sa_flags & SA_SIGINFO) || cur.sa_sigaction != on_fault) {
        /* Something replaced the handler after it was installed.  Put it back on top, still
         * chaining to what was there before it: the replacement may itself chain back to this
         * handler, and chaining to it as well could turn a real crash into a loop. */
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, NULL) != 0 || sigaction(SIGBUS, &sa, NULL) != 0) rc = -errno;
    }
    pthread_mutex_unlock(&g_handler_lock);
    return rc;
}
