// Decode-shape linear on an x86 CPU: y[m, n] = sum_k x[m, k] * W[n, k] (· scale[n]) (+ residual[m, n]) for a few
// rows m.
//
// A decode step is bound by streaming the weights once, so the weight is packed (at load, by cpu_gemv.py) into one
// sequential stream per block of 16 output channels: for bf16, [N/16, K/2, 16, 2] -- each 64 bytes hold one pair of
// k for 16 outputs, the operand layout of AVX512-BF16's dot product (vdpbf16ps); for fp32 and for int8 (weight-only,
// one scale per output channel), [N/16, K, 16]. Each thread streams its own contiguous run of blocks; the rows'
// activations are broadcast from L1 and every weight vector feeds all rows of a group before the next is loaded,
// with accumulators in fp32.
//
// Two instruction sets, picked at run time by what the CPU reports: AVX-512 (bf16 weights through vdpbf16ps, which
// rounds the activations to bf16; fp32 weights by FMA; int8 codes widened to fp32 by sign extension, 16 at a time;
// groups of 4 rows), and AVX2 + FMA, where every weight type is widened to fp32 in registers (bf16 by a shift or mask
// of each 32-bit lane of a k-pair, int8 by sign extension: both exact) against fp32 activations, in groups of 2 rows
// (16 vector registers). int8's scale is applied once per result. The kernels are compiled for each set through
// function attributes, so this file builds on any x86-64 host; the Python side calls them only where torch reports
// AVX2.
// Narrow torch headers, not <torch/extension.h>: that one pulls in pybind11 and torch's Python and C++ API headers,
// about two thirds of this file's build time; the operators are registered with TORCH_LIBRARY and loaded without
// Python bindings. (Outputs come from Tensor::new_empty: <ATen/ops/empty.h> alone adds ~2 s to a build.)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>

namespace {

inline bool avx2_requested() {
  const char* isa = std::getenv("FASTGEN_CPU_ISA");
  return isa != nullptr && std::strcmp(isa, "avx2") == 0;
}

constexpr int64_t kBlock = 16;        // output channels per packed block: one fp32 vector of results
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead of the loads to prefetch the weight stream

// G rows of x against one block of W → results[g * 16 + i] in fp32. Vectors never cross a function boundary: a
// __m512 passed between code built with and without AVX-512 changes the calling convention.
template <int G>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void block_bf16(const at::BFloat16* x, int64_t K, const at::BFloat16* w, float* results) {
  // two accumulators per row (even and odd k-pairs): vdpbf16ps's latency would otherwise serialise the chain
  __m512 even[G], odd[G];
  for (int g = 0; g < G; ++g) { even[g] = _mm512_setzero_ps(); odd[g] = _mm512_setzero_ps(); }
  const int64_t pairs = K / 2;
  const char* stream = reinterpret_cast<const char*>(w);
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    _mm_prefetch(stream + p * 64 + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(stream + p * 64 + 64 + kPrefetchBytes, _MM_HINT_T0);
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 32);
    __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 32 + 32);
    for (int g = 0; g < G; ++g) {
      const int32_t* xp = reinterpret_cast<const int32_t*>(x + g * K);
      even[g] = _mm512_dpbf16_ps(even[g], w0, (__m512bh)_mm512_set1_epi32(xp[p]));
      odd[g] = _mm512_dpbf16_ps(odd[g], w1, (__m512bh)_mm512_set1_epi32(xp[p + 1]));
    }
  }
  if (p < pairs) {  // an odd number of k-pairs
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 32);
    for (int g = 0; g < G; ++g) {
      const int32_t* xp = reinterpret_cast<const int32_t*>(x + g * K);
      even[g] = _mm512_dpbf16_ps(even[g], w0, (__m512bh)_mm512_set1_epi32(xp[p]));
    }
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(results + g * kBlock, _mm512_add_ps(even[g], odd[g]));
}

