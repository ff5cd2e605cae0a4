/* bf16 kernels for decoding on CPUs with AVX512-BF16 (see cpu_kernels.py for why and when).

   kernos_linear_bf16: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), bf16 in and out, fp32 accumulation with
   vdpbf16ps. The weight is packed once into tiles of NT outputs: [ceil(N / NT)][K / 2][NT][2], i.e. for each
   pair of input positions the NT outputs' two weights, so that a tile streams through memory once per call
   whatever M is, and each zmm load feeds every row of a register block. Every output sums its K / 2 pairs in
   the same order for any M and any row block, so a row's result does not depend on the batch it is computed
   in (batched == alone, bit for bit). K must be even.

   kernos_attention_bf16: one query position per row against the cached keys and values it may see,
   grouped-query heads, fp32 scores, softmax and sums. A row reads only its own columns, so its result depends
   neither on the batch's padding nor on the other rows, nor on whether it is decoded or part of a prompt.

   On CPUs with AMX (and K a multiple of 32) the same tiles run on AMX's tile multiply instead
   (kernos_amx_enable): about 10x the arithmetic for prompt chunks. AMX sums a row's products in its own order,
   which differs from vdpbf16ps's by a rounding, so a weight is always computed one way in a process (AMX once
   enabled, for every call on it, whatever M): each row's result still depends only on that row, computed alike
   in a decode step and in a prompt chunk of any size.

   The engine runs one compute thread on the small machines where these kernels are used; helper threads
   (below) take tiles of large linears on the cores it leaves. */
#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef KERNOS_AMX
#include <asm/prctl.h>
#endif

#define NZ 4               /* zmm registers of outputs per tile */
#define NT (16 * NZ)       /* outputs per tile */
#define RT 6               /* at most RT rows per register block: RT * NZ accumulators */
#define PF 16              /* prefetch distance, in pairs of input positions */

static inline __attribute__((always_inline)) void block(const uint16_t *x, int K, const int rows,
                                                        const uint16_t *wp, int kp_n, const float *bias, int n0,
                                                        int nvalid, uint16_t *y, int ldy) {
  __m512 acc[RT][NZ];
  for (int r = 0; r < rows; r++)
    for (int z = 0; z < NZ; z++) acc[r][z] = _mm512_setzero_ps();
  for (int kp = 0; kp < kp_n; kp++) {
    const uint16_t *wk = wp + (size_t)kp * 2 * NT;
    for (int z = 0; z < NZ; z++) _mm_prefetch((const char *)(wk + 2 * NT * PF + 32 * z), _MM_HINT_T0);
    __m512bh w[NZ];
    for (int z = 0; z < NZ; z++) w[z] = (__m512bh)_mm512_loadu_si512(wk + 32 * z);
    for (int r = 0; r < rows; r++) {
      __m512bh a = (__m512bh)_mm512_set1_epi32(((const int32_t *)(x + (size_t)r * K))[kp]);
      for (int z = 0; z < NZ; z++) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], a, w[z]);
    }
  }
  for (int z = 0; z < NZ; z++) {
    int left = nvalid - 16 * z;
    __mmask16 m = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
    __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n0 + 16 * z) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
      __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][z], b));
      _mm256_mask_storeu_epi16(y + (size_t)r * ldy + n0 + 16 * z, m, o);
    }
  }
}

