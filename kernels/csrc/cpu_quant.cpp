// AVX2/FMA/F16C kernels for y = x @ dequant(W) + b on GPTQ weights, built by kernels/cpu_build.py
// as the CPython extension module _llmq_cpu.
//
// The packed int32 qweight [K*bits/32, N] is read in place: one 256-bit load takes the same
// word row for 8 consecutive output columns, so each lane decodes its own column.
//
// Decoding trick: a value sitting at bit offset `sh` of its word is extracted with a single AND
// (no shift) and converted to float, which gives q * 2^sh exactly; the matching activation is
// pre-multiplied by 2^-sh (exact too), so the product is exactly q * x. The value touching the
// sign bit is shifted down instead, and 3-bit values that straddle two words are spliced.
//
// Zero points and scales are applied once per group: sum_k x_k s (q_k - z) = s (sum_k x_k q_k
// - z sum_k x_k), so the inner loop is AND, convert and FMA per 8 weights. Act-order g_idx (rows
// of different groups interleaved) multiplies each row's scale into the decoded weights instead.
//
// Work is split over output column tiles (and row tiles when M > 1) with OpenMP, linked against
// the runtime torch already uses so that both share one thread pool; see parallel_for for how
// it copes with a core taken by another process.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Packed by kernels/cpu.py (_PARAMS, struct format "6Q3q2i"); every pointer stays owned by Python.
struct Weights {
  const int32_t* qweight;  // [K * bits / 32, N], GPTQ layout
  const int16_t* zeros;    // [G, N] zero points themselves (unpacked, any checkpoint format)
  const void* scales;      // [G, N], fp16 when scales_fp32 == 0 else fp32
  const int32_t* g_idx;    // [K] group of each input row, any order
  const int32_t* gstart;   // [G + 1] first row of each group when groups are contiguous runs of
                           // whole packing units, else null (act-order: scales applied per row)
  const float* bias;       // [N] or null (gemv only)
  int64_t K, N, G;
  int32_t bits, scales_fp32;
};

#define LLMQ_INLINE inline __attribute__((always_inline))

// Up to this many accumulator sets per tile, see accumulate().
constexpr int kAccSets = 2;
// Packed rows (units) per pass over the column blocks for one row, see gemv_range.
constexpr int64_t kChunkUnits = 8;
// Below this much work (multiply-adds, or weights dequantized) one thread beats two: waking the
// second costs more than it saves.
constexpr int64_t kMinParallelWork = 1 << 18;
// A parallel region slower than kStallNs + work / 4 ns (1 ms more than several times what the
// work takes on one thread) waited for a preempted thread. Two such stalls within kStallWindowNs
// mean another process holds a core (a lone one is a hiccup): the next calls then run on one
// thread for a back-off that doubles from kFirstBackoffNs to kMaxBackoffNs while stalls go on.
constexpr int64_t kStallNs = 1'000'000, kStallWindowNs = 50'000'000;
constexpr int64_t kFirstBackoffNs = 250'000'000, kMaxBackoffNs = 8'000'000'000;

std::atomic<int64_t> serial_until{0};
std::atomic<int64_t> last_stall{-kStallWindowNs};
std::atomic<int64_t> backoff{kFirstBackoffNs};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// body(i) for i in [0, n), on up to nthreads threads of the OpenMP pool torch uses.
//
// An OpenMP region ends in a barrier, so when another process holds a core the region waits a
// scheduler slice (milliseconds) for the preempted thread: ruinous for kernels of microseconds
// on a shared 2-core machine. Repeated overruns send later calls to one thread for a while.
template <typename F>
void parallel_for(int64_t n, int nthreads, int64_t work, const F& body) {
  const int64_t start = now_ns();
  if (nthreads < 2 || work < kMinParallelWork || start < serial_until.load(std::memory_order_relaxed)) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < n; ++i) body(i);
  const int64_t end = now_ns();
  if (end - start <= kStallNs + work / 4) {
    backoff.store(kFirstBackoffNs, std::memory_order_relaxed);
  } else if (end - last_stall.exchange(end, std::memory_order_relaxed) < kStallWindowNs) {
    const int64_t wait = backoff.load(std::memory_order_relaxed);
    serial_until.store(end + wait, std::memory_order_relaxed);
    backoff.store(std::min(2 * wait, kMaxBackoffNs), std::memory_order_relaxed);
  }
}

