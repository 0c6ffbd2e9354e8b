// Decode-shape linear on an x86 CPU: y[m, n] = sum_k x[m, k] * W[n, k] (+ residual[m, n]) for a few rows m.
//
// A decode step is bound by streaming the weights once, so the weight is packed (at load, by cpu_gemv.py) into one
// sequential stream per block of 16 output channels: for bf16, [N/16, K/2, 16, 2] -- each 64-byte vector holds one
// pair of k for 16 outputs, the operand layout of AVX512-BF16's dot product (vdpbf16ps); for fp32, [N/16, K, 16].
// Each thread streams its own contiguous run of blocks; the rows' activations are broadcast from L1 and every
// weight vector feeds all rows of a group (up to 4) before the next is loaded, with accumulators in fp32.
//
// The kernels are compiled for AVX-512 through function attributes, so this file builds on any x86-64 host; the
// Python side only calls them where torch reports the instructions (torch.cpu._is_avx512_*_supported).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 16;        // output channels per packed block: one fp32 vector of results
constexpr int64_t kMaxGroup = 4;      // rows sharing each weight vector load
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

template <int G>
__attribute__((target("avx512f")))
void block_fp32(const float* x, int64_t K, const float* w, float* results) {
  __m512 even[G], odd[G];
  for (int g = 0; g < G; ++g) { even[g] = _mm512_setzero_ps(); odd[g] = _mm512_setzero_ps(); }
  const char* stream = reinterpret_cast<const char*>(w);
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    _mm_prefetch(stream + k * 64 + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(stream + k * 64 + 64 + kPrefetchBytes, _MM_HINT_T0);
    __m512 w0 = _mm512_loadu_ps(w + k * 16);
    __m512 w1 = _mm512_loadu_ps(w + k * 16 + 16);
    for (int g = 0; g < G; ++g) {
      even[g] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[g * K + k]), even[g]);
      odd[g] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[g * K + k + 1]), odd[g]);
    }
  }
  if (k < K) {
    __m512 w0 = _mm512_loadu_ps(w + k * 16);
    for (int g = 0; g < G; ++g) even[g] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[g * K + k]), even[g]);
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(results + g * kBlock, _mm512_add_ps(even[g], odd[g]));
}

// the 16 results of one row and block, plus the residual's, in the output's dtype
template <typename Out>
inline void store(const float* results, const Out* residual, Out* out) {
  for (int64_t i = 0; i < kBlock; ++i) {
    float value = results[i];
    if (residual != nullptr) value += static_cast<float>(residual[i]);
    out[i] = static_cast<Out>(value);
  }
}

template <typename Weight, typename Out, int G>
void rows_of_block(const Weight* x, int64_t K, const Weight* w, const Out* residual, Out* out, int64_t N) {
  float results[G * kBlock];
  if constexpr (std::is_same_v<Weight, float>) block_fp32<G>(x, K, w, results);
  else block_bf16<G>(x, K, w, results);
  for (int g = 0; g < G; ++g) store<Out>(results + g * kBlock, residual ? residual + g * N : nullptr, out + g * N);
}

template <typename Weight, typename Out>
void linear_rows(const Weight* x, int64_t M, int64_t K, const Weight* packed, const Out* residual, Out* out,
                 int64_t N) {
  at::parallel_for(0, N / kBlock, 4, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b) {
      const Weight* w = packed + b * K * kBlock;
      // every row group against this block before the next: the block (16 × K weights, ≤ 128 KB at K = 4096) is
      // read from memory once and from the core's cache for the other groups
      for (int64_t m = 0; m < M; m += kMaxGroup) {
        const Weight* xg = x + m * K;
        const Out* rg = residual ? residual + m * N + b * kBlock : nullptr;
        Out* og = out + m * N + b * kBlock;
        switch (std::min(kMaxGroup, M - m)) {
          case 1: rows_of_block<Weight, Out, 1>(xg, K, w, rg, og, N); break;
          case 2: rows_of_block<Weight, Out, 2>(xg, K, w, rg, og, N); break;
          case 3: rows_of_block<Weight, Out, 3>(xg, K, w, rg, og, N); break;
          default: rows_of_block<Weight, Out, 4>(xg, K, w, rg, og, N); break;
        }
      }
    }
  });
}

}  // namespace

// x [M, K] (any float dtype), packed as above, residual None or [M, N] in x's dtype → [M, N] in x's dtype.
at::Tensor gemv_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() >= 3, "cpu_gemv: x must be [M, K] and the weight packed");
  TORCH_CHECK(out_features % kBlock == 0 && packed.size(0) * kBlock == out_features,
              "cpu_gemv: out_features must be a multiple of 16 matching the packed weight");
  const bool bf16 = packed.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || packed.scalar_type() == at::kFloat, "cpu_gemv: weights must be bfloat16 or float32");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(packed.numel() == N * K, "cpu_gemv: x's width does not match the packed weight");
  const at::Tensor xw = x.to(packed.scalar_type()).contiguous();
  const at::Tensor weight = packed.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == out.sizes(), "cpu_gemv: residual must be [M, N]");
    res = residual->to(x.scalar_type()).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cpu_gemv", [&] {
    const scalar_t* r = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
    if (bf16)
      linear_rows<at::BFloat16, scalar_t>(xw.data_ptr<at::BFloat16>(), M, K, weight.data_ptr<at::BFloat16>(), r,
                                          out.data_ptr<scalar_t>(), N);
    else
      linear_rows<float, scalar_t>(xw.data_ptr<float>(), M, K, weight.data_ptr<float>(), r,
                                   out.data_ptr<scalar_t>(), N);
  });
  return out;
}

#else  // not x86-64: the operator exists but refuses; cpu_gemv.py never offers the path there

at::Tensor gemv_linear(const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "cpu_gemv: built for a CPU without AVX-512");
}

#endif

TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("gemv_linear(Tensor x, Tensor packed, int out_features, Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("gemv_linear", &gemv_linear); }
