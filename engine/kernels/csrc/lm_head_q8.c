// Exact greedy LM head through an int8 pre-pass (AVX512-VNNI): each row's argmax over the
// vocabulary, the same index the float kernel's argmax mode returns, at a quarter of its
// multiply work.
//
// 1. quantize_row: each row of x becomes int8 with its own scale (x ~ sx * xq; the weight has
//    one scale, w ~ sw * wq), and gets a margin: twice a bound, in int units, on how far the
//    int8 logit sx * sw * dot(xq, wq) can be from the float kernel's logit. The bound is
//    Cauchy-Schwarz on both rounding errors,
//      |x.w - x^.w^| <= |x| |w - w^| + |x - x^| |w^|   (<= |x| e_max + |x - x^| n_max)
//    plus the float kernel's own summation error (eps_rel |x| |w|), so it holds for every
//    input, not just typical ones.
// 2. scan_range (one per OpenMP thread, over an equal share of the vocabulary blocks): the
//    int8 logits in int32, exact. A logit can be the argmax only if it is within the margin of
//    the row's largest int8 logit; the scan keeps a running max and records every index that
//    passes against it (a later, larger max only makes the test stricter).
// 3. *_finish: the row's threshold from the max over all ranges; the surviving candidates (a
//    handful: int8 logits are within ~1% of the real ones) are recomputed with the float
//    kernel's own block code, bit for bit, and the first index of the max wins. A row whose
//    candidates overflowed, or whose x could not be quantized (zero, inf, NaN), is scanned in
//    full with the float kernel instead.
// Entry points: q8_argmax_f32 and q8_argmax_bf16 (the float kernel's dtype). With `allow` (a
// bitmask per row, bit v of word v / 32 set where token v may be picked: a grammar's mask) the
// argmax is over the allowed tokens only; NULL allows every token.
//
// The int8 weight is stored unsigned (wq + 128, for vpdpbusd's u8 x s8 form) and packed like
// the float weight: pq[b][g][r][j] = wq[16 b + r][4 g + j] + 128, K padded to a multiple of 4
// with zeros. Each accumulator starts at -128 * sum(xq), which cancels the +128 exactly.
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lm_head.h"

