/* test_pool.c - the persistent thread pool and its chunked copy: every part runs once, runs
 * reuse the threads, nested and concurrent runs, fork, and byte-exact copies in every store
 * mode at odd sizes and alignments. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zc_test.h"
#include "zerocopy/zc.h"

static uint64_t g_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    g_state ^= g_state << 13;
    g_state ^= g_state >> 7;
    g_state ^= g_state << 17;
    return g_state;
}

/* ---- runs -------------------------------------------------------------------- */

typedef struct count_job {
    _Atomic int *hits; /* hits[part] counts how often part ran. */
    _Atomic int threads_seen;
    pthread_t seen[128];
    pthread_mutex_t mu;
} count_job;

static void count_part(void *arg, int part) {
    count_job *job = (count_job *)arg;
    pthread_t me = pthread_self();
    int known = 0;
    atomic_fetch_add(&job->hits[part], 1);
    pthread_mutex_lock(&job->mu);
    for (int i = 0; i < job->threads_seen; i++)
        if (pthread_equal(job->seen[i], me)) known = 1;
    if (!known && job->threads_seen < 128) job->seen[job->threads_seen++] = me;
    pthread_mutex_unlock(&job->mu);
}

/* Runs nparts parts; *bad counts the parts that did not run exactly once (and a failed run).
 * Returns the number of threads that ran parts.  Safe to call from several threads. */
static int run_counted_quiet(zc_pool *pool, int nparts, int *bad) {
    count_job job;
    job.hits = (_Atomic int *)calloc((size_t)nparts + 1, sizeof *job.hits);
    atomic_init(&job.threads_seen, 0);
    pthread_mutex_init(&job.mu, NULL);
    *bad = zc_pool_run(pool, nparts, count_part, &job) != 0;
    for (int i = 0; i < nparts; i++)
        if (atomic_load(&job.hits[i]) != 1) (*bad)++;
    pthread_mutex_destroy(&job.mu);
    free((void *)job.hits);
    return job.threads_seen;
}

/* Runs nparts parts and checks that each ran exactly once; returns the threads that ran them. */
static int run_counted(zc_pool *pool, int nparts) {
    int bad, seen = run_counted_quiet(pool, nparts, &bad);
    ZT_EQ_INT(bad, 0);
    return seen;
}

static void test_create_and_sizes(void) {
    zc_pool *pool = NULL;
    ZT_EQ_INT(zc_pool_create(4, 0, NULL), ZC_EINVAL);
    ZT_EQ_INT(zc_pool_create(4, -1, &pool), ZC_EINVAL);
    ZT_CHECK(pool == NULL);
    ZT_EQ_INT(zc_pool_create(4, 0, &pool), 0);
    ZT_EQ_INT(zc_pool_size(pool), 4);
    zc_pool_destroy(pool);
    ZT_EQ_INT(zc_pool_create(1000, 0, &pool), 0);
    ZT_EQ_INT(zc_pool_size(pool), ZC_POOL_MAX_THREADS);
    zc_pool_destroy(pool);
    ZT_EQ_INT(zc_pool_create(0, 0, &pool), 0); /* One per CPU. */
    ZT_CHECK(zc_pool_size(pool) >= 1);
    zc_pool_destroy(pool);
    ZT_EQ_INT(zc_pool_size(NULL), 1);
    zc_pool_destroy(NULL);
}

static void test_runs(int nthreads, int spin_us) {
    zc_pool *pool = NULL;
    int max_seen = 0;
    ZT_EQ_INT(zc_pool_create(nthreads, spin_us, &pool), 0);
    ZT_EQ_INT(zc_pool_run(pool, 3, NULL, NULL), ZC_EINVAL);
    ZT_EQ_INT(zc_pool_run(pool, 0, count_part, NULL), 0); /* Nothing to run: fn not called. */
    ZT_EQ_INT(zc_pool_run(pool, -5, count_part, NULL), 0);
    /* Many runs of various sizes reuse the same threads; never more threads than the pool. */
    for (int r = 0; r < 300; r++) {
        int nparts = 1 + (int)(rnd() % 40);
        int seen = run_counted(pool, nparts);
        ZT_CHECK(seen <= nthreads);
        if (seen > max_seen) max_seen = seen;
    }
    ZT_CHECK(max_seen >= 1);
    zc_pool_destroy(pool);
}

