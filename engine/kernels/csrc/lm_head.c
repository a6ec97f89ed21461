// LM head for small batches on x86 CPUs with AVX-512: out[m, v] = dot(x[m, :], w[v, :]), or,
// for greedy decoding, only each row's argmax over v (the logits are never written out).
//
// The weight is packed once into blocks of 16 vocabulary rows, interleaved along K so that one
// 512-bit load holds the same K step of 16 rows:
//   float32:  packed[b][k][r]        = w[16 b + r][k]
//   bfloat16: packed[b][k / 2][r][j] = w[16 b + r][k + j]   (j = 0, 1: one dpbf16 pair)
// Each x element (or bf16 pair) is broadcast and multiplied into 16 accumulators, one per
// row of x, so the weight streams through exactly once per 16 rows of x and no horizontal
// sum is ever needed. Rows past the vocabulary are zero in the packed weight and masked on
// store. Outputs are float32 whatever the input dtype.
//
// Argmax mode keeps, per row and per lane, the best value and its vocabulary index; a later
// block replaces them only when strictly greater, and the final pick among lanes holding the
// row's max is the lowest index: the first index of the maximum, as torch.argmax (NaN aside:
// a NaN logit is never picked here).
//
// Greedy decoding on CPUs with AVX512-VNNI goes through lm_head_q8.c instead, which returns
// the same index at a quarter of the multiply work; it reuses this file's block code through
// lm_head.h.
#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "lm_head.h"

// One tile of MT rows of x over vocabulary blocks [b0, b1): logits into `out` when it is not
// NULL, else each row's best value and index into best_val / best_idx.
#define DEFINE_TILE(NAME, T, BLOCK, MT)                                                    \
  static void NAME##_##MT(const T *x, int64_t ldx, int64_t K, const T *wp, int64_t V,      \
                          float *out, int64_t ldo, float *best_val, int32_t *best_idx,     \
                          int64_t b0, int64_t b1) {                                        \
    __m512 bestv[MT];                                                                      \
    __m512i besti[MT];                                                                     \
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); \
    for (int i = 0; i < MT; i++) {                                                         \
      bestv[i] = _mm512_set1_ps(-INFINITY);                                                \
      besti[i] = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(b0 * ROWS)), iota);          \
    }                                                                                      \
    for (int64_t b = b0; b < b1; b++) {                                                    \
      __m512 acc[MT];                                                                      \
      _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();  \
      BLOCK(MT)                                                                            \
      int64_t left = V - b * ROWS;                                                         \
      __mmask16 mask = left >= ROWS ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);   \
      if (out != NULL) {                                                                   \
        for (int i = 0; i < MT; i++) _mm512_mask_storeu_ps(out + i * ldo + b * ROWS, mask, acc[i]); \
        continue;                                                                          \
      }                                                                                    \
      __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(b * ROWS)), iota);      \
      for (int i = 0; i < MT; i++) {                                                       \
        __mmask16 gt = _mm512_mask_cmp_ps_mask(mask, acc[i], bestv[i], _CMP_GT_OQ);        \
        bestv[i] = _mm512_mask_mov_ps(bestv[i], gt, acc[i]);                               \
        besti[i] = _mm512_mask_mov_epi32(besti[i], gt, index);                             \
      }                                                                                    \
    }                                                                                      \
    if (out != NULL) return;                                                               \
    for (int i = 0; i < MT; i++) {                                                         \
      float top = _mm512_reduce_max_ps(bestv[i]);                                          \
      __mmask16 at_top = _mm512_cmp_ps_mask(bestv[i], _mm512_set1_ps(top), _CMP_EQ_OQ);    \
      __m512i idx = _mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), at_top, besti[i]); \
      best_val[i] = top;                                                                   \
      best_idx[i] = at_top ? _mm512_reduce_min_epi32(idx) : (int32_t)(b0 * ROWS);          \
    }                                                                                      \
  }

#define DEFINE_TILES(NAME, T, BLOCK)                                                       \
  DEFINE_TILE(NAME, T, BLOCK, 1)                                                           \
  DEFINE_TILE(NAME, T, BLOCK, 2)                                                           \
  DEFINE_TILE(NAME, T, BLOCK, 4)                                                           \
  DEFINE_TILE(NAME, T, BLOCK, 8)                                                           \
  DEFINE_TILE(NAME, T, BLOCK, 16)

