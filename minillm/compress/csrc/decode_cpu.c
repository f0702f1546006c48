/* One decode step of a Llama-family layer stack in C: every layer of a token, one call from Python.
 *
 * Built into the same library as quant_cpu.c (cpu_kernel.py); driven by minillm/generate/native.py,
 * which checks that the model is one this file knows and otherwise runs the flat Python step.
 *
 * Why it exists: at batch 1 a quantized SmolLM2-135M token costs ~14 ms of matmuls on our 2-core CPU,
 * and the flat Python step adds ~6 ms around them: 30 layers × ~25 small PyTorch ops (norms, RoPE,
 * the cache write, attention, SiLU, residual adds), each a few µs of dispatch for a few hundred
 * numbers of work. Here those ops are loops over those few hundred numbers, and the matmuls are
 * minillm_qlinear called directly (measured: 52.6 -> ~113 tokens/s at batch 1, docs/guides/real-models.md).
 * The ops are the ones the modules run, written out:
 *
 *   for each layer:                                       x (B, C): the residual stream, updated in place
 *     h = x / sqrt(mean(x²) + eps) · w1                     RMSNorm (model/layers.py)
 *     q, k, v = split(h @ Wqkvᵀ)                            H query heads, H_kv key and value heads of D
 *     q, k = rope(q, pos), rope(k, pos)                     interleaved pairs (model/positional.py Rotary)
 *     cache[layer][:, :, pos] = k, v
 *     a_h = Σ_t softmax_t(q_h·k_t / sqrt(D)) v_t            query head h reads K/V head h / (H / H_kv)
 *     x = x + a @ Woᵀ
 *     h = RMSNorm(x) · w2
 *     x = x + (silu(h @ Wgateᵀ) · (h @ Wupᵀ)) @ Wdownᵀ      SwiGLU (model/layers.py FeedForward)
 *
 * Not bit for bit the PyTorch step (sums in another order: ~1e-6 relative on the logits), which is
 * why it is its own path with its own test against the flat step (tests/test_native_decode.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_cpu.h"

typedef struct {
    const QLayer *qkv, *proj, *gate, *up, *down;  /* the five linears: quantized, or bits = 32 (float32) */
    const float *norm1, *norm2;                   /* RMSNorm weights (C,) */
    float eps1, eps2;
} DecLayer;

typedef struct {
    int64_t n_layer, C, H, H_kv, D, F, max_pos;   /* F: the FFN's hidden width; max_pos: rows of cos/sin */
    const float *cos, *sin;                       /* (max_pos, D/2): RoPE's angles, pos·θ_i */
    const DecLayer *layers;
} DecModel;

/* y (M, N) = x (M, K) @ Wᵀ + b for a float32 W (N, K) (QLayer bits = 32, w the weight, s unused): the
 * float model's linears at decode sizes. Bound by reading W once, like the quantized kernel: each
 * weight row is dotted with the M activation rows while it sits in L1. Threads take rows. */
#if defined(__AVX2__) && defined(__FMA__)
/* Several activation rows (batched decoding): 4 weight rows × FM activation rows per tile, each
 * loaded vector used FM (or 4) times, so the FMA unit rather than the loads sets the pace; the
 * accumulators fill the registers: FM = 2 on AVX2's 16, 4 on AVX-512's 32. One dot per row would
 * load two vectors per FMA and run ~2x slower at batch 8 (fp32 SmolLM2, 2-core CPU). */
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define FM 4
#else
#define FM 2
#endif
static inline __attribute__((always_inline)) void tile_f32(const float *W, int64_t K, const float *x, int64_t mt,
                                                           float out[FM][4]) {
    __m256 acc[FM][4];
    for (int m = 0; m < FM; m++)
        for (int r = 0; r < 4; r++) acc[m][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w[4];
        for (int r = 0; r < 4; r++) w[r] = _mm256_loadu_ps(W + r * K + k);
        for (int64_t m = 0; m < mt; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * K + k);
            for (int r = 0; r < 4; r++) acc[m][r] = _mm256_fmadd_ps(w[r], xv, acc[m][r]);
        }
    }
    for (int64_t m = 0; m < mt; m++)
        for (int r = 0; r < 4; r++) {
            float sum = hsum(acc[m][r]);
            for (int64_t i = k; i < K; i++) sum += W[r * K + i] * x[m * K + i];
            out[m][r] = sum;
        }
}
#define HAVE_TILE_F32 1
#else
#define HAVE_TILE_F32 0
#endif

static void linear_f32(const QLayer *L, const float *x, int64_t M, float *y, int n_threads) {
    int64_t N = L->N, K = L->K;
    const float *W = (const float *)L->w;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (N * K >= (1 << 16))
    for (int64_t t = 0; t < (N + 3) / 4; t++) {
        int64_t n = 4 * t, rows = N - n < 4 ? N - n : 4, m = 0;
#if HAVE_TILE_F32
        if (rows == 4 && M > 1)
            for (; m < M; m += FM) {  /* a constant FM keeps the accumulators in registers */
                float out[FM][4];
                int64_t mt = M - m < FM ? M - m : FM;
                if (mt == FM) tile_f32(W + n * K, K, x + m * K, FM, out);
                else tile_f32(W + n * K, K, x + m * K, mt, out);
                for (int64_t i = 0; i < mt; i++)
                    for (int r = 0; r < 4; r++) y[(m + i) * N + n + r] = out[i][r] + (L->bias ? L->bias[n + r] : 0.0f);
            }
#endif
        for (; m < M; m++)  /* one activation row (batch 1: bound by reading W), or the last N % 4 rows */
            for (int64_t r = 0; r < rows; r++)
                y[m * N + n + r] = minillm_dot_f32(W + (n + r) * K, x + m * K, K) + (L->bias ? L->bias[n + r] : 0.0f);
    }
}

