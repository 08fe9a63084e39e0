/* Sub-byte packing: the ONNX INT4/UINT4/INT2/UINT2 layout (first element in the low
 * bits) and the com.microsoft MatMulNBits weight / zero-point layout built on it. */
#include <string.h>

#include "qt_internal.h"

typedef void (*pack_fn)(const uint8_t *q, int64_t n, int bits, uint8_t *out);
typedef void (*unpack_fn)(const uint8_t *p, int64_t n, int bits, int sgn, uint8_t *q);

static void pack_scalar(const uint8_t *q, int64_t n, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, q, (size_t)n);
        return;
    }
    const int per = 8 / bits;
    const unsigned mask = (1u << bits) - 1;
    int64_t nbytes = (n * bits + 7) / 8;
    for (int64_t j = 0; j < nbytes; j++) {
        unsigned byte = 0;
        for (int e = 0; e < per; e++) {
            int64_t i = j * per + e;
            if (i < n) byte |= (q[i] & mask) << (e * bits);
        }
        out[j] = (uint8_t)byte;
    }
}

static void unpack_scalar(const uint8_t *p, int64_t n, int bits, int sgn, uint8_t *q) {
    if (bits == 8) {
        memcpy(q, p, (size_t)n);
        return;
    }
    const int per = 8 / bits;
    const unsigned mask = (1u << bits) - 1, sign = 1u << (bits - 1);
    for (int64_t i = 0; i < n; i++) {
        unsigned v = (p[i / per] >> ((i % per) * bits)) & mask;
        if (sgn) v = ((v ^ sign) - sign) & 0xffu; /* sign-extend into the byte */
        q[i] = (uint8_t)v;
    }
}

#if QT_X86
QT_TARGET_AVX2 static void pack_avx2(const uint8_t *q, int64_t n, int bits, uint8_t *out) {
    int64_t i = 0;
    if (bits == 4) {
        const __m256i m0 = _mm256_set1_epi16(0x000f), m1 = _mm256_set1_epi16(0x00f0);
        for (; i + 32 <= n; i += 32) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(q + i));
            __m256i r = _mm256_or_si256(_mm256_and_si256(w, m0),
                                        _mm256_and_si256(_mm256_srli_epi16(w, 4), m1));
            __m128i h = _mm_packus_epi16(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128((__m128i *)(out + i / 2), h);
        }
    } else if (bits == 2) {
        for (; i + 32 <= n; i += 32) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(q + i));
            __m256i r = _mm256_and_si256(w, _mm256_set1_epi32(0x3));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(w, 6), _mm256_set1_epi32(0xc)));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(w, 12), _mm256_set1_epi32(0x30)));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(w, 18), _mm256_set1_epi32(0xc0)));
            __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storel_epi64((__m128i *)(out + i / 4), _mm_packus_epi16(h, h));
        }
    }
    pack_scalar(q + i, n - i, bits, out + i * bits / 8);
}

QT_TARGET_AVX2 static void unpack_avx2(const uint8_t *p, int64_t n, int bits, int sgn, uint8_t *q) {
    int64_t i = 0;
    const __m256i sx = _mm256_set1_epi8((char)(bits == 4 ? 0x08 : 0x02));
    if (bits == 4) {
        for (; i + 32 <= n; i += 32) {
            __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + i / 2)));
            __m256i r = _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi16(0x000f)),
                                        _mm256_and_si256(_mm256_slli_epi16(w, 4), _mm256_set1_epi16(0x0f00)));
            if (sgn) r = _mm256_sub_epi8(_mm256_xor_si256(r, sx), sx);
            _mm256_storeu_si256((__m256i *)(q + i), r);
        }
    } else if (bits == 2) {
        for (; i + 32 <= n; i += 32) {
            __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i / 4)));
            __m256i r = _mm256_and_si256(w, _mm256_set1_epi32(0x3));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 6), _mm256_set1_epi32(0x300)));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 12), _mm256_set1_epi32(0x30000)));
            r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 18), _mm256_set1_epi32(0x3000000)));
            if (sgn) r = _mm256_sub_epi8(_mm256_xor_si256(r, sx), sx);
            _mm256_storeu_si256((__m256i *)(q + i), r);
        }
    }
    unpack_scalar(p + i * bits / 8, n - i, bits, sgn, q + i);
}

