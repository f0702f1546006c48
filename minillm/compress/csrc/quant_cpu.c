/* Quantized matmul on the CPU: y = x @ Ŵᵀ + b, Ŵ stored as int8 or packed int4 codes.
 *
 * Built and loaded by minillm/compress/cpu_kernel.py (plain C, compiled on first use with the
 * machine's own flags, called through ctypes; OpenMP threads shared with PyTorch's). The formats
 * are those of minillm/compress/quant_format.py:
 *   int8: q (N, K) int8,            Ŵ[n,k] = q[n,k] · s[n]  or  q[n,k] · s[n, k/G]
 *   int4: q (N, K/2) uint8 packed,  Ŵ[n,k] = (q[n,k] - 8) · s[n, k/G] + z[n, k/G]
 *         byte j of a row holds code 2j in its low nibble and code 2j+1 in its high nibble.
 *
 * Why this is fast (llama.cpp's idea): at batch 1 a linear layer reads every weight once and does
 * two flops with it, so time = bytes moved. We never expand a weight to a 4-byte float; instead the
 * activation row is quantized too, per block of 32 inputs (QB):
 *     d_b = max|x| / 127 over the block,   xq = round(x / d_b) in -127..127,   x ≈ d_b · xq
 * and each block's dot product is done on integers, 32 multiply-adds in a handful of AVX2 instructions:
 *     int8:  Σ_k Ŵ x  ≈  Σ_b s · d_b · Σ_{k in b} q·xq
 *     int4:  Σ_k Ŵ x  =  Σ_g [ s_g Σ_{k in g} (q-8)·x  +  z_g Σ_{k in g} x ]
 *                     ≈  Σ_b s_g d_b (Σ q·xq - 8 Σ xq)  +  Σ_g z_g Σ_{k in g} x
 * The zero term uses the exact Σx (kept per block), and (q-8) rather than q multiplies the activation
 * error, so the only difference from the reference is the rounding of x to xq: |error| ≤ Σ_k |(q-8)s|·d/2.
 *
 * SIMD (AVX2): _mm256_maddubs_epi16(a, b) multiplies 32 unsigned bytes a by 32 signed bytes b and adds
 * neighbouring pairs into 16 int16 (no overflow here: 2·15·127 and 2·127·127 fit in int16);
 * _mm256_madd_epi16(·, 1) adds pairs again into 8 int32. int4 codes are already unsigned; for int8,
 * |q| goes in a and sign(q)·xq in b (_mm256_sign_epi8). A 16-byte int4 block splits into its low
 * nibbles (even k) and high nibbles (odd k) without a shuffle, so the activation block is stored in
 * the same order: its 16 even entries, then its 16 odd ones.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_cpu.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define USE_AVX2 1
#else
#define USE_AVX2 0
#endif

#define QB 32                     /* activation block: 32 inputs share one scale d_b */
#define MIN_PARALLEL (1 << 17)    /* weights below which one thread is faster than waking the others */
/* Output rows computed together (a tile). A tile holds, per row, its unpacked block, its scale and an
 * accumulator in vector registers: 4 rows fit AVX2's 16; with AVX-512's 32 registers (even for 256-bit
 * code) 8 rows fit, and each activation block then serves 8 rows: 1.1-1.17x faster on the SmolLM2 int4
 * layers at 1 thread (int8 head unchanged). Rows past the last full tile take the portable path. */
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define R 8
#else
#define R 4
#endif
#define MAX_M 16                  /* tiles handle up to 15 activation rows (cpu_kernel.GEMM_MIN_M - 1) */

static float half_to_float(uint16_t h) {  /* IEEE fp16 -> fp32, exact, portable */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);           /* inf / nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);      /* normal: rebias 15 -> 127 */
    else if (!man) bits = sign;                                          /* ±0 */
    else {                                                               /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
    float f; memcpy(&f, &bits, 4); return f;
}

