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
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define USE_AVX2 1
#else
#define USE_AVX2 0
#endif

#define QB 32                     /* activation block: 32 inputs share one scale d_b */
#define MIN_PARALLEL (1 << 17)    /* weights below which one thread is faster than waking the others */

enum { F32 = 0, BF16 = 1, F16 = 2 };  /* dtype codes for x, scales and zeros */

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
/* Row x (K,) -> xq (nb·QB,) int8, d (nb,) scales, sq (nb,) Σxq, sx (nb,) exact Σx, nb = ceil(K/QB).
 * A ragged last block (int8 with K % 32 != 0) is zero-padded. `split` stores each block as its even
 * entries then its odd entries (the int4 layout above). Rounding is half-to-even, as torch.round. */
static void quantize_row(const void *x, int x_type, int64_t K, int split,
                         int8_t *xq, float *d, int32_t *sq, float *sx) {
    int64_t nb = (K + QB - 1) / QB;
    for (int64_t b = 0; b < nb; b++) {
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
            int pos = split ? (i % 2) * (QB / 2) + i / 2 : i;  /* evens first, then odds */
            xq[b * QB + pos] = q;
        }
        d[b] = db; sq[b] = isum; sx[b] = sum;
    }
}

/* --- 2. one block of 32 integer products ------------------------------------------------------ */
#if USE_AVX2
static inline __m256i dot_int4_block(const uint8_t *w, const int8_t *xq) {  /* -> 8 int32 partial sums */
    __m128i bytes = _mm_loadu_si128((const __m128i *)w);                      /* 16 bytes = 32 codes */
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes),
                                 _mm256_set1_epi8(0x0F));                     /* [16 even k | 16 odd k] */
    __m256i p16 = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)xq));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
static inline __m256i dot_int8_block(const int8_t *w, const int8_t *xq) {
    __m256i q = _mm256_loadu_si256((const __m256i *)w), v = _mm256_loadu_si256((const __m256i *)xq);
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(v, q));  /* |q| · sign(q)·xq */
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

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

/* --- 3. one output: row n of W against one quantized activation row ------------------------- */
/* G = group size (int4, grouped int8) or 0 (int8 per channel). ng = groups per row. */
static float row_int4(const uint8_t *w, const void *s, int st, const void *z, int zt, int64_t n, int64_t K,
                      int64_t G, const int8_t *xq, const float *d, const int32_t *sq, const float *sx) {
    int64_t ng = K / G, bpg = G / QB;
    float acc_s = 0.0f, corr = 0.0f;
#if USE_AVX2
    __m256 acc = _mm256_setzero_ps();
#endif
    for (int64_t g = 0; g < ng; g++) {
        float sg = load_f(s, st, n * ng + g), zg = load_f(z, zt, n * ng + g), xsum = 0.0f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            xsum += sx[b];
            corr -= 8.0f * sg * d[b] * (float)sq[b];                  /* the -8 of (q - 8), per block */
#if USE_AVX2
            __m256 p = _mm256_cvtepi32_ps(dot_int4_block(w + b * QB / 2, xq + b * QB));
            acc = _mm256_fmadd_ps(p, _mm256_set1_ps(sg * d[b]), acc);
#else
            acc_s += sg * d[b] * (float)dot_int4_scalar(w + b * QB / 2, xq + b * QB);
#endif
        }
        corr += zg * xsum;                                              /* z_g · Σ_{k in g} x, exact x */
    }
#if USE_AVX2
    acc_s = hsum(acc);
#endif
    return acc_s + corr;
}

