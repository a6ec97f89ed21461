// RMSNorm and SiLU-and-mul over bfloat16 rows on x86 CPUs with AVX-512: one pass each where
// torch's ops make several (float32 copies, powers, means, casts). Float32 inside, rounded to
// bfloat16 where the reference implementations round:
//
//   rms_norm_bf16:  out = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps)))   (HF's LlamaRMSNorm)
//   silu_mul_bf16:  out = bf16(bf16(silu(gate)) * up), rows of gate_up = [gate | up]
//
// Rows are split over OpenMP threads. silu_mul matched torch bit for bit here; rms_norm sums the
// squares in another order than torch's mean, so about 1 output in 200,000 differs by one
// bfloat16 step.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

// out[t, i] = bf16(bf16(silu(gate[t, i])) * up[t, i]); gate_up rows [gate | up], I % 16 == 0
int silu_mul_bf16(const uint16_t *gate_up, int64_t T, int64_t I, uint16_t *out, int64_t threads) {
  if (I % 16) return -1;
  _Pragma("omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)")
  for (int64_t t = 0; t < T; t++) {
    const uint16_t *g = gate_up + t * 2 * I, *u = g + I;
    uint16_t *o = out + t * I;
    for (int64_t i = 0; i < I; i += 16) {
      __m512 x = widen_bf16(_mm256_loadu_si256((const __m256i *)(g + i)));
      __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
      __m512 one = _mm512_set1_ps(1.0f);
      __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, e));      // x >= 0
      __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
      sig = _mm512_mask_mul_ps(sig, neg, e, sig);                  // x < 0: e / (1 + e)
      __m512 s = widen_bf16(narrow_bf16(_mm512_mul_ps(x, sig)));
      __m512 y = _mm512_mul_ps(s, widen_bf16(_mm256_loadu_si256((const __m256i *)(u + i))));
      _mm256_storeu_si256((__m256i *)(o + i), narrow_bf16(y));
    }
  }
  return 0;
}

// out[t] = bf16(weight * bf16(x[t] * rsqrt(mean(x[t]^2) + eps))), float32 inside; H % 16 == 0
int rms_norm_bf16(const uint16_t *x, const uint16_t *weight, int64_t T, int64_t H, float eps,
                  uint16_t *out, int64_t threads) {
  if (H % 16) return -1;
  _Pragma("omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)")
  for (int64_t t = 0; t < T; t++) {
    const uint16_t *row = x + t * H;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
      __m512 v = widen_bf16(_mm256_loadu_si256((const __m256i *)(row + i)));
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    float r = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps);
    __m512 rv = _mm512_set1_ps(r);
    for (int64_t i = 0; i < H; i += 16) {
      __m512 v = widen_bf16(_mm256_loadu_si256((const __m256i *)(row + i)));
      __m512 h = widen_bf16(narrow_bf16(_mm512_mul_ps(v, rv)));
      __m512 w = widen_bf16(_mm256_loadu_si256((const __m256i *)(weight + i)));
      _mm256_storeu_si256((__m256i *)(out + t * H + i), narrow_bf16(_mm512_mul_ps(w, h)));
    }
  }
  return 0;
}
