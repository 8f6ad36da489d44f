/* The LUT forward on the CPU in one pass over memory: load, quantize, gather, store.
 *
 * The same arithmetic as ops/torch_lut.py and ops/triton_lut.py, so the outputs are bit-identical:
 * v = x * 2^d in float32 (exact: a power of two), NaN -> 0, round half to even (rintf under
 * the default rounding mode), clamp to [qmin, qmax], then the expanded table's entry for that
 * code, already in the output's type (the caller converts the table once, as torch would).
 * No -ffast-math: it would drop the NaN test and allow reassociation. Built and loaded by
 * ops/cpu_kernel.py; OpenMP splits large tensors over the threads torch is told to use.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PARALLEL_MIN 65536

static inline int32_t code_of(float x, float scale, float lo, float hi, int32_t qmin) {
    float v = x * scale;
    v = (v == v) ? v : 0.0f;
    v = rintf(v);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return (int32_t)v - qmin;
}

/* One thread's contiguous slice: a plain loop over restrict pointers, which the compiler
 * vectorizes (rounding, compares and the gather in SIMD registers). */
static void run_f32(const float *restrict x, float *restrict y, const float *restrict table, int64_t n,
                    float scale, int32_t qmin, int32_t qmax) {
    const float lo = (float)qmin, hi = (float)qmax;
    for (int64_t i = 0; i < n; i++)
        y[i] = table[code_of(x[i], scale, lo, hi, qmin)];
}

/* bfloat16 in and out: the input widens exactly (its bits are the top half of a float32's);
 * the table holds the bfloat16 entries (converted once by torch, round to nearest even), each
 * zero-extended to 32 bits so that the gather is the SIMD one. */
static void run_bf16(const uint16_t *restrict x, uint16_t *restrict y, const uint32_t *restrict table,
                     int64_t n, float scale, int32_t qmin, int32_t qmax) {
    const float lo = (float)qmin, hi = (float)qmax;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        float xf;
        memcpy(&xf, &bits, sizeof xf);
        y[i] = (uint16_t)table[code_of(xf, scale, lo, hi, qmin)];
    }
}

#if defined(__AVX512F__)
/* Tables of at most 256 entries (8-bit codes) live in sixteen 512-bit registers: a lookup is
 * eight two-register permutes (each answers for 32 codes) and a three-level blend on the code's
 * top bits, where a memory gather of 16 lanes is far slower on most processors (measured:
 * 2x on an AMD EPYC, bench/ops_speed.py). Same rounding as code_of: roundscale to nearest
 * even, NaN lanes to 0 before the clamp. */
static inline __m512i codes16(__m512 x, __m512 scale, __m512 lo, __m512 hi, __m512i qmin) {
    __m512 v = _mm512_mul_ps(x, scale);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    return _mm512_sub_epi32(_mm512_cvttps_epi32(v), qmin);
}

static inline __m512i lookup16(__m512i idx, const __m512i t[16]) {
    __m512i r[8];
    for (int j = 0; j < 8; j++)
        r[j] = _mm512_permutex2var_epi32(t[2 * j], idx, t[2 * j + 1]);
    __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512i a0 = _mm512_mask_blend_epi32(b5, r[0], r[1]), a1 = _mm512_mask_blend_epi32(b5, r[2], r[3]);
    __m512i a2 = _mm512_mask_blend_epi32(b5, r[4], r[5]), a3 = _mm512_mask_blend_epi32(b5, r[6], r[7]);
    __m512i c0 = _mm512_mask_blend_epi32(b6, a0, a1), c1 = _mm512_mask_blend_epi32(b6, a2, a3);
    return _mm512_mask_blend_epi32(b7, c0, c1);
}

static void load_table(const uint32_t *table, int32_t entries, __m512i t[16]) {
    uint32_t pad[256] __attribute__((aligned(64)));
    memset(pad, 0, sizeof pad);
    memcpy(pad, table, (size_t)entries * sizeof *pad);
    for (int j = 0; j < 16; j++)
        t[j] = _mm512_load_si512((const void *)(pad + 16 * j));
}