static float row_int8(const int8_t *w, const void *s, int st, int64_t n, int64_t K, int64_t G,
                      const int8_t *xq, const float *d) {
    int64_t nfull = K / QB, ng = G ? K / G : 1, bpg = G ? G / QB : nfull;
    float acc_s = 0.0f;
#if USE_AVX2
    __m256 acc = _mm256_setzero_ps();
#endif
    for (int64_t g = 0, b = 0; b < nfull; g++) {
        float sg = G ? load_f(s, st, n * ng + g) : 1.0f;  /* per channel: s[n] is applied at the end */
        for (int64_t end = b + bpg; b < end; b++) {
#if USE_AVX2
            __m256 p = _mm256_cvtepi32_ps(dot_int8_block(w + b * QB, xq + b * QB));
            acc = _mm256_fmadd_ps(p, _mm256_set1_ps(sg * d[b]), acc);
#else
            acc_s += sg * d[b] * (float)dot_int8_scalar(w + b * QB, xq + b * QB, QB);
#endif
        }
    }
#if USE_AVX2
    acc_s = hsum(acc);
#endif
    if (K % QB)  /* ragged tail (per channel only: groups are multiples of 32) */
        acc_s += d[nfull] * (float)dot_int8_scalar(w + nfull * QB, xq + nfull * QB, (int)(K % QB));
    return G ? acc_s : acc_s * load_f(s, st, n);
}

/* --- 4. the entry point ------------------------------------------------------------------------ */
/* One quantized layer, described once (cpu_kernel.py builds it when the layer's tensors change), so
 * that a call from Python passes 6 arguments instead of 15: ctypes converts each one, every call. */
typedef struct {
    const void *w; int64_t N, K, G;     /* codes (N, K) int8 or (N, K/2) uint8; G = 0: int8 per channel */
    int32_t bits, s_type, z_type, pad;  /* 8 or 4; dtype codes of scales and zeros */
    const void *s, *z; const float *bias;
} QLayer;

/* y (M, N) fp32 = x (M, K) @ Ŵᵀ + b. Threads split the N outputs: each thread reads its rows of W
 * once and, for M > 1, reuses each weight row (from L1) for all M activation rows. Returns 0, or -1
 * when the scratch buffer cannot be allocated. */
int minillm_qlinear(const QLayer *L, const void *x, int x_type, int64_t M, float *y, int n_threads) {
    int64_t N = L->N, K = L->K, G = L->G, nb = (K + QB - 1) / QB;
    size_t per_row = nb * QB + nb * (sizeof(float) * 2 + sizeof(int32_t));
    char *scratch = malloc((size_t)M * per_row);
    if (!scratch) return -1;
    int8_t *xq = (int8_t *)scratch;
    float *d = (float *)(scratch + M * nb * QB), *sx = d + M * nb;
    int32_t *sq = (int32_t *)(sx + M * nb);
    size_t x_bytes = x_type == F32 ? 4 : 2;
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * K * x_bytes, x_type, K, L->bits == 4, xq + m * nb * QB, d + m * nb,
                     sq + m * nb, sx + m * nb);
    if (n_threads < 1 || N * K < MIN_PARALLEL) n_threads = 1;  /* small layer: waking threads costs more */
    #pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m++) {
            float acc = L->bits == 4
                ? row_int4((const uint8_t *)L->w + n * (K / 2), L->s, L->s_type, L->z, L->z_type, n, K, G,
                           xq + m * nb * QB, d + m * nb, sq + m * nb, sx + m * nb)
                : row_int8((const int8_t *)L->w + n * K, L->s, L->s_type, n, K, G, xq + m * nb * QB, d + m * nb);
            y[m * N + n] = acc + (L->bias ? L->bias[n] : 0.0f);
        }
    }
    free(scratch);
    return 0;
}

/* Ŵ (N, K) fp32, for large M: there a float GEMM (PyTorch's, MKL/oneDNN) beats per-row integer dots,
 * and expanding W once costs little next to M·N·K multiply-adds. */
void minillm_dequantize(const void *w, int bits, int64_t N, int64_t K, int64_t G, const void *s, int s_type,
                        const void *z, int z_type, float *out, int n_threads) {
    int64_t ng = G ? K / G : 1;
    #pragma omp parallel for schedule(static) num_threads(n_threads < 1 ? 1 : n_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) {
            int64_t gi = n * ng + (G ? k / G : 0);
            if (bits == 4) {
                uint8_t byte = ((const uint8_t *)w)[n * (K / 2) + k / 2];
                int q = k % 2 ? byte >> 4 : byte & 0xF;
                out[n * K + k] = (float)(q - 8) * load_f(s, s_type, gi) + load_f(z, z_type, gi);
            } else {
                out[n * K + k] = (float)((const int8_t *)w)[n * K + k] * load_f(s, s_type, gi);
            }
        }
    }
}

int minillm_has_avx2(void) { return USE_AVX2; }