static inline float load_f(const void *p, int type, int64_t i) {
    if (type == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (type == F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f;  /* bf16: top half */
}


/* --- 1. quantize the activations, one row at a time ----------------------------------------- */
/* Row x (K,) -> xq (nb·QB,) int8 and d (nb,) scales, nb = ceil(K/QB); for int4 also, per group of G,
 * gsx = Σx (exact) and gdsq = Σ_b d_b·Σxq (for the -8 of (q - 8)), so the hot loop needs neither.
 * A ragged last block (int8 with K % 32 != 0) is zero-padded. `split` stores each block as its even
 * entries then its odd entries (the int4 layout above). Rounding is half-to-even, as torch.round. */
#if USE_AVX2
/* One full fp32 block, 8 lanes at a time: the same d, the same products v·(1/d) and the same
 * round-half-to-even (cvtps uses the default rounding mode) as the scalar loop below, so xq and d are
 * identical; only Σx is summed in another order. The scalar loop called nearbyintf 32 times a block,
 * a few µs per row that every call of a small layer paid. */

static void quantize_block_f32(const float *x, int split, int8_t *xq, float *db, float *sum, int32_t *isum) {
    __m256 v[4], amax = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));  /* |v|: clear the sign bit */
        vs = _mm256_add_ps(vs, v[i]);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float am = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    float d = am / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    int32_t qi[QB];
    __m256i qs = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        qs = _mm256_add_epi32(qs, q);
        _mm256_storeu_si256((__m256i *)(qi + 8 * i), q);
    }
    for (int i = 0; i < QB; i++)  /* split: evens first, then odds (the int4 layout) */
        xq[split ? (i % 2) * (QB / 2) + i / 2 : i] = (int8_t)qi[i];
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    *isum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    *db = d;
    *sum = hsum(vs);
}
#endif

static void quantize_row(const void *x, int x_type, int64_t K, int64_t G, int split,
                         int8_t *xq, float *d, float *gsx, float *gdsq) {
    int64_t nb = (K + QB - 1) / QB, bpg = G ? G / QB : 1;
    for (int64_t b = 0; b < nb; b++) {
#if USE_AVX2
        if (x_type == F32 && (b + 1) * QB <= K) {
            float db, sum;
            int32_t isum;
            quantize_block_f32((const float *)x + b * QB, split, xq + b * QB, &db, &sum, &isum);
            d[b] = db;
            if (split) {
                if (b % bpg == 0) gsx[b / bpg] = gdsq[b / bpg] = 0.0f;
                gsx[b / bpg] += sum;
                gdsq[b / bpg] += db * (float)isum;
            }
            continue;
        }
#endif
        float v[QB] = {0}, amax = 0.0f, sum = 0.0f;
        int64_t n = K - b * QB < QB ? K - b * QB : QB;
        for (int64_t i = 0; i < n; i++) {
            v[i] = load_f(x, x_type, b * QB + i);
            amax = fmaxf(amax, fabsf(v[i]));
            sum += v[i];
        }
        float db = amax / 127.0f, id = db > 0.0f ? 1.0f / db : 0.0f;
        int32_t isum = 0;
        for (int i = 0; i < QB; i++) {
            int8_t q = (int8_t)nearbyintf(v[i] * id);
            isum += q;
            xq[b * QB + (split ? (i % 2) * (QB / 2) + i / 2 : i)] = q;  /* split: evens first, then odds */
        }
        d[b] = db;
        if (split) {
            if (b % bpg == 0) gsx[b / bpg] = gdsq[b / bpg] = 0.0f;
            gsx[b / bpg] += sum;
            gdsq[b / bpg] += db * (float)isum;
        }
    }
}

/* --- 2. integer dot products --------------------------------------------------------------------- */
static inline int32_t dot_int4_scalar(const uint8_t *w, const int8_t *xq) {
    int32_t acc = 0;
    for (int j = 0; j < QB / 2; j++)
        acc += (w[j] & 0xF) * xq[j] + (w[j] >> 4) * xq[QB / 2 + j];
    return acc;
}
static inline int32_t dot_int8_scalar(const int8_t *w, const int8_t *xq, int n) {
    int32_t acc = 0;
    for (int j = 0; j < n; j++) acc += w[j] * xq[j];
    return acc;
}

