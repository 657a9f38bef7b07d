// AVX2/FMA/F16C kernels for y = x @ dequant(W) + b on GPTQ v1 weights, called through ctypes.
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
// - z sum_k x_k), so the inner loop is AND, convert and FMA per 8 weights.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Mirrors kernels/cpu.py::_Weights; every pointer stays owned by Python.
struct Weights {
  const int32_t* qweight;  // [K * bits / 32, N], GPTQ v1 layout
  const uint8_t* zeros;    // [G, N] unpacked zero points
  const void* scales;      // [G, N], fp16 when scales_fp32 == 0 else fp32
  const int32_t* gstart;   // [G + 1] first input row of each group, multiples of the pack unit
  const float* bias;       // [N] or null
  int64_t K, N, G;
  int32_t bits, scales_fp32;
};

#define LLMQ_INLINE inline __attribute__((always_inline))

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

LLMQ_INLINE __m256 load_zeros(const uint8_t* zeros) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros))));
}

// Rows m0..m0+MT and columns n0..n0+8*NBV of y, over all groups.
// xs: activations pre-scaled per unit position [M, K]; xsum: per-group sums of x [M, G].
template <int BITS, typename S, int MT, int NBV>
void gemv_tile(const Weights& W, const float* xs, const float* xsum, int64_t m0, int64_t n0, float* y) {
  using L = Layout<BITS>;
  const int64_t N = W.N, K = W.K, G = W.G;
  __m256 out[MT][NBV];
  for (int v = 0; v < NBV; ++v) {
    const __m256 b = W.bias ? _mm256_loadu_ps(W.bias + n0 + 8 * v) : _mm256_setzero_ps();
    for (int m = 0; m < MT; ++m) out[m][v] = b;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[MT][NBV];
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NBV; ++v) acc[m][v] = _mm256_setzero_ps();
    const int64_t u_end = W.gstart[g + 1] / L::VPU;
    for (int64_t u = W.gstart[g] / L::VPU; u < u_end; ++u) {
      __m256i w[NBV][L::WPU];
      const int32_t* row = W.qweight + u * L::WPU * N + n0;
      for (int v = 0; v < NBV; ++v)
        for (int j = 0; j < L::WPU; ++j)
          w[v][j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * N + 8 * v));
      const float* xu = xs + m0 * K + u * L::VPU;
      static_for<L::VPU>([&](auto I) __attribute__((always_inline)) {
        __m256 f[NBV];
        for (int v = 0; v < NBV; ++v) f[v] = decode<BITS, I()>(w[v]);
        for (int m = 0; m < MT; ++m) {
          const __m256 xb = _mm256_broadcast_ss(xu + m * K + I());
          for (int v = 0; v < NBV; ++v) acc[m][v] = _mm256_fmadd_ps(f[v], xb, acc[m][v]);
        }
      });
    }
    for (int v = 0; v < NBV; ++v) {
      const __m256 s = load_scales<S>(W.scales, g * N + n0 + 8 * v);
      const __m256 z = load_zeros(W.zeros + g * N + n0 + 8 * v);
      for (int m = 0; m < MT; ++m) {
        const __m256 t = _mm256_fnmadd_ps(z, _mm256_broadcast_ss(xsum + (m0 + m) * G + g), acc[m][v]);
        out[m][v] = _mm256_fmadd_ps(s, t, out[m][v]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NBV; ++v) _mm256_storeu_ps(y + (m0 + m) * N + n0 + 8 * v, out[m][v]);
}

struct Task {
  int64_t m0, n0;
  int mt, nbv;
};

// Register budgets (16 ymm): one row takes 4 column vectors, row tiles of 2 or 4 take 2;
// 3-bit keeps three words per column vector live, so it always takes 2.
template <int BITS>
constexpr int wide_nbv(int mt) {
  return mt == 1 && BITS != 3 ? 4 : 2;
}

template <int BITS, typename S>
void run_task(const Weights& W, const float* xs, const float* xsum, const Task& t, float* y) {
  constexpr int NB1 = wide_nbv<BITS>(1), NB2 = wide_nbv<BITS>(2);
  if (t.mt == 1) {
    if (t.nbv == NB1) gemv_tile<BITS, S, 1, NB1>(W, xs, xsum, t.m0, t.n0, y);
    else gemv_tile<BITS, S, 1, 1>(W, xs, xsum, t.m0, t.n0, y);
  } else if (t.mt == 2) {
    if (t.nbv == NB2) gemv_tile<BITS, S, 2, NB2>(W, xs, xsum, t.m0, t.n0, y);
    else gemv_tile<BITS, S, 2, 1>(W, xs, xsum, t.m0, t.n0, y);
  } else {
    if (t.nbv == NB2) gemv_tile<BITS, S, 4, NB2>(W, xs, xsum, t.m0, t.n0, y);
    else gemv_tile<BITS, S, 4, 1>(W, xs, xsum, t.m0, t.n0, y);
  }
}

template <int BITS, typename S>
void gemv(const Weights& W, int64_t M, const float* x, float* y, int nthreads) {
  using L = Layout<BITS>;
  const int64_t K = W.K, N = W.N, G = W.G;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(M * (K + G)));
  float* xs = buf.data();
  float* xsum = xs + M * K;
  float scale[L::VPU];
  for (int i = 0; i < L::VPU; ++i) scale[i] = L::x_scale(i);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) xs[m * K + k] = x[m * K + k] * scale[k % L::VPU];
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t k = W.gstart[g]; k < W.gstart[g + 1]; ++k) s += x[m * K + k];
      xsum[m * G + g] = s;
    }
  }
  std::vector<Task> tasks;
  for (int64_t m0 = 0; m0 < M;) {
    const int mt = M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
    const int nbv = wide_nbv<BITS>(mt);
    int64_t n0 = 0;
    for (; n0 + 8 * nbv <= N; n0 += 8 * nbv) tasks.push_back({m0, n0, mt, nbv});
    for (; n0 < N; n0 += 8) tasks.push_back({m0, n0, mt, 1});
    m0 += mt;
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t i = 0; i < n_tasks; ++i) run_task<BITS, S>(W, xs, xsum, tasks[i], y);
}

