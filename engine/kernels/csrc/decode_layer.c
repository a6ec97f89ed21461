// A pure decode step through every layer of a Llama-family model (Llama, Qwen2's qkv bias,
// Qwen3's q/k norms) on x86 CPUs with AVX-512, in one call. Activations and weights are float32
// (a bfloat16 model's weights are widened once at load); the KV cache is float32 or bfloat16
// (stored rounded to nearest even, as torch converts).
//
// Why: a small model's decode layer is ~25 torch ops of a few microseconds of work each, so
// per-op dispatch, not arithmetic, is most of its time. Here each layer is the same math as
// the torch path in one pass over the rows, with no dispatch between ops:
//   h = rmsnorm(x) ; qkv = h Wqkv (+ b) ; [q/k rmsnorm per head] ; rotary(q, k) ;
//   write k, v to their cache slots ; a = attention over the cached pages ;
//   x += a Wo ; h = rmsnorm(x) ; x += (silu(h Wg) * h Wu) Wd
// The matmuls run through lm_head.c's small-M tiles on weights packed the same way, the
// attention through decode_attention.c's per-(request, kv head) item. Work is split over the
// OpenMP threads (torch's pool where torch loaded libgomp) phase by phase.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void lm_head_f32_range(const float *x, int64_t M, int64_t ldx, int64_t K, const float *wp,
                       int64_t V, float *out, int64_t ldo, float *best_val, int32_t *best_idx,
                       int64_t b0, int64_t b1, int64_t mt);
void decode_attention_f32_item(const float *q, const float *k, const float *v,
                               const int64_t *table, int64_t len, int64_t h, int64_t G,
                               int64_t Hkv, int64_t D, int64_t page_size, float scale,
                               float *out, float *scores, int64_t padded);
void decode_attention_bf16_item(const float *q, const uint16_t *k, const uint16_t *v,
                                const int64_t *table, int64_t len, int64_t h, int64_t G,
                                int64_t Hkv, int64_t D, int64_t page_size, float scale,
                                float *out, float *scores, int64_t padded);
int decode_attention_supported(int64_t Hq, int64_t Hkv, int64_t D);

struct llama_layer {
  const float *in_norm, *post_norm;  // [hidden]
  const float *q_norm, *k_norm;      // [head_dim], or NULL
  const float *qkv_w, *qkv_b;        // packed [(q + 2 kv) heads * head_dim outputs], bias or NULL
  const float *o_w, *gate_up_w, *down_w;  // packed; gate_up: [gate | up] outputs
  void *k_cache, *v_cache;  // this layer's pool buffers, [pages, kv_heads, page_size, head_dim]
};

struct llama_shape {
  int64_t hidden, heads, kv_heads, head_dim, inter, page_size;
  int64_t bf16_cache;  // the KV cache holds bfloat16 (else float32)
  float eps, scale;
};

struct decode_batch {
  int64_t rows, max_pages;
  const float *cos, *sin;  // [rows, head_dim / 2]
  const int64_t *slots;    // [rows] this token's cache slot
  const int64_t *pages;    // [rows, max_pages] page tables
  const int64_t *lens;     // [rows] context length, this token included
};

// Rows [0, M) of x against the packed weight's output blocks [b0, b1), in power-of-two tiles.
static void matmul_blocks(const float *x, int64_t M, int64_t ldx, int64_t K, const float *wp,
                          int64_t N, float *out, int64_t ldo, int64_t b0, int64_t b1) {
  for (int64_t m = 0; m < M;) {
    int64_t mt = 16;
    while (mt > M - m) mt /= 2;
    lm_head_f32_range(x + m * ldx, mt, ldx, K, wp, N, out + m * ldo, ldo, NULL, NULL, b0, b1,
                      mt);
    m += mt;
  }
}

