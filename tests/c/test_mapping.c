/* test_mapping.c - populate, protect/unprotect, and the fault handler (in forked children). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "zc_test.h"
#include "zerocopy/zc.h"

static size_t g_page;

/* What a child did: the signal that killed it (0 if none), its exit status, and its stderr. */
typedef struct child_result {
    int signal;
    int status;
    char err[4096];
} child_result;

/* Runs fn(arg) in a child with stderr captured; the child exits 0 if fn returns. */
static child_result in_child(void (*fn)(void *), void *arg) {
    child_result r;
    int fds[2];
    pid_t pid;
    size_t n = 0;
    memset(&r, 0, sizeof r);
    if (pipe(fds) != 0) {
        r.status = -1;
        return r;
    }
    fflush(NULL);
    pid = fork();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], STDERR_FILENO);
        /* Start from the default dispositions, whatever a sanitizer installed. */
        signal(SIGSEGV, SIG_DFL);
        signal(SIGBUS, SIG_DFL);
        fn(arg);
        _exit(0);
    }
    close(fds[1]);
    for (;;) {
        ssize_t k = read(fds[0], r.err + n, sizeof r.err - 1 - n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        n += (size_t)k;
    }
    close(fds[0]);
    r.err[n] = '\0';
    {
        int st = 0;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        if (WIFSIGNALED(st)) r.signal = WTERMSIG(st);
        if (WIFEXITED(st)) r.status = WEXITSTATUS(st);
    }
    return r;
}

typedef struct write_job {
    unsigned char *addr;
    int install;
    int own_handler;
} write_job;

static void exit42(int sig, siginfo_t *si, void *ctx) { _exit(42); }

static void do_write(void *arg) {
    write_job *job = (write_job *)arg;
    if (job->own_handler) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = exit42;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, NULL);
    }
    if (job->install && zc_install_fault_handler() != 0) _exit(3);
    if (job->install && zc_install_fault_handler() != 0) _exit(4); /* Idempotent. */
    *(volatile unsigned char *)job->addr = 1;
}

static child_result write_in_child(unsigned char *addr, int install, int own_handler) {
    write_job job = {addr, install, own_handler};
    return in_child(do_write, &job);
}

static void test_populate(void) {
    size_t len = 3 * (1u << 20) + 12345;
    unsigned char *m = (unsigned char *)mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *h = (unsigned char *)malloc(10000);
    ZT_CHECK(m != MAP_FAILED);
    ZT_EQ_INT(zc_populate(m, len, 0), 0);
    ZT_EQ_INT(zc_populate(m + 17, len - 100, 3), 0);
    ZT_EQ_INT(zc_populate(m, 1, 1), 0);
    ZT_EQ_INT(zc_populate(m, 0, 1), 0);
    ZT_EQ_INT(zc_populate(NULL, 0, 1), 0);
    ZT_EQ_INT(zc_populate(NULL, 10, 1), ZC_EINVAL);
    ZT_EQ_INT(zc_populate(h + 1, 9999, 2), 0);
    ZT_EQ_INT(m[100], 0);
    munmap(m, len);
    free(h);
}