static void linear_tile(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias, uint16_t *y,
                        int t) {
  int kp_n = K / 2;
  int blocks = (M + RT - 1) / RT, per = blocks ? (M + blocks - 1) / blocks : 0;   /* 8 rows: 4 + 4, not 6 + 2 */
  const uint16_t *wp = w + (size_t)t * kp_n * 2 * NT;
  int n0 = t * NT, nvalid = N - n0 < NT ? N - n0 : NT;
  for (int m = 0; m < M; m += per) {
    int rows = M - m < per ? M - m : per;
    const uint16_t *xm = x + (size_t)m * K;
    uint16_t *ym = y + (size_t)m * N;
    switch (rows) {   /* a constant row count per case keeps the accumulators in registers */
      case 1: block(xm, K, 1, wp, kp_n, bias, n0, nvalid, ym, N); break;
      case 2: block(xm, K, 2, wp, kp_n, bias, n0, nvalid, ym, N); break;
      case 3: block(xm, K, 3, wp, kp_n, bias, n0, nvalid, ym, N); break;
      case 4: block(xm, K, 4, wp, kp_n, bias, n0, nvalid, ym, N); break;
      case 5: block(xm, K, 5, wp, kp_n, bias, n0, nvalid, ym, N); break;
      default: block(xm, K, RT, wp, kp_n, bias, n0, nvalid, ym, N); break;
    }
  }
}

/* ---- the same tile on AMX: 16 rows at a time, the tile's 64 outputs as four 16 x 16 fp32 accumulators;
   A (16 rows x 16 pairs of inputs) from x, B (16 pairs x 16 outputs, already in pair order) straight from the
   packed weight (rows 2 * NT bf16 apart). A tile configuration per thread, reloaded when the row count changes. */
static int amx_on;
#ifdef KERNOS_AMX
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;
static __thread int amx_rows;           /* rows of A and C in this thread's loaded configuration (0: none) */

/* After a call's tiles: the tile state goes back to its initial state. Other code on the thread (oneDNN's AMX
   kernels, used by torch) configures and releases tiles too, so a configuration is never assumed to outlive a
   call; released tiles also cost nothing to save at a context switch. */
static void amx_done(void) {
  if (amx_rows) {
    _tile_release();
    amx_rows = 0;
  }
}

static void amx_configure(int rows) {
  tile_config c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) {
    c.colsb[t] = 64;
    c.rows[t] = t >= 5 ? 16 : rows;     /* 0-3: C, 4: A, 5-7: B */
  }
  _tile_loadconfig(&c);
  amx_rows = rows;
}

static void linear_tile_amx(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias, uint16_t *y,
                            int t) {
  int kp_n = K / 2;
  const uint16_t *wp = w + (size_t)t * kp_n * 2 * NT;
  int n0 = t * NT, nvalid = N - n0 < NT ? N - n0 : NT;
  float c[16][16];
  for (int m = 0; m < M; m += 16) {
    int rows = M - m < 16 ? M - m : 16;
    if (amx_rows != rows) amx_configure(rows);
    const uint16_t *xm = x + (size_t)m * K;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kp = 0; kp < kp_n; kp += 16) {
      const uint16_t *wk = wp + (size_t)kp * 2 * NT;
      if (kp + 32 <= kp_n)                         /* the block after next: 16 pairs x 256 bytes */
        for (int i = 0; i < 64; i++) _mm_prefetch((const char *)(wk + 32 * 2 * NT) + 64 * i, _MM_HINT_T0);
      _tile_loadd(4, xm + 2 * kp, K * 2);
      _tile_loadd(5, wk, 4 * NT);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, wk + 32, 4 * NT);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, wk + 64, 4 * NT);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, wk + 96, 4 * NT);
      _tile_dpbf16ps(3, 4, 5);
    }
    for (int z = 0; z < NZ; z++) {
      if (z == 0) _tile_stored(0, c, 64);
      else if (z == 1) _tile_stored(1, c, 64);
      else if (z == 2) _tile_stored(2, c, 64);
      else _tile_stored(3, c, 64);
      int left = nvalid - 16 * z;
      __mmask16 mk = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
      __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + n0 + 16 * z) : _mm512_setzero_ps();
      for (int r = 0; r < rows; r++) {
        __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c[r]), b));
        _mm256_mask_storeu_epi16(y + (size_t)(m + r) * N + n0 + 16 * z, mk, o);
      }
    }
  }
}
#endif