QT_TARGET_AVX512 static void pack_avx512(const uint8_t *q, int64_t n, int bits, uint8_t *out) {
    int64_t i = 0;
    if (bits == 4) {
        const __m512i m0 = _mm512_set1_epi16(0x000f), m1 = _mm512_set1_epi16(0x00f0);
        for (; i + 64 <= n; i += 64) {
            __m512i w = _mm512_loadu_si512((const void *)(q + i));
            __m512i r = _mm512_or_si512(_mm512_and_si512(w, m0),
                                        _mm512_and_si512(_mm512_srli_epi16(w, 4), m1));
            _mm256_storeu_si256((__m256i *)(out + i / 2), _mm512_cvtepi16_epi8(r));
        }
    } else if (bits == 2) {
        for (; i + 64 <= n; i += 64) {
            __m512i w = _mm512_loadu_si512((const void *)(q + i));
            __m512i r = _mm512_and_si512(w, _mm512_set1_epi32(0x3));
            r = _mm512_or_si512(r, _mm512_and_si512(_mm512_srli_epi32(w, 6), _mm512_set1_epi32(0xc)));
            r = _mm512_or_si512(r, _mm512_and_si512(_mm512_srli_epi32(w, 12), _mm512_set1_epi32(0x30)));
            r = _mm512_or_si512(r, _mm512_and_si512(_mm512_srli_epi32(w, 18), _mm512_set1_epi32(0xc0)));
            _mm_storeu_si128((__m128i *)(out + i / 4), _mm512_cvtepi32_epi8(r));
        }
    }
    pack_avx2(q + i, n - i, bits, out + i * bits / 8);
}

QT_TARGET_AVX512 static void unpack_avx512(const uint8_t *p, int64_t n, int bits, int sgn, uint8_t *q) {
    int64_t i = 0;
    const __m512i sx = _mm512_set1_epi8((char)(bits == 4 ? 0x08 : 0x02));
    if (bits == 4) {
        for (; i + 64 <= n; i += 64) {
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(p + i / 2)));
            __m512i r = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000f)),
                                        _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0f00)));
            if (sgn) r = _mm512_sub_epi8(_mm512_xor_si512(r, sx), sx);
            _mm512_storeu_si512((void *)(q + i), r);
        }
    } else if (bits == 2) {
        for (; i + 64 <= n; i += 64) {
            __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i / 4)));
            __m512i r = _mm512_and_si512(w, _mm512_set1_epi32(0x3));
            r = _mm512_or_si512(r, _mm512_and_si512(_mm512_slli_epi32(w, 6), _mm512_set1_epi32(0x300)));
            r = _mm512_or_si512(r, _mm512_and_si512(_mm512_slli_epi32(w, 12), _mm512_set1_epi32(0x30000)));
            r = _mm512_or_si512(r, _mm512_and_si512(_mm512_slli_epi32(w, 18), _mm512_set1_epi32(0x3000000)));
            if (sgn) r = _mm512_sub_epi8(_mm512_xor_si512(r, sx), sx);
            _mm512_storeu_si512((void *)(q + i), r);
        }
    }
    unpack_avx2(p + i * bits / 8, n - i, bits, sgn, q + i);
}
#endif

static pack_fn pick_pack(void) {
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) return pack_avx512;
    if (isa >= QT_ISA_AVX2) return pack_avx2;
#endif
    return pack_scalar;
}

static unpack_fn pick_unpack(void) {
#if QT_X86
    int isa = qt__isa();
    if (isa >= QT_ISA_AVX512) return unpack_avx512;
    if (isa >= QT_ISA_AVX2) return unpack_avx2;
#endif
    return unpack_scalar;
}

int qt_pack(const void *q, int64_t n, qt_qtype qtype, uint8_t *packed) {
    if (q == NULL || packed == NULL || n < 0 || !qt__valid_qtype(qtype)) return QT_ERR_ARG;
    pick_pack()((const uint8_t *)q, n, qt__bits(qtype), packed);
    return QT_OK;
}