static void run_f32_512(const float *x, float *y, const uint32_t *table, int64_t n, float scale, int32_t qmin,
                        int32_t qmax) {
    __m512i t[16];
    load_table(table, qmax - qmin + 1, t);
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps((float)qmin), hi = _mm512_set1_ps((float)qmax);
    const __m512i q0 = _mm512_set1_epi32(qmin);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i idx = codes16(_mm512_loadu_ps(x + i), s, lo, hi, q0);
        _mm512_storeu_si512((void *)(y + i), lookup16(idx, t));
    }
    run_f32(x + i, y + i, (const float *)table, n - i, scale, qmin, qmax);
}

static void run_bf16_512(const uint16_t *x, uint16_t *y, const uint32_t *table, int64_t n, float scale,
                         int32_t qmin, int32_t qmax) {
    __m512i t[16];
    load_table(table, qmax - qmin + 1, t);
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps((float)qmin), hi = _mm512_set1_ps((float)qmax);
    const __m512i q0 = _mm512_set1_epi32(qmin);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(x + i));
        __m512 xf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        __m512i idx = codes16(xf, s, lo, hi, q0);
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtepi32_epi16(lookup16(idx, t)));
    }
    run_bf16(x + i, y + i, table, n - i, scale, qmin, qmax);
}
#endif

static void part_f32(const float *x, float *y, const float *table, int64_t n, float scale, int32_t qmin,
                     int32_t qmax) {
#if defined(__AVX512F__)
    if (qmax - qmin < 256) {
        run_f32_512(x, y, (const uint32_t *)table, n, scale, qmin, qmax);
        return;
    }
#endif
    run_f32(x, y, table, n, scale, qmin, qmax);
}

static void part_bf16(const uint16_t *x, uint16_t *y, const uint32_t *table, int64_t n, float scale, int32_t qmin,
                      int32_t qmax) {
#if defined(__AVX512F__)
    if (qmax - qmin < 256) {
        run_bf16_512(x, y, table, n, scale, qmin, qmax);
        return;
    }
#endif
    run_bf16(x, y, table, n, scale, qmin, qmax);
}

/* Slice [a, b) of n for thread k of m, aligned to 64 elements so no two threads share a line. */
static void slice(int64_t n, int k, int m, int64_t *a, int64_t *b) {
    int64_t per = ((n + m - 1) / m + 63) / 64 * 64;
    *a = per * k < n ? per * k : n;
    *b = per * (k + 1) < n ? per * (k + 1) : n;
}

/* Run CALL over [a, b): the whole range on one thread for small n, else one slice per thread. */
#define SPLIT(n, threads, CALL)                                                \
    do {                                                                       \
        if ((n) < PARALLEL_MIN || (threads) <= 1) {                            \
            int64_t a = 0, b = (n);                                            \
            CALL;                                                              \
        } else {                                                               \
            _Pragma("omp parallel num_threads(threads)") {                     \
                int64_t a, b;                                                  \
                slice((n), omp_get_thread_num(), omp_get_num_threads(), &a, &b); \
                CALL;                                                          \
            }                                                                  \
        }                                                                      \
    } while (0)

void lut_f32(const float *x, float *y, const float *table, int64_t n, float scale, int32_t qmin, int32_t qmax,
             int32_t threads) {
    SPLIT(n, threads, part_f32(x + a, y + a, table, b - a, scale, qmin, qmax));
}

void lut_bf16(const uint16_t *x, uint16_t *y, const uint32_t *table, int64_t n, float scale, int32_t qmin,
              int32_t qmax, int32_t threads) {
    SPLIT(n, threads, part_bf16(x + a, y + a, table, b - a, scale, qmin, qmax));
}

/* A scale per feature of the last dim (calibrate(scales="channel")): element (r, j) of a
 * rows x c tensor takes its code at scale[j] and its entry from the expanded table's row that
 * starts at offset[j]. The same code_of as the per-tensor lookup, so each feature's outputs are
 * bit-identical to a per-tensor call at that feature's scale. Rows are split over the threads. */
