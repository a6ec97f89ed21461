// LM head for small batches on x86 CPUs with AVX-512: out[m, v] = dot(x[m, :], w[v, :]).
//
// The weight is packed once into blocks of 16 vocabulary rows, interleaved along K so that one
// 512-bit load holds the same K step of 16 rows:
//   float32:  packed[b][k][r]        = w[16 b + r][k]
//   bfloat16: packed[b][k / 2][r][j] = w[16 b + r][k + j]   (j = 0, 1: one dpbf16 pair)
// Each x element (or bf16 pair) is broadcast and multiplied into 16 accumulators, one per
// row of x, so the weight streams through exactly once per 16 rows of x and no horizontal
// sum is ever needed. Rows past the vocabulary are zero in the packed weight and masked on
// store. Outputs are float32 whatever the input dtype.
#include <immintrin.h>
#include <stdint.h>

#define ROWS 16

#define DEFINE_F32(MT)                                                                     \
  static void f32_tile_##MT(const float *x, int64_t ldx, int64_t K, const float *wp,       \
                            int64_t V, float *out, int64_t ldo, int64_t b0, int64_t b1) {  \
    for (int64_t b = b0; b < b1; b++) {                                                    \
      __m512 acc[MT];                                                                      \
      _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();  \
      const float *wb = wp + b * K * ROWS;                                                 \
      for (int64_t k = 0; k < K; k++) {                                                    \
        __m512 w = _mm512_loadu_ps(wb + k * ROWS);                                         \
        _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++)                              \
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w, acc[i]);             \
      }                                                                                    \
      int64_t left = V - b * ROWS;                                                         \
      __mmask16 mask = left >= ROWS ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);   \
      _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++)                                \
        _mm512_mask_storeu_ps(out + i * ldo + b * ROWS, mask, acc[i]);                     \
    }                                                                                      \
  }

#define DEFINE_BF16(MT)                                                                    \
  static void bf16_tile_##MT(const uint16_t *x, int64_t ldx, int64_t K, const uint16_t *wp, \
                             int64_t V, float *out, int64_t ldo, int64_t b0, int64_t b1) { \
    for (int64_t b = b0; b < b1; b++) {                                                    \
      __m512 acc[MT];                                                                      \
      _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();  \
      const uint16_t *wb = wp + b * K * ROWS;                                              \
      for (int64_t k = 0; k < K; k += 2) {                                                 \
        __m512bh w = (__m512bh)_mm512_loadu_si512(wb + k * ROWS);                          \
        _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) {                            \
          int32_t pair = *(const int32_t *)(x + i * ldx + k);                              \
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), w);         \
        }                                                                                  \
      }                                                                                    \
      int64_t left = V - b * ROWS;                                                         \
      __mmask16 mask = left >= ROWS ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);   \
      _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++)                                \
        _mm512_mask_storeu_ps(out + i * ldo + b * ROWS, mask, acc[i]);                     \
    }                                                                                      \
  }

DEFINE_F32(1) DEFINE_F32(2) DEFINE_F32(4) DEFINE_F32(8) DEFINE_F32(16)
DEFINE_BF16(1) DEFINE_BF16(2) DEFINE_BF16(4) DEFINE_BF16(8) DEFINE_BF16(16)

// out[M, ldo] (columns [16 b0, min(V, 16 b1)) written) = x[M, K] . w^T over vocab blocks
// [b0, b1), in tiles of `mt` rows of x (1, 2, 4, 8 or 16; M a multiple of it). Each tile streams
// the weight once, so the caller pads a small M up to one tile rather than splitting it.
#define DRIVER(NAME, T, TILE)                                                              \
  int NAME(const T *x, int64_t M, int64_t ldx, int64_t K, const T *wp, int64_t V,          \
           float *out, int64_t ldo, int64_t b0, int64_t b1, int64_t mt) {                  \
    if (M % mt != 0) return -1;                                                            \
    for (int64_t m = 0; m < M; m += mt) {                                                  \
      const T *xm = x + m * ldx;                                                           \
      float *om = out + m * ldo;                                                           \
      switch (mt) {                                                                        \
        case 16: TILE##16(xm, ldx, K, wp, V, om, ldo, b0, b1); break;                      \
        case 8: TILE##8(xm, ldx, K, wp, V, om, ldo, b0, b1); break;                        \
        case 4: TILE##4(xm, ldx, K, wp, V, om, ldo, b0, b1); break;                        \
        case 2: TILE##2(xm, ldx, K, wp, V, om, ldo, b0, b1); break;                        \
        case 1: TILE##1(xm, ldx, K, wp, V, om, ldo, b0, b1); break;                        \
        default: return -1;                                                                \
      }                                                                                    \
    }                                                                                      \
    return 0;                                                                              \
  }

DRIVER(lm_head_f32, float, f32_tile_)
DRIVER(lm_head_bf16, uint16_t, bf16_tile_)