static inline double element(const void *x, int bf16, int64_t k) {
  if (!bf16) return ((const float *)x)[k];
  uint32_t bits = (uint32_t)((const uint16_t *)x)[k] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// x row -> xq (Kp bytes, zero padded), acc0 = -128 * sum(xq), margin in int units (-1: this
// row cannot use the int8 pass). The float bounds are computed in double and rounded up.
static void quantize_row(const void *x, int bf16, int64_t K, int64_t Kp, double sw,
                         double e_max, double n_max, double eps_rel, int8_t *xq, int32_t *acc0,
                         int32_t *margin) {
  double amax = 0.0, norm2 = 0.0;
  for (int64_t k = 0; k < K; k++) {
    double v = element(x, bf16, k);
    amax = fmax(amax, fabs(v));
    norm2 += v * v;
  }
  memset(xq, 0, (size_t)Kp);
  *acc0 = 0;
  *margin = -1;
  if (!(amax > 0.0) || !isfinite(amax) || !isfinite(norm2)) return;
  double sx = amax / 127.0, err2 = 0.0;
  int32_t sum = 0;
  for (int64_t k = 0; k < K; k++) {
    double v = element(x, bf16, k);
    double q = fmin(127.0, fmax(-127.0, nearbyint(v / sx)));
    xq[k] = (int8_t)q;
    sum += (int32_t)q;
    err2 += (v - sx * q) * (v - sx * q);
  }
  double norm = sqrt(norm2), err = sqrt(err2);
  double bound = norm * e_max + err * n_max + eps_rel * norm * (n_max + e_max);
  double units = bound / (sx * sw) * (1.0 + 1e-9) + 2.0;
  if (units > (double)(INT32_MAX / 4)) return;
  *acc0 = -128 * sum;
  *margin = 2 * (int32_t)ceil(units);
}

// Record the lanes of `m` (a block's int8 logits `acc` for one row) that pass against the
// row's updated running max. A full list is first compacted against that max; if it is still
// full the row overflows (count -1) and will be scanned in full.
static void collect(__m512i acc, __mmask16 m, int64_t base, int32_t margin, int32_t *maxacc,
                    int32_t *idx, int32_t *val, int32_t *count, int64_t cap) {
  int32_t lanes[ROWS];
  _mm512_storeu_si512(lanes, acc);
  int32_t top = _mm512_mask_reduce_max_epi32(m, acc);
  if (top > *maxacc) *maxacc = top;
  int32_t thr = *maxacc - margin;
  for (int r = 0; r < ROWS; r++) {
    if (!((m >> r) & 1) || lanes[r] < thr) continue;
    if (*count == cap) {
      int64_t kept = 0;
      for (int64_t c = 0; c < cap; c++)
        if (val[c] >= thr) idx[kept] = idx[c], val[kept++] = val[c];
      *count = (int32_t)kept;
      if (kept == cap) {
        *count = -1;
        return;
      }
    }
    idx[*count] = (int32_t)(base + r);
    val[*count] = lanes[r];
    *count += 1;
  }
}

// The allow bits of vocabulary block b (16 tokens: half of one 32-bit word) as a lane mask.
static inline __mmask16 allowed16(const int32_t *allow, int64_t b) {
  return (__mmask16)(((uint32_t)allow[b >> 1] >> ((b & 1) * 16)) & 0xFFFFu);
}

static inline int allowed(const int32_t *allow, int64_t v) {
  return allow == NULL || (((uint32_t)allow[v >> 5] >> (v & 31)) & 1u);
}

#define DEFINE_SCAN(MT)                                                                    \
  static void scan_##MT(const int8_t *xq, int64_t Kp, const int32_t *acc0,                 \
                        const int32_t *margin, const uint8_t *pq, int64_t V, int64_t b0,   \
                        int64_t b1, int32_t *maxacc, int32_t *idx, int32_t *val,           \
                        int32_t *count, int64_t cap, const int32_t *allow, int64_t lda) {  \
    int32_t thr[MT];                                                                       \
    for (int i = 0; i < MT; i++) {                                                         \
      maxacc[i] = INT32_MIN;                                                               \
      count[i] = margin[i] < 0 ? -1 : 0;                                                   \
      thr[i] = margin[i] < 0 ? INT32_MAX : INT32_MIN;                                      \
    }                                                                                      \
    const int64_t G = Kp / 4;                                                              \
    for (int64_t b = b0; b < b1; b++) {                                                    \
      __m512i acc[MT];                                                                     \
      _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) acc[i] = _mm512_set1_epi32(acc0[i]); \
      const uint8_t *wb = pq + b * G * 64;                                                 \
      for (int64_t g = 0; g < G; g++) {                                                    \
        __m512i w = _mm512_loadu_si512(wb + g * 64);                                       \
        _Pragma("GCC unroll 16") for (int i = 0; i < MT; i++) {                            \
          int32_t quad = *(const int32_t *)(xq + i * Kp + 4 * g);                          \
          acc[i] = _mm512_dpbusd_epi32(acc[i], w, _mm512_set1_epi32(quad));                \
        }                                                                                  \
      }                                                                                    \
      int64_t left = V - b * ROWS;                                                         \
      __mmask16 mask = left >= ROWS ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);   \
      for (int i = 0; i < MT; i++) {                                                       \
        __mmask16 ok = mask;                                                               \
        if (allow != NULL) ok &= allowed16(allow + i * lda, b);                            \
        __mmask16 m = _mm512_mask_cmpge_epi32_mask(ok, acc[i], _mm512_set1_epi32(thr[i])); \
        if (__builtin_expect(m != 0, 0)) {                                                 \
          collect(acc[i], m, b * ROWS, margin[i], &maxacc[i], idx + i * cap, val + i * cap, \
                  &count[i], cap);                                                         \
          thr[i] = count[i] < 0 ? INT32_MAX : maxacc[i] - margin[i];                       \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
  }

DEFINE_SCAN(1)
DEFINE_SCAN(2)
DEFINE_SCAN(4)
DEFINE_SCAN(8)
DEFINE_SCAN(16)

// Rows [0, M) of xq (tiles of mt rows, M a multiple of mt) over vocabulary blocks [b0, b1):
// maxacc[M], count[M] and the candidates idx/val[M][cap] of this range.
static void scan_range(const int8_t *xq, int64_t M, int64_t Kp, const int32_t *acc0,
                       const int32_t *margin, const uint8_t *pq, int64_t V, int64_t b0,
                       int64_t b1, int64_t mt, int32_t *maxacc, int32_t *idx, int32_t *val,
                       int32_t *count, int64_t cap, const int32_t *allow, int64_t lda) {
  for (int64_t m = 0; m < M; m += mt) {
    const int8_t *x = xq + m * Kp;
    int32_t *mx = maxacc + m, *ix = idx + m * cap, *vx = val + m * cap, *cx = count + m;
    const int32_t *al = allow == NULL ? NULL : allow + m * lda;
#define SCAN(T) scan_##T(x, Kp, acc0 + m, margin + m, pq, V, b0, b1, mx, ix, vx, cx, cap, al, lda)
    switch (mt) {
      case 16: SCAN(16); break;
      case 8: SCAN(8); break;
      case 4: SCAN(4); break;
      case 2: SCAN(2); break;
      default: SCAN(1); break;
    }
#undef SCAN
  }
}


#define CAP 1024  // candidates per row and range before the row falls back to a full scan

struct q8_args {
  const void *x;  // [M, ldx] float32 or bfloat16 (bf16 = 1); rows [0, rows) are real
  int bf16;
  int64_t rows, M, ldx, K;
  const void *wp;  // the float kernel's packed weight
  int64_t V;
  const uint8_t *pq;  // the int8 weight, K padded to Kp
  int64_t Kp;
  double scale, err_max, norm_max, eps_rel;
  int64_t mt, threads;
  const int32_t *allow;  // [M, lda] bitmask, or NULL: every token allowed
  int64_t lda;
};

typedef void (*finish_fn)(const void *, int64_t, int64_t, int64_t, const void *, int64_t,
                          int64_t, int64_t, const int32_t *, const int32_t *, const int32_t *,
                          const int32_t *, const int32_t *, int64_t, const int32_t *, int64_t,
                          int32_t *);

// Quantize, scan the vocabulary on `threads` OpenMP threads (torch's own pool where torch
// loaded libgomp), each over an equal share of the blocks, then finish rows [0, rows): the
// padding rows of a tile are scanned but never finished. -1: bad arguments; -2: no memory.
static int q8_argmax(const struct q8_args *a, finish_fn finish, int32_t *out) {
  int64_t M = a->M, blocks = (a->V + ROWS - 1) / ROWS;
  if (a->mt < 1 || a->mt > 16 || (a->mt & (a->mt - 1)) || M % a->mt || a->rows > M ||
      a->Kp < a->K || a->Kp % 4 || a->K > 32768 || blocks < 1)
    return -1;
  int64_t parts = a->threads < 1 ? 1 : a->threads > blocks ? blocks : a->threads;
  int8_t *xq = malloc((size_t)(M * a->Kp + 1));
  int32_t *ints = malloc(sizeof *ints * (size_t)(2 * M + 2 * parts * M + 2 * parts * M * CAP));
  if (xq == NULL || ints == NULL) {
    free(xq), free(ints);
    return -2;
  }
  int32_t *acc0 = ints, *margin = acc0 + M, *maxacc = margin + M, *count = maxacc + parts * M;
  int32_t *idx = count + parts * M, *val = idx + parts * M * CAP;
  size_t row_bytes = (size_t)a->ldx * (a->bf16 ? 2 : 4);
  for (int64_t m = 0; m < M; m++)
    quantize_row((const char *)a->x + m * row_bytes, a->bf16, a->K, a->Kp, a->scale, a->err_max,
                 a->norm_max, a->eps_rel, xq + m * a->Kp, acc0 + m, margin + m);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int64_t p = 0; p < parts; p++)
    scan_range(xq, M, a->Kp, acc0, margin, a->pq, a->V, blocks * p / parts,
               blocks * (p + 1) / parts, a->mt, maxacc + p * M, idx + p * M * CAP,
               val + p * M * CAP, count + p * M, CAP, a->allow, a->lda);
  finish(a->x, a->rows, a->ldx, a->K, a->wp, a->V, parts, M, margin, maxacc, idx, val, count,
         CAP, a->allow, a->lda, out);
  free(xq), free(ints);
  return 0;
}