template <typename F, int... I>
LLMQ_INLINE void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
LLMQ_INLINE void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// Where value i of a packing unit (VPU values in WPU words) lives and how it is extracted.
template <int BITS>
struct Layout {
  static constexpr int VPU = BITS == 3 ? 32 : 32 / BITS;
  static constexpr int WPU = BITS == 3 ? 3 : 1;
  static constexpr int MASK = (1 << BITS) - 1;
  static constexpr int word(int i) { return i * BITS / 32; }
  static constexpr int shift(int i) { return i * BITS % 32; }
  // Below the sign bit and inside one word: AND in place, giving q * 2^shift.
  static constexpr bool in_place(int i) { return shift(i) + BITS < 32; }
  static constexpr float x_scale(int i) { return in_place(i) ? 1.0f / float(1u << shift(i)) : 1.0f; }
};

template <int BITS, int I>
LLMQ_INLINE __m256 decode(const __m256i* w) {
  using L = Layout<BITS>;
  constexpr int wd = L::word(I), sh = L::shift(I);
  if constexpr (L::in_place(I)) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(w[wd], _mm256_set1_epi32(L::MASK << sh)));
  } else if constexpr (sh + BITS == 32) {
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(w[wd], sh));
  } else {
    const __m256i v = _mm256_or_si256(_mm256_srli_epi32(w[wd], sh), _mm256_slli_epi32(w[wd + 1], 32 - sh));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(L::MASK)));
  }
}

template <typename S>
LLMQ_INLINE __m256 load_scales(const void* scales, int64_t i) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm256_loadu_ps(static_cast<const float*>(scales) + i);
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(scales) + i)));
  }
}

LLMQ_INLINE __m256 load_zeros(const int16_t* zeros) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros))));
}

// acc[a][m][v] += x[m0 + m, k] * w[k, n0 + 8v + lane] over units [u0, u1), without zero points.
// Plain groups leave the scale out too (applied per group by the caller); act-order (ACT)
// multiplies each row's scale in here because neighbouring rows belong to different groups.
// AS accumulator sets take alternate values of a unit, so that MT * NBV * AS independent FMA
// chains (8 or more) hide the FMA latency.
template <int BITS, typename S, int MT, int NBV, int AS, bool ACT>
LLMQ_INLINE void accumulate(const Weights& W, const float* xs, int64_t m0, int64_t n0, int64_t u0, int64_t u1,
                            __m256 (&acc)[AS][MT][NBV]) {
  using L = Layout<BITS>;
  const int64_t N = W.N, K = W.K;
  for (int64_t u = u0; u < u1; ++u) {
    __m256i w[NBV][L::WPU];
    const int32_t* row = W.qweight + u * L::WPU * N + n0;
    for (int v = 0; v < NBV; ++v)
      for (int j = 0; j < L::WPU; ++j)
        w[v][j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * N + 8 * v));
    const float* xu = xs + m0 * K + u * L::VPU;
    static_for<L::VPU>([&](auto I) __attribute__((always_inline)) {
      constexpr int a = I() % AS;
      __m256 f[NBV];
      for (int v = 0; v < NBV; ++v) f[v] = decode<BITS, I()>(w[v]);
      if constexpr (ACT) {
        const int64_t at = static_cast<int64_t>(W.g_idx[u * L::VPU + I()]) * N + n0;
        for (int v = 0; v < NBV; ++v) f[v] = _mm256_mul_ps(f[v], load_scales<S>(W.scales, at + 8 * v));
      }
      for (int m = 0; m < MT; ++m) {
        const __m256 xb = _mm256_broadcast_ss(xu + m * K + I());
        for (int v = 0; v < NBV; ++v) acc[a][m][v] = _mm256_fmadd_ps(f[v], xb, acc[a][m][v]);
      }
    });
  }
}

template <int AS, int MT, int NBV>
LLMQ_INLINE void zero(__m256 (&acc)[AS][MT][NBV]) {
  for (int a = 0; a < AS; ++a)
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NBV; ++v) acc[a][m][v] = _mm256_setzero_ps();
}

