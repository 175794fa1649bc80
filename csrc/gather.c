/*
 * gather.c - many copies into one arena, shared evenly among threads.
 *
 * The copies are seen as one stream of bytes; thread k copies the k-th equal slice of that
 * stream, which splits large copies and batches small ones without any allocation.
 */
#include "internal.h"

typedef struct gather_job {
    const zc_copy *copies;
    size_t n_copies;
    uint64_t total;
    uint64_t slice;
    int nparts;
} gather_job;

static void gather_part(void *arg, int part) {
    const gather_job *job = (const gather_job *)arg;
    uint64_t lo = (uint64_t)part * job->slice;
    uint64_t hi = part == job->nparts - 1 ? job->total : lo + job->slice;
    uint64_t pos = 0; /* Stream offset of the current copy. */

    for (size_t i = 0; i < job->n_copies && pos < hi; i++) {
        const zc_copy *c = &job->copies[i];
        uint64_t end = pos + c->n;
        if (end > lo) {
            uint64_t a = pos > lo ? pos : lo;
            uint64_t b = end < hi ? end : hi;
            if (b > a)
                memcpy((unsigned char *)c->dst + (a - pos), (const unsigned char *)c->src + (a - pos),
                       (size_t)(b - a));
        }
        pos = end;
    }
}

int zc_gather(const zc_copy *copies, size_t n_copies, int nthreads) {
    gather_job job;
    uint64_t total = 0;
    int nparts;

    if (n_copies == 0) return 0;
    if (!copies) return ZC_EINVAL;
    for (size_t i = 0; i < n_copies; i++) {
        if (copies[i].n == 0) continue;
        if (!copies[i].dst || !copies[i].src) return ZC_EINVAL;
        if (zc__add64(total, copies[i].n, &total)) return ZC_EINVAL;
    }

    nparts = zc__resolve_threads(nthreads);
    if ((uint64_t)nparts > total / ZC__MIN_CHUNK) nparts = (int)(total / ZC__MIN_CHUNK);
    if (nparts < 1) nparts = 1;

    job.copies = copies;
    job.n_copies = n_copies;
    job.total = total;
    job.slice = total / (uint64_t)nparts;
    job.nparts = nparts;
    if (nparts == 1) {
        gather_part(&job, 0);
        return 0;
    }
    return zc__run_parallel(nparts, gather_part, &job);
}