// This thread's share of out[M, N] = x[M, K] W^T (call from every thread of the team).
static void matmul(const float *x, int64_t M, int64_t K, const float *wp, int64_t N,
                   float *out) {
  int64_t blocks = (N + 15) / 16, t = omp_get_thread_num(), n = omp_get_num_threads();
  matmul_blocks(x, M, K, K, wp, N, out, N, blocks * t / n, blocks * (t + 1) / n);
}

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
  float r = 1.0f / sqrtf(sum / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rotate(float *x, const float *cos, const float *sin, int64_t half) {
  for (int64_t i = 0; i < half; i++) {
    float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

// n floats into cache elements [at, at + n), as float32 or bfloat16 (nearest even; NaN stays
// NaN).
static void store(void *cache, int64_t at, const float *x, int64_t n, int64_t bf16) {
  if (!bf16) {
    memcpy((float *)cache + at, x, sizeof(float) * (size_t)n);
    return;
  }
  uint16_t *out = (uint16_t *)cache + at;
  for (int64_t i = 0; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, &x[i], sizeof bits);
    out[i] = isnan(x[i]) ? (uint16_t)((bits >> 16) | 0x40)
                         : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  }
}

// Row m's q/k post-processing and cache write: bias, per-head norms, rotary, store k and v.
static void prepare_row(const struct llama_layer *L, const struct llama_shape *s,
                        const struct decode_batch *b, float *qkv_row, int64_t m) {
  const int64_t D = s->head_dim, width = (s->heads + 2 * s->kv_heads) * D;
  if (L->qkv_b != NULL)
    for (int64_t i = 0; i < width; i++) qkv_row[i] += L->qkv_b[i];
  float *k = qkv_row + s->heads * D, *v = k + s->kv_heads * D;
  for (int64_t h = 0; h < s->heads + s->kv_heads; h++) {
    float *head = qkv_row + h * D;
    const float *norm = h < s->heads ? L->q_norm : L->k_norm;
    if (norm != NULL) rmsnorm(head, norm, D, s->eps, head);
    rotate(head, b->cos + m * (D / 2), b->sin + m * (D / 2), D / 2);
  }
  // head-major pages: each kv head of the token lands in its own run of the page
  const int64_t page = b->slots[m] / s->page_size, offset = b->slots[m] % s->page_size;
  for (int64_t h = 0; h < s->kv_heads; h++) {
    int64_t at = ((page * s->kv_heads + h) * s->page_size + offset) * D;
    store(L->k_cache, at, k + h * D, D, s->bf16_cache);
    store(L->v_cache, at, v + h * D, D, s->bf16_cache);
  }
}

static void layer(const struct llama_layer *L, const struct llama_shape *s,
                  const struct decode_batch *b, float *x, float *h, float *qkv, float *attn,
                  float *gu, float *tmp, float *scores, int64_t padded) {
  const int64_t M = b->rows, H = s->hidden, D = s->head_dim, I = s->inter;
  const int64_t width = (s->heads + 2 * s->kv_heads) * D, G = s->heads / s->kv_heads;
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; m++) rmsnorm(x + m * H, L->in_norm, H, s->eps, h + m * H);
  matmul(h, M, H, L->qkv_w, width, qkv);
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; m++) prepare_row(L, s, b, qkv + m * width, m);
#pragma omp for schedule(static)
  for (int64_t item = 0; item < M * s->kv_heads; item++) {
    int64_t m = item / s->kv_heads, kh = item % s->kv_heads;
    const float *q = qkv + m * width + kh * G * D;
    const int64_t *table = b->pages + m * b->max_pages;
    float *o = attn + (m * s->heads + kh * G) * D;
    if (s->bf16_cache)
      decode_attention_bf16_item(q, L->k_cache, L->v_cache, table, b->lens[m], kh, G,
                                 s->kv_heads, D, s->page_size, s->scale, o, scores, padded);
    else
      decode_attention_f32_item(q, L->k_cache, L->v_cache, table, b->lens[m], kh, G,
                                s->kv_heads, D, s->page_size, s->scale, o, scores, padded);
  }
  matmul(attn, M, s->heads * D, L->o_w, H, tmp);
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; m++) {
    for (int64_t i = 0; i < H; i++) x[m * H + i] += tmp[m * H + i];
    rmsnorm(x + m * H, L->post_norm, H, s->eps, h + m * H);
  }
  matmul(h, M, H, L->gate_up_w, 2 * I, gu);
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; m++) {
    float *g = gu + m * 2 * I;
    for (int64_t i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
  }
  int64_t blocks = (H + 15) / 16, t = omp_get_thread_num(), n = omp_get_num_threads();
  matmul_blocks(gu, M, 2 * I, I, L->down_w, H, tmp, H, blocks * t / n, blocks * (t + 1) / n);
#pragma omp barrier
#pragma omp for schedule(static)
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < H; i++) x[m * H + i] += tmp[m * H + i];
}

// x[rows, hidden] (the embeddings in, the last layer's residual stream out) through
// layers[0, n). -1: shapes the kernels do not serve or bad lengths; -2: out of memory.
int llama_decode_f32(const struct llama_layer *layers, int64_t n, const struct llama_shape *s,
                     const struct decode_batch *b, float *x, int64_t threads) {
  const int64_t M = b->rows, H = s->hidden, D = s->head_dim, I = s->inter;
  if (!decode_attention_supported(s->heads, s->kv_heads, D) || D % 2 || M < 1) return -1;
  int64_t longest = 1;
  for (int64_t m = 0; m < M; m++) {
    if (b->lens[m] < 1 || b->lens[m] > b->max_pages * s->page_size) return -1;
    longest = b->lens[m] > longest ? b->lens[m] : longest;
  }
  const int64_t width = (s->heads + 2 * s->kv_heads) * D, padded = (longest + 15) / 16 * 16;
  size_t floats = (size_t)(M * (2 * H + width + s->heads * D + 2 * I));
  float *work = malloc(sizeof(float) * floats);
  if (work == NULL) return -2;
  float *h = work, *tmp = h + M * H, *qkv = tmp + M * H, *attn = qkv + M * width;
  float *gu = attn + M * s->heads * D;
  int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    float *scores = malloc(sizeof(float) * (size_t)(s->heads / s->kv_heads * padded));
    if (scores == NULL) failed = 1;  // a benign race: every writer stores 1
#pragma omp barrier
    for (int64_t l = 0; l < n && !failed; l++)
      layer(&layers[l], s, b, x, h, qkv, attn, gu, tmp, scores, padded);
    free(scores);
  }
  free(work);
  return failed ? -2 : 0;
}
