// Paged decode attention on x86 CPUs with AVX-512: one new query token per request against the
// request's cached keys and values, read in place from the page pool (no gather copy).
//
//   out[b, h, :] = sum_t softmax_t(scale * q[b, h] . k_t) v_t,   t < lens[b]
//
// k and v are one layer's buffers, [pages, Hkv, page_size, D] of float32 or bfloat16 (head-major
// pages: token t of kv head h is at ((table[t / page_size] * Hkv + h) * page_size + t % page_size)
// * D), pages[b, :] the request's page table (padded), q and out float32 [B, Hq, D]; query head
// h reads kv head h / (Hq / Hkv) (GQA). D is a multiple of 16. Work is
// split over (request, kv head) pairs on OpenMP threads (torch's pool where torch loaded
// libgomp). Per pair: scores for every token and query head of the group, a max, a vectorized
// exp (a degree-6 polynomial, ~1 ulp), then the weighted sum of v; float32 throughout.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define MAX_CHUNKS 16  // D <= 256
#define MAX_GROUP 16   // query heads per kv head
#define AHEAD 48       // tokens ahead whose rows are asked for early (at least one page)

// Ask for `bytes` from `rows` ahead of their use. A request's pages lie anywhere in the pool, so
// the hardware prefetcher loses the stream at each page boundary, and at mid-size a decode
// step's keys and values come from memory: prefetched pages ahead, the kernel ran ~2x faster.
static inline void prefetch(const void *rows, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)rows + b, _MM_HINT_T0);
}

// Page `p` of the request (its rows of kv head h) in `buffer` (k or v), if it holds tokens
// before `len`, prefetched.
#define PREFETCH_PAGE(buffer, p)                                                            \
  if ((p) * page_size < len)                                                                \
    prefetch(buffer + (table[p] * Hkv + h) * page_size * D,                                 \
             (len - (p) * page_size < page_size ? len - (p) * page_size : page_size) * D *  \
                 (int64_t)sizeof(*buffer));

static inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }

static inline __m512 load16_bf16(const uint16_t *p) {
  return widen_bf16(_mm256_loadu_si256((const __m256i *)p));
}

// One (request, kv head) pair: the G = Hq / Hkv query heads q[G, D] (scale applied here)
// against tokens [0, len) found through `table`; out[G, D]. `scores` holds G * padded floats,
// padded >= len rounded up to 16.
#define DEFINE_ITEM(NAME, T, LOAD)                                                          \
  void NAME(const float *q, const T *k, const T *v, const int64_t *table, int64_t len,      \
            int64_t h, int64_t G, int64_t Hkv, int64_t D, int64_t page_size, float scale,   \
            float *out, float *scores, int64_t padded) {                                    \
    const int64_t C = D / 16;                                                               \
    __m512 qv[MAX_GROUP][MAX_CHUNKS];                                                       \
    float top[MAX_GROUP], total[MAX_GROUP];                                                 \
    for (int64_t g = 0; g < G; g++) {                                                       \
      top[g] = -INFINITY, total[g] = 0.0f;                                                  \
      for (int64_t c = 0; c < C; c++)                                                       \
        qv[g][c] = _mm512_mul_ps(load16(q + g * D + 16 * c), _mm512_set1_ps(scale));        \
    }                                                                                       \
    const int64_t ahead = (AHEAD + page_size - 1) / page_size, pages = (len + page_size - 1) / page_size; \
    for (int64_t p = 0; p < ahead; p++) PREFETCH_PAGE(k, p)                                 \
    for (int64_t p = 0; p < pages; p++) {                                                   \
      PREFETCH_PAGE(k, p + ahead)                                                           \
      const T *page = k + (table[p] * Hkv + h) * page_size * D;                             \
      const int64_t first = p * page_size;                                                  \
      const int64_t end = len - first < page_size ? len : first + page_size;                \
      for (int64_t t = first; t < end; t++) {                                               \
        const T *kp = page + (t - first) * D;                                               \
        __m512 kc[MAX_CHUNKS];                                                              \
        for (int64_t c = 0; c < C; c++) kc[c] = LOAD(kp + 16 * c);                          \
        for (int64_t g = 0; g < G; g++) {                                                   \
          __m512 dot = _mm512_mul_ps(qv[g][0], kc[0]);                                      \
          for (int64_t c = 1; c < C; c++) dot = _mm512_fmadd_ps(qv[g][c], kc[c], dot);      \
          float s = _mm512_reduce_add_ps(dot);                                              \
          scores[g * padded + t] = s;                                                       \
          top[g] = s > top[g] ? s : top[g];                                                 \
        }                                                                                   \
      }                                                                                     \
    }                                                                                       \
    for (int64_t p = 0; p < ahead; p++) PREFETCH_PAGE(v, p)                                 \
    for (int64_t g = 0; g < G; g++) {                                                       \
      float *row = scores + g * padded;                                                     \
      __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(top[g]);                         \
      for (int64_t t = 0; t < len; t += 16) {                                               \
        __mmask16 live = len - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - t)) - 1); \
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + t), m));  \
        e = _mm512_maskz_mov_ps(live, e);                                                   \
        _mm512_storeu_ps(row + t, e);                                                       \
        sum = _mm512_add_ps(sum, e);                                                        \
      }                                                                                     \
      total[g] = _mm512_reduce_add_ps(sum);                                                 \
    }                                                                                       \
    __m512 acc[MAX_GROUP][MAX_CHUNKS];                                                      \
    for (int64_t g = 0; g < G; g++)                                                         \
      for (int64_t c = 0; c < C; c++) acc[g][c] = _mm512_setzero_ps();                      \
    for (int64_t p = 0; p < pages; p++) {                                                   \
      PREFETCH_PAGE(v, p + ahead)                                                           \
      const T *page = v + (table[p] * Hkv + h) * page_size * D;                             \
      const int64_t first = p * page_size;                                                  \
      const int64_t end = len - first < page_size ? len : first + page_size;                \
      for (int64_t t = first; t < end; t++) {                                               \
        const T *vp = page + (t - first) * D;                                               \
        for (int64_t c = 0; c < C; c++) {                                                   \
          __m512 vc = LOAD(vp + 16 * c);                                                    \
          for (int64_t g = 0; g < G; g++)                                                   \
            acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * padded + t]), vc, acc[g][c]); \
        }                                                                                   \
      }                                                                                     \
    }                                                                                       \
    for (int64_t g = 0; g < G; g++) {                                                       \
      __m512 inv = _mm512_set1_ps(1.0f / total[g]);                                         \
      for (int64_t c = 0; c < C; c++)                                                       \
        _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(acc[g][c], inv));              \
    }                                                                                       \
  }