static void test_protect(void) {
    size_t len = 16 * g_page;
    unsigned char *m = (unsigned char *)mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    zc_named_range ranges[2];
    uint64_t id = 0, id2 = 0;
    char name[64];
    child_result r;

    ZT_CHECK(m != MAP_FAILED);
    memset(m, 7, len);
    ranges[0] = (zc_named_range){(uintptr_t)(m + 2 * g_page), 4 * g_page, "layer.weight", 12};
    ranges[1] = (zc_named_range){(uintptr_t)(m + 6 * g_page), g_page / 2, "layer.bias!!", 10};

    /* Before protection the children write freely. */
    r = write_in_child(m + 3 * g_page, 1, 0);
    ZT_EQ_INT(r.signal, 0);
    ZT_EQ_INT(r.status, 0);

    ZT_EQ_INT(zc_protect(m + 100, len - 200, ranges, 2, &id), 0);
    ZT_CHECK(id != 0);
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 3 * g_page + 5), name, sizeof name), 1);
    ZT_EQ_STR(name, "layer.weight");
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 6 * g_page + 5), name, sizeof name), 1);
    ZT_EQ_STR(name, "layer.bias");
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 10 * g_page), name, sizeof name), 1);
    ZT_EQ_STR(name, "");
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 50), name, sizeof name), 0); /* Partial first page. */
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + len - 1), name, sizeof name), 0);
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 3 * g_page), name, 4), 1);
    ZT_EQ_STR(name, "lay");

    /* A write to a protected tensor kills the writer with SIGSEGV and a message naming it. */
    r = write_in_child(m + 3 * g_page + 8, 1, 0);
    ZT_EQ_INT(r.signal, SIGSEGV);
    ZT_CONTAINS(r.err, "ray_zerocopy: write to shared read-only weight 'layer.weight' at 0x");
    ZT_CONTAINS(r.err, "load with writable=True to get a private copy\n");
    r = write_in_child(m + 10 * g_page, 1, 0);
    ZT_EQ_INT(r.signal, SIGSEGV);
    ZT_CONTAINS(r.err, "inside a protected arena at 0x");
    /* Without the handler the fault is plain. */
    r = write_in_child(m + 3 * g_page, 0, 0);
    ZT_EQ_INT(r.signal, SIGSEGV);
    ZT_EQ_STR(r.err, "");
    /* The previous handler runs after the message. */
    r = write_in_child(m + 3 * g_page, 1, 1);
    ZT_EQ_INT(r.signal, 0);
    ZT_EQ_INT(r.status, 42);
    ZT_CONTAINS(r.err, "'layer.weight'");
    /* Pages at the partial edges stay writable. */
    r = write_in_child(m + 50, 1, 0);
    ZT_EQ_INT(r.signal, 0);
    ZT_EQ_INT(r.status, 0);

    /* Overlapping protections: pages stay read-only while any protection covers them. */
    ranges[0] = (zc_named_range){(uintptr_t)(m + 8 * g_page), g_page, "other", 5};
    ZT_EQ_INT(zc_protect(m + 8 * g_page, 6 * g_page, ranges, 1, &id2), 0);
    ZT_EQ_INT(zc_unprotect(id), 0);
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 3 * g_page), name, sizeof name), 0);
    ZT_EQ_INT(zc_describe_address((uintptr_t)(m + 8 * g_page), name, sizeof name), 1);
    ZT_EQ_STR(name, "other");
    m[3 * g_page] = 9; /* Writable again in this process. */
    m[15 * g_page - 1] = 9;
    r = write_in_child(m + 9 * g_page, 1, 0);
    ZT_EQ_INT(r.signal, SIGSEGV);
    ZT_CONTAINS(r.err, "inside a protected arena");
    ZT_EQ_INT(zc_unprotect(id2), 0);
    for (size_t p = 0; p < 16; p++) m[p * g_page] = 1;
    ZT_EQ_INT(m[9 * g_page], 1);

    ZT_EQ_INT(zc_unprotect(id), ZC_EINVAL);
    ZT_EQ_INT(zc_unprotect(0), 0);
    ZT_EQ_INT(zc_protect(m + 1, g_page, ranges, 1, &id), 0); /* No whole page inside. */
    ZT_EQ_U64(id, 0);
    ZT_EQ_INT(zc_protect(NULL, 10, NULL, 0, &id), ZC_EINVAL);
    ZT_EQ_INT(zc_protect(m, len, NULL, 1, &id), ZC_EINVAL);
    ZT_EQ_INT(zc_protect(m, len, NULL, 0, NULL), ZC_EINVAL);

    /* The registry is bounded; a full registry reports ZC_ENOMEM and recovers. */
    {
        static uint64_t ids[400];
        int n = 0, rc = 0;
        while (n < 400 && (rc = zc_protect(m, len, NULL, 0, &ids[n])) == 0) n++;
        ZT_EQ_INT(rc, ZC_ENOMEM);
        ZT_CHECK(n >= 64);
        for (int i = 0; i < n; i++) ZT_EQ_INT(zc_unprotect(ids[i]), 0);
        m[0] = 2;
    }
    munmap(m, len);
}

int main(void) {
    g_page = zc_page_size();
    ZT_CHECK(g_page >= 4096 && (g_page & (g_page - 1)) == 0);
    test_populate();
    test_protect();
    return zt_report();
}