/* Ask the kernel for AMX's tile state (once per process) and compute linears with K % 32 == 0 on it from now on
   (on 1) or not (0: only before any weight is used, e.g. in tests). Returns whether AMX is on. */
int kernos_amx_enable(int on) {
#ifdef KERNOS_AMX
  static int granted = -1;
  if (granted < 0) granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, 18 /* XFEATURE_XTILEDATA */) == 0;
  amx_on = on && granted;
#else
  (void)on;
#endif
  return amx_on;
}

typedef void (*tile_fn)(const uint16_t *, int, int, const uint16_t *, int, const float *, uint16_t *, int);

#ifndef KERNOS_AMX
static void amx_done(void) {}
#endif

static tile_fn tile_for(int K) {
#ifdef KERNOS_AMX
  if (amx_on && K % 32 == 0) return linear_tile_amx;
#endif
  (void)K;
  return linear_tile;
}

/* ---- helper threads: idle cores take tiles of a linear while the caller works on it too -----------------
   The caller publishes a job and claims tiles from a shared counter; helpers (woken by a futex, spinning a
   little between the back-to-back calls of a step) claim tiles from the same counter. Nobody waits for a
   helper that is not running: the caller takes whatever is left, and waits only for tiles already claimed.
   A tile is computed the same way by any thread, so results do not depend on who computed what. */
typedef struct {
  const uint16_t *x, *w;
  const float *bias;
  uint16_t *y;
  int M, K, N;
  tile_fn fn;
  /* an attention job instead (attn): tile t is query rows t * rows .. t * rows + rows - 1 of M */
  int attn, rows, H, KV, D;
  const uint16_t *q, *k, *v;
  long rs, sh, scratch_per;
  const int *start, *end;
  float scale;
  uint16_t *out;
  float *scratch;
} lin_job;

static void attention_rows(const uint16_t *q, const uint16_t *k, const uint16_t *v, long rs, long sh, int b0, int b1,
                           int H, int KV, int D, const int *start, const int *end, float scale, uint16_t *out,
                           float *scratch);

static lin_job job;
static _Atomic uint64_t claim;          /* generation << 40 | tiles << 20 | next tile */
static _Atomic int done_tiles;
static _Atomic uint32_t wake_word;      /* the futex helpers sleep on: bumped for each parallel job */
static _Atomic int sleeping;
static int helper_count, spin_iters = 20000;
static uint64_t generation;
static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER;   /* several engines: one job at a time */

static int take_tile(void) {
  uint64_t c = atomic_load_explicit(&claim, memory_order_acquire);
  for (;;) {
    uint32_t tiles = (uint32_t)(c >> 20) & 0xFFFFF, next = (uint32_t)c & 0xFFFFF;
    if (next >= tiles) return -1;
    if (atomic_compare_exchange_weak_explicit(&claim, &c, c + 1, memory_order_acq_rel, memory_order_acquire))
      return (int)next;
  }
}

static void work_tiles(int worker) {
  int t;
  while ((t = take_tile()) >= 0) {
    if (job.attn) {
      int b0 = t * job.rows, b1 = b0 + job.rows < job.M ? b0 + job.rows : job.M;
      attention_rows(job.q, job.k, job.v, job.rs, job.sh, b0, b1, job.H, job.KV, job.D, job.start, job.end,
                     job.scale, job.out, job.scratch + (size_t)worker * job.scratch_per);
    } else {
      job.fn(job.x, job.M, job.K, job.w, job.N, job.bias, job.y, t);
    }
    atomic_fetch_add_explicit(&done_tiles, 1, memory_order_release);
  }
  amx_done();
}