static void run_channels_f32(const float *restrict x, float *restrict y, const float *restrict table,
                             const int32_t *restrict offset, const float *restrict scale, int64_t rows, int64_t c,
                             int32_t qmin, int32_t qmax) {
    const float lo = (float)qmin, hi = (float)qmax;
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict xr = x + r * c;
        float *restrict yr = y + r * c;
        for (int64_t j = 0; j < c; j++)
            yr[j] = table[offset[j] + code_of(xr[j], scale[j], lo, hi, qmin)];
    }
}

void lut_channels_f32(const float *x, float *y, const float *table, const int32_t *offset, const float *scale,
                      int64_t rows, int64_t c, int32_t qmin, int32_t qmax, int32_t threads) {
    if (rows * c < PARALLEL_MIN || threads <= 1 || rows < 2) {
        run_channels_f32(x, y, table, offset, scale, rows, c, qmin, qmax);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t m = omp_get_num_threads(), k = omp_get_thread_num(), per = (rows + m - 1) / m;
        int64_t a = per * k < rows ? per * k : rows, b = per * (k + 1) < rows ? per * (k + 1) : rows;
        run_channels_f32(x + a * c, y + a * c, table, offset, scale, b - a, c, qmin, qmax);
    }
}

/* The straight-through mask of the backward, in place: the gradient is kept where
 * x * 2^d lies within [qmin - 1/2, qmax + 1/2] (the codes the quantizer does not clamp) and set
 * to 0 elsewhere, NaN and +-inf included (their comparisons are false). The gradient itself
 * comes from torch's native backward of the exact function, one vectorized pass. */
static void mask_f32(float *restrict g, const float *restrict x, int64_t n, float scale, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i] * scale;
        g[i] = (v >= lo && v <= hi) ? g[i] : 0.0f;
    }
}

static void mask_bf16(uint16_t *restrict g, const uint16_t *restrict x, int64_t n, float scale, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        float v;
        memcpy(&v, &bits, sizeof v);
        v *= scale;
        g[i] = (v >= lo && v <= hi) ? g[i] : (uint16_t)0;
    }
}

void lut_mask_f32(float *g, const float *x, int64_t n, float scale, int32_t qmin, int32_t qmax, int32_t threads) {
    const float lo = (float)qmin - 0.5f, hi = (float)qmax + 0.5f;
    SPLIT(n, threads, mask_f32(g + a, x + a, b - a, scale, lo, hi));
}

void lut_mask_bf16(uint16_t *g, const uint16_t *x, int64_t n, float scale, int32_t qmin, int32_t qmax,
                   int32_t threads) {
    const float lo = (float)qmin - 0.5f, hi = (float)qmax + 0.5f;
    SPLIT(n, threads, mask_bf16(g + a, x + a, b - a, scale, lo, hi));
}

/* RangeReducedLUT's forward (ops/modules.py) in one pass, float32: the input's octave from its
 * exponent bits, the table on the mantissa, the result times 2^-k, with the same clamps as the
 * torch ops (NaN -> 1, +inf -> FLT_MAX, anything below the smallest normal -> it), so the
 * bits are the same. rsqrt: v = m * 4^k, m in [1, 4); reciprocal: v = m * 2^k, m in [1, 2). */