// w[k, n] = s[g, n] * (q[k, n] - z[g, n]) in fp32, one rounding like the torch reference.
template <int BITS, typename S>
void dequant(const Weights& W, float* out, int nthreads) {
  using L = Layout<BITS>;
  const int64_t N = W.N, n_units = W.K / L::VPU;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t u = 0; u < n_units; ++u) {
    const int64_t g = std::upper_bound(W.gstart, W.gstart + W.G + 1, static_cast<int32_t>(u * L::VPU)) - W.gstart - 1;
    const int32_t* row = W.qweight + u * L::WPU * N;
    float* dst = out + u * L::VPU * N;
    for (int64_t n = 0; n < N; n += 8) {
      __m256i w[L::WPU];
      for (int j = 0; j < L::WPU; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j * N + n));
      const __m256 s = load_scales<S>(W.scales, g * N + n);
      const __m256 z = load_zeros(W.zeros + g * N + n);
      static_for<L::VPU>([&](auto I) __attribute__((always_inline)) {
        const __m256 q = _mm256_mul_ps(decode<BITS, I()>(w), _mm256_set1_ps(L::x_scale(I())));
        _mm256_storeu_ps(dst + I() * N + n, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
      });
    }
  }
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
  static void run(const Weights& W, float* out, int nt) { dequant<BITS, S>(W, out, nt); }
};

}  // namespace

extern "C" {

// y [M, N] = x [M, K] @ dequant(W) + bias, all fp32 and contiguous. Returns 0, or 1 for bad bits.
int llmq_gemv(const Weights* W, int64_t M, const float* x, float* y, int nthreads) {
  return dispatch<GemvFn>(*W, M, x, y, nthreads);
}

// out [K, N] fp32 = dequant(W). Returns 0, or 1 for bad bits.
int llmq_dequant(const Weights* W, float* out, int nthreads) { return dispatch<DequantFn>(*W, out, nthreads); }

}