#if USE_AVX2
/* 32 unsigned bytes a times 32 signed bytes b, summed in fours: 8 int32. VNNI does it in one
 * instruction; plain AVX2 in two (pairs into int16, then pairs of those into int32). */
static inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

/* --- 3. a tile: R weight rows against all M activation rows ----------------------------------- */
/* Loop order: block b -> activation row m -> weight row r. A weight block is loaded and unpacked once
 * and then dotted with the M activation blocks, so batch-8 decoding reads and unpacks W once, not
 * 8 times. The R·M accumulators are independent, which also keeps the FMA unit busy (one accumulator
 * would wait on its own previous sum every block).
 * No per-row set-up: the factor s[n, g(b)]·d_b is formed in the loop (two broadcasts and a multiply
 * are cheaper than filling a table when a row has only K/32 = 18 blocks), and the -8 of (q - 8)
 * stays in the integers: Σ (q-8)·xq = Σ q·xq - Σ 8·xq, the second dot shared by the R rows.
 * Only the zero term z_g·Σx remains per row, one short dot over the groups.
 * `always_inline` + a constant M at the call site (M = 1) lets the compiler keep the accumulators in
 * registers for the batch-1 case; for M > 1 they live in a small array in L1. */

static inline const float *rows_f32(const void *p, int type, int64_t n, int64_t ng, float *buf) {
    if (type == F32) return (const float *)p + n * ng;   /* (R, ng) rows read in place */
    for (int64_t i = 0; i < R * ng; i++) buf[i] = load_f(p, type, n * ng + i);
    return buf;
}


/* out[m·R + r] = Σ_k Ŵ[n+r, k]·x[m, k] for m < M, r < R.  xq (M, nb·QB), d (M, nb), gsx (M, ng). */
static inline __attribute__((always_inline)) void tile_int4(const QLayer *L, int64_t n, int64_t M,
        const int8_t *xq, const float *d, const float *gsx, float *sbuf, float *zbuf, float *out) {
    int64_t K = L->K, ng = K / L->G, bpg = L->G / QB, nb = K / QB, ldw = K / 2;
    const float *s = rows_f32(L->s, L->s_type, n, ng, sbuf), *z = rows_f32(L->z, L->z_type, n, ng, zbuf);
    const uint8_t *w = (const uint8_t *)L->w + n * ldw;
    const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    __m256 acc[MAX_M * R];
    for (int64_t i = 0; i < M * R; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i q[R];
        __m256 sv[R];
        for (int r = 0; r < R; r++) {  /* unpack: 16 bytes -> [16 low nibbles (even k) | 16 high (odd k)] */
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w + r * ldw + b * QB / 2));
            q[r] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), low4);
            sv[r] = _mm256_broadcast_ss(s + r * ng + b / bpg);
        }
        for (int64_t m = 0; m < M; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * nb * QB + b * QB));
            __m256i x8 = dot_u8s8(eight, xv);                 /* Σ 8·xq, in 8 partial sums */
            __m256 dv = _mm256_broadcast_ss(d + m * nb + b);
            for (int r = 0; r < R; r++) {
                __m256i p = _mm256_sub_epi32(dot_u8s8(q[r], xv), x8);  /* Σ (q-8)·xq, exact */
                acc[m * R + r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv[r], dv), acc[m * R + r]);
            }
        }
    }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < R; r++)  /* + Σ_g z_g·Σ_{k in g} x: the zero term, exact Σx */
            out[m * R + r] = hsum(acc[m * R + r]) + minillm_dot_f32(z + r * ng, gsx + m * ng, ng);
}