static inline float pow2i(int e) { /* 2^e for e in [-126, 127], from its bits */
    uint32_t b = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static void range_reduced(const float *restrict v, float *restrict y, const float *restrict table, int64_t n,
                          float scale, int32_t qmin, int32_t qmax, int rsqrt) {
    const float lo = (float)qmin, hi = (float)qmax;
    for (int64_t i = 0; i < n; i++) {
        float f = v[i];
        f = (f == f) ? f : 1.0f;
        f = (f > 3.4028234663852886e38f) ? 3.4028234663852886e38f : f;
        f = (f < 1.1754943508222875e-38f) ? 1.1754943508222875e-38f : f;
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        int e = (int)((bits >> 23) & 0xFF) - 127;
        int k = rsqrt ? (e >= 0 ? e / 2 : -((1 - e) / 2)) : e; /* floor(e / 2) for rsqrt */
        int eb = rsqrt ? e - 2 * k : 0;
        uint32_t mb = (bits & 0x007FFFFFu) | ((uint32_t)(eb + 127) << 23);
        float m;
        memcpy(&m, &mb, sizeof m);
        float c = rintf(m * scale);
        c = c < lo ? lo : (c > hi ? hi : c);
        int half = (-k) >= 0 ? (-k) / 2 : -((1 + k) / 2); /* floor(-k / 2) */
        float r = (table[(int32_t)c - qmin] * pow2i(half)) * pow2i(-k - half);
        y[i] = (v[i] == v[i]) ? r : v[i]; /* NaN propagates */
    }
}

void lut_range_reduced_f32(const float *v, float *y, const float *table, int64_t n, float scale, int32_t qmin,
                           int32_t qmax, int32_t rsqrt, int32_t threads) {
    SPLIT(n, threads, range_reduced(v + a, y + a, table, b - a, scale, qmin, qmax, rsqrt));
}

/* TQT fake quantization (ops/fake_quant.py), float32, with the torch path's arithmetic:
 * v = x * 2^d (NaN -> 0; +-inf saturate), q = clamp(rint(v)), y = q * 2^-d. */
/* Softmax's numerators with exp range-reduced (ops/nn/softmax.py, LUTSoftmax.along), one row
 * of `cols` at a time, and each row's sum: the same float32 operations in the same order as
 * the torch ops there, so the bits agree. top = the row's max (given: torch's amax); z = x - top,
 * NaN -> -inf, clamped below at zmin; n = floor(z * inv_ln2); r = z + n * ln2 (two roundings,
 * no FMA: -std=c99 keeps contraction off); e = table[code(r)] * 2^-n, 0 where n > nmax.
 * The sum runs in torch's order only for rows it sums the same way: the caller sums e itself. */
static void softmax_exp_row(const float *restrict xr, float *restrict er, int64_t cols, float top,
                            const float *restrict table, float scale, int32_t qmin, int32_t qmax, float zmin,
                            float inv_ln2, float ln2, int32_t nmax) {
    const float lo = (float)qmin, hi = (float)qmax;
    float pw[64]; /* 2^-k, k = 0 .. nmax + 2 (nmax < 62): exact, gathered like the table */
    for (int k = 0; k < 64; k++)
        pw[k] = k <= nmax + 2 ? ldexpf(1.0f, -k) : 0.0f;
    for (int64_t j = 0; j < cols; j++) {
        float z = xr[j] - top;
        z = (z >= zmin) ? z : zmin; /* NaN (compares false) and -inf -> zmin, as nan_to_num + clamp */
        float n = floorf(z * inv_ln2);
        float t = n * ln2;
        float c = rintf((z + t) * scale);
        c = c < lo ? lo : (c > hi ? hi : c);
        int32_t k = (int32_t)n; /* 0 <= k <= nmax + 2 */
        float v = table[(int32_t)c - qmin] * pw[k];
        er[j] = k > nmax ? 0.0f : v;
    }
}

#if defined(__AVX512F__)
/* softmax_exp_row sixteen lanes at a time (the compiler leaves that loop scalar): the same
 * operations, roundscale for floorf and rintf, the 2^-k from its exponent bits. */
static void softmax_exp_row_512(const float *xr, float *er, int64_t cols, float top, const float *table,
                                float scale, int32_t qmin, int32_t qmax, float zmin, float inv_ln2, float ln2,
                                int32_t nmax) {
    const __m512 vtop = _mm512_set1_ps(top), vzmin = _mm512_set1_ps(zmin), vinv = _mm512_set1_ps(inv_ln2);
    const __m512 vln2 = _mm512_set1_ps(ln2), vs = _mm512_set1_ps(scale);
    const __m512 lo = _mm512_set1_ps((float)qmin), hi = _mm512_set1_ps((float)qmax);
    const __m512i q0 = _mm512_set1_epi32(qmin), vnmax = _mm512_set1_epi32(nmax), b127 = _mm512_set1_epi32(127);
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) {
        __m512 z = _mm512_sub_ps(_mm512_loadu_ps(xr + j), vtop);
        z = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, vzmin, _CMP_GE_OQ), vzmin, z);
        __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, vinv), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_add_ps(z, _mm512_mul_ps(n, vln2));
        __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(r, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c = _mm512_min_ps(_mm512_max_ps(c, lo), hi);
        __m512 tv = _mm512_i32gather_ps(_mm512_sub_epi32(_mm512_cvttps_epi32(c), q0), table, 4);
        __m512i k = _mm512_cvttps_epi32(n);
        __m512 v = _mm512_mul_ps(tv, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(b127, k), 23)));
        _mm512_storeu_ps(er + j, _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(k, vnmax), v, _mm512_setzero_ps()));
    }
    softmax_exp_row(xr + j, er + j, cols - j, top, table, scale, qmin, qmax, zmin, inv_ln2, ln2, nmax);
}
#define SOFTMAX_EXP_ROW softmax_exp_row_512
#else
#define SOFTMAX_EXP_ROW softmax_exp_row
#endif

