/*
 * threads.c - a fork-join helper on pthreads, shared by gather, checksums and populate.
 */
#include <errno.h>
#include <pthread.h>

#include "internal.h"

typedef struct part_ctx {
    void (*fn)(void *arg, int part);
    void *arg;
    int part;
} part_ctx;

static void *part_main(void *p) {
    part_ctx *ctx = (part_ctx *)p;
    ctx->fn(ctx->arg, ctx->part);
    return NULL;
}

int zc__resolve_threads(int nthreads) {
    int n = nthreads > 0 ? nthreads : zc__plat_online_cpus();
    if (n > ZC__MAX_THREADS) n = ZC__MAX_THREADS;
    return n < 1 ? 1 : n;
}

int zc__run_parallel(int nparts, void (*fn)(void *arg, int part), void *arg) {
    pthread_t tids[ZC__MAX_THREADS];
    part_ctx ctxs[ZC__MAX_THREADS];
    int started[ZC__MAX_THREADS];
    int rc = 0;

    if (nparts > ZC__MAX_THREADS) nparts = ZC__MAX_THREADS;
    for (int i = 1; i < nparts; i++) {
        int err;
        ctxs[i].fn = fn;
        ctxs[i].arg = arg;
        ctxs[i].part = i;
        err = pthread_create(&tids[i], NULL, part_main, &ctxs[i]);
        started[i] = err == 0;
        if (err != 0 && rc == 0) rc = -err;
    }
    if (nparts > 0) fn(arg, 0);
    for (int i = 1; i < nparts; i++) {
        if (started[i])
            pthread_join(tids[i], NULL);
        else
            fn(arg, i);
    }
    return rc;
}
