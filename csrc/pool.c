/*
 * pool.c - a persistent thread pool and the chunked copy that runs on it.
 *
 * The GPU staging path copies a 4 GiB arena in 64 chunks; starting and joining a thread per
 * part of every chunk (threads.c) costs tens of microseconds per thread each time.  A pool
 * starts its threads once: a run posts a job (a function and a number of parts) under a mutex,
 * every participant (the workers and the calling thread) claims parts one at a time until
 * none is left, and the caller waits until every claimed part has finished.  Claiming under
 * the mutex keeps the protocol simple; a part is at least tens of kilobytes of copying, so the
 * lock is never the bottleneck.
 *
 * Idle workers may poll for a new job for a short time (spin_us) before sleeping on the
 * condition variable: a staging loop posts the next chunk a few microseconds after the last
 * one finished, sooner than a sleeping thread wakes up.
 *
 * Non-temporal stores (x86-64 SSE2 streaming stores) write whole cache lines without first
 * reading them (no read-for-ownership), and do not leave the destination in the cache: that
 * saves a third of the memory traffic of a copy into a buffer the CPU will not read again,
 * such as a pinned staging buffer the GPU reads by DMA.  They lose when the destination would
 * have stayed in the cache for its reader, which is why the choice is the caller's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#if (defined(__x86_64__) || defined(__SSE2__)) && !defined(ZC_NO_NT_STORES)
#include <emmintrin.h>
#define ZC__HAVE_NT 1
#else
#define ZC__HAVE_NT 0
#endif

/* A part of a copy is never smaller than this (except the only part of a small copy). */
#define ZC__POOL_MIN_PART ((size_t)64 << 10)
/* ZC_COPY_AUTO uses non-temporal stores for parts at least this large. */
#define ZC__NT_MIN ((size_t)256 << 10)
/* Parts of a copy start at multiples of this in the destination (one cache line). */
#define ZC__LINE 64u

struct zc_pool {
    pthread_mutex_t mu;      /* Guards the job fields below. */
    pthread_cond_t work_cv;  /* Signalled when a job is posted or the pool stops. */
    pthread_cond_t done_cv;  /* Signalled when the last part of a job finishes. */
    pthread_mutex_t run_mu;  /* Serializes zc_pool_run callers. */
    int nthreads;            /* Participants: the workers plus the calling thread. */
    int nworkers;            /* Worker threads started. */
    long spin_ns;            /* How long an idle worker polls before sleeping. */
    pid_t pid;               /* The process that created the workers. */
    pthread_t *tids;

    /* The job (under mu). */
    void (*fn)(void *arg, int part);
    void *arg;
    int nparts;              /* Parts of the current job; 0 when there is none. */
    int next;                /* Next part to claim. */
    int done;                /* Parts finished. */
    int stop;
    _Atomic uint64_t posted; /* Jobs posted so far; polled without the lock by spinning workers. */
};

/* The pool whose part this thread is running (NULL outside parts): a zc_pool_run from inside
 * a part of the same pool runs inline instead of waiting for itself. */
static _Thread_local const zc_pool *tl_running;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Polls until a job newer than seen is posted, the pool stops, or spin_ns pass. */
static void spin_for_work(zc_pool *pool, uint64_t seen) {
    uint64_t deadline = now_ns() + (uint64_t)pool->spin_ns;
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(&pool->posted, memory_order_acquire) != seen) return;
        if ((i & 63u) == 0 && now_ns() >= deadline) return;
        cpu_relax();
    }
}

/* Claims and runs parts of the current job until none is left.  Called with mu held;
 * returns with mu held. */
static void run_parts_locked(zc_pool *pool) {
    while (pool->next < pool->nparts) {
        int part = pool->next++;
        void (*fn)(void *, int) = pool->fn;
        void *arg = pool->arg;
        const zc_pool *outer = tl_running;
        pthread_mutex_unlock(&pool->mu);
        tl_running = pool;
        fn(arg, part);
        tl_running = outer;
        pthread_mutex_lock(&pool->mu);
        if (++pool->done == pool->nparts) pthread_cond_signal(&pool->done_cv);
    }
}