/* Rows [a, b) of softmax_exp_f32; `top` holds each row's max (torch's amax: NaN if any is NaN). */
static void softmax_exp_rows(const float *restrict x, float *restrict e, const float *restrict top, int64_t rows,
                             int64_t cols, const float *restrict table, float scale, int32_t qmin, int32_t qmax,
                             float zmin, float inv_ln2, float ln2, int32_t nmax) {
    for (int64_t r = 0; r < rows; r++)
        SOFTMAX_EXP_ROW(x + r * cols, e + r * cols, cols, top[r], table, scale, qmin, qmax, zmin, inv_ln2, ln2,
                        nmax);
}

void softmax_exp_f32(const float *x, float *e, const float *top, int64_t rows, int64_t cols, const float *table,
                     float scale, int32_t qmin, int32_t qmax, float zmin, float inv_ln2, float ln2, int32_t nmax,
                     int32_t threads) {
    if (rows * cols < PARALLEL_MIN || threads <= 1 || rows < 2) {
        softmax_exp_rows(x, e, top, rows, cols, table, scale, qmin, qmax, zmin, inv_ln2, ln2, nmax);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t m = omp_get_num_threads(), k = omp_get_thread_num(), per = (rows + m - 1) / m;
        int64_t a = per * k < rows ? per * k : rows, b = per * (k + 1) < rows ? per * (k + 1) : rows;
        softmax_exp_rows(x + a * cols, e + a * cols, top + a, b - a, cols, table, scale, qmin, qmax, zmin, inv_ln2,
                         ln2, nmax);
    }
}

static void tqt_fwd(const float *restrict x, float *restrict y, int64_t n, float scale, float inv, float lo,
                    float hi) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        v = (v == v) ? v * scale : 0.0f;
        float q = rintf(v);
        q = q < lo ? lo : (q > hi ? hi : q);
        y[i] = q * inv;
    }
}

void tqt_forward_f32(const float *x, float *y, int64_t n, float scale, float inv, int32_t qmin, int32_t qmax,
                     int32_t threads) {
    SPLIT(n, threads, tqt_fwd(x + a, y + a, b - a, scale, inv, (float)qmin, (float)qmax));
}

/* Backward: the input's straight-through gradient (grad inside [qmin, qmax], 0 outside) and
 * the threshold's, sum of grad * 2^-d * (q - v) inside and grad * 2^-d * q at the clip (the
 * caller multiplies by ln 2). Each thread sums its slice in double; the slices are added in
 * thread order, so the result does not depend on timing. */
static double tqt_bwd(const float *restrict g, const float *restrict x, float *restrict gx, int64_t n, float scale,
                      float inv, float lo, float hi) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        v = (v == v) ? v * scale : 0.0f;
        float q = rintf(v);
        q = q < lo ? lo : (q > hi ? hi : q);
        int inside = v >= lo && v <= hi;
        gx[i] = inside ? g[i] : 0.0f;
        acc += (double)g[i] * (double)inv * (double)(inside ? q - v : q);
    }
    return acc;
}

