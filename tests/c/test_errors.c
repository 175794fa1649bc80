/* test_errors.c - every code has a name and a message from the one table. */
#include <errno.h>

#include "zc_test.h"
#include "zerocopy/zc.h"

int main(void) {
    ZT_EQ_STR(zc_error_name(ZC_OK), "ZC_OK");
    ZT_EQ_STR(zc_error_name(ZC_ECHECKSUM), "ZC_ECHECKSUM");
    ZT_EQ_STR(zc_error_name(ZC_ETOOBIG), "ZC_ETOOBIG");
    ZT_EQ_STR(zc_error_name(-EINVAL), "EINVAL");
    ZT_EQ_STR(zc_error_name(-ENOMEM), "ENOMEM");
    ZT_EQ_STR(zc_error_name(-999), "ERRNO");
    ZT_EQ_STR(zc_error_name(12345), "ZC_EUNKNOWN");
    ZT_EQ_STR(zc_error_name(-5000), "ZC_EUNKNOWN");
    for (int c = ZC_ECODE_MIN_; c <= ZC_EINVAL; c++) {
        const char *name = zc_error_name(c), *msg = zc_strerror(c);
        ZT_CHECK(strncmp(name, "ZC_E", 4) == 0);
        ZT_CHECK(msg != NULL && strlen(msg) > 5 && msg[strlen(msg) - 1] == '.');
    }
    ZT_CHECK(zc_strerror(-EPERM) != NULL);
    ZT_CHECK(zc_strerror(7777) != NULL);
    return zt_report();
}