static inline __attribute__((always_inline)) void tile_int8(const QLayer *L, int64_t n, int64_t M,
        const int8_t *xq, const float *d, float *sbuf, float *out) {
    int64_t K = L->K, G = L->G, nfull = K / QB, nb = (K + QB - 1) / QB, ng = G ? K / G : 1, bpg = G ? G / QB : 1;
    const float *s = rows_f32(L->s, L->s_type, n, ng, sbuf);  /* per channel: ng = 1, s[r] */
    const int8_t *w = (const int8_t *)L->w + n * K;
    __m256 acc[MAX_M * R];
    for (int64_t i = 0; i < M * R; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nfull; b++) {
        __m256i q[R], qa[R];
        __m256 sv[R];
        for (int r = 0; r < R; r++) {
            q[r] = _mm256_loadu_si256((const __m256i *)(w + r * K + b * QB));
            qa[r] = _mm256_abs_epi8(q[r]);  /* |q| is the unsigned operand; its sign moves onto xq */
            sv[r] = G ? _mm256_broadcast_ss(s + r * ng + b / bpg) : _mm256_set1_ps(1.0f);
        }
        for (int64_t m = 0; m < M; m++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * nb * QB + b * QB));
            __m256 dv = _mm256_broadcast_ss(d + m * nb + b);
            for (int r = 0; r < R; r++) {
                __m256 p = _mm256_cvtepi32_ps(dot_u8s8(qa[r], _mm256_sign_epi8(xv, q[r])));  /* Σ q·xq */
                acc[m * R + r] = _mm256_fmadd_ps(p, G ? _mm256_mul_ps(sv[r], dv) : dv, acc[m * R + r]);
            }
        }
    }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            float a = hsum(acc[m * R + r]);
            if (K % QB)  /* ragged tail (per channel only: groups are multiples of 32) */
                a += d[m * nb + nfull] * (float)dot_int8_scalar(w + r * K + nfull * QB, xq + m * nb * QB + nfull * QB,
                                                                (int)(K % QB));
            out[m * R + r] = G ? a : a * s[r];  /* per channel: s[n] applied once, at the end */
        }
}
#endif

/* --- 3b. exact: x stays float, Ŵ rebuilt value for value -------------------------------------------
 * With QLayer.exact = 1 the activations are not rounded to 8 bits: each weight is expanded to exactly
 * the float the reference computes ((q - 8)·s + z, or q·s: two roundings, in that order) and dotted
 * with x in fp32, so y differs from x @ Ŵᵀ only by the order of the sums (~1e-7 relative). What a GGUF
 * kept quantized needs to give the greedy tokens of its dequantized fp32 weights.
 * The trick that makes it cheap on AVX-512: a group has only 16 possible weights, T[q] = (q - 8)·s + z,
 * one 16-float register built once per row and block; _mm512_permutexvar_ps then looks up 16 codes
 * in it at once, so expanding a weight costs about what the integer path's unpacking does. x is stored
 * in the int4 block order (16 even k, then 16 odd k) so that the low and high nibbles meet their x. */
#if defined(__AVX512F__)
#define EXACT_SIMD 1
/* RT weight rows from n (s, z: their scales and zeros as fp32, RT × ng) against M activation rows;
 * out[m·R + r]. One activation row takes the whole tile (RT = R); several take it 2 rows at a time,
 * so that the 2·M accumulators stay in registers (M a constant at the call: see qlinear_exact). */
static inline __attribute__((always_inline)) void tile_int4_exact(const QLayer *L, int64_t n, int RT, int64_t M,
        const float *xs, const float *s, const float *z, float *out) {
    int64_t K = L->K, ng = K / L->G, bpg = L->G / QB, nb = K / QB, ldw = K / 2;
    const uint8_t *w = (const uint8_t *)L->w + n * ldw;
    const __m512 q8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);  /* q - 8 */
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m512 acc[MAX_M * R];
    for (int64_t i = 0; i < M * RT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < RT; r++) {
            int64_t g = r * ng + b / bpg;
            __m512 T = _mm512_add_ps(_mm512_mul_ps(q8, _mm512_set1_ps(s[g])), _mm512_set1_ps(z[g]));  /* no FMA */
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w + r * ldw + b * QB / 2));
            __m512 we = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4)), T);  /* even k */
            __m512 wo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4)), T);
            for (int64_t m = 0; m < M; m++) {
                const float *xb = xs + m * K + b * QB;
                acc[m * RT + r] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xb), acc[m * RT + r]);
                acc[m * RT + r] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xb + QB / 2), acc[m * RT + r]);
            }
        }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < RT; r++) out[m * R + r] = _mm512_reduce_add_ps(acc[m * RT + r]);
}

