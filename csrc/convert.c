/*
 * convert.c - floating-point dtype conversion, eager and on demand.
 *
 * zc_convert() converts n elements between float16, bfloat16, float32 and float64 with the
 * rounding torch's Tensor.to() uses on the CPU: round to nearest even; float64 reaches float16
 * and bfloat16 through float32 (as c10::Half and c10::BFloat16 are built from a float); a NaN
 * stays a NaN, but its bits may differ from torch's (bfloat16: 0x7fc0 with its sign here, where
 * torch 2.13 writes 0xffff).
 *
 * A lazy region (zc_lazy_*) is read-only memory whose bytes are such conversions of source
 * memory, made on first access, a chunk at a time, with at most max_chunks chunks resident: a
 * reader (Ray's copy into its object store, a gather) sees one long buffer while the process
 * never holds more than the window.  How:
 *
 * - the view readers get is reserved address space, PROT_NONE where a chunk is absent; the
 *   window is a memfd of max_chunks chunks ("slots"), also mapped writable (the alias) for this
 *   file alone;
 * - a read of an absent chunk faults (SEGV_ACCERR); the core's fault handler (mapping.c) calls
 *   zc__lazy_fault(), which takes the oldest resident chunk's slot if the window is full (its
 *   place in the view is replaced by PROT_NONE first), converts the chunk's elements into the
 *   slot through the alias, and only then maps the slot read-only at the chunk's place in the
 *   view, so no reader ever sees a partial chunk; returning from the handler re-executes the
 *   read.  The slots' pages are made once and reused: no page is allocated or zeroed per chunk;
 * - a chunk evicted while another thread still reads it faults again and is made again: the
 *   bytes depend only on the source, so every reader sees the same bytes.

 * Everything the handler does is a syscall or plain arithmetic: no allocation, no locks other
 * than the spinlock below, which normal code takes only around table changes that never touch
 * lazy memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include "internal.h"

/* ---- element conversions ------------------------------------------------------------- */

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MANT_DIG__)
#define ZC__HAVE_F16 1
static float f16_to_f32(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}
static uint16_t f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}
#else
#define ZC__HAVE_F16 0
#endif

static int convertible(unsigned code) {
    return code == ZC_DT_BFLOAT16 || code == ZC_DT_FLOAT32 || code == ZC_DT_FLOAT64 ||
           (ZC__HAVE_F16 && code == ZC_DT_FLOAT16);
}

int zc_convert_supported(unsigned dst_dtype, unsigned src_dtype) {
    return convertible(dst_dtype) && convertible(src_dtype);
}

/* Element i of src as a double (exact for every supported type). */
static double load(const unsigned char *src, unsigned code, size_t i) {
    switch (code) {
    case ZC_DT_BFLOAT16: {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        return bf16_to_f32(h);
    }
#if ZC__HAVE_F16
    case ZC_DT_FLOAT16: {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        return f16_to_f32(h);
    }
#endif
    case ZC_DT_FLOAT32: {
        float f;
        memcpy(&f, src + 4 * i, 4);
        return f;
    }
    default: {
        double d;
        memcpy(&d, src + 8 * i, 8);
        return d;
    }
    }
}

static void store(unsigned char *dst, unsigned code, size_t i, double v) {
    switch (code) {
    case ZC_DT_BFLOAT16: {
        uint16_t h = f32_to_bf16((float)v);
        memcpy(dst + 2 * i, &h, 2);
        break;
    }
#if ZC__HAVE_F16
    case ZC_DT_FLOAT16: {
        uint16_t h = f32_to_f16((float)v);
        memcpy(dst + 2 * i, &h, 2);
        break;
    }
#endif
    case ZC_DT_FLOAT32: {
        float f = (float)v;
        memcpy(dst + 4 * i, &f, 4);
        break;
    }
    default:
        memcpy(dst + 8 * i, &v, 8);
        break;
    }
}

/* The common pairs get loops the compiler can vectorize; the rest go through double. */
static void convert_n(unsigned char *dst, unsigned dt, const unsigned char *src, unsigned st,
                      size_t n) {
    if (dt == ZC_DT_FLOAT32 && st == ZC_DT_BFLOAT16) {
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            uint32_t u;
            memcpy(&h, src + 2 * i, 2);
            u = (uint32_t)h << 16;
            memcpy(dst + 4 * i, &u, 4);
        }
        return;
    }
    if (dt == ZC_DT_BFLOAT16 && st == ZC_DT_FLOAT32) {
        for (size_t i = 0; i < n; i++) {
            float f;
            uint16_t h;
            memcpy(&f, src + 4 * i, 4);
            h = f32_to_bf16(f);
            memcpy(dst + 2 * i, &h, 2);
        }
        return;
    }
    if (dt == st) {
        memcpy(dst, src, n * zc_dtype_size(dt));
        return;
    }
    for (size_t i = 0; i < n; i++) store(dst, dt, i, load(src, st, i));
}

