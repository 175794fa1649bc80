/* test_convert.c - dtype conversion, and lazy regions read by one and by several threads. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zc_test.h"
#include "zerocopy/zc.h"

static uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t to_bf16(float f) {
    uint16_t h;
    ZT_EQ_INT(zc_convert(&h, ZC_DT_BFLOAT16, &f, ZC_DT_FLOAT32, 1), 0);
    return h;
}

static void test_scalars(void) {
    uint16_t h;
    float f;
    double d;

    ZT_EQ_INT(to_bf16(1.0f), 0x3f80);
    ZT_EQ_INT(to_bf16(-2.0f), 0xc000);
    ZT_EQ_INT(to_bf16(u2f(0x3f808000u)), 0x3f80); /* a tie rounds to even (down) */
    ZT_EQ_INT(to_bf16(u2f(0x3f818000u)), 0x3f82); /* a tie rounds to even (up) */
    ZT_EQ_INT(to_bf16(u2f(0x3f808001u)), 0x3f81); /* above the tie rounds up */
    ZT_EQ_INT(to_bf16(u2f(0x7fc00001u)), 0x7fc0); /* NaN: c10's quiet NaN */
    ZT_EQ_INT(to_bf16(u2f(0xffc00001u)), 0xffc0);
    ZT_EQ_INT(to_bf16(u2f(0x7f800000u)), 0x7f80); /* inf stays inf */
    h = 0x3f80;
    ZT_EQ_INT(zc_convert(&f, ZC_DT_FLOAT32, &h, ZC_DT_BFLOAT16, 1), 0);
    ZT_EQ_U64(f2u(f), 0x3f800000u);
    d = 1.0 + 1e-12;
    ZT_EQ_INT(zc_convert(&f, ZC_DT_FLOAT32, &d, ZC_DT_FLOAT64, 1), 0);
    ZT_EQ_U64(f2u(f), 0x3f800000u);
    if (zc_convert_supported(ZC_DT_FLOAT16, ZC_DT_FLOAT32)) {
        f = 65520.0f; /* rounds up past float16's largest finite value */
        ZT_EQ_INT(zc_convert(&h, ZC_DT_FLOAT16, &f, ZC_DT_FLOAT32, 1), 0);
        ZT_EQ_INT(h, 0x7c00);
        f = 1.0f;
        ZT_EQ_INT(zc_convert(&h, ZC_DT_FLOAT16, &f, ZC_DT_FLOAT32, 1), 0);
        ZT_EQ_INT(h, 0x3c00);
        h = 0x0001; /* the smallest subnormal */
        ZT_EQ_INT(zc_convert(&f, ZC_DT_FLOAT32, &h, ZC_DT_FLOAT16, 1), 0);
        ZT_CHECK(f == 5.9604644775390625e-08f);
    }
    /* Unsupported pairs and bad pointers. */
    ZT_EQ_INT(zc_convert(&h, ZC_DT_INT16, &f, ZC_DT_FLOAT32, 1), ZC_EINVAL);
    ZT_EQ_INT(zc_convert(&h, ZC_DT_BFLOAT16, &f, ZC_DT_FLOAT8_E4M3FN, 1), ZC_EINVAL);
    ZT_EQ_INT(zc_convert(NULL, ZC_DT_BFLOAT16, &f, ZC_DT_FLOAT32, 1), ZC_EINVAL);
    ZT_EQ_INT(zc_convert(NULL, ZC_DT_BFLOAT16, NULL, ZC_DT_FLOAT32, 0), 0);
    ZT_CHECK(!zc_convert_supported(ZC_DT_FLOAT32, ZC_DT_INT32));
}

/* A region of three float32 -> bfloat16 segments with gaps, a window of 3 chunks. */
enum { N1 = 10000, N2 = 3, N3 = 20000 };
static float g_src[N1 + N2 + N3];
static unsigned char *g_expect;
static size_t g_size;

typedef struct reader {
    const unsigned char *region;
    unsigned seed;
    int mismatches;
} reader;

static void *read_randomly(void *arg) {
    reader *r = (reader *)arg;
    unsigned char buf[9000];
    for (int i = 0; i < 400; i++) {
        size_t off = (size_t)rand_r(&r->seed) % g_size, n = (size_t)rand_r(&r->seed) % sizeof buf;
        if (n > g_size - off) n = g_size - off;
        memcpy(buf, r->region + off, n);
        if (memcmp(buf, g_expect + off, n) != 0) r->mismatches++;
    }
    return NULL;
}

static void write_to(void *region) { ((volatile unsigned char *)region)[0] = 1; }