static inline __attribute__((always_inline)) void tile_int8_exact(const QLayer *L, int64_t n, int RT, int64_t M,
        const float *x, const float *s, float *out) {
    int64_t K = L->K, G = L->G, nfull = K / QB, ng = G ? K / G : 1, bpg = G ? G / QB : 1;  /* per channel: ng = 1 */
    const int8_t *w = (const int8_t *)L->w + n * K;
    __m512 acc[MAX_M * R];
    for (int64_t i = 0; i < M * RT; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nfull; b++)
        for (int r = 0; r < RT; r++) {
            __m512 sv = _mm512_set1_ps(s[r * ng + (G ? b / bpg : 0)]);
            const int8_t *wb = w + r * K + b * QB;
            __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)wb))), sv);
            __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wb + 16)))),
                                      sv);
            for (int64_t m = 0; m < M; m++) {
                const float *xb = x + m * K + b * QB;
                acc[m * RT + r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[m * RT + r]);
                acc[m * RT + r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[m * RT + r]);
            }
        }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < RT; r++) {
            float a = _mm512_reduce_add_ps(acc[m * RT + r]);
            for (int64_t k = nfull * QB; k < K; k++)  /* ragged tail (per channel only) */
                a += (float)w[r * K + k] * s[r * ng + (G ? k / G : 0)] * x[m * K + k];
            out[m * R + r] = a;
        }
}
#elif USE_AVX2
#define EXACT_SIMD 1
/* The same tiles with AVX2's 8 lanes (no 16-entry permute there): each code becomes its weight by
 * arithmetic, ((float)q - 8)·s + z, the reference's two roundings in its order. */
static inline __attribute__((always_inline)) void tile_int4_exact(const QLayer *L, int64_t n, int RT, int64_t M,
        const float *xs, const float *s, const float *z, float *out) {
    int64_t K = L->K, ng = K / L->G, bpg = L->G / QB, nb = K / QB, ldw = K / 2;
    const uint8_t *w = (const uint8_t *)L->w + n * ldw;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256 eight = _mm256_set1_ps(8.0f);
    __m256 acc[MAX_M * R];
    for (int64_t i = 0; i < M * RT; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < RT; r++) {
            int64_t g = r * ng + b / bpg;
            __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w + r * ldw + b * QB / 2));
            __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
            __m128i codes[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};  /* x's order: even, odd */
            __m256 wv[4];
            for (int j = 0; j < 4; j++)  /* 8 codes -> 8 weights: (q - 8)·s + z, no FMA */
                wv[j] = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes[j])),
                                                                  eight), sv), zv);
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < 4; j++)
                    acc[m * RT + r] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xs + m * K + b * QB + 8 * j), acc[m * RT + r]);
        }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < RT; r++) out[m * R + r] = hsum(acc[m * RT + r]);
}