static void test_null_pool_runs_inline(void) {
    ZT_EQ_INT(run_counted(NULL, 7), 1);
}

/* A part that runs another job on the same pool: runs inline, no deadlock. */
typedef struct nested_job {
    zc_pool *pool;
    _Atomic int inner_total;
} nested_job;

static void inner_part(void *arg, int part) { atomic_fetch_add((_Atomic int *)arg, part + 1); }

static void outer_part(void *arg, int part) {
    nested_job *job = (nested_job *)arg;
    (void)part;
    ZT_EQ_INT(zc_pool_run(job->pool, 4, inner_part, (void *)&job->inner_total), 0);
}

static void test_nested(void) {
    zc_pool *pool = NULL;
    nested_job job;
    ZT_EQ_INT(zc_pool_create(3, 0, &pool), 0);
    job.pool = pool;
    atomic_init(&job.inner_total, 0);
    ZT_EQ_INT(zc_pool_run(pool, 6, outer_part, &job), 0);
    ZT_EQ_INT(atomic_load(&job.inner_total), 6 * (1 + 2 + 3 + 4));
    zc_pool_destroy(pool);
}

/* Several threads run jobs on one pool at once: the runs take turns, each completes. */
typedef struct caller_arg {
    zc_pool *pool;
    int runs;
    _Atomic int bad;
} caller_arg;

static void *caller_main(void *p) {
    caller_arg *a = (caller_arg *)p;
    for (int r = 0; r < a->runs; r++) {
        int bad;
        (void)run_counted_quiet(a->pool, 1 + r % 17, &bad);
        atomic_fetch_add(&a->bad, bad);
    }
    return NULL;
}

static void test_concurrent_callers(void) {
    zc_pool *pool = NULL;
    pthread_t t[4];
    caller_arg a;
    ZT_EQ_INT(zc_pool_create(3, 20, &pool), 0);
    a.pool = pool;
    a.runs = 100;
    atomic_init(&a.bad, 0);
    for (int i = 0; i < 4; i++) ZT_EQ_INT(pthread_create(&t[i], NULL, caller_main, &a), 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    ZT_EQ_INT(atomic_load(&a.bad), 0);
    zc_pool_destroy(pool);
}

/* ---- copies ------------------------------------------------------------------ */

static void fill(unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)rnd();
}

/* Copies n bytes from src+soff to dst+doff and checks them and the guard bytes around them. */
static void check_copy(zc_pool *pool, size_t n, size_t soff, size_t doff, int nparts, int mode) {
    size_t guard = 128;
    unsigned char *src = (unsigned char *)malloc(n + soff + guard);
    unsigned char *dst = (unsigned char *)malloc(n + doff + 2 * guard);
    unsigned char *d = dst + guard + doff;
    int bad_guard = 0;
    fill(src, n + soff + guard);
    memset(dst, 0xA5, n + doff + 2 * guard);
    ZT_EQ_INT(zc_pool_copy(pool, d, src + soff, n, nparts, mode), 0);
    if (memcmp(d, src + soff, n) != 0)
        ZT_FAIL_AT("copy of %zu bytes (src+%zu -> dst+%zu, %d parts, mode %d) differs", n, soff, doff, nparts,
                   mode);
    for (size_t i = 0; i < guard + doff; i++) bad_guard |= dst[i] != 0xA5;
    for (size_t i = 0; i < guard; i++) bad_guard |= d[n + i] != 0xA5;
    ZT_EQ_INT(bad_guard, 0);
    zt_checks++;
    free(src);
    free(dst);
}

