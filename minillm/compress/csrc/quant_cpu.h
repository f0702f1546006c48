/* What the C files of the CPU backend share: the description of one quantized layer, and the matmul.
 * quant_cpu.c defines them; decode_cpu.c (a whole decode step) calls the matmul without going
 * back through Python. cpu_kernel.py compiles the .c files together into one library. */
#ifndef MINILLM_QUANT_CPU_H
#define MINILLM_QUANT_CPU_H
#include <stdint.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };  /* dtype codes for x, scales and zeros */

/* One quantized layer, described once (cpu_kernel.py builds it when the layer's tensors change), so
 * that a call from Python passes 6 arguments instead of 15: ctypes converts each one, every call. */
typedef struct {
    const void *w; int64_t N, K, G;     /* codes (N, K) int8 or (N, K/2) uint8; G = 0: int8 per channel */
    int32_t bits, s_type, z_type;       /* 8 or 4; dtype codes of scales and zeros */
    int32_t exact;                      /* 1: x stays float, Ŵ rebuilt value for value (quant_cpu.c 3b) */
    const void *s, *z; const float *bias;
} QLayer;

/* y (M, N) fp32 = x (M, K) @ Ŵᵀ + b; 0, or -1 without memory for the quantized activations. */
int minillm_qlinear(const QLayer *L, const void *x, int x_type, int64_t M, float *y, int n_threads);

/* Σ_i a[i]·b[i] over n floats, vectorized where the build has AVX2 (a plain C sum stays scalar: C
 * keeps its order). The quantized tiles' zero term and decode_cpu.c's float linears and attention. */
float minillm_dot_f32(const float *a, const float *b, int64_t n);

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline float hsum(__m256 v) {  /* the 8 lanes' sum */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#endif