static inline __attribute__((always_inline)) void tile_int8_exact(const QLayer *L, int64_t n, int RT, int64_t M,
        const float *x, const float *s, float *out) {
    int64_t K = L->K, G = L->G, nfull = K / QB, ng = G ? K / G : 1, bpg = G ? G / QB : 1;
    const int8_t *w = (const int8_t *)L->w + n * K;
    __m256 acc[MAX_M * R];
    for (int64_t i = 0; i < M * RT; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nfull; b++)
        for (int r = 0; r < RT; r++) {
            __m256 sv = _mm256_set1_ps(s[r * ng + (G ? b / bpg : 0)]), wv[4];
            const int8_t *wb = w + r * K + b * QB;
            for (int j = 0; j < 4; j++)
                wv[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wb + 8 * j)))),
                                      sv);
            for (int64_t m = 0; m < M; m++)
                for (int j = 0; j < 4; j++)
                    acc[m * RT + r] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + m * K + b * QB + 8 * j), acc[m * RT + r]);
        }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < RT; r++) {
            float a = hsum(acc[m * RT + r]);
            for (int64_t k = nfull * QB; k < K; k++)  /* ragged tail (per channel only) */
                a += (float)w[r * K + k] * s[r * ng + (G ? k / G : 0)] * x[m * K + k];
            out[m * R + r] = a;
        }
}
#else
#define EXACT_SIMD 0
#endif
#if EXACT_SIMD
/* A tile of R rows against mc activation rows: the whole tile for one, pairs of rows for several,
 * with mc spelled out as a constant up to 8 (batched decoding) so the compiler keeps the accumulators
 * in registers: SmolLM2 Q4_1 kept at batch 8 went from ~277 to ~350 tok/s on our 2-core CPU
 * (one tile of R rows for all M kept 8·M accumulators in memory). */
#define PAIRS(TILE, MC) for (int rr = 0; rr < R; rr += 2) TILE(rr, MC)
#define BY_M(TILE) switch (mc) { \
    case 1: TILE(0, 1); break; \
    case 2: PAIRS(TILE, 2); break; case 3: PAIRS(TILE, 3); break; case 4: PAIRS(TILE, 4); break; \
    case 5: PAIRS(TILE, 5); break; case 6: PAIRS(TILE, 6); break; case 7: PAIRS(TILE, 7); break; \
    case 8: PAIRS(TILE, 8); break; default: PAIRS(TILE, mc); }
#endif

/* Portable exact rows (machines without AVX-512, and the last N % R rows): the same Ŵ, summed in order. */
static float row_exact(const QLayer *L, int64_t n, const float *x) {  /* x in natural order */
    int64_t K = L->K, G = L->G, ng = G ? K / G : 1;
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float sg = load_f(L->s, L->s_type, n * ng + (G ? k / G : 0)), wk;
        if (L->bits == 4) {
            uint8_t byte = ((const uint8_t *)L->w)[n * (K / 2) + k / 2];
            float q = (float)(((k % 2) ? byte >> 4 : byte & 0xF) - 8);
            wk = q * sg + load_f(L->z, L->z_type, n * ng + k / G);
        } else {
            wk = (float)((const int8_t *)L->w)[n * K + k] * sg;
        }
        acc += wk * x[k];
    }
    return acc;
}

/* y (M, N) with float activations (QLayer.exact). xf: x as fp32, (M, K); for int4 also `xsplit`, the
 * same rows in the int4 block order. */
static void qlinear_exact(const QLayer *L, const float *xf, const float *xsplit, int64_t M, float *y, int n_threads) {
    int64_t N = L->N, K = L->K;
    if (n_threads < 1 || N * K < MIN_PARALLEL) n_threads = 1;
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t t = 0; t < (N + R - 1) / R; t++) {
        int64_t n = t * R, rows = N - n < R ? N - n : R;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_M - 1) {
            int64_t mc = M - m0 < MAX_M - 1 ? M - m0 : MAX_M - 1;
            float out[MAX_M * R];
#if EXACT_SIMD
            if (rows == R) {
                int64_t ng = L->G ? K / L->G : 1;
                float sbuf[R * ng], zbuf[R * ng];  /* scales/zeros as fp32 when they are bf16/fp16 */
                const float *s = rows_f32(L->s, L->s_type, n, ng, sbuf);
                if (L->bits == 4) {
                    const float *z = rows_f32(L->z, L->z_type, n, ng, zbuf), *xm = xsplit + m0 * K;
#define T4(rr, MC) tile_int4_exact(L, n + (rr), (MC) == 1 ? R : 2, MC, xm, s + (rr) * ng, z + (rr) * ng, out + (rr))
                    BY_M(T4)
                } else {
                    const float *xm = xf + m0 * K;
#define T8(rr, MC) tile_int8_exact(L, n + (rr), (MC) == 1 ? R : 2, MC, xm, s + (rr) * ng, out + (rr))
                    BY_M(T8)
                }
            } else
#endif
            for (int64_t m = 0; m < mc; m++)
                for (int64_t r = 0; r < rows; r++) out[m * R + r] = row_exact(L, n + r, xf + (m0 + m) * K);
            for (int64_t m = 0; m < mc; m++)
                for (int64_t r = 0; r < rows; r++)
                    y[(m0 + m) * N + n + r] = out[m * R + r] + (L->bias ? L->bias[n + r] : 0.0f);
        }
    }
}