static void test_copies(void) {
    zc_pool *pool = NULL;
    static const size_t sizes[] = {0, 1, 15, 63, 64, 65, 127, 4096, 65535, 65536 + 3, 300000, (1u << 20) + 17,
                                   (3u << 20) + 4095};
    static const size_t offs[] = {0, 1, 7, 16, 33, 63};
    ZT_EQ_INT(zc_pool_create(4, 0, &pool), 0);
    for (int mode = ZC_COPY_PLAIN; mode <= ZC_COPY_AUTO; mode++)
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            for (size_t j = 0; j < sizeof offs / sizeof offs[0]; j++) {
                size_t soff = offs[j], doff = offs[(j + i) % (sizeof offs / sizeof offs[0])];
                check_copy(pool, sizes[i], soff, doff, 0, mode);
                check_copy(pool, sizes[i], soff, doff, 1 + (int)(rnd() % 9), mode);
            }
    /* More parts than threads, and a NULL pool. */
    check_copy(pool, (5u << 20) + 11, 3, 5, 50, ZC_COPY_NT);
    check_copy(NULL, (2u << 20) + 11, 3, 5, 8, ZC_COPY_AUTO);
    zc_pool_destroy(pool);
}

static void test_copy_errors(void) {
    unsigned char buf[256];
    memset(buf, 1, sizeof buf);
    ZT_EQ_INT(zc_pool_copy(NULL, NULL, buf, 0, 1, ZC_COPY_PLAIN), 0); /* Nothing to copy. */
    ZT_EQ_INT(zc_pool_copy(NULL, NULL, buf, 4, 1, ZC_COPY_PLAIN), ZC_EINVAL);
    ZT_EQ_INT(zc_pool_copy(NULL, buf, NULL, 4, 1, ZC_COPY_PLAIN), ZC_EINVAL);
    ZT_EQ_INT(zc_pool_copy(NULL, buf, buf + 128, 16, 1, 7), ZC_EINVAL);
    ZT_EQ_INT(zc_pool_copy(NULL, buf, buf + 8, 16, 1, ZC_COPY_PLAIN), ZC_EINVAL);  /* Overlap. */
    ZT_EQ_INT(zc_pool_copy(NULL, buf + 8, buf, 16, 1, ZC_COPY_NT), ZC_EINVAL);     /* Overlap. */
    ZT_EQ_INT(zc_pool_copy(NULL, buf, buf + 16, 16, 1, ZC_COPY_PLAIN), 0);        /* Adjacent. */
    ZT_EQ_INT(zc_pool_copy(NULL, (void *)(uintptr_t)(UINTPTR_MAX - 8), buf, 64, 1, ZC_COPY_PLAIN), ZC_EINVAL);
    ZT_CHECK(zc_nt_stores_available() == 0 || zc_nt_stores_available() == 1);
}

/* After fork() the child has no workers: runs and copies go on its own thread, and destroying
 * the inherited pool frees only memory. */
static void test_fork(void) {
    zc_pool *pool = NULL;
    pid_t pid;
    int status = 0;
    ZT_EQ_INT(zc_pool_create(4, 0, &pool), 0);
    (void)run_counted(pool, 8);
    pid = fork();
    if (pid == 0) {
        unsigned char src[1 << 17], dst[1 << 17];
        int ok;
        fill(src, sizeof src);
        ok = zc_pool_copy(pool, dst, src, sizeof dst, 4, ZC_COPY_NT) == 0 && memcmp(dst, src, sizeof dst) == 0 &&
             run_counted(pool, 5) == 1 && zt_failures == 0;
        zc_pool_destroy(pool);
        _exit(ok ? 0 : 3);
    }
    ZT_CHECK(pid > 0);
    ZT_EQ_INT(waitpid(pid, &status, 0), pid);
    ZT_CHECK(WIFEXITED(status));
    ZT_EQ_INT(WEXITSTATUS(status), 0);
    (void)run_counted(pool, 8); /* The parent's pool still works. */
    zc_pool_destroy(pool);
}

int main(void) {
    test_create_and_sizes();
    test_runs(1, 0);
    test_runs(4, 0);
    test_runs(4, 50);
    test_runs(16, 0);
    test_null_pool_runs_inline();
    test_nested();
    test_concurrent_callers();
    test_copies();
    test_copy_errors();
    test_fork();
    return zt_report();
}