double tqt_backward_f32(const float *g, const float *x, float *gx, int64_t n, float scale, float inv, int32_t qmin,
                        int32_t qmax, int32_t threads) {
    if (n < PARALLEL_MIN || threads <= 1)
        return tqt_bwd(g, x, gx, n, scale, inv, (float)qmin, (float)qmax);
    double parts[256] = {0};
    int used = threads < 256 ? threads : 256;
#pragma omp parallel num_threads(used)
    {
        int64_t a, b;
        int k = omp_get_thread_num();
        slice(n, k, omp_get_num_threads(), &a, &b);
        parts[k] = tqt_bwd(g + a, x + a, gx + a, b - a, scale, inv, (float)qmin, (float)qmax);
    }
    double acc = 0.0;
    for (int k = 0; k < used; k++)
        acc += parts[k];
    return acc;
}

/* GroupNorm's statistics: the mean and the biased variance of every (sample, group) of a
 * float32 tensor of n samples, c channels and s positions, stored (n, c, s) (contiguous) or
 * (n, s, c) (channels-last), in double, two passes (the variance from the centred values).
 * torch reaches a channels-last group only through a copy and five passes; this reads it
 * twice. Eight (contiguous) or c (channels-last) independent sums per pass let the compiler
 * vectorize without reassociating; each (sample, group) is one thread's, in a fixed order,
 * so the result does not depend on the thread count. */
static void chunk_stats(const float *restrict x, int64_t len, double *mean, double *var) {
    double acc[8] = {0}, m = 0.0, q = 0.0;
    int64_t k = 0;
    for (; k + 8 <= len; k += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += (double)x[k + j];
    for (int j = 0; j < 8; j++)
        m += acc[j];
    for (; k < len; k++)
        m += (double)x[k];
    m /= (double)len;
    double sq[8] = {0};
    for (k = 0; k + 8 <= len; k += 8)
        for (int j = 0; j < 8; j++) {
            double d = (double)x[k + j] - m;
            sq[j] += d * d;
        }
    for (int j = 0; j < 8; j++)
        q += sq[j];
    for (; k < len; k++) {
        double d = (double)x[k] - m;
        q += d * d;
    }
    *mean = m;
    *var = q / (double)len;
}

static void sample_stats_last(const float *restrict x, int64_t c, int64_t s, int64_t g, double *restrict acc,
                              float *mean, float *var) {
    int64_t per = c / g;
    for (int64_t j = 0; j < c; j++)
        acc[j] = 0.0;
    for (int64_t p = 0; p < s; p++)
        for (int64_t j = 0; j < c; j++)
            acc[j] += (double)x[p * c + j];
    double *mu = acc + c;
    for (int64_t h = 0; h < g; h++) {
        double t = 0.0;
        for (int64_t j = 0; j < per; j++)
            t += acc[h * per + j];
        t /= (double)(per * s);
        for (int64_t j = 0; j < per; j++)
            mu[h * per + j] = t;
        mean[h] = (float)t;
    }
    for (int64_t j = 0; j < c; j++)
        acc[j] = 0.0;
    for (int64_t p = 0; p < s; p++)
        for (int64_t j = 0; j < c; j++) {
            double d = (double)x[p * c + j] - mu[j];
            acc[j] += d * d;
        }
    for (int64_t h = 0; h < g; h++) {
        double t = 0.0;
        for (int64_t j = 0; j < per; j++)
            t += acc[h * per + j];
        var[h] = (float)(t / (double)(per * s));
    }
}

/* Returns 0, or -1 where the working memory (2 c doubles per thread) cannot be had. */
int group_stats_f32(const float *x, float *mean, float *var, int64_t n, int64_t c, int64_t s, int64_t g,
                    int32_t channels_last, int32_t threads) {
    int64_t total = n * c * s;
    int nt = (total < PARALLEL_MIN || threads <= 1) ? 1 : threads;
    if (!channels_last) {
        int64_t len = (c / g) * s;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n * g; i++) {
            double m, v;
            chunk_stats(x + i * len, len, &m, &v);
            mean[i] = (float)m;
            var[i] = (float)v;
        }
        return 0;
    }
    double *work = malloc(sizeof(double) * 2 * (size_t)c * (size_t)nt);
    if (work == NULL)
        return -1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++)
        sample_stats_last(x + i * s * c, c, s, g, work + 2 * c * omp_get_thread_num(), mean + i * g, var + i * g);
    free(work);
    return 0;
}