template <int AS, int MT, int NBV>
LLMQ_INLINE void reduce(__m256 (&acc)[AS][MT][NBV]) {
  for (int a = 1; a < AS; ++a)
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NBV; ++v) acc[0][m][v] = _mm256_add_ps(acc[0][m][v], acc[a][m][v]);
}

// Units [u0, u1) (one run, see gemv_range) for rows m0..m0+MT and columns n0..n0+8*NBV.
// Plain groups sum x q over the group's runs in `raw` (first run stores, later ones add); the
// last run applies scale and zero point into y. Act-order runs (scales already applied) add
// straight into y.
// xs: activations pre-scaled per unit position [M, K]; xsum: per-group sums of x [M, G].
template <int BITS, typename S, int MT, int NBV, int AS, bool ACT>
void chunk_tile(const Weights& W, const float* xs, const float* xsum, int64_t m0, int64_t n0, int64_t g, int64_t u0,
                int64_t u1, bool first, bool last, float* raw, float* y) {
  const int64_t N = W.N, G = W.G;
  __m256 acc[AS][MT][NBV];
  zero(acc);
  accumulate<BITS, S, MT, NBV, AS, ACT>(W, xs, m0, n0, u0, u1, acc);
  reduce(acc);
  for (int v = 0; v < NBV; ++v) {
    const int64_t at = m0 * N + n0 + 8 * v;
    if constexpr (ACT) {
      for (int m = 0; m < MT; ++m)
        _mm256_storeu_ps(y + at + m * N, _mm256_add_ps(_mm256_loadu_ps(y + at + m * N), acc[0][m][v]));
    } else {
      if (!first)
        for (int m = 0; m < MT; ++m) acc[0][m][v] = _mm256_add_ps(acc[0][m][v], _mm256_loadu_ps(raw + at + m * N));
      if (!last) {
        for (int m = 0; m < MT; ++m) _mm256_storeu_ps(raw + at + m * N, acc[0][m][v]);
        continue;
      }
      // s (sum_k x_k q_k - z sum_k x_k) for group g
      const __m256 s = load_scales<S>(W.scales, g * N + n0 + 8 * v);
      const __m256 z = load_zeros(W.zeros + g * N + n0 + 8 * v);
      for (int m = 0; m < MT; ++m) {
        const __m256 t = _mm256_fnmadd_ps(z, _mm256_broadcast_ss(xsum + (m0 + m) * G + g), acc[0][m][v]);
        _mm256_storeu_ps(y + at + m * N, _mm256_fmadd_ps(s, t, _mm256_loadu_ps(y + at + m * N)));
      }
    }
  }
}

// Register budgets (16 ymm): a single row takes tiles of 4 column vectors (2 for 3-bit, which
// keeps three words per vector live); row tiles of 2 or 4 take 2 (more rows measured slower).
template <int BITS>
constexpr int row_nbv() {
  return BITS == 3 ? 2 : 4;
}

// What one pass of gemv_range works on: units [u0, u1) of group g (or of act-order rows).
struct Chunk {
  int64_t g, u0, u1;
  bool first, last;
};

template <int BITS, typename S, bool ACT, int MT, int NBV>
LLMQ_INLINE void tile(const Weights& W, const float* xs, const float* xsum, int64_t m0, int64_t n0, const Chunk& c,
                      float* raw, float* y) {
  constexpr int AS = std::max(1, std::min(kAccSets, 8 / (MT * NBV)));
  chunk_tile<BITS, S, MT, NBV, AS, ACT>(W, xs, xsum, m0, n0, c.g, c.u0, c.u1, c.first, c.last, raw, y);
}

template <int BITS, typename S, bool ACT, int MT>
LLMQ_INLINE void tile_cols(const Weights& W, const float* xs, const float* xsum, int64_t m0, int64_t n0, int nbv,
                           const Chunk& c, float* raw, float* y) {
  if constexpr (MT == 1 && row_nbv<BITS>() == 4) {
    if (nbv == 4) return tile<BITS, S, ACT, 1, 4>(W, xs, xsum, m0, n0, c, raw, y);
  }
  if (nbv == 2) tile<BITS, S, ACT, MT, 2>(W, xs, xsum, m0, n0, c, raw, y);
  else tile<BITS, S, ACT, MT, 1>(W, xs, xsum, m0, n0, c, raw, y);
}

