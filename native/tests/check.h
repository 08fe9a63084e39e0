/* What every C test file of libqtool shares: a failure counter with a CHECK macro that
 * reports file:line and keeps going, a small xorshift generator (seeded per file with
 * check_seed) and the names of the ISA levels the tests loop over. */
#ifndef QTOOL_TESTS_CHECK_H
#define QTOOL_TESTS_CHECK_H

#include <stdint.h>
#include <stdio.h>

static int g_fail = 0;
#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            g_fail++;                                                 \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
        }                                                             \
    } while (0)

static uint64_t g_rng = 0x2545f4914f6cdd1dULL;
static inline void check_seed(uint64_t seed) { g_rng = seed; }
static inline uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}
static inline float frand(float lo, float hi) {
    return lo + (hi - lo) * (float)(rnd() & 0xffffff) / 16777216.0f;
}

static inline const char *isa_name(int level) {
    static const char *names[] = {"scalar", "avx2", "avx512", "vnni"};
    return names[level];
}

#endif