static void *worker_main(void *p) {
    zc_pool *pool = (zc_pool *)p;
    pthread_mutex_lock(&pool->mu);
    while (!pool->stop) {
        if (pool->next < pool->nparts) {
            run_parts_locked(pool);
            continue;
        }
        if (pool->spin_ns > 0) {
            uint64_t seen = atomic_load_explicit(&pool->posted, memory_order_relaxed);
            pthread_mutex_unlock(&pool->mu);
            spin_for_work(pool, seen);
            pthread_mutex_lock(&pool->mu);
            if (pool->stop || pool->next < pool->nparts) continue;
        }
        pthread_cond_wait(&pool->work_cv, &pool->mu);
    }
    pthread_mutex_unlock(&pool->mu);
    return NULL;
}

/* Stops and joins the workers started so far, then frees the pool. */
static void pool_free(zc_pool *pool, int join) {
    if (join && pool->nworkers > 0) {
        pthread_mutex_lock(&pool->mu);
        pool->stop = 1;
        atomic_fetch_add_explicit(&pool->posted, 1, memory_order_release);
        pthread_cond_broadcast(&pool->work_cv);
        pthread_mutex_unlock(&pool->mu);
        for (int i = 0; i < pool->nworkers; i++) pthread_join(pool->tids[i], NULL);
    }
    if (join) {
        pthread_cond_destroy(&pool->work_cv);
        pthread_cond_destroy(&pool->done_cv);
        pthread_mutex_destroy(&pool->mu);
        pthread_mutex_destroy(&pool->run_mu);
    }
    free(pool->tids);
    free(pool);
}

int zc_pool_create(int nthreads, int spin_us, zc_pool **out) {
    zc_pool *pool;
    int n, rc = 0;

    if (!out) return ZC_EINVAL;
    *out = NULL;
    if (spin_us < 0 || spin_us > 1000000) return ZC_EINVAL;
    n = nthreads > 0 ? nthreads : zc__plat_online_cpus();
    if (n > ZC_POOL_MAX_THREADS) n = ZC_POOL_MAX_THREADS;
    if (n < 1) n = 1;

    pool = (zc_pool *)calloc(1, sizeof *pool);
    if (!pool) return ZC_ENOMEM;
    pool->tids = (pthread_t *)calloc((size_t)n, sizeof *pool->tids);
    if (!pool->tids) {
        free(pool);
        return ZC_ENOMEM;
    }
    pthread_mutex_init(&pool->mu, NULL);
    pthread_mutex_init(&pool->run_mu, NULL);
    pthread_cond_init(&pool->work_cv, NULL);
    pthread_cond_init(&pool->done_cv, NULL);
    atomic_init(&pool->posted, 0);
    pool->nthreads = n;
    pool->spin_ns = (long)spin_us * 1000L;
    pool->pid = getpid();
    for (int i = 0; i < n - 1; i++) {
        int err = pthread_create(&pool->tids[i], NULL, worker_main, pool);
        if (err != 0) {
            rc = -err;
            break;
        }
        pool->nworkers++;
    }
    if (rc != 0) {
        pool_free(pool, 1);
        return rc;
    }
    *out = pool;
    return 0;
}

void zc_pool_destroy(zc_pool *pool) {
    if (!pool) return;
    /* After fork() the child has none of the workers, and a mutex may have been copied locked:
     * only the memory is freed there. */
    pool_free(pool, pool->pid == getpid());
}

int zc_pool_size(const zc_pool *pool) { return pool ? pool->nthreads : 1; }

int zc_pool_run(zc_pool *pool, int nparts, void (*fn)(void *arg, int part), void *arg) {
    if (!fn) return ZC_EINVAL;
    if (nparts <= 0) return 0;
    if (!pool || pool->nworkers == 0 || tl_running == pool || pool->pid != getpid()) {
        /* No workers, a nested run, or a forked child: the parts run here, in order. */
        for (int i = 0; i < nparts; i++) fn(arg, i);
        return 0;
    }
    pthread_mutex_lock(&pool->run_mu);
    pthread_mutex_lock(&pool->mu);
    pool->fn = fn;
    pool->arg = arg;
    pool->nparts = nparts;
    pool->next = 0;
    pool->done = 0;
    atomic_fetch_add_explicit(&pool->posted, 1, memory_order_release);
    if (nparts > 1) pthread_cond_broadcast(&pool->work_cv);
    run_parts_locked(pool);
    while (pool->done < pool->nparts) pthread_cond_wait(&pool->done_cv, &pool->mu);
    pool->fn = NULL;
    pool->arg = NULL;
    pool->nparts = 0;
    pool->next = 0;
    pool->done = 0;
    pthread_mutex_unlock(&pool->mu);
    pthread_mutex_unlock(&pool->run_mu);
    return 0;
}