static void test_lazy(void) {
    size_t page = zc_page_size(), chunk = page, n_chunks;
    zc_convert_seg segs[3];
    zc_lazy *z = NULL;
    zc_lazy_stats st;
    unsigned char *copy;
    const unsigned char *region;
    pthread_t th[4];
    reader rd[4];

    for (size_t i = 0; i < N1 + N2 + N3; i++) g_src[i] = (float)i * 0.37f - 1000.0f;
    g_size = 24576 + 2 * N3 + 1000;
    n_chunks = (g_size + chunk - 1) / chunk;
    /* Given out of order: the region sorts them. */
    segs[0] = (zc_convert_seg){g_src + N1 + N2, 24576, N3, ZC_DT_FLOAT32};
    segs[1] = (zc_convert_seg){g_src, 64, N1, ZC_DT_FLOAT32};
    segs[2] = (zc_convert_seg){g_src + N1, 64 + 2 * N1 + 64, N2, ZC_DT_FLOAT32};
    g_expect = (unsigned char *)calloc(1, g_size);
    ZT_CHECK(g_expect != NULL);
    for (int i = 0; i < 3; i++)
        ZT_EQ_INT(zc_convert(g_expect + segs[i].dst_offset, ZC_DT_BFLOAT16, segs[i].src, ZC_DT_FLOAT32,
                             segs[i].count),
                  0);

    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 3, &z), 0);
    ZT_CHECK(z != NULL);
    region = (const unsigned char *)zc_lazy_data(z);
    ZT_EQ_U64(zc_lazy_size(z), g_size);
    zc_lazy_get_stats(z, &st);
    ZT_EQ_U64(st.fills, 0);
    ZT_EQ_U64(st.n_chunks, n_chunks);
    ZT_CHECK(n_chunks > 3);

    /* One reader, front to back: every chunk once, never more than the window. */
    copy = (unsigned char *)malloc(g_size);
    memcpy(copy, region, g_size);
    ZT_CHECK(memcmp(copy, g_expect, g_size) == 0);
    zc_lazy_get_stats(z, &st);
    ZT_EQ_U64(st.fills, n_chunks);
    ZT_EQ_U64(st.evictions, n_chunks - 3);
    ZT_EQ_INT(st.peak_resident, 3);
    ZT_EQ_INT(st.resident, 3);

    /* Again, backwards: evicted chunks are made again, with the same bytes. */
    for (size_t off = g_size; off > 0;) {
        size_t n = off < 777 ? off : 777;
        off -= n;
        memcpy(copy + off, region + off, n);
    }
    ZT_CHECK(memcmp(copy, g_expect, g_size) == 0);

    /* Four threads reading random ranges at once. */
    for (int i = 0; i < 4; i++) {
        rd[i] = (reader){region, 1234u + (unsigned)i, 0};
        ZT_EQ_INT(pthread_create(&th[i], NULL, read_randomly, &rd[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        ZT_EQ_INT(rd[i].mismatches, 0);
    }
    zc_lazy_get_stats(z, &st);
    ZT_CHECK(st.peak_resident <= 3);

    /* A write is a bug, not a read to serve: the process dies instead of looping. */
    {
        pid_t pid = fork();
        int status = 0;
        if (pid == 0) {
            alarm(10);
            write_to((void *)region);
            _exit(0);
        }
        waitpid(pid, &status, 0);
        /* Killed by SIGSEGV (or, under ASan, its report's exit): neither exit 0 nor the alarm. */
        ZT_CHECK(WIFSIGNALED(status) ? WTERMSIG(status) == SIGSEGV : WEXITSTATUS(status) != 0);
    }
    /* A forked child inherits none of the region: its read kills it (it can neither fill the
     * parent's slots nor see a slot the parent gives another chunk), and the parent still reads
     * the right bytes. */
    {
        pid_t pid = fork();
        int status = 0;
        if (pid == 0) {
            alarm(10);
            for (size_t off = 0; off < g_size; off += 512) copy[off] = region[off];
            _exit(0);
        }
        waitpid(pid, &status, 0);
        ZT_CHECK(WIFSIGNALED(status) ? WTERMSIG(status) == SIGSEGV : WEXITSTATUS(status) != 0);
        memcpy(copy, region, g_size);
        ZT_CHECK(memcmp(copy, g_expect, g_size) == 0);
    }
    zc_lazy_destroy(z);
    free(copy);

    /* Bad arguments. */
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk + 1, 3, &z), ZC_EINVAL);
    ZT_CHECK(z == NULL);
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_INT8, g_size, chunk, 3, &z), ZC_EINVAL);
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, 1000, chunk, 3, &z), ZC_EINVAL); /* past the end */
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 0, &z), ZC_EINVAL);
    /* A window of one chunk becomes two: an unaligned read across a chunk boundary needs both. */
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 1, &z), 0);
    {
        uint64_t v, e;
        memcpy(&v, (const unsigned char *)zc_lazy_data(z) + chunk - 4, 8);
        memcpy(&e, g_expect + chunk - 4, 8);
        ZT_EQ_U64(v, e);
        zc_lazy_get_stats(z, &st);
        ZT_EQ_INT(st.max_chunks, 2);
    }
    zc_lazy_destroy(z);
    segs[2].dst_offset = 64 + 2 * N1 - 2; /* overlaps the segment before it */
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 3, &z), ZC_EINVAL);
    segs[2].dst_offset = 64 + 2 * N1 + 63; /* not a multiple of the element size */
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 3, &z), ZC_EINVAL);
    segs[2].dst_offset = 64 + 2 * N1 + 64;
    segs[2].src_dtype = ZC_DT_INT32;
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 3, &z), ZC_EINVAL);
    ZT_EQ_INT(zc_lazy_create(segs, 3, ZC_DT_BFLOAT16, g_size, chunk, 3, NULL), ZC_EINVAL);
    /* No segments: a region of zeros. */
    ZT_EQ_INT(zc_lazy_create(NULL, 0, ZC_DT_FLOAT32, 100, chunk, 1, &z), 0);
    ZT_EQ_INT(((const unsigned char *)zc_lazy_data(z))[99], 0);
    zc_lazy_destroy(z);
    zc_lazy_destroy(NULL);
    free(g_expect);
}

int main(void) {
    test_scalars();
    test_lazy();
    return zt_report();
}
