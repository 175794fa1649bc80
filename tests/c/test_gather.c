/* test_gather.c - threaded gather copies: split large copies, batch small ones, exact bytes. */
#include <stdlib.h>

#include "zc_test.h"
#include "zerocopy/zc.h"

static uint64_t g_state = 88172645463325252ull;
static uint64_t rnd(void) {
    g_state ^= g_state << 13;
    g_state ^= g_state >> 7;
    g_state ^= g_state << 17;
    return g_state;
}

/* Gathers n copies of random sizes up to max_size from src into dst and checks every byte. */
static void run(size_t n, size_t max_size, int nthreads) {
    zc_copy *copies = (zc_copy *)calloc(n + 1, sizeof *copies);
    size_t *sizes = (size_t *)calloc(n + 1, sizeof *sizes), total = 0, pos = 0;
    unsigned char *src, *dst;
    int bad = 0;

    for (size_t i = 0; i < n; i++) {
        sizes[i] = max_size ? (size_t)(rnd() % (max_size + 1)) : 0;
        total += sizes[i];
    }
    src = (unsigned char *)malloc(total + 1);
    dst = (unsigned char *)malloc(total + 1);
    for (size_t i = 0; i < total; i++) src[i] = (unsigned char)rnd();
    memset(dst, 0, total + 1);
    /* Copy i goes to the mirrored position so that order matters. */
    for (size_t i = 0; i < n; i++) {
        copies[i].src = sizes[i] ? src + pos : NULL;
        copies[i].dst = dst + (total - pos - sizes[i]);
        copies[i].n = sizes[i];
        pos += sizes[i];
    }
    ZT_EQ_INT(zc_gather(copies, n, nthreads), 0);
    pos = 0;
    for (size_t i = 0; i < n && !bad; i++) {
        if (sizes[i] && memcmp(dst + (total - pos - sizes[i]), src + pos, sizes[i]) != 0) bad = 1;
        pos += sizes[i];
    }
    if (bad) fprintf(stderr, "gather mismatch: n=%zu max=%zu threads=%d\n", n, max_size, nthreads);
    ZT_CHECK(!bad);
    free(copies);
    free(sizes);
    free(src);
    free(dst);
}

int main(void) {
    static const int threads[] = {0, 1, 2, 3, 5, 16, 100};
    unsigned char a[8] = {1, 2, 3, 4, 5, 6, 7, 8}, b[8] = {0};
    zc_copy c = {b, NULL, 4};

    for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
        run(1, 9u << 20, threads[t]);     /* One large copy split across threads. */
        run(2000, 3000, threads[t]);      /* Many small copies batched. */
        run(7, 3u << 20, threads[t]);     /* A few large ones. */
        run(50, 0, threads[t]);           /* Only empty copies. */
    }
    run(0, 0, 0);
    ZT_EQ_INT(zc_gather(NULL, 0, 0), 0);
    ZT_EQ_INT(zc_gather(NULL, 1, 0), ZC_EINVAL);
    ZT_EQ_INT(zc_gather(&c, 1, 0), ZC_EINVAL); /* NULL src with bytes to copy. */
    c.src = a;
    ZT_EQ_INT(zc_gather(&c, 1, 0), 0);
    ZT_CHECK(memcmp(a, b, 4) == 0 && b[4] == 0);
    return zt_report();
}
