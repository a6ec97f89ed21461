// Shared by lm_head.c and lm_head_q8.c: one 16-row vocabulary block's dot products, the inner
// loop of every float path. acc[i] (i < MT) accumulates x row i against block b of the packed
// weight `wp`; each lane's sum runs in the same order whatever MT is, so one row computed alone
// gives the same bits as that row computed inside a tile.
#ifndef PDSERVE_LM_HEAD_H
#define PDSERVE_LM_HEAD_H

#include <immintrin.h>
#include <stdint.h>

#define ROWS 16

#define F32_BLOCK(MT)                                                                      \
  const float *wb = wp + b * K * ROWS;                                                     \
  for (int64_t k = 0; k < K; k++) {                                                        \
    __m512 w = _mm512_loadu_ps(wb + k * ROWS);                                             \
    _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++)                                  \
      acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[i * ldx + k]), w, acc[i]);                 \
  }

#define BF16_BLOCK(MT)                                                                     \
  const uint16_t *wb = wp + b * K * ROWS;                                                  \
  for (int64_t k = 0; k < K; k += 2) {                                                     \
    __m512bh w = (__m512bh)_mm512_loadu_si512(wb + k * ROWS);                              \
    _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) {                                \
      int32_t pair = *(const int32_t *)(x + i * ldx + k);                                  \
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(pair), w);             \
    }                                                                                      \
  }

#endif
