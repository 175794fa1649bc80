/*
 * errors.c - the one table of error codes, their names and their messages.
 */
#include <errno.h>
#include <stdio.h>

#include "internal.h"

typedef struct zc_error_entry {
    int code;
    const char *name;
    const char *message;
} zc_error_entry;

/* zc codes first, then the -errno values the core can return. */
static const zc_error_entry k_errors[] = {
    {ZC_OK, "ZC_OK", "Success."},
    {ZC_EINVAL, "ZC_EINVAL", "Invalid argument."},
    {ZC_ETRUNCATED, "ZC_ETRUNCATED", "The buffer is shorter than the arena claims."},
    {ZC_EMAGIC, "ZC_EMAGIC", "Wrong magic bytes: the buffer is not an arena."},
    {ZC_EVERSION, "ZC_EVERSION", "Unsupported arena format version."},
    {ZC_EHEADER, "ZC_EHEADER", "An arena header field is inconsistent."},
    {ZC_EMANIFEST, "ZC_EMANIFEST", "An arena manifest entry is inconsistent."},
    {ZC_ESTORAGE, "ZC_ESTORAGE", "A storage is misaligned, out of range, overlapping or leaves a hole."},
    {ZC_ETENSOR, "ZC_ETENSOR", "A tensor's dtype, shape, strides or offset are out of range."},
    {ZC_ECHECKSUM, "ZC_ECHECKSUM", "A CRC32C checksum does not match."},
    {ZC_EOVERFLOW, "ZC_EOVERFLOW", "A size computation overflows 64 bits."},
    {ZC_ENOMEM, "ZC_ENOMEM", "Out of memory."},
    {ZC_ETOOBIG, "ZC_ETOOBIG", "A count or size exceeds a format limit."},
    {ZC_ENODATACRC, "ZC_ENODATACRC", "The arena carries no data checksum to verify against."},
    {-EPERM, "EPERM", "Operation not permitted."},
    {-ENOENT, "ENOENT", "No such file or directory."},
    {-EINTR, "EINTR", "Interrupted system call."},
    {-EIO, "EIO", "Input/output error."},
    {-EBADF, "EBADF", "Bad file descriptor."},
    {-EAGAIN, "EAGAIN", "Resource temporarily unavailable."},
    {-ENOMEM, "ENOMEM", "Cannot allocate memory."},
    {-EACCES, "EACCES", "Permission denied."},
    {-EFAULT, "EFAULT", "Bad address."},
    {-EBUSY, "EBUSY", "Device or resource busy."},
    {-EEXIST, "EEXIST", "File exists."},
    {-EINVAL, "EINVAL", "Invalid argument (from the operating system)."},
    {-ENOSPC, "ENOSPC", "No space left on device."},
    {-ERANGE, "ERANGE", "Result out of range."},
    {-ENOSYS, "ENOSYS", "Function not implemented."},
    {-EOVERFLOW, "EOVERFLOW", "Value too large for defined data type."},
    {-ENOTSUP, "ENOTSUP", "Operation not supported."},
#ifdef EHWPOISON
    {-EHWPOISON, "EHWPOISON", "Memory page has hardware error."},
#endif
};

static const zc_error_entry *find_error(int code) {
    for (size_t i = 0; i < sizeof k_errors / sizeof k_errors[0]; i++)
        if (k_errors[i].code == code) return &k_errors[i];
    return NULL;
}

const char *zc_error_name(int code) {
    const zc_error_entry *e = find_error(code);
    if (e) return e->name;
    return code < 0 && code > ZC_EINVAL ? "ERRNO" : "ZC_EUNKNOWN";
}

const char *zc_strerror(int code) {
    const zc_error_entry *e = find_error(code);
    if (e) return e->message;
    return code < 0 && code > ZC_EINVAL ? "Operating system error." : "Unknown error code.";
}

int zc__fail(int code, char *msg, size_t msg_cap, const char *fmt, ...) {
    if (msg && msg_cap > 0) {
        va_list ap;
        va_start(ap, fmt);
        (void)vsnprintf(msg, msg_cap, fmt, ap); /* truncation is fine: msg_cap bounds it */
        va_end(ap);
    }
    return code;
}

void zc__quote_name(char *dst, size_t cap, const char *name, size_t name_len) {
    const size_t max = 96;
    size_t n = 0;
    if (cap == 0) return;
    for (size_t i = 0; i < name_len && i < max && n + 1 < cap; i++) {
        unsigned char c = (unsigned char)name[i];
        dst[n++] = (char)((c < 0x20 || c == 0x7f || c == '\'' || c == '\\') ? '?' : c);
    }
    if (name_len > max) {
        for (int k = 0; k < 3 && n + 1 < cap; k++) dst[n++] = '.';
    }
    dst[n] = '\0';
}