/* Σ a·b (quant_cpu.h): 4 independent sums of 8 lanes, so the FMA unit never waits on its last result,
 * then 8 lanes at a time, then one by one. */
float minillm_dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#if USE_AVX2
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j), acc[j]);
    for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
    sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* The portable version, one row (also the last N % R rows of the AVX2 build). */
static float row_int4(const uint8_t *w, int64_t n, int64_t K, int64_t G, const void *s, int st, const void *z,
                      int zt, const int8_t *xq, const float *d, const float *gsx, const float *gdsq) {
    int64_t ng = K / G, bpg = G / QB;
    float acc = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        float sg = load_f(s, st, n * ng + g), zg = load_f(z, zt, n * ng + g);
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++)
            acc += sg * d[b] * (float)dot_int4_scalar(w + n * (K / 2) + b * QB / 2, xq + b * QB);
        acc += zg * gsx[g] - 8.0f * sg * gdsq[g];
    }
    return acc;
}

static float row_int8(const int8_t *w, int64_t n, int64_t K, int64_t G, const void *s, int st,
                      const int8_t *xq, const float *d) {
    int64_t nb = (K + QB - 1) / QB, ng = G ? K / G : 1;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int len = K - b * QB < QB ? (int)(K - b * QB) : QB;
        float sg = G ? load_f(s, st, n * ng + b * QB / G) : 1.0f;
        acc += sg * d[b] * (float)dot_int8_scalar(w + n * K + b * QB, xq + b * QB, len);
    }
    return G ? acc : acc * load_f(s, st, n);
}

/* --- 4. the entry point ------------------------------------------------------------------------ */

/* y (M, N) fp32 = x (M, K) @ Ŵᵀ + b. Threads split the N outputs in tiles of R rows: each thread
 * reads its rows of W once and, for M > 1, dots each unpacked block with all M activation rows
 * (up to 15 per pass; more are taken in chunks, though cpu_kernel.py sends M >= 16 to a float GEMM).
 * Returns 0, or -1 when the scratch buffer cannot be allocated. */