int zc_convert(void *dst, unsigned dst_dtype, const void *src, unsigned src_dtype, size_t n) {
    if (!zc_convert_supported(dst_dtype, src_dtype)) return ZC_EINVAL;
    if (n == 0) return 0;
    if (!dst || !src) return ZC_EINVAL;
    convert_n((unsigned char *)dst, dst_dtype, (const unsigned char *)src, src_dtype, n);
    return 0;
}

/* ---- lazy regions ---------------------------------------------------------------------- */

#define ZC__MAX_LAZY 64

enum { CHUNK_ABSENT = 0, CHUNK_RESIDENT = 1 };

struct zc_lazy {
    unsigned char *view;  /* What readers get: PROT_NONE, or a slot mapped read-only. */
    unsigned char *alias; /* The slots, writable (this file only). */
    size_t size, mapped, chunk;
    size_t n_chunks;
    int fd;
    unsigned dst_dtype;
    zc_convert_seg *segs; /* Sorted by dst_offset, not overlapping. */
    size_t n_segs;
    unsigned char *state;  /* Per chunk. */
    uint32_t *ring;        /* Resident chunks, oldest first (circular); ring position = slot. */
    unsigned max_chunks, ring_head, resident;
    zc_lazy_stats stats;
};

static zc_lazy *g_lazy[ZC__MAX_LAZY];
static atomic_flag g_lazy_lock = ATOMIC_FLAG_INIT;
static zc_lazy_totals g_totals; /* Under g_lazy_lock. */
static uint64_t g_resident_bytes;

static void lazy_lock(void) {
    while (atomic_flag_test_and_set_explicit(&g_lazy_lock, memory_order_acquire)) sched_yield();
}

static void lazy_unlock(void) { atomic_flag_clear_explicit(&g_lazy_lock, memory_order_release); }

/* fork() while another thread holds the lock would leave it held forever in the child. */
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void lazy_atfork(void) { (void)pthread_atfork(lazy_lock, lazy_unlock, lazy_unlock); }

/* Writes bytes [lo, hi) of the region to dst: every segment's part converted, zeros between. */
static void fill(zc_lazy *z, size_t lo, size_t hi, unsigned char *dst) {
    size_t esz = zc_dtype_size(z->dst_dtype), at = lo;
    size_t a = 0, b = z->n_segs;
    while (a < b) { /* First segment that ends after lo. */
        size_t m = a + (b - a) / 2;
        const zc_convert_seg *s = &z->segs[m];
        if (s->dst_offset + s->count * esz <= lo)
            a = m + 1;
        else
            b = m;
    }
    for (size_t i = a; i < z->n_segs && z->segs[i].dst_offset < hi; i++) {
        const zc_convert_seg *s = &z->segs[i];
        size_t s_lo = (size_t)s->dst_offset, s_hi = s_lo + (size_t)s->count * esz;
        size_t from = s_lo > lo ? s_lo : lo, to = s_hi < hi ? s_hi : hi;
        size_t first = (from - s_lo) / esz, n = (to - from) / esz;
        const unsigned char *src = (const unsigned char *)s->src + first * zc_dtype_size(s->src_dtype);
        if (from > at) memset(dst + (at - lo), 0, from - at);
        convert_n(dst + (from - lo), z->dst_dtype, src, s->src_dtype, n);
        at = to;
    }
    if (hi > at) memset(dst + (at - lo), 0, hi - at);
}