static void *helper_main(void *arg) {
  int worker = (int)(intptr_t)arg;
  for (;;) {
    uint32_t seen = atomic_load_explicit(&wake_word, memory_order_acquire);
    work_tiles(worker);
    int i = 0;
    for (; i < spin_iters && atomic_load_explicit(&wake_word, memory_order_acquire) == seen; i++) {
      _mm_pause();
      if ((i & 255) == 255) sched_yield();     /* a server thread that needs this core gets it */
    }
    if (i == spin_iters) {
      atomic_fetch_add(&sleeping, 1);
      syscall(SYS_futex, &wake_word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
      atomic_fetch_sub(&sleeping, 1);
    }
  }
  return NULL;
}

/* Start `n` helper threads (once; later calls only report how many run). */
int kernos_start_helpers(int n) {
  pthread_mutex_lock(&caller);
  for (; helper_count < n; helper_count++) {
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&th, &attr, helper_main, (void *)(intptr_t)(helper_count + 1));
    pthread_attr_destroy(&attr);
    if (rc) break;
  }
  int got = helper_count;
  pthread_mutex_unlock(&caller);
  return got;
}

#define MIN_SHARED_TILES 4

static void run_shared(int tiles);

void kernos_linear_bf16(const uint16_t *x, int M, int K, const uint16_t *w, int N, const float *bias,
                        uint16_t *y) {
  int tiles = (N + NT - 1) / NT;
  tile_fn fn = tile_for(K);
  if (helper_count == 0 || tiles < MIN_SHARED_TILES || tiles >= (1 << 20) || pthread_mutex_trylock(&caller)) {
    for (int t = 0; t < tiles; t++) fn(x, M, K, w, N, bias, y, t);
    amx_done();
    return;
  }
  job = (lin_job){x, w, bias, y, M, K, N, fn};
  run_shared(tiles);
}

/* Publish `job` (the caller holds `caller`), work on its tiles beside the helpers, wait for the tiles they
   claimed, release `caller`. */
static void run_shared(int tiles) {
  generation = (generation + 1) & 0xFFFFFF;
  atomic_store_explicit(&done_tiles, 0, memory_order_relaxed);
  atomic_store_explicit(&claim, (generation << 40) | ((uint64_t)tiles << 20), memory_order_release);
  atomic_fetch_add_explicit(&wake_word, 1, memory_order_release);
  if (atomic_load(&sleeping)) syscall(SYS_futex, &wake_word, FUTEX_WAKE_PRIVATE, helper_count, NULL, NULL, 0);
  work_tiles(0);
  for (int i = 1; atomic_load_explicit(&done_tiles, memory_order_acquire) < tiles; i++) {   /* claimed, in flight */
    _mm_pause();
    if ((i & 1023) == 0) sched_yield();     /* a helper preempted mid-tile: let it run */
  }
  pthread_mutex_unlock(&caller);
}

/* w [N, K] bf16, row-major -> the tiled layout above, zero-padded to a whole number of tiles. */
void kernos_pack_bf16(const uint16_t *w, int N, int K, uint16_t *dst) {
  int kp_n = K / 2, tiles = (N + NT - 1) / NT;
  memset(dst, 0, (size_t)tiles * NT * K * sizeof(uint16_t));
  for (int n = 0; n < N; n++) {
    int t = n / NT, j = n % NT;
    for (int kp = 0; kp < kp_n; kp++) {
      uint16_t *d = dst + ((size_t)t * kp_n + kp) * 2 * NT + j * 2;
      d[0] = w[(size_t)n * K + 2 * kp];
      d[1] = w[(size_t)n * K + 2 * kp + 1];
    }
  }
}

int kernos_tile_outputs(void) { return NT; }

/* exp(x) for x <= 87 (softmax after subtracting the max; silu), fp32, within 2 ulp; exp(-inf) = 0. */
static inline __m512 exp_neg(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps((__mmask16)~under, p, n);
}

/* r[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once (a transpose by shuffles, 30 operations in all
   instead of 16 horizontal reductions). */