/* ---- copies ---------------------------------------------------------------- */

int zc_nt_stores_available(void) { return ZC__HAVE_NT; }

#if ZC__HAVE_NT
/* Copies n bytes with streaming stores: memcpy up to the next cache line of dst, then 64
 * bytes per step (unaligned loads, aligned non-temporal stores), then memcpy of the tail.
 * The sfence makes the streaming stores visible before the caller reports the part done. */
static void copy_nt(unsigned char *d, const unsigned char *s, size_t n) {
    size_t head = (size_t)((ZC__LINE - ((uintptr_t)d & (ZC__LINE - 1))) & (ZC__LINE - 1));
    size_t body;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    body = n & ~(size_t)(ZC__LINE - 1);
    for (size_t i = 0; i < body; i += ZC__LINE) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(const void *)(s + i + 48));
        _mm_stream_si128((__m128i *)(void *)(d + i), a);
        _mm_stream_si128((__m128i *)(void *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(void *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(void *)(d + i + 48), e);
    }
    _mm_sfence();
    memcpy(d + body, s + body, n - body);
}
#endif

static void copy_part_bytes(unsigned char *d, const unsigned char *s, size_t n, int mode) {
#if ZC__HAVE_NT
    if (mode == ZC_COPY_NT || (mode == ZC_COPY_AUTO && n >= ZC__NT_MIN)) {
        copy_nt(d, s, n);
        return;
    }
#else
    (void)mode;
#endif
    memcpy(d, s, n);
}

typedef struct copy_job {
    unsigned char *dst;
    const unsigned char *src;
    size_t n;
    size_t slice;
    int nparts;
    int mode;
} copy_job;

/* Start of part k: k * slice rounded up to a cache line of dst, within [0, n]. */
static size_t part_start(const copy_job *job, int k) {
    uintptr_t base = (uintptr_t)job->dst, a;
    size_t off;
    if (k <= 0) return 0;
    if (k >= job->nparts) return job->n;
    off = (size_t)k * job->slice; /* <= n: slice = n / nparts. */
    a = (base + off + (ZC__LINE - 1)) & ~(uintptr_t)(ZC__LINE - 1);
    off = (size_t)(a - base);
    return off < job->n ? off : job->n;
}

static void copy_part(void *arg, int part) {
    const copy_job *job = (const copy_job *)arg;
    size_t lo = part_start(job, part), hi = part_start(job, part + 1);
    if (hi > lo) copy_part_bytes(job->dst + lo, job->src + lo, hi - lo, job->mode);
}

int zc_pool_copy(zc_pool *pool, void *dst, const void *src, size_t n, int nparts, int mode) {
    copy_job job;
    uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    size_t max_parts;

    if (n == 0) return 0;
    if (!dst || !src) return ZC_EINVAL;
    if (mode != ZC_COPY_PLAIN && mode != ZC_COPY_NT && mode != ZC_COPY_AUTO) return ZC_EINVAL;
    if (d + n < d || s + n < s) return ZC_EINVAL;
    if ((d < s && s - d < n) || (s <= d && d - s < n)) return ZC_EINVAL; /* Overlap. */

    if (nparts <= 0) nparts = zc_pool_size(pool);
    max_parts = n / ZC__POOL_MIN_PART;
    if (max_parts < 1) max_parts = 1;
    if ((size_t)nparts > max_parts) nparts = (int)max_parts;

    job.dst = (unsigned char *)dst;
    job.src = (const unsigned char *)src;
    job.n = n;
    job.nparts = nparts;
    job.slice = n / (size_t)nparts;
    job.mode = mode;
    return zc_pool_run(pool, nparts, copy_part, &job);
}