DEFINE_ITEM(decode_attention_f32_item, float, load16)
DEFINE_ITEM(decode_attention_bf16_item, uint16_t, load16_bf16)

// Whether the item code serves these shapes (the caller checks once per call).
int decode_attention_supported(int64_t Hq, int64_t Hkv, int64_t D) {
  return D % 16 == 0 && D <= 16 * MAX_CHUNKS && Hkv >= 1 && Hq % Hkv == 0 &&
         Hq / Hkv <= MAX_GROUP;
}

#define DEFINE_DECODE(NAME, T)                                                              \
  int NAME(const float *q, const T *k, const T *v, const int64_t *pages, const int64_t *lens, \
           int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t page_size,                \
           int64_t max_pages, float scale, float *out, int64_t threads) {                   \
    if (!decode_attention_supported(Hq, Hkv, D) || page_size < 1) return -1;                \
    int64_t longest = 1;                                                                    \
    for (int64_t b = 0; b < B; b++) {                                                       \
      if (lens[b] < 1 || lens[b] > max_pages * page_size) return -1;                        \
      if (lens[b] > longest) longest = lens[b];                                             \
    }                                                                                       \
    const int64_t G = Hq / Hkv, padded = (longest + 15) / 16 * 16;                          \
    int failed = 0;                                                                         \
    _Pragma("omp parallel num_threads(threads > 0 ? threads : 1)") {                        \
      float *scores = malloc(sizeof(float) * (size_t)(G * padded));                         \
      if (scores == NULL) failed = 1;                                                       \
      _Pragma("omp for schedule(static)")                                                   \
      for (int64_t item = 0; item < B * Hkv; item++) {                                      \
        if (scores == NULL) continue;                                                       \
        const int64_t b = item / Hkv, h = item % Hkv;                                       \
        NAME##_item(q + (b * Hq + h * G) * D, k, v, pages + b * max_pages, lens[b], h, G,   \
                    Hkv, D, page_size, scale, out + (b * Hq + h * G) * D, scores, padded);  \
      }                                                                                     \
      free(scores);                                                                         \
    }                                                                                       \
    return failed ? -2 : 0;                                                                 \
  }

DEFINE_DECODE(decode_attention_f32, float)
DEFINE_DECODE(decode_attention_bf16, uint16_t)