static int evict_oldest(zc_lazy *z) {
    uint32_t c = z->ring[z->ring_head];
    void *p = mmap(z->view + (size_t)c * z->chunk, z->chunk, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return -errno;
    (void)madvise(p, z->chunk, MADV_DONTFORK);
    z->state[c] = CHUNK_ABSENT;
    z->ring_head = (z->ring_head + 1) % z->max_chunks;
    z->resident--;
    z->stats.evictions++;
    g_totals.evictions++;
    g_resident_bytes -= z->chunk;
    return 0;
}

static int make_resident(zc_lazy *z, size_t c) {
    size_t lo = c * z->chunk, slot;
    void *p;
    if (z->resident == z->max_chunks && evict_oldest(z) != 0) return 0;
    slot = (z->ring_head + z->resident) % z->max_chunks;
    fill(z, lo, lo + z->chunk, z->alias + slot * z->chunk);
    p = mmap(z->view + lo, z->chunk, PROT_READ, MAP_SHARED | MAP_FIXED | MAP_POPULATE, z->fd,
             (off_t)(slot * z->chunk));
    if (p == MAP_FAILED) return 0;
    (void)madvise(p, z->chunk, MADV_DONTFORK); /* a new mapping: not the view's advice */
    z->state[c] = CHUNK_RESIDENT;
    z->ring[slot] = (uint32_t)c;
    z->resident++;
    z->stats.fills++;
    if (z->resident > z->stats.peak_resident) z->stats.peak_resident = z->resident;
    g_totals.fills++;
    g_resident_bytes += z->chunk;
    if (g_resident_bytes > g_totals.peak_resident_bytes) g_totals.peak_resident_bytes = g_resident_bytes;
    return 1;
}

/* Is this fault a write (or an instruction fetch)?  Only x86-64 says so in the signal context;
 * elsewhere a write to a region (a bug: the view is read-only) is taken for a read, and the
 * writer faults again and again instead of dying. */
static int is_write(const void *uctx) {
#if defined(__x86_64__) && defined(REG_ERR)
    const ucontext_t *uc = (const ucontext_t *)uctx;
    return uc && (uc->uc_mcontext.gregs[REG_ERR] & (2 | 16)) != 0; /* a write or a fetch */
#else
    (void)uctx;
    return 0;
#endif
}

int zc__lazy_fault(uintptr_t addr, const void *uctx) {
    int handled = 0;
    lazy_lock();
    for (size_t i = 0; i < ZC__MAX_LAZY; i++) {
        zc_lazy *z = g_lazy[i];
        size_t c;
        if (!z || addr < (uintptr_t)z->view || addr >= (uintptr_t)z->view + z->size) continue;
        if (is_write(uctx)) break; /* Not a read: the caller reports it as not ours. */
        c = (addr - (uintptr_t)z->view) / z->chunk;
        /* Resident already: another thread made it between the fault and the lock. */
        handled = z->state[c] == CHUNK_RESIDENT ? 1 : make_resident(z, c);
        break;
    }
    lazy_unlock();
    return handled;
}

static int cmp_seg(const void *a, const void *b) {
    const zc_convert_seg *x = (const zc_convert_seg *)a, *y = (const zc_convert_seg *)b;
    return x->dst_offset < y->dst_offset ? -1 : x->dst_offset > y->dst_offset;
}

static void lazy_free(zc_lazy *z) {
    if (z->view && z->view != MAP_FAILED) munmap(z->view, z->mapped);
    if (z->alias && z->alias != MAP_FAILED) munmap(z->alias, (size_t)z->max_chunks * z->chunk);
    if (z->fd >= 0) close(z->fd);
    free(z->segs);
    free(z->state);
    free(z->ring);
    free(z);
}

int zc_lazy_create(const zc_convert_seg *segs, size_t n_segs, unsigned dst_dtype, size_t size,
                   size_t chunk, unsigned max_chunks, zc_lazy **out) {
    size_t page = zc_page_size(), esz, slot;
    zc_lazy *z;
    int rc;

    if (!out) return ZC_EINVAL;
    *out = NULL;
    if (size == 0 || chunk == 0 || chunk % page || chunk % 64 || max_chunks == 0 ||
        (n_segs && !segs) || !convertible(dst_dtype))
        return ZC_EINVAL;
    esz = zc_dtype_size(dst_dtype);
    z = (zc_lazy *)calloc(1, sizeof *z);
    if (!z) return ZC_ENOMEM;
    z->fd = -1;
    z->size = size;
    z->chunk = chunk;
    z->dst_dtype = dst_dtype;
    if (__builtin_add_overflow(size, chunk - 1, &z->mapped)) {
        free(z);
        return ZC_EOVERFLOW;
    }
    z->n_chunks = z->mapped / chunk;
    z->mapped = z->n_chunks * chunk;
    if (z->n_chunks > UINT32_MAX) {
        free(z);
        return ZC_ETOOBIG;
    }
    /* One read may span two chunks: a window of one would evict one half to make the other. */
    if (max_chunks < 2) max_chunks = 2;
    z->max_chunks = max_chunks < z->n_chunks ? max_chunks : (unsigned)z->n_chunks;
    z->segs = (zc_convert_seg *)malloc((n_segs ? n_segs : 1) * sizeof *segs);
    z->state = (unsigned char *)calloc(z->n_chunks, 1);
    z->ring = (uint32_t *)calloc(z->max_chunks, sizeof *z->ring);
    if (!z->segs || !z->state || !z->ring) {
        lazy_free(z);
        return ZC_ENOMEM;
    }
    if (n_segs) memcpy(z->segs, segs, n_segs * sizeof *segs);
    z->n_segs = n_segs;
    qsort(z->segs, n_segs, sizeof *segs, cmp_seg);
    for (size_t i = 0; i < n_segs; i++) {
        const zc_convert_seg *s = &z->segs[i];
        uint64_t bytes, end;
        if (!convertible(s->src_dtype) || s->dst_offset % esz || (s->count && !s->src) ||
            __builtin_mul_overflow(s->count, (uint64_t)esz, &bytes) ||
            __builtin_add_overflow(s->dst_offset, bytes, &end) || end > size ||
            (i + 1 < n_segs && end > z->segs[i + 1].dst_offset)) {
            lazy_free(z);
            return ZC_EINVAL;
        }
    }
    z->fd = memfd_create("ray_zerocopy-convert", MFD_CLOEXEC);
    if (z->fd < 0 || ftruncate(z->fd, (off_t)((size_t)z->max_chunks * chunk)) != 0) {
        rc = -errno;
        lazy_free(z);
        return rc;
    }
    z->view = (unsigned char *)mmap(NULL, z->mapped, PROT_NONE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    z->alias = (unsigned char *)mmap(NULL, (size_t)z->max_chunks * chunk, PROT_READ | PROT_WRITE,
                                     MAP_SHARED, z->fd, 0);
    if (z->view == MAP_FAILED || z->alias == MAP_FAILED) {
        rc = -errno;
        lazy_free(z);
        return rc;
    }
    /* A child forked while the region lives inherits none of it: it cannot write into the slots
     * the parent's readers see, nor read a slot the parent later gives another chunk (its read
     * of the region kills it instead); the lock is not held across fork (lazy_atfork). */
    (void)madvise(z->alias, (size_t)z->max_chunks * chunk, MADV_DONTFORK);
    (void)madvise(z->view, z->mapped, MADV_DONTFORK);
    (void)pthread_once(&g_atfork_once, lazy_atfork);
    rc = zc__fault_handler_current();
    if (rc != 0) {
        lazy_free(z);
        return rc;
    }
    lazy_lock();
    for (slot = 0; slot < ZC__MAX_LAZY && g_lazy[slot]; slot++) {
    }
    if (slot < ZC__MAX_LAZY) {
        g_lazy[slot] = z;
        g_totals.regions_created++;
        g_totals.regions_alive++;
    }
    lazy_unlock();
    if (slot == ZC__MAX_LAZY) {
        lazy_free(z);
        return ZC_ENOMEM;
    }
    *out = z;
    return 0;
}

const void *zc_lazy_data(const zc_lazy *z) { return z ? z->view : NULL; }

size_t zc_lazy_size(const zc_lazy *z) { return z ? z->size : 0; }

void zc_lazy_get_stats(const zc_lazy *z, zc_lazy_stats *out) {
    if (!z || !out) return;
    lazy_lock();
    *out = z->stats;
    out->resident = z->resident;
    out->chunk = z->chunk;
    out->max_chunks = z->max_chunks;
    out->n_chunks = z->n_chunks;
    lazy_unlock();
}

void zc_lazy_destroy(zc_lazy *z) {
    if (!z) return;
    lazy_lock();
    for (size_t i = 0; i < ZC__MAX_LAZY; i++) {
        if (g_lazy[i] != z) continue;
        g_lazy[i] = NULL;
        g_totals.regions_alive--;
        g_resident_bytes -= (uint64_t)z->resident * z->chunk;
    }
    lazy_unlock();
    lazy_free(z);
}

void zc_lazy_get_totals(zc_lazy_totals *out, int reset_peak) {
    if (!out) return;
    lazy_lock();
    *out = g_totals;
    out->resident_bytes = g_resident_bytes;
    if (reset_peak) g_totals.peak_resident_bytes = g_resident_bytes;
    lazy_unlock();
}