int minillm_qlinear(const QLayer *L, const void *x, int x_type, int64_t M, float *y, int n_threads) {
    int64_t N = L->N, K = L->K, G = L->G, nb = (K + QB - 1) / QB, ng = G ? K / G : 1;
    int split = L->bits == 4;
    if (L->exact) {  /* x as fp32, and for int4 a copy in the block order (evens, then odds) */
        float *xf = malloc(sizeof(float) * (size_t)(M * K * (split ? 2 : 1)));
        if (!xf) return -1;
        float *xsplit = xf + M * K;
        for (int64_t i = 0; i < M * K; i++) xf[i] = load_f(x, x_type, i);
        if (split)
            for (int64_t i = 0; i < M * K; i++) {
                int64_t j = i % QB;  /* K % 32 == 0 for int4 */
                xsplit[i - j + (j % 2) * (QB / 2) + j / 2] = xf[i];
            }
        qlinear_exact(L, xf, xsplit, M, y, n_threads);
        free(xf);
        return 0;
    }
    char *scratch = malloc((size_t)M * (nb * QB + nb * sizeof(float) + 2 * ng * sizeof(float)));
    if (!scratch) return -1;
    int8_t *xq = (int8_t *)scratch;
    float *d = (float *)(scratch + M * nb * QB), *gsx = d + M * nb, *gdsq = gsx + M * ng;
    size_t x_bytes = x_type == F32 ? 4 : 2;
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * K * x_bytes, x_type, K, G, split, xq + m * nb * QB, d + m * nb,
                     gsx + m * ng, gdsq + m * ng);
    if (n_threads < 1 || N * K < MIN_PARALLEL) n_threads = 1;  /* small layer: waking threads costs more */
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t t = 0; t < (N + R - 1) / R; t++) {
        int64_t n = t * R, rows = N - n < R ? N - n : R;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_M - 1) {  /* activation rows in chunks a tile can hold */
            int64_t mc = M - m0 < MAX_M - 1 ? M - m0 : MAX_M - 1;
            const int8_t *xm = xq + m0 * nb * QB;
            const float *dm = d + m0 * nb, *gsxm = gsx + m0 * ng, *gdsqm = gdsq + m0 * ng;
            float out[MAX_M * R];  /* (mc, R) */
#if USE_AVX2
            if (rows == R) {
                float sbuf[R * ng], zbuf[R * ng];  /* scales/zeros as fp32 when they are bf16/fp16 */
                if (split) {
                    if (mc == 1) tile_int4(L, n, 1, xm, dm, gsxm, sbuf, zbuf, out);  /* constant M = 1: */
                    else tile_int4(L, n, mc, xm, dm, gsxm, sbuf, zbuf, out);     /* registers, see above */
                } else {
                    if (mc == 1) tile_int8(L, n, 1, xm, dm, sbuf, out);
                    else tile_int8(L, n, mc, xm, dm, sbuf, out);
                }
            } else
#endif
            for (int64_t m = 0; m < mc; m++)
                for (int64_t r = 0; r < rows; r++)
                    out[m * R + r] = split ? row_int4(L->w, n + r, K, G, L->s, L->s_type, L->z, L->z_type,
                                                      xm + m * nb * QB, dm + m * nb, gsxm + m * ng, gdsqm + m * ng)
                                           : row_int8(L->w, n + r, K, G, L->s, L->s_type, xm + m * nb * QB,
                                                      dm + m * nb);
            for (int64_t m = 0; m < mc; m++)
                for (int64_t r = 0; r < rows; r++)
                    y[(m0 + m) * N + n + r] = out[m * R + r] + (L->bias ? L->bias[n + r] : 0.0f);
        }
    }
    free(scratch);
    return 0;
}

/* Ŵ (N, K) fp32, for large M: there a float GEMM (PyTorch's, MKL/oneDNN) beats per-row integer dots,
 * and expanding W once costs little next to M·N·K multiply-adds. */
void minillm_dequantize(const void *w, int bits, int64_t N, int64_t K, int64_t G, const void *s, int s_type,
                        const void *z, int z_type, float *out, int n_threads) {
    int64_t ng = G ? K / G : 1, len = G ? G : K;  /* per channel: one "group" spans the row */
    #pragma omp parallel for schedule(static) num_threads(n_threads < 1 ? 1 : n_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < ng; g++) {
            float sg = load_f(s, s_type, n * ng + g), *o = out + n * K + g * len;
            if (bits == 4) {  /* (q - 8)·s + z, two roundings as in PyTorch: bit-exact to the reference */
                float zg = load_f(z, z_type, n * ng + g);
                const uint8_t *p = (const uint8_t *)w + n * (K / 2) + g * len / 2;
                for (int64_t j = 0; j < len / 2; j++) {
                    o[2 * j] = (float)((p[j] & 0xF) - 8) * sg + zg;
                    o[2 * j + 1] = (float)((p[j] >> 4) - 8) * sg + zg;
                }
            } else {
                const int8_t *p = (const int8_t *)w + n * K + g * len;
                for (int64_t j = 0; j < len; j++) o[j] = (float)p[j] * sg;
            }
        }
    }
}

int minillm_has_avx2(void) { return USE_AVX2; }
int minillm_exact_is_simd(void) { return EXACT_SIMD; }  /* 3b's tiles compiled in (AVX-512 or AVX2) */
