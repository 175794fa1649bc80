/*
 * zc_test.h - a tiny assertion header for the C tests: each check prints both sides on failure
 * and counts it; a test's main() ends with `return zt_report();`.
 */
#ifndef ZC_TEST_H
#define ZC_TEST_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int zt_failures = 0;
static int zt_checks = 0;

#define ZT_FAIL_AT(...)                                                \
    do {                                                               \
        zt_failures++;                                                 \
        fprintf(stderr, "%s:%d: check failed: ", __FILE__, __LINE__);  \
        fprintf(stderr, __VA_ARGS__);                                  \
        fputc('\n', stderr);                                           \
    } while (0)

#define ZT_CHECK(cond)                                                   \
    do {                                                                 \
        zt_checks++;                                                     \
        if (!(cond)) ZT_FAIL_AT("%s", #cond);                            \
    } while (0)

#define ZT_EQ_INT(a, b)                                                                      \
    do {                                                                                     \
        long long zt_a = (long long)(a), zt_b = (long long)(b);                              \
        zt_checks++;                                                                         \
        if (zt_a != zt_b) ZT_FAIL_AT("%s == %s: %lld != %lld", #a, #b, zt_a, zt_b);          \
    } while (0)

#define ZT_EQ_U64(a, b)                                                                             \
    do {                                                                                            \
        uint64_t zt_a = (uint64_t)(a), zt_b = (uint64_t)(b);                                        \
        zt_checks++;                                                                                \
        if (zt_a != zt_b) ZT_FAIL_AT("%s == %s: %" PRIu64 " != %" PRIu64, #a, #b, zt_a, zt_b);       \
    } while (0)

#define ZT_EQ_HEX(a, b)                                                                             \
    do {                                                                                            \
        uint64_t zt_a = (uint64_t)(a), zt_b = (uint64_t)(b);                                        \
        zt_checks++;                                                                                \
        if (zt_a != zt_b) ZT_FAIL_AT("%s == %s: 0x%" PRIx64 " != 0x%" PRIx64, #a, #b, zt_a, zt_b);   \
    } while (0)

#define ZT_EQ_STR(a, b)                                                                     \
    do {                                                                                    \
        const char *zt_a = (a), *zt_b = (b);                                                \
        zt_checks++;                                                                        \
        if (!zt_a || !zt_b || strcmp(zt_a, zt_b) != 0)                                     \
            ZT_FAIL_AT("%s == %s: \"%s\" != \"%s\"", #a, #b, zt_a ? zt_a : "(null)",        \
                       zt_b ? zt_b : "(null)");                                             \
    } while (0)

#define ZT_CONTAINS(hay, needle)                                                             \
    do {                                                                                     \
        const char *zt_h = (hay), *zt_n = (needle);                                          \
        zt_checks++;                                                                         \
        if (!zt_h || !strstr(zt_h, zt_n))                                                    \
            ZT_FAIL_AT("%s contains %s: \"%s\" lacks \"%s\"", #hay, #needle,                 \
                       zt_h ? zt_h : "(null)", zt_n);                                        \
    } while (0)

/* Prints a summary line and returns the exit status of the test. */
static inline int zt_report(void) {
    fprintf(stderr, "%d checks, %d failures\n", zt_checks, zt_failures);
    return zt_failures ? 1 : 0;
}

#endif /* ZC_TEST_H */