// One row against one block with the float kernel's own code: 16 logits, bit for bit those of
// lm_head.c. `full` = scan every block (the fallback) instead of the candidates.
#define DEFINE_FINISH(NAME, T, BLOCK)                                                      \
  static void NAME##_block(const T *x, int64_t K, const T *wp, int64_t b, float *o16) {    \
    const int64_t ldx = 0;                                                                 \
    __m512 acc[1] = {_mm512_setzero_ps()};                                                 \
    BLOCK(1)                                                                               \
    _mm512_storeu_ps(o16, acc[0]);                                                         \
  }                                                                                        \
  static void NAME##_finish(const void *xv, int64_t M, int64_t ldx, int64_t K,            \
                            const void *wv, int64_t V, int64_t parts, int64_t ldp,         \
                            const int32_t *margin, const int32_t *maxacc,                  \
                            const int32_t *idx, const int32_t *val, const int32_t *count,  \
                            int64_t cap, const int32_t *allow, int64_t lda, int32_t *out) { \
    const T *x = xv, *wp = wv;                                                             \
    float o16[ROWS];                                                                       \
    const int64_t blocks = (V + ROWS - 1) / ROWS;                                          \
    for (int64_t m = 0; m < M; m++) {                                                      \
      const T *xm = x + m * ldx;                                                           \
      const int32_t *am = allow == NULL ? NULL : allow + m * lda;                          \
      int full = margin[m] < 0;                                                            \
      int32_t top = INT32_MIN;                                                             \
      for (int64_t p = 0; p < parts; p++) {                                                \
        full |= count[p * ldp + m] < 0;                                                    \
        if (maxacc[p * ldp + m] > top) top = maxacc[p * ldp + m];                          \
      }                                                                                    \
      float best = -INFINITY;                                                              \
      int32_t best_idx = 0, cached = -1;                                                   \
      int64_t seen = 0;                                                                    \
      for (int64_t p = 0; p < parts && !full; p++) {                                       \
        const int32_t *ci = idx + (p * ldp + m) * cap, *cv = val + (p * ldp + m) * cap;    \
        for (int32_t c = 0; c < count[p * ldp + m]; c++) {                                 \
          if (cv[c] < top - margin[m]) continue;                                           \
          if (ci[c] / ROWS != cached) {                                                    \
            cached = ci[c] / ROWS;                                                         \
            NAME##_block(xm, K, wp, cached, o16);                                          \
          }                                                                                \
          float v = o16[ci[c] % ROWS];                                                     \
          seen++;                                                                          \
          if (v > best) best = v, best_idx = ci[c];                         \
        }                                                                                  \
      }                                                                                    \
      if (full || seen == 0) {                                                             \
        best = -INFINITY, best_idx = 0;                                                    \
        for (int64_t b = 0; b < blocks; b++) {                                             \
          NAME##_block(xm, K, wp, b, o16);                                                 \
          for (int r = 0; r < ROWS && b * ROWS + r < V; r++)                               \
            if (o16[r] > best && allowed(am, b * ROWS + r))                                \
              best = o16[r], best_idx = (int32_t)(b * ROWS + r);                           \
        }                                                                                  \
      }                                                                                    \
      out[m] = best_idx;                                                                   \
    }                                                                                      \
  }                                                                                        \
  int NAME(const T *x, int64_t rows, int64_t M, int64_t ldx, int64_t K, const T *wp,       \
           int64_t V, const uint8_t *pq, int64_t Kp, double scale, double err_max,         \
           double norm_max, double eps_rel, int64_t mt, int64_t threads,                   \
           const int32_t *allow, int64_t lda, int32_t *out) {                              \
    struct q8_args a = {x, IS_BF16, rows, M, ldx, K, wp, V, pq, Kp,                        \
                        scale, err_max, norm_max, eps_rel, mt, threads, allow, lda};       \
    return q8_argmax(&a, NAME##_finish, out);                                              \
  }

#define IS_BF16 0
DEFINE_FINISH(q8_argmax_f32, float, F32_BLOCK)
#undef IS_BF16
#define IS_BF16 1
DEFINE_FINISH(q8_argmax_bf16, uint16_t, BF16_BLOCK)