int qt_unpack(const uint8_t *packed, int64_t n, qt_qtype qtype, void *q) {
    if (q == NULL || packed == NULL || n < 0 || !qt__valid_qtype(qtype)) return QT_ERR_ARG;
    pick_unpack()(packed, n, qt__bits(qtype), qt__signed(qtype), (uint8_t *)q);
    return QT_OK;
}

static int nbits_args_ok(int64_t N, int64_t K, int64_t bs, int bits) {
    if (N < 0 || K < 0 || bs < 16 || (bs & (bs - 1)) != 0) return 0;
    return bits == 2 || bits == 4 || bits == 8;
}

int qt_pack_matmulnbits(const uint8_t *q, int64_t N, int64_t K, int64_t block_size, int bits,
                        const uint8_t *zero_points, uint8_t *b) {
    if (q == NULL || b == NULL || !nbits_args_ok(N, K, block_size, bits)) return QT_ERR_ARG;
    const int64_t nb = (K + block_size - 1) / block_size, blob = block_size * bits / 8;
    const int per = 8 / bits;
    const unsigned mask = (1u << bits) - 1;
    pack_fn pack = pick_pack();
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k0 = 0, j = 0; j < nb; j++, k0 += block_size) {
            uint8_t *dst = b + (n * nb + j) * blob;
            const uint8_t *src = q + n * K + k0;
            if (k0 + block_size <= K) {
                pack(src, block_size, bits, dst);
                continue;
            }
            /* last block: rows past K hold the zero point (dequantize to 0.0) */
            unsigned pad = zero_points ? zero_points[n * nb + j] : 1u << (bits - 1);
            for (int64_t byte = 0; byte < blob; byte++) {
                unsigned v = 0;
                for (int e = 0; e < per; e++) {
                    int64_t k = byte * per + e;
                    v |= ((k0 + k < K ? src[k] : pad) & mask) << (e * bits);
                }
                dst[byte] = (uint8_t)v;
            }
        }
    }
    return QT_OK;
}

int qt_unpack_matmulnbits(const uint8_t *b, int64_t N, int64_t K, int64_t block_size, int bits,
                          uint8_t *q) {
    if (q == NULL || b == NULL || !nbits_args_ok(N, K, block_size, bits)) return QT_ERR_ARG;
    const int64_t nb = (K + block_size - 1) / block_size, blob = block_size * bits / 8;
    unpack_fn unpack = pick_unpack();
    for (int64_t n = 0; n < N; n++)
        for (int64_t k0 = 0, j = 0; j < nb; j++, k0 += block_size) {
            int64_t len = K - k0 < block_size ? K - k0 : block_size;
            unpack(b + (n * nb + j) * blob, len, bits, 0, q + n * K + k0);
        }
    return QT_OK;
}

int qt_pack_zero_points(const uint8_t *zp, int64_t N, int64_t n_blocks, int bits, uint8_t *packed) {
    if (zp == NULL || packed == NULL || N < 0 || n_blocks < 0) return QT_ERR_ARG;
    if (bits != 2 && bits != 4 && bits != 8) return QT_ERR_ARG;
    const int64_t row = (n_blocks * bits + 7) / 8;
    pack_fn pack = pick_pack();
    for (int64_t n = 0; n < N; n++) pack(zp + n * n_blocks, n_blocks, bits, packed + n * row);
    return QT_OK;
}

int qt_unpack_zero_points(const uint8_t *packed, int64_t N, int64_t n_blocks, int bits, uint8_t *zp) {
    if (zp == NULL || packed == NULL || N < 0 || n_blocks < 0) return QT_ERR_ARG;
    if (bits != 2 && bits != 4 && bits != 8) return QT_ERR_ARG;
    const int64_t row = (n_blocks * bits + 7) / 8;
    unpack_fn unpack = pick_unpack();
    for (int64_t n = 0; n < N; n++) unpack(packed + n * row, n_blocks, bits, 0, zp + n * n_blocks);
    return QT_OK;
}