// prefetch the cache lines kPrefetchBytes ahead of the k-pair at k in a block's stream of Weight (16 per k), each
// line once: an int8 pair is half a line
template <typename Weight>
inline void prefetch_pair(const char* stream, int64_t k) {
  constexpr int64_t pair_bytes = 32 * sizeof(Weight);
  const int64_t at = k * 16 * static_cast<int64_t>(sizeof(Weight));
  if (at % 64 != 0) return;  // (int8: the previous pair's prefetch covered this line)
  for (int64_t line = 0; line < std::max<int64_t>(pair_bytes, 64); line += 64)
    _mm_prefetch(stream + at + line + kPrefetchBytes, _MM_HINT_T0);
}

// the 16 outputs' weights at k as fp32: fp32 loaded, int8 codes widened (sign extension: exact)
__attribute__((target("avx512f"))) inline __m512 widen16(const float* w, int64_t k) {
  return _mm512_loadu_ps(w + k * 16);
}
__attribute__((target("avx512f"))) inline __m512 widen16(const int8_t* w, int64_t k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * 16))));
}

// G rows of fp32 x against one block of fp32 weights or int8 codes (their scale is applied in store)
template <int G, typename Weight>
__attribute__((target("avx512f")))
void block_fma(const float* x, int64_t K, const Weight* w, float* results) {
  __m512 even[G], odd[G];
  for (int g = 0; g < G; ++g) { even[g] = _mm512_setzero_ps(); odd[g] = _mm512_setzero_ps(); }
  const char* stream = reinterpret_cast<const char*>(w);
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    prefetch_pair<Weight>(stream, k);
    const __m512 w0 = widen16(w, k), w1 = widen16(w, k + 1);
    for (int g = 0; g < G; ++g) {
      even[g] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[g * K + k]), even[g]);
      odd[g] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[g * K + k + 1]), odd[g]);
    }
  }
  if (k < K) {
    const __m512 w0 = widen16(w, k);
    for (int g = 0; g < G; ++g) even[g] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[g * K + k]), even[g]);
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(results + g * kBlock, _mm512_add_ps(even[g], odd[g]));
}

#define FASTGEN_AVX2 __attribute__((target("avx2,fma")))

// AVX2: the weights of one block's 16 outputs at k and k + 1 (k even), widened to fp32 as [k: outputs 0-7, 8-15;
// k + 1: outputs 0-7, 8-15]. A k-pair of bf16 weights is one 32-bit lane per output (k in the low half): shifted
// left, the low half is k's fp32; masked, the high half is k + 1's.
FASTGEN_AVX2 inline void widen_pair(const at::BFloat16* w, int64_t k, __m256* out) {
  const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16));
  const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 16 + 16));
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(low, 16));
  out[1] = _mm256_castsi256_ps(_mm256_slli_epi32(high, 16));
  out[2] = _mm256_castsi256_ps(_mm256_and_si256(low, top));
  out[3] = _mm256_castsi256_ps(_mm256_and_si256(high, top));
}
FASTGEN_AVX2 inline void widen_pair(const float* w, int64_t k, __m256* out) {
  for (int j = 0; j < 4; ++j) out[j] = _mm256_loadu_ps(w + k * 16 + j * 8);
}
FASTGEN_AVX2 inline void widen_pair(const int8_t* w, int64_t k, __m256* out) {
  for (int j = 0; j < 4; ++j)
    out[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k * 16 + j * 8))));
}