// Columns [nb, ne) of all M rows of y: runs of packed rows outermost, then column blocks, then row
// tiles. For one row (decode, weights streamed from memory) a run is kChunkUnits packed rows,
// read as a few parallel sequential streams that the prefetchers follow; one column block down
// all K rows jumps a whole qweight row on every load and streams at half the speed, though it
// is up to 25% faster from cache. Several rows reuse the weights, so there a run is a whole
// group, whose weights stay in L1 across the row tiles. raw holds per-group sums across runs,
// [M, N] like y.
template <int BITS, typename S, bool ACT>
void gemv_range(const Weights& W, const float* xs, const float* xsum, int64_t M, int64_t nb, int64_t ne, float* raw,
                float* y) {
  using L = Layout<BITS>;
  const int64_t N = W.N, G = W.G, units = W.K / L::VPU;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = nb; n < ne; ++n) y[m * N + n] = W.bias ? W.bias[n] : 0.0f;
  const int64_t width = 8 * (M == 1 ? row_nbv<BITS>() : 2);
  for (int64_t g = 0; g < (ACT ? 1 : G); ++g) {
    const int64_t g0 = ACT ? 0 : W.gstart[g] / L::VPU, g1 = ACT ? units : W.gstart[g + 1] / L::VPU;
    const int64_t step = M == 1 ? kChunkUnits : std::max<int64_t>(1, g1 - g0);
    for (int64_t u0 = g0; u0 < g1; u0 += step) {
      const Chunk c{g, u0, std::min(g1, u0 + step), u0 == g0, u0 + step >= g1};
      for (int64_t n0 = nb; n0 < ne;) {
        const int nbv = static_cast<int>((ne - n0 >= width ? width : 8) / 8);
        for (int64_t m0 = 0; m0 < M;) {
          if (M - m0 >= 4) {
            tile_cols<BITS, S, ACT, 4>(W, xs, xsum, m0, n0, nbv, c, raw, y);
            m0 += 4;
          } else if (M - m0 >= 2) {
            tile_cols<BITS, S, ACT, 2>(W, xs, xsum, m0, n0, nbv, c, raw, y);
            m0 += 2;
          } else {
            tile_cols<BITS, S, ACT, 1>(W, xs, xsum, m0, n0, nbv, c, raw, y);
            m0 += 1;
          }
        }
        n0 += 8 * nbv;
      }
    }
  }
  if constexpr (ACT) {
    // sum_k x_k s_gk (q_k - z_gk) = sum_k (x_k s_gk) q_k - sum_g s_g z_g sum_{k in g} x_k
    for (int64_t g = 0; g < G; ++g)
      for (int64_t n = nb; n < ne; n += 8) {
        const __m256 sz = _mm256_mul_ps(load_scales<S>(W.scales, g * N + n), load_zeros(W.zeros + g * N + n));
        for (int64_t m = 0; m < M; ++m) {
          float* out = y + m * N + n;
          _mm256_storeu_ps(out, _mm256_fnmadd_ps(sz, _mm256_broadcast_ss(xsum + m * G + g), _mm256_loadu_ps(out)));
        }
      }
  }
}

// Fills xs (x times 2^-shift of each row's unit position, see decode) and xsum (x summed per
// group) for all M rows.
template <int BITS>
void prepare_x(const Weights& W, int64_t M, const float* x, float* xs, float* xsum) {
  using L = Layout<BITS>;
  const int64_t K = W.K, G = W.G;
  float x_scale[L::VPU];
  for (int i = 0; i < L::VPU; ++i) x_scale[i] = L::x_scale(i);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    for (int64_t u = 0; u < K / L::VPU; ++u)
      for (int i = 0; i < L::VPU; ++i) xs[m * K + u * L::VPU + i] = xm[u * L::VPU + i] * x_scale[i];
    float* sums = xsum + m * G;
    if (W.gstart) {
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = W.gstart[g]; k < W.gstart[g + 1]; ++k) s += xm[k];
        sums[g] = s;
      }
    } else {
      std::fill(sums, sums + G, 0.0f);
      for (int64_t k = 0; k < K; ++k) sums[W.g_idx[k]] += xm[k];
    }
  }
}