static inline __m512 reduce16(const __m512 *a) {
  __m512 v[4];
  for (int q = 0; q < 4; q++) {
    const __m512 *x = a + 4 * q;
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1));
    v[q] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));   /* lane k: the 4 vectors' lane-k sums */
  }
  __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
  __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x88), _mm512_shuffle_f32x4(v[2], v[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

static inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* out[g] = sum over j of p_g[j] * v[j], for the G heads sharing one key/value head, two keys per vdpbf16ps:
   pb[g] holds head g's probabilities as bf16 (an even count, zero-padded), the value rows of keys j and j + 1
   are interleaved once for all G heads. D = 32 * DC (DC constant: unrolled, in registers); the outputs come out
   with d permuted within 128-bit lanes (lo/hi halves), which `store_values` undoes. */
static inline __attribute__((always_inline)) void weighted_values(const uint16_t *vh, const int D, int n,
                                                                  const uint16_t *const *pb, const int G,
                                                                  const int DC, __mmask32 tail, __m512 *o) {
  for (int i = 0; i < G * 2 * DC; i++) o[i] = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 2) {
    const uint16_t *r0 = vh + (size_t)j * D, *r1 = r0 + D;
    __m512bh lo[8], hi[8];
    for (int c = 0; c < DC; c++) {
      __mmask32 m = c + 1 < DC ? 0xFFFFFFFFu : tail;      /* a last, partial chunk of d */
      __m512i a = _mm512_maskz_loadu_epi16(m, r0 + 32 * c);
      __m512i b = j + 1 < n ? _mm512_maskz_loadu_epi16(m, r1 + 32 * c) : _mm512_setzero_si512();
      lo[c] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      hi[c] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int g = 0; g < G; g++) {
      __m512bh p = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(pb[g] + j));
      for (int c = 0; c < DC; c++) {
        o[(g * DC + c) * 2] = _mm512_dpbf16_ps(o[(g * DC + c) * 2], p, lo[c]);
        o[(g * DC + c) * 2 + 1] = _mm512_dpbf16_ps(o[(g * DC + c) * 2 + 1], p, hi[c]);
      }
    }
  }
}

/* lo holds, per 128-bit lane k, d = 8k + 0..3 of a 32-wide chunk; hi d = 8k + 4..7: put them back in order. */
static inline void store_values(uint16_t *dst, __m512 lo, __m512 hi, __m512 scale, int width) {
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  __m512 x = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), scale);
  __m512 y = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), scale);
  __mmask16 m0 = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
  __mmask16 m1 = width >= 32 ? 0xFFFF : (width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1));
  _mm256_mask_storeu_epi16(dst, m0, (__m256i)_mm512_cvtneps_pbh(x));
  _mm256_mask_storeu_epi16(dst + 16, m1, (__m256i)_mm512_cvtneps_pbh(y));
}

/* acc[j] = the lanes of q . key j, for 16 whole keys of D = 32 * CH (constant: unrolled, in registers). The
   same products in the same order as the general loop, so either path gives the same scores. */
static inline __attribute__((always_inline)) void scores16(const uint16_t *kb, const int D, const int CH,
                                                           const __m512bh *qv, __m512 *acc) {
  for (int j = 0; j < 16; j++) {
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < CH; c++)
      a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(kb + (size_t)j * D + 32 * c));
    acc[j] = a;
  }
}

/* q [M, H, D] bf16, a query position per row; keys and values bf16, a column every D, head g of query row m
   at k + m * rs + g * sh (rs: the batch stride, one cache row per query row in a decode step; 0: all rows
   query one sequence's cache, a prompt chunk). Row m attends to columns start[m] .. end[m] - 1.
   out [M, H, D] bf16. scratch: scratch_per >= 2 * (H / KV) * (max(end) + 2) floats for each of the helper threads
   and the caller. D even, <= 256; H / KV <= 64. Rows are shared with the helper threads when there is enough
   work: each row is computed whole by one thread, the same way by any. */
#define MIN_SHARED_KEYS 4096    /* rows x keys below which an attention call is not worth waking helpers */