/* Every linear of the step: float32 weights here, quantized ones in quant_cpu.c. */
static int linear(const QLayer *L, const float *x, int64_t M, float *y, int n_threads) {
    if (L->bits == 32) {
        linear_f32(L, x, M, y, n_threads);
        return 0;
    }
    return minillm_qlinear(L, x, F32, M, y, n_threads);
}

static void rms_norm(const float *x, const float *w, float eps, int64_t B, int64_t C, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C;
        float ss = 0.0f;
        for (int64_t c = 0; c < C; c++) ss += xb[c] * xb[c];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        for (int64_t c = 0; c < C; c++) out[b * C + c] = xb[c] * r * w[c];
    }
}

/* (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) for each channel pair of `n` heads of D. */
static void rope(float *x, int64_t n, int64_t D, const float *cos, const float *sin) {
    for (int64_t h = 0; h < n; h++)
        for (int64_t i = 0; i < D / 2; i++) {
            float x0 = x[h * D + 2 * i], x1 = x[h * D + 2 * i + 1];
            x[h * D + 2 * i] = x0 * cos[i] - x1 * sin[i];
            x[h * D + 2 * i + 1] = x0 * sin[i] + x1 * cos[i];
        }
}

/* One query head over T cached keys: out (D,) = Σ_t p_t v_t, p = softmax(q·k_t · scale). */
static void attend(const float *q, const float *k, const float *v, int64_t T, int64_t D, float scale,
                   float *p, float *out) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < T; t++) {  /* (a plain loop's sum would stay scalar: C keeps its order) */
        p[t] = minillm_dot_f32(q, k + t * D, D) * scale;
        mx = p[t] > mx ? p[t] : mx;
    }
    for (int64_t t = 0; t < T; t++) sum += (p[t] = expf(p[t] - mx));
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < T; t++) {  /* across i: no reduction, so the compiler vectorizes it */
        float w = p[t] / sum;
        for (int64_t i = 0; i < D; i++) out[i] += w * v[t * D + i];
    }
}

/* x (B, C) fp32, updated in place: the residual stream after every layer, for the token at `pos` of
 * each of the B rows (all rows at the same position: no padding). k_cache, v_cache: the whole cache,
 * (n_layer, B, H_kv, T_max, D) fp32, of which positions < pos are filled; this step writes pos.
 * Returns 0, or -1 when scratch memory (or the matmul's) cannot be allocated. */
int minillm_decode_step(const DecModel *m, float *x, int64_t B, int64_t pos, float *k_cache, float *v_cache,
                        int64_t T_max, int n_threads) {
    int64_t C = m->C, H = m->H, Hkv = m->H_kv, D = m->D, F = m->F, T = pos + 1, QKV = (H + 2 * Hkv) * D;
    if (pos < 0 || pos >= T_max || pos >= m->max_pos) return -2;
    float *buf = malloc(sizeof(float) * (size_t)(B * (C + QKV + H * D + 2 * F + C) + B * H * T));
    if (!buf) return -1;
    float *h = buf, *qkv = h + B * C, *att = qkv + B * QKV, *g = att + B * H * D, *u = g + B * F,
          *o = u + B * F, *p = o + B * C;
    const float *cos = m->cos + pos * (D / 2), *sin = m->sin + pos * (D / 2);
    float scale = 1.0f / sqrtf((float)D);
    int rc = 0;
    for (int64_t l = 0; l < m->n_layer && !rc; l++) {
        const DecLayer *L = m->layers + l;
        float *kc = k_cache + l * B * Hkv * T_max * D, *vc = v_cache + l * B * Hkv * T_max * D;
        rms_norm(x, L->norm1, L->eps1, B, C, h);
        if ((rc = linear(L->qkv, h, B, qkv, n_threads))) break;
        for (int64_t b = 0; b < B; b++) {
            float *row = qkv + b * QKV;  /* H query heads, then H_kv keys, then H_kv values */
            rope(row, H + Hkv, D, cos, sin);  /* queries and keys together */
            for (int64_t j = 0; j < Hkv; j++) {
                memcpy(kc + ((b * Hkv + j) * T_max + pos) * D, row + (H + j) * D, sizeof(float) * D);
                memcpy(vc + ((b * Hkv + j) * T_max + pos) * D, row + (H + Hkv + j) * D, sizeof(float) * D);
            }
        }
        /* heads are independent: threads take them when there is enough work to share (long contexts) */
        #pragma omp parallel for schedule(static) num_threads(n_threads) if (T * D * H * B >= (1 << 16))
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, hh = bh % H, j = hh / (H / Hkv);
            const float *kj = kc + (b * Hkv + j) * T_max * D, *vj = vc + (b * Hkv + j) * T_max * D;
            attend(qkv + b * QKV + hh * D, kj, vj, T, D, scale, p + bh * T, att + b * H * D + hh * D);
        }
        if ((rc = linear(L->proj, att, B, o, n_threads))) break;
        for (int64_t i = 0; i < B * C; i++) x[i] += o[i];
        rms_norm(x, L->norm2, L->eps2, B, C, h);
        if ((rc = linear(L->gate, h, B, g, n_threads))) break;
        if ((rc = linear(L->up, h, B, u, n_threads))) break;
        for (int64_t i = 0; i < B * F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];  /* silu(g)·u */
        if ((rc = linear(L->down, g, B, o, n_threads))) break;
        for (int64_t i = 0; i < B * C; i++) x[i] += o[i];
    }
    free(buf);
    return rc;
}
