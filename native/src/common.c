/* Status strings and run-time ISA selection. */
#include <stdlib.h>
#include <string.h>

#include "qt_internal.h"

const char *qt_strerror(int status) {
    switch (status) {
    case QT_OK: return "ok";
    case QT_ERR_ARG: return "invalid argument (NULL pointer, bad size, bad type or bad scale)";
    case QT_ERR_NONFINITE: return "input contains NaN or Inf";
    case QT_ERR_UNSUPPORTED: return "not supported by this build";
    default: return "unknown status";
    }
}

static int g_supported = -1; /* detected once */
static int g_cap = -1;       /* -1: not set yet (QTOOL_ISA consulted) */

int qt_isa_supported(void) {
    if (g_supported < 0) {
        int level = QT_ISA_SCALAR;
#if QT_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            level = QT_ISA_AVX2;
            if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
                level = QT_ISA_AVX512;
                if (__builtin_cpu_supports("avx512vnni")) level = QT_ISA_VNNI;
            }
        }
#endif
        g_supported = level;
    }
    return g_supported;
}

static int level_from_env(void) {
    const char *s = getenv("QTOOL_ISA");
    if (s == NULL || *s == '\0') return QT_ISA_VNNI;
    if (strcmp(s, "scalar") == 0) return QT_ISA_SCALAR;
    if (strcmp(s, "avx2") == 0) return QT_ISA_AVX2;
    if (strcmp(s, "avx512") == 0) return QT_ISA_AVX512;
    return QT_ISA_VNNI;
}

int qt__isa(void) {
    int cap = g_cap;
    if (cap < 0) g_cap = cap = level_from_env();
    int sup = qt_isa_supported();
    return cap < sup ? cap : sup;
}

int qt_isa_active(void) { return qt__isa(); }

int qt_set_isa(int max_level) {
    if (max_level < QT_ISA_SCALAR || max_level > QT_ISA_VNNI) return -QT_ERR_ARG;
    g_cap = max_level;
    return qt__isa();
}