void kernos_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, long rs, long sh, int M, int H,
                           int KV, int D, const int *start, const int *end, float scale, uint16_t *out,
                           float *scratch, long scratch_per) {
  long keys = 0;
  for (int b = 0; b < M; b++) keys += end[b] - start[b];
  if (helper_count == 0 || M < 2 || keys < MIN_SHARED_KEYS || pthread_mutex_trylock(&caller)) {
    attention_rows(q, k, v, rs, sh, 0, M, H, KV, D, start, end, scale, out, scratch);
    return;
  }
  int rows = M >= 8 * (helper_count + 1) ? 4 : 1;     /* a prompt chunk's rows a few at a time; a batch's one */
  job = (lin_job){0};
  job.attn = 1, job.M = M, job.rows = rows, job.H = H, job.KV = KV, job.D = D;
  job.q = q, job.k = k, job.v = v, job.rs = rs, job.sh = sh, job.start = start, job.end = end;
  job.scale = scale, job.out = out, job.scratch = scratch, job.scratch_per = scratch_per;
  run_shared((M + rows - 1) / rows);
}

/* Query rows b0 .. b1 - 1 of kernos_attention_bf16, each computed alone (whoever runs it: the same bits). */
static void attention_rows(const uint16_t *q, const uint16_t *k, const uint16_t *v, long rs, long sh, int b0, int b1,
                           int H, int KV, int D, const int *start, const int *end, float scale, uint16_t *out,
                           float *scratch) {
  int group = H / KV, chunks = (D + 31) / 32;
  for (int b = b0; b < b1; b++) {
    int s0 = start[b], n = end[b] - s0;
    for (int kvh = 0; kvh < KV; kvh++) {
      const uint16_t *kh = k + b * rs + (long)kvh * sh + (size_t)s0 * D;
      const uint16_t *vh = v + b * rs + (long)kvh * sh + (size_t)s0 * D;
      float inv[64];
      __m512bh qv[64][8];                      /* the group's queries, pairs of bf16 */
      __mmask32 qm[8];
      __m512 vmax[64];
      for (int c = 0; c < chunks; c++) {
        int left = D - 32 * c;
        qm[c] = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
      }
      for (int hg = 0; hg < group; hg++) {
        const uint16_t *qh = q + ((size_t)b * H + kvh * group + hg) * D;
        for (int c = 0; c < chunks; c++) qv[hg][c] = (__m512bh)_mm512_maskz_loadu_epi16(qm[c], qh + 32 * c);
        vmax[hg] = _mm512_set1_ps(-INFINITY);
      }
      int exact = D == 32 * chunks && (chunks == 1 || chunks == 2 || chunks == 4);
      for (int j0 = 0; j0 < n; j0 += 16) {            /* 16 keys at a time, for every head of the group while
                                                         they are in L1; their 16 scores reduced together */
        int cnt = n - j0 < 16 ? n - j0 : 16;
        const uint16_t *kb = kh + (size_t)j0 * D;
        __mmask16 m = cnt == 16 ? 0xFFFF : (__mmask16)((1u << cnt) - 1);
        for (int hg = 0; hg < group; hg++) {
          __m512 acc[16];
          if (cnt == 16 && exact && chunks == 2) scores16(kb, 64, 2, qv[hg], acc);
          else if (cnt == 16 && exact && chunks == 4) scores16(kb, 128, 4, qv[hg], acc);
          else if (cnt == 16 && exact && chunks == 1) scores16(kb, 32, 1, qv[hg], acc);
          else
            for (int j = 0; j < 16; j++) {
              acc[j] = _mm512_setzero_ps();
              if (j < cnt)
                for (int c = 0; c < chunks; c++)
                  acc[j] = _mm512_dpbf16_ps(acc[j], qv[hg][c],
                                            (__m512bh)_mm512_maskz_loadu_epi16(qm[c], kb + (size_t)j * D + 32 * c));
            }
          __m512 sc = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
          _mm512_mask_storeu_ps(scratch + (size_t)hg * n + j0, m, sc);
          vmax[hg] = _mm512_mask_max_ps(vmax[hg], m, vmax[hg], sc);
        }
      }
      for (int hg = 0; hg < group; hg++) {
        float *sc_row = scratch + (size_t)hg * n;
        __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[hg])), vsum = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
          __mmask16 mm = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
          __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(mm, sc_row + j), vmx));
          _mm512_mask_storeu_ps(sc_row + j, mm, e);
          vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mm, e));
        }
        inv[hg] = 1.0f / _mm512_reduce_add_ps(vsum);
      }
      __m512 o[64];
      int padded = (n + 1) & ~1;
      uint16_t *pbuf = (uint16_t *)(scratch + (size_t)group * n);
      for (int hg = 0; hg < group; hg++) {      /* probabilities to bf16 pairs, as transformers rounds them */
        const float *src = scratch + (size_t)hg * n;
        uint16_t *dst = pbuf + (size_t)hg * padded;
        for (int j = 0; j < n; j += 16) {
          __mmask16 mm = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
          _mm256_mask_storeu_epi16(dst + j, mm, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mm, src + j)));
        }
        if (padded > n) dst[n] = 0;
      }
      for (int g0 = 0; g0 < group; g0 += 4) {        /* value rows shared by up to 4 heads at a time */
        int gn = group - g0 < 4 ? group - g0 : 4;
        const uint16_t *pb[4];
        for (int g = 0; g < gn; g++) pb[g] = pbuf + (size_t)(g0 + g) * padded;
        int dc = chunks, whole = D % 32 == 0;
        __mmask32 tail = whole ? 0xFFFFFFFFu : (__mmask32)((1u << (D % 32)) - 1);
        if (whole && dc == 2 && gn == 3) weighted_values(vh, D, n, pb, 3, 2, tail, o);
        else if (whole && dc == 2 && gn == 4) weighted_values(vh, D, n, pb, 4, 2, tail, o);
        else if (whole && dc == 4 && gn == 2) weighted_values(vh, D, n, pb, 2, 4, tail, o);
        else if (whole && dc == 2 && gn == 1) weighted_values(vh, D, n, pb, 1, 2, tail, o);
        else if (whole && dc == 4 && gn == 1) weighted_values(vh, D, n, pb, 1, 4, tail, o);
        else weighted_values(vh, D, n, pb, gn, dc, tail, o);
        for (int g = 0; g < gn; g++) {
          uint16_t *oh = out + ((size_t)b * H + kvh * group + g0 + g) * D;
          __m512 vinv = _mm512_set1_ps(inv[g0 + g]);
          for (int c = 0; c < dc; c++)
            store_values(oh + 32 * c, o[(g * dc + c) * 2], o[(g * dc + c) * 2 + 1], vinv, D - 32 * c);
        }
      }
    }
  }
}