template <int BITS, typename S>
void gemv(const Weights& W, int64_t M, const float* x, float* y, int nthreads) {
  const int64_t K = W.K, N = W.N, G = W.G;
  // Per calling thread and reused across calls; OpenMP workers reach it through the pointers
  // taken here (a thread_local named inside the parallel region would be the worker's own).
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(M * (K + G + N)));
  float* xs = buf.data();
  float* xsum = xs + M * K;
  float* raw = xsum + M * G;
  prepare_x<BITS>(W, M, x, xs, xsum);
  // One range of whole 32-column blocks per thread.
  const int64_t blocks = (N + 31) / 32, ranges = std::max<int64_t>(1, std::min<int64_t>(nthreads, blocks));
  auto range = [&](int64_t r) {
    const int64_t nb = r * blocks / ranges * 32, ne = std::min(N, (r + 1) * blocks / ranges * 32);
    if (W.gstart) gemv_range<BITS, S, false>(W, xs, xsum, M, nb, ne, raw, y);
    else gemv_range<BITS, S, true>(W, xs, xsum, M, nb, ne, raw, y);
  };
  parallel_for(ranges, nthreads, M * K * N, range);
}

// Rows [k0, k1) (multiples of the packing unit) of w[k, n] = s[g, n] * (q[k, n] - z[g, n]) into
// out [k1 - k0, N], fp32 with one rounding like the torch reference. With contiguous groups a unit
// shares one group; act-order (ACT) looks up each row.
template <int BITS, typename S, bool ACT>
void dequant_rows(const Weights& W, float* out, int64_t k0, int64_t k1, int nthreads) {
  using L = Layout<BITS>;
  const int64_t N = W.N, u0 = k0 / L::VPU;
  parallel_for(k1 / L::VPU - u0, nthreads, (k1 - k0) * N, [&](int64_t i) {
    const int64_t u = u0 + i;
    const int32_t* row = W.qweight + u * L::WPU * N;
    const int32_t* groups = W.g_idx + u * L::VPU;
    float* dst = out + (u - u0) * L::VPU * N;
    for (int64_t n = 0; n < N; n += 8) {
      __m256i w[L::WPU];
      for (int j = 0; j < L::WPU; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * N + n));
      const int64_t unit_at = groups[0] * N + n;
      const __m256 s = load_scales<S>(W.scales, unit_at), z = load_zeros(W.zeros + unit_at);
      static_for<L::VPU>([&](auto I) __attribute__((always_inline)) {
        const __m256 q = _mm256_mul_ps(decode<BITS, I()>(w), _mm256_set1_ps(L::x_scale(I())));
        if constexpr (ACT) {
          const int64_t at = groups[I()] * N + n;
          const __m256 wq = _mm256_sub_ps(q, load_zeros(W.zeros + at));
          _mm256_storeu_ps(dst + I() * N + n, _mm256_mul_ps(wq, load_scales<S>(W.scales, at)));
        } else {
          _mm256_storeu_ps(dst + I() * N + n, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
        }
      });
    }
  });
}

template <int BITS, typename S>
void dequant(const Weights& W, float* out, int64_t k0, int64_t k1, int nthreads) {
  if (W.gstart) dequant_rows<BITS, S, false>(W, out, k0, k1, nthreads);
  else dequant_rows<BITS, S, true>(W, out, k0, k1, nthreads);
}

template <template <int, typename> class Fn, typename... A>
int dispatch(const Weights& W, A... args) {
  const bool f32 = W.scales_fp32 != 0;
  switch (W.bits) {
    case 2: f32 ? Fn<2, float>::run(W, args...) : Fn<2, uint16_t>::run(W, args...); return 0;
    case 3: f32 ? Fn<3, float>::run(W, args...) : Fn<3, uint16_t>::run(W, args...); return 0;
    case 4: f32 ? Fn<4, float>::run(W, args...) : Fn<4, uint16_t>::run(W, args...); return 0;
    case 8: f32 ? Fn<8, float>::run(W, args...) : Fn<8, uint16_t>::run(W, args...); return 0;
    default: return 1;
  }
}