// G rows of fp32 x against one block (any weight type) → results[g * 16 + i]. Four accumulators per row (two
// halves of the block × even and odd k) keep the FMA chains independent; their sum order is fixed, so a row's result
// never depends on the rows beside it.
template <int G, typename Weight>
FASTGEN_AVX2 void block_avx2(const float* x, int64_t K, const Weight* w, float* results) {
  __m256 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
  const char* stream = reinterpret_cast<const char*>(w);
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    prefetch_pair<Weight>(stream, k);
    __m256 wk[4];
    widen_pair(w, k, wk);
    for (int g = 0; g < G; ++g) {
      const __m256 even = _mm256_set1_ps(x[g * K + k]), odd = _mm256_set1_ps(x[g * K + k + 1]);
      acc[g][0] = _mm256_fmadd_ps(wk[0], even, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(wk[1], even, acc[g][1]);
      acc[g][2] = _mm256_fmadd_ps(wk[2], odd, acc[g][2]);
      acc[g][3] = _mm256_fmadd_ps(wk[3], odd, acc[g][3]);
    }
  }
  if constexpr (!std::is_same_v<Weight, at::BFloat16>) {  // an odd K (bf16 is packed in pairs: K is even)
    if (k < K) {
      __m256 wk[2];
      for (int j = 0; j < 2; ++j) {
        if constexpr (std::is_same_v<Weight, float>) wk[j] = _mm256_loadu_ps(w + k * 16 + j * 8);
        else wk[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                 _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k * 16 + j * 8))));
      }
      for (int g = 0; g < G; ++g) {
        const __m256 xk = _mm256_set1_ps(x[g * K + k]);
        acc[g][0] = _mm256_fmadd_ps(wk[0], xk, acc[g][0]);
        acc[g][1] = _mm256_fmadd_ps(wk[1], xk, acc[g][1]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(results + g * kBlock, _mm256_add_ps(acc[g][0], acc[g][2]));
    _mm256_storeu_ps(results + g * kBlock + 8, _mm256_add_ps(acc[g][1], acc[g][3]));
  }
}

// the 16 results of one row and block (times the block's int8 scales, if any), plus the residual's, in the output's
// dtype
template <typename Out>
inline void store(const float* results, const float* scale, const Out* residual, Out* out) {
  for (int64_t i = 0; i < kBlock; ++i) {
    float value = scale != nullptr ? results[i] * scale[i] : results[i];
    if (residual != nullptr) value += static_cast<float>(residual[i]);
    out[i] = static_cast<Out>(value);
  }
}

// Avx512: the AVX-512 kernels; otherwise AVX2. Activations are fp32 but for AVX-512's bf16 dot products.
template <bool Avx512, typename Weight>
using Activation = std::conditional_t<Avx512 && std::is_same_v<Weight, at::BFloat16>, at::BFloat16, float>;

template <bool Avx512, typename Weight, typename Out, int G>
void rows_of_block(const Activation<Avx512, Weight>* x, int64_t K, const Weight* w, const float* scale,
                   const Out* residual, Out* out, int64_t N) {
  float results[G * kBlock];
  if constexpr (!Avx512) block_avx2<G>(x, K, w, results);
  else if constexpr (std::is_same_v<Weight, at::BFloat16>) block_bf16<G>(x, K, w, results);
  else block_fma<G>(x, K, w, results);  // fp32 weights or int8 codes
  for (int g = 0; g < G; ++g)
    store<Out>(results + g * kBlock, scale, residual ? residual + g * N : nullptr, out + g * N);
}

template <bool Avx512, typename Weight, typename Out>
void linear_rows(const Activation<Avx512, Weight>* x, int64_t M, int64_t K, const Weight* packed,
                 const float* scales, const Out* residual, Out* out, int64_t N) {
  // rows sharing each weight load: AVX-512's 32 registers hold 4 rows' accumulators, AVX2's 16 hold 2
  constexpr int64_t group = Avx512 ? 4 : 2;
  at::parallel_for(0, N / kBlock, 4, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b) {
      const Weight* w = packed + b * K * kBlock;
      const float* scale = scales ? scales + b * kBlock : nullptr;
      // every row group against this block before the next: the block (16 × K weights, ≤ 256 KB at K = 4096) is
      // read from memory once and from the core's cache for the other groups
      for (int64_t m = 0; m < M; m += group) {
        const Activation<Avx512, Weight>* xg = x + m * K;
        const Out* rg = residual ? residual + m * N + b * kBlock : nullptr;
        Out* og = out + m * N + b * kBlock;
        switch (std::min(group, M - m)) {
          case 1: rows_of_block<Avx512, Weight, Out, 1>(xg, K, w, scale, rg, og, N); break;
          case 2: rows_of_block<Avx512, Weight, Out, 2>(xg, K, w, scale, rg, og, N); break;
          case 3: if constexpr (Avx512) rows_of_block<Avx512, Weight, Out, 3>(xg, K, w, scale, rg, og, N); break;
          default: if constexpr (Avx512) rows_of_block<Avx512, Weight, Out, 4>(xg, K, w, scale, rg, og, N); break;
        }
      }
    }
  });
}