DEFINE_TILES(lm_head_f32_tile, float, F32_BLOCK)
DEFINE_TILES(lm_head_bf16_tile, uint16_t, BF16_BLOCK)

// x[M, K] against vocabulary blocks [b0, b1), in tiles of `mt` rows of x (1, 2, 4, 8 or 16; M
// a multiple of it). Each tile streams the weight once, so the caller pads a small M up to one
// tile rather than splitting it. out[M, ldo] (columns [16 b0, min(V, 16 b1))) gets the logits;
// with out NULL, best_val[M] / best_idx[M] get each row's max over those columns and its index.
// Exported: decode_layer.c runs its small matmuls through it.
#define RANGE(NAME, T, TILE)                                                               \
  void NAME##_range(const T *x, int64_t M, int64_t ldx, int64_t K, const T *wp, int64_t V, \
                    float *out, int64_t ldo, float *best_val, int32_t *best_idx,          \
                    int64_t b0, int64_t b1, int64_t mt) {                                 \
    for (int64_t m = 0; m < M; m += mt) {                                                  \
      const T *xm = x + m * ldx;                                                           \
      float *om = out == NULL ? NULL : out + m * ldo;                                      \
      float *bv = best_val == NULL ? NULL : best_val + m;                                  \
      int32_t *bi = best_idx == NULL ? NULL : best_idx + m;                                \
      switch (mt) {                                                                        \
        case 16: TILE##_16(xm, ldx, K, wp, V, om, ldo, bv, bi, b0, b1); break;             \
        case 8: TILE##_8(xm, ldx, K, wp, V, om, ldo, bv, bi, b0, b1); break;               \
        case 4: TILE##_4(xm, ldx, K, wp, V, om, ldo, bv, bi, b0, b1); break;               \
        case 2: TILE##_2(xm, ldx, K, wp, V, om, ldo, bv, bi, b0, b1); break;               \
        default: TILE##_1(xm, ldx, K, wp, V, om, ldo, bv, bi, b0, b1); break;              \
      }                                                                                    \
    }                                                                                      \
  }

// The whole LM head on `threads` OpenMP threads (torch's own pool when torch loaded libgomp,
// as its CPU wheels do), each over an equal share of the vocabulary blocks: logits into
// out[M, ldo], or, with out NULL, each row's argmax into out_idx[M] (the first range holding
// the max wins ties, so the first index of the max overall).
#define DRIVER(NAME, T)                                                                    \
  RANGE(NAME, T, NAME##_tile)                                                              \
  int NAME(const T *x, int64_t M, int64_t ldx, int64_t K, const T *wp, int64_t V,          \
           float *out, int64_t ldo, int32_t *out_idx, int64_t mt, int64_t threads) {       \
    int64_t blocks = (V + ROWS - 1) / ROWS;                                                \
    if (mt < 1 || mt > 16 || (mt & (mt - 1)) || M % mt || (out == NULL && out_idx == NULL)) \
      return -1;                                                                           \
    threads = threads < 1 ? 1 : threads > blocks ? (blocks > 0 ? blocks : 1) : threads;    \
    float *pv = NULL;                                                                      \
    int32_t *pi = NULL;                                                                    \
    if (out == NULL) {                                                                     \
      pv = malloc(sizeof *pv * (size_t)(threads * M + 1));                                 \
      pi = malloc(sizeof *pi * (size_t)(threads * M + 1));                                 \
      if (pv == NULL || pi == NULL) {                                                      \
        free(pv), free(pi);                                                                \
        return -2;                                                                         \
      }                                                                                    \
    }                                                                                      \
    _Pragma("omp parallel for num_threads(threads) schedule(static, 1)")                   \
    for (int64_t p = 0; p < threads; p++)                                                  \
      NAME##_range(x, M, ldx, K, wp, V, out, ldo, pv ? pv + p * M : NULL,                  \
                   pi ? pi + p * M : NULL, blocks * p / threads, blocks * (p + 1) / threads, mt); \
    if (out != NULL) return 0;                                                             \
    for (int64_t m = 0; m < M; m++) {                                                      \
      int64_t best = m;                                                                    \
      for (int64_t p = 1; p < threads; p++)                                                \
        if (pv[p * M + m] > pv[best]) best = p * M + m;                                    \
      out_idx[m] = pi[best];                                                               \
    }                                                                                      \
    free(pv), free(pi);                                                                    \
    return 0;                                                                              \
  }

DRIVER(lm_head_f32, float)
DRIVER(lm_head_bf16, uint16_t)