template <int BITS, typename S>
struct GemvFn {
  static void run(const Weights& W, int64_t M, const float* x, float* y, int nt) { gemv<BITS, S>(W, M, x, y, nt); }
};
template <int BITS, typename S>
struct DequantFn {
  static void run(const Weights& W, float* out, int64_t k0, int64_t k1, int nt) { dequant<BITS, S>(W, out, k0, k1, nt); }
};

// ---- Half-precision weights: y [M, N] = x [M, K] @ W^T + bias, W fp16 or bf16 [N, K] ----
// For the unquantized layers a GPTQ checkpoint stores in half precision (the output head, often
// tied to the embeddings): each weight is widened to fp32 exactly in registers and multiplied
// with fp32 activations in fp32, so the result equals fp32 `linear` on the widened weight up to
// summation order, while moving half the bytes. W is nn.Linear's layout, so every output is a
// dot product along K: a tile holds MT rows of x and NT rows of W, one accumulator each.

template <bool BF16>
LLMQ_INLINE __m256 load_half(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

template <bool BF16>
LLMQ_INLINE float half_to_float(uint16_t h) {
  if constexpr (BF16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
  } else {
    return _cvtsh_ss(h);
  }
}

LLMQ_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct HalfWeights {
  const uint16_t* w;  // [N, K]
  const float* bias;  // [N] or null
  int64_t K, N;
};

// y[m0.., n0..] for MT rows of x and NT rows of W.
template <bool BF16, int MT, int NT>
LLMQ_INLINE void half_tile(const HalfWeights& W, const float* x, float* y, int64_t m0, int64_t n0) {
  const int64_t K = W.K, K8 = K & ~int64_t{7};
  __m256 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_setzero_ps();
  const uint16_t* w = W.w + n0 * K;
  const float* xm = x + m0 * K;
  for (int64_t k = 0; k < K8; k += 8) {
    if constexpr (MT == 1) {  // one row: load each weight vector right before its FMA
      const __m256 xv = _mm256_loadu_ps(xm + k);
      for (int j = 0; j < NT; ++j) acc[0][j] = _mm256_fmadd_ps(load_half<BF16>(w + j * K + k), xv, acc[0][j]);
    } else {
      __m256 wv[NT];
      for (int j = 0; j < NT; ++j) wv[j] = load_half<BF16>(w + j * K + k);
      for (int m = 0; m < MT; ++m) {
        const __m256 xv = _mm256_loadu_ps(xm + m * K + k);
        for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_fmadd_ps(wv[j], xv, acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    for (int j = 0; j < NT; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t k = K8; k < K; ++k) s += half_to_float<BF16>(w[j * K + k]) * xm[m * K + k];
      if (W.bias) s += W.bias[n0 + j];
      y[(m0 + m) * W.N + n0 + j] = s;
    }
  }
}

constexpr int kHalfRows = 8;  // rows of W per parallel work item

template <bool BF16>
void half_gemv(const HalfWeights& W, int64_t M, const float* x, float* y, int nthreads) {
  const int64_t N = W.N;
  const int64_t tiles = (N + kHalfRows - 1) / kHalfRows;
  parallel_for(tiles, nthreads, M * N * W.K, [&](int64_t t) {
    const int64_t n0 = t * kHalfRows;
    if (n0 + kHalfRows > N) {  // ragged last tile: one row of W at a time
      for (int64_t n = n0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) half_tile<BF16, 1, 1>(W, x, y, m, n);
      return;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
      static_for<kHalfRows / 2>([&](auto J) { half_tile<BF16, 4, 2>(W, x, y, m, n0 + 2 * J()); });
    for (; m < M; ++m) half_tile<BF16, 1, kHalfRows>(W, x, y, m, n0);
  });
}

// Python entry points. Arguments are plain ints (addresses from Tensor.data_ptr()) so that a
// call costs well under a microsecond; kernels/cpu.py checks shapes, dtypes and contiguity.

const Weights* weights_arg(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
    return nullptr;
  }
  if (!PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != static_cast<Py_ssize_t>(sizeof(Weights))) {
    PyErr_SetString(PyExc_TypeError, "first argument must be the packed weight parameters");
    return nullptr;
  }
  return reinterpret_cast<const Weights*>(PyBytes_AS_STRING(args[0]));
}

PyObject* done(int rc) {
  if (rc) {
    PyErr_SetString(PyExc_ValueError, "unsupported bit width");
    return nullptr;
  }
  Py_RETURN_NONE;
}

// gemv(params: bytes, m: int, x: int, y: int, nthreads: int): y [m, N] = x [m, K] @ W + bias,
// all fp32 and contiguous.
PyObject* py_gemv(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const Weights* W = weights_arg(args, nargs, 5);
  if (W == nullptr) return nullptr;
  const int64_t M = PyLong_AsLongLong(args[1]);
  const auto* x = static_cast<const float*>(PyLong_AsVoidPtr(args[2]));
  auto* y = static_cast<float*>(PyLong_AsVoidPtr(args[3]));
  const int nthreads = static_cast<int>(PyLong_AsLong(args[4]));
  if (PyErr_Occurred()) return nullptr;
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = dispatch<GemvFn>(*W, M, x, y, nthreads);
  Py_END_ALLOW_THREADS;
  return done(rc);
}

// dequant(params: bytes, out: int, k0: int, k1: int, nthreads: int): out [k1 - k0, N] fp32
// contiguous = rows k0..k1 of dequant(W); k0 and k1 multiples of the packing unit.
PyObject* py_dequant(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const Weights* W = weights_arg(args, nargs, 5);
  if (W == nullptr) return nullptr;
  auto* out = static_cast<float*>(PyLong_AsVoidPtr(args[1]));
  const int64_t k0 = PyLong_AsLongLong(args[2]), k1 = PyLong_AsLongLong(args[3]);
  const int nthreads = static_cast<int>(PyLong_AsLong(args[4]));
  if (PyErr_Occurred()) return nullptr;
  const int64_t unit = 32 / std::gcd(32, static_cast<int>(W->bits));
  if (k0 < 0 || k1 > W->K || k0 > k1 || k0 % unit || k1 % unit) {
    PyErr_SetString(PyExc_ValueError, "row range outside the weight or not on packing units");
    return nullptr;
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS;
  rc = dispatch<DequantFn>(*W, out, k0, k1, nthreads);
  Py_END_ALLOW_THREADS;
  return done(rc);
}

// gemv_half(w: int, bf16: int, bias: int, m: int, k: int, n: int, x: int, y: int, nthreads: int):
// y [m, n] = x [m, k] @ w^T + bias; w [n, k] fp16 (bf16 when bf16 != 0), bias fp32 [n] or 0, x and
// y fp32, all contiguous.
PyObject* py_gemv_half(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9) {
    PyErr_Format(PyExc_TypeError, "expected 9 arguments, got %zd", nargs);
    return nullptr;
  }
  HalfWeights W{static_cast<const uint16_t*>(PyLong_AsVoidPtr(args[0])), nullptr, 0, 0};
  const long bf16 = PyLong_AsLong(args[1]);
  W.bias = static_cast<const float*>(PyLong_AsVoidPtr(args[2]));
  const int64_t M = PyLong_AsLongLong(args[3]);
  W.K = PyLong_AsLongLong(args[4]);
  W.N = PyLong_AsLongLong(args[5]);
  const auto* x = static_cast<const float*>(PyLong_AsVoidPtr(args[6]));
  auto* y = static_cast<float*>(PyLong_AsVoidPtr(args[7]));
  const int nthreads = static_cast<int>(PyLong_AsLong(args[8]));
  if (PyErr_Occurred()) return nullptr;
  if (W.w == nullptr || x == nullptr || y == nullptr || M < 0 || W.K < 1 || W.N < 1) {
    PyErr_SetString(PyExc_ValueError, "null pointer or empty shape");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS;
  if (bf16) half_gemv<true>(W, M, x, y, nthreads);
  else half_gemv<false>(W, M, x, y, nthreads);
  Py_END_ALLOW_THREADS;
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"gemv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_gemv)), METH_FASTCALL, "y = x @ W + bias"},
    {"dequant", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_dequant)), METH_FASTCALL,
     "fp32 [K, N] weight"},
    {"gemv_half", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_gemv_half)), METH_FASTCALL,
     "y = x @ W^T + bias, W fp16/bf16 [N, K]"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_llmq_cpu", "llmq CPU kernels", -1, methods, nullptr, nullptr, nullptr,
                      nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__llmq_cpu() { return PyModule_Create(&module); }