// the AVX-512 kernels for this weight type run here (bf16 also needs AVX512-BF16); read once per process.
// FASTGEN_CPU_ISA=avx2 keeps an AVX-512 CPU on the AVX2 kernels (the tests run both that way).
bool use_avx512(at::ScalarType weight_type) {
  static const bool f = !avx2_requested() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  static const bool bf16 = f && __builtin_cpu_supports("avx512bf16");
  if (weight_type == at::kFloat || weight_type == at::kChar) return f;
  return weight_type == at::kBFloat16 && bf16;
}

}  // namespace

// x [M, K] (any float dtype), packed as above, residual None or [M, N] in x's dtype, scale [N] fp32 for int8 codes
// (and only for them) → [M, N] in x's dtype.
at::Tensor gemv_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() >= 3, "cpu_gemv: x must be [M, K] and the weight packed");
  TORCH_CHECK(out_features % kBlock == 0 && packed.size(0) * kBlock == out_features,
              "cpu_gemv: out_features must be a multiple of 16 matching the packed weight");
  const at::ScalarType weight_type = packed.scalar_type();
  TORCH_CHECK(weight_type == at::kBFloat16 || weight_type == at::kFloat || weight_type == at::kChar,
              "cpu_gemv: weights must be bfloat16, float32 or int8");
  const bool int8 = weight_type == at::kChar;
  TORCH_CHECK(int8 == scale.has_value(), "cpu_gemv: int8 weights need their scale, and only they take one");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(packed.numel() == N * K, "cpu_gemv: x's width does not match the packed weight");
  const bool avx512 = use_avx512(weight_type);
  const at::Tensor xw = x.to(avx512 && weight_type == at::kBFloat16 ? at::kBFloat16 : at::kFloat).contiguous();
  const at::Tensor weight = packed.contiguous();
  at::Tensor scales;
  if (int8) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == N, "cpu_gemv: scale must be [out_features]");
    scales = scale->to(at::kFloat).contiguous();
  }
  at::Tensor out = x.new_empty({M, N});
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "cpu_gemv: residual must be [M, N]");
    res = residual->to(x.scalar_type()).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cpu_gemv", [&] {
    const scalar_t* r = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    if (int8 && avx512)
      linear_rows<true, int8_t, scalar_t>(xw.data_ptr<float>(), M, K, weight.data_ptr<int8_t>(),
                                          scales.data_ptr<float>(), r, o, N);
    else if (int8)
      linear_rows<false, int8_t, scalar_t>(xw.data_ptr<float>(), M, K, weight.data_ptr<int8_t>(),
                                           scales.data_ptr<float>(), r, o, N);
    else if (weight_type == at::kBFloat16 && avx512)
      linear_rows<true, at::BFloat16, scalar_t>(xw.data_ptr<at::BFloat16>(), M, K,
                                                weight.data_ptr<at::BFloat16>(), nullptr, r, o, N);
    else if (weight_type == at::kBFloat16)
      linear_rows<false, at::BFloat16, scalar_t>(xw.data_ptr<float>(), M, K, weight.data_ptr<at::BFloat16>(),
                                                 nullptr, r, o, N);
    else if (avx512)
      linear_rows<true, float, scalar_t>(xw.data_ptr<float>(), M, K, weight.data_ptr<float>(), nullptr, r, o, N);
    else
      linear_rows<false, float, scalar_t>(xw.data_ptr<float>(), M, K, weight.data_ptr<float>(), nullptr, r, o, N);
  });
  return out;
}

#else  // not x86-64: the operator exists but refuses; cpu_gemv.py never offers the path there

at::Tensor gemv_linear(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                       const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "cpu_gemv: built for a CPU that is not x86-64");
}

#endif

TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("gemv_linear(Tensor x, Tensor packed, int out_features, Tensor? residual=None, Tensor? scale=None) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("gemv_linear", &gemv_linear); }