/* ---- the elementwise work of a decode step, one call each instead of several tensor operations ---------- */

static inline float bf16_round(float f) {     /* to the nearest bf16 (ties to even), as a float */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;   /* NaN */
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}
static inline float bf16_load(const uint16_t *p) {
  uint32_t u = (uint32_t)*p << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t bf16_store(float f) {   /* f already a bf16 value */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

/* h[M, H] += delta (when given, rounded to bf16 as torch's bf16 add); out = RMSNorm(h) * weight, computed as
   transformers' LlamaRMSNorm: in fp32, rounded to bf16, times the bf16 weight, rounded again. */
void kernos_add_rmsnorm_bf16(uint16_t *h, const uint16_t *delta, const uint16_t *weight, int M, int H, float eps,
                             uint16_t *out) {
  for (int m = 0; m < M; m++) {
    uint16_t *row = h + (size_t)m * H;
    float ss = 0.0f;
    if (delta) {
      const uint16_t *d = delta + (size_t)m * H;
      for (int i = 0; i < H; i++) row[i] = bf16_store(bf16_round(bf16_load(row + i) + bf16_load(d + i)));
    }
    for (int i = 0; i < H; i++) { float x = bf16_load(row + i); ss += x * x; }
    float r = 1.0f / sqrtf(ss / (float)H + eps);
    uint16_t *o = out + (size_t)m * H;
    for (int i = 0; i < H; i++)
      o[i] = bf16_store(bf16_round(bf16_load(weight + i) * bf16_round(bf16_load(row + i) * r)));
  }
}

/* From a fused q|k|v projection qkv[M, (NQ + 2 * NKV) * D]: q rotated into q_out[M, NQ, D]; row m's k rotated
   and its v written into the cache buffers at head g: kbuf + m * rs + g * sh + (col + m * cs) * D (a decode
   step: rs the batch stride, cs 0; a prompt chunk: rs 0, cs 1, consecutive columns of one sequence).
   cos and sin [M, D] bf16. Each product and the sum are rounded to bf16, as transformers' rotary is. */
void kernos_rope_append_bf16(const uint16_t *qkv, int M, int NQ, int NKV, int D, const uint16_t *cos,
                             const uint16_t *sin, uint16_t *q_out, uint16_t *kbuf, uint16_t *vbuf, long rs, long sh,
                             int col, int cs) {
  int half = D / 2, width = (NQ + 2 * NKV) * D;
  for (int m = 0; m < M; m++) {
    const uint16_t *src = qkv + (size_t)m * width, *c = cos + (size_t)m * D, *s = sin + (size_t)m * D;
    for (int head = 0; head < NQ + NKV; head++) {
      const uint16_t *x = src + (size_t)head * D;
      uint16_t *dst = head < NQ ? q_out + ((size_t)m * NQ + head) * D
                                : kbuf + m * rs + (long)(head - NQ) * sh + (size_t)(col + m * cs) * D;
      for (int i = 0; i < D; i++) {
        float rot = i < half ? -bf16_load(x + i + half) : bf16_load(x + i - half);
        float a = bf16_round(bf16_load(x + i) * bf16_load(c + i));
        float b = bf16_round(rot * bf16_load(s + i));
        dst[i] = bf16_store(bf16_round(a + b));
      }
    }
    const uint16_t *v = src + (size_t)(NQ + NKV) * D;
    for (int g = 0; g < NKV; g++)
      memcpy(vbuf + m * rs + (long)g * sh + (size_t)(col + m * cs) * D, v + (size_t)g * D, (size_t)D * sizeof(uint16_t));
  }
}

/* gu[M, 2 * I] = gate | up -> out[M, I] = bf16(silu(gate)) * up, rounded to bf16 (torch's bf16 silu and mul). */
static inline __m512 round_bf16x16(__m512 x) { return bf16_to_f32((__m256i)_mm512_cvtneps_pbh(x)); }

void kernos_silu_mul_bf16(const uint16_t *gu, int M, int I, uint16_t *out) {
  const __m512 one = _mm512_set1_ps(1.0f), hi = _mm512_set1_ps(87.0f);
  for (int m = 0; m < M; m++) {
    const uint16_t *g = gu + (size_t)m * 2 * I, *u = g + I;
    uint16_t *o = out + (size_t)m * I;
    for (int i = 0; i < I; i += 16) {
      __mmask16 k = I - i >= 16 ? 0xFFFF : (__mmask16)((1u << (I - i)) - 1);
      __m512 x = bf16_to_f32(_mm256_maskz_loadu_epi16(k, g + i));
      __m512 e = exp_neg(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), hi));   /* exp(-x) */
      __m512 sx = round_bf16x16(_mm512_div_ps(x, _mm512_add_ps(one, e)));
      __m512 y = _mm512_mul_ps(sx, bf16_to_f32(_mm256_maskz_loadu_epi16(k, u + i)));
      _mm256_mask_storeu_epi16(o + i, k, (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}
