/*
 * dtype.c - the dtype table of docs/format.md: code, canonical name, element size.
 */
#include "internal.h"

typedef struct zc_dtype_entry {
    const char *name;
    size_t size;
} zc_dtype_entry;

/* Indexed by code; entry 0 is unused (code 0 is invalid). */
static const zc_dtype_entry k_dtypes[ZC_DT_MAX_ + 1] = {
    [ZC_DT_BOOL] = {"bool", 1},
    [ZC_DT_UINT8] = {"uint8", 1},
    [ZC_DT_INT8] = {"int8", 1},
    [ZC_DT_INT16] = {"int16", 2},
    [ZC_DT_INT32] = {"int32", 4},
    [ZC_DT_INT64] = {"int64", 8},
    [ZC_DT_FLOAT16] = {"float16", 2},
    [ZC_DT_BFLOAT16] = {"bfloat16", 2},
    [ZC_DT_FLOAT32] = {"float32", 4},
    [ZC_DT_FLOAT64] = {"float64", 8},
    [ZC_DT_COMPLEX32] = {"complex32", 4},
    [ZC_DT_COMPLEX64] = {"complex64", 8},
    [ZC_DT_COMPLEX128] = {"complex128", 16},
    [ZC_DT_UINT16] = {"uint16", 2},
    [ZC_DT_UINT32] = {"uint32", 4},
    [ZC_DT_UINT64] = {"uint64", 8},
    [ZC_DT_FLOAT8_E4M3FN] = {"float8_e4m3fn", 1},
    [ZC_DT_FLOAT8_E5M2] = {"float8_e5m2", 1},
    [ZC_DT_FLOAT8_E4M3FNUZ] = {"float8_e4m3fnuz", 1},
    [ZC_DT_FLOAT8_E5M2FNUZ] = {"float8_e5m2fnuz", 1},
    [ZC_DT_FLOAT8_E8M0FNU] = {"float8_e8m0fnu", 1},
    [ZC_DT_FLOAT4_E2M1FN_X2] = {"float4_e2m1fn_x2", 1},
};

size_t zc_dtype_size(unsigned code) {
    return code >= 1 && code <= ZC_DT_MAX_ ? k_dtypes[code].size : 0;
}

const char *zc_dtype_name(unsigned code) {
    return code >= 1 && code <= ZC_DT_MAX_ ? k_dtypes[code].name : NULL;
}
