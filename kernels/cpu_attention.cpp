// Single-query attention over a KV cache on an x86 CPU (AVX-512, or AVX2 + FMA): out[r, h] = softmax(q·Kᵀ·scale + bias) · V
// for each row r and head h, the decode step's attention (one new query per row).
//
// Each (row, head) is one task: its keys and values are read once, in order, from its row of the layer's cache (any
// row and head strides, Dh contiguous), its scores kept in a small buffer between the three passes
// (scores, softmax, weighted sum of values). The softmax and accumulation are in fp32 whatever the cache's dtype;
// exp is a polynomial in registers (scalef for the power of two), exact 0 for scores far below the maximum (the
// masked keys, whose bias is the dtype's lowest value). Dh must be a multiple of 16 (64 in MusicGen). The AVX-512
// passes work on 16 keys or lanes at a time; on a CPU without AVX-512 the AVX2 passes do the same on 8.
// Narrow torch headers, not <torch/extension.h>: that one pulls in pybind11 and torch's Python and C++ API headers,
// about two thirds of this file's build time; the operators are registered with TORCH_LIBRARY and loaded without
// Python bindings. (Outputs come from Tensor::new_empty: <ATen/ops/empty.h> alone adds ~2 s to a build.)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>

namespace {

#define FASTGEN_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq")))

// 16 bf16 values (32 bytes) → 16 fp32 lanes: bf16 is the top half of an fp32
FASTGEN_AVX512 inline __m512 load16(const at::BFloat16* p) {
  __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
FASTGEN_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// e^x for x ≤ 0 (scores minus their maximum): x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-6 polynomial (relative
// error ~2e-7), times 2^n by scalef. Below -87 (e^x < 2^-126) the result is exactly 0; a NaN stays NaN, so a
// fault in the cache reaches the logits (and the engine's non-finite check) as it does through torch's softmax.
FASTGEN_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // this operand order keeps a NaN (max returns the second)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);   // ln2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

struct Strides {
  int64_t row, head, position;
};

// the 16 lane sums of v[0..15], as one vector (lane i = sum of v[i]): a transposing tree of unpacks and lane
// shuffles, ~45 operations where 16 separate horizontal sums take ~130
FASTGEN_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sum of v4i .. v4i+3
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // across the four 128-bit lanes: lane k of the result holds quads[k]'s four totals
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(h01, h23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q·key (q already scaled) as a vector of 16 partial sums
template <typename T>
FASTGEN_AVX512 inline __m512 dot_lanes(const __m512* qv, const T* key, int64_t chunks) {
  __m512 acc = _mm512_mul_ps(qv[0], load16(key));
  for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[c], load16(key + c * 16), acc);
  return acc;
}

// one (row, head): q [Dh] (fp32), keys / values [span, Dh] at the given position stride, bias [span] (stride
// bias_stride) → out [Dh] (fp32). scores: a buffer of at least span floats.
template <typename T, typename B>
FASTGEN_AVX512 void attend(const float* q, const T* keys, const T* values, int64_t position_stride, const B* bias,
                           int64_t bias_stride, int64_t span, int64_t dh, float scale, float* scores, float* out) {
  const int64_t chunks = dh / 16;
  __m512 qv[8];  // Dh ≤ 128
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + c * 16), _mm512_set1_ps(scale));
  // scores, 16 keys at a time; the maximum ignores NaN (a NaN score still turns the output NaN below)
  __m512 best16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t first = 0;
  for (; first + 16 <= span; first += 16) {
    __m512 lanes[16];
    for (int i = 0; i < 16; ++i) lanes[i] = dot_lanes(qv, keys + (first + i) * position_stride, chunks);
    alignas(64) float biases[16];
    for (int i = 0; i < 16; ++i) biases[i] = static_cast<float>(bias[(first + i) * bias_stride]);
    const __m512 block = _mm512_add_ps(sum16(lanes), _mm512_load_ps(biases));
    _mm512_storeu_ps(scores + first, block);
    best16 = _mm512_max_ps(block, best16);  // max returns its second operand where the first is NaN
  }
  float best = _mm512_reduce_max_ps(best16);
  for (int64_t j = first; j < span; ++j) {
    const float score = _mm512_reduce_add_ps(dot_lanes(qv, keys + j * position_stride, chunks)) +
                        static_cast<float>(bias[j * bias_stride]);
    scores[j] = score;
    best = score > best ? score : best;
  }
  // softmax numerators in place, and their sum
  const __m512 top = _mm512_set1_ps(best);
  __m512 total = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= span; j += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j), top));
    _mm512_storeu_ps(scores + j, e);
    total = _mm512_add_ps(total, e);
  }
  if (j < span) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (span - j)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), top));
    _mm512_mask_storeu_ps(scores + j, tail, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
  }
  const float inverse = 1.0f / _mm512_reduce_add_ps(total);
  __m512 acc[8];
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < span; ++k) {
    const T* value = values + k * position_stride;
    const __m512 weight = _mm512_set1_ps(scores[k]);
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(weight, load16(value + c * 16), acc[c]);
  }
  for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(acc[c], _mm512_set1_ps(inverse)));
}

#define FASTGEN_AVX2 __attribute__((target("avx2,fma")))

// The same three passes with AVX2 + FMA (8 fp32 lanes; no masks, no scalef), for CPUs without AVX-512.
FASTGEN_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
FASTGEN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

FASTGEN_AVX2 inline float sum_lanes(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// the largest lane; a NaN lane may or may not win (a NaN score turns the output NaN in the value pass regardless)
FASTGEN_AVX2 inline float max_lanes(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// e^x for x ≤ 0 as exp_nonpositive, with 2^n built in the exponent bits (n ≥ -126 after the clamp: a normal float)
FASTGEN_AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // max returns its second operand, x, where x is NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

// lane i = the sum of v[i]'s lanes: two rounds of pairwise adds and one exchange of 128-bit halves
FASTGEN_AVX2 inline __m256 sum8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [v0..v3 low, v0..v3 high], v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <typename T>
FASTGEN_AVX2 inline __m256 dot_lanes8(const __m256* qv, const T* key, int64_t chunks) {
  __m256 acc = _mm256_mul_ps(qv[0], load8(key));
  for (int64_t c = 1; c < chunks; ++c) acc = _mm256_fmadd_ps(qv[c], load8(key + c * 8), acc);
  return acc;
}

template <typename T, typename B>
FASTGEN_AVX2 void attend_avx2(const float* q, const T* keys, const T* values, int64_t position_stride,
                              const B* bias, int64_t bias_stride, int64_t span, int64_t dh, float scale,
                              float* scores, float* out) {
  const int64_t chunks = dh / 8;
  __m256 qv[16];  // Dh ≤ 128
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q + c * 8), _mm256_set1_ps(scale));
  float best = -std::numeric_limits<float>::infinity();
  __m256 best8 = _mm256_set1_ps(best);
  int64_t first = 0;
  for (; first + 8 <= span; first += 8) {
    __m256 lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = dot_lanes8(qv, keys + (first + i) * position_stride, chunks);
    alignas(32) float biases[8];
    for (int i = 0; i < 8; ++i) biases[i] = static_cast<float>(bias[(first + i) * bias_stride]);
    const __m256 block = _mm256_add_ps(sum8(lanes), _mm256_load_ps(biases));
    _mm256_storeu_ps(scores + first, block);
    best8 = _mm256_max_ps(block, best8);
  }
  best = max_lanes(best8);
  for (int64_t j = first; j < span; ++j) {
    const float score = sum_lanes(dot_lanes8(qv, keys + j * position_stride, chunks)) +
                        static_cast<float>(bias[j * bias_stride]);
    scores[j] = score;
    best = score > best ? score : best;
  }
  const __m256 top = _mm256_set1_ps(best);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= span; j += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
    _mm256_storeu_ps(scores + j, e);
    total = _mm256_add_ps(total, e);
  }
  if (j < span) {  // the tail through a buffer padded with -inf, whose exponentials are exactly 0
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) tail[i] = j + i < span ? scores[j + i] : -std::numeric_limits<float>::infinity();
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_load_ps(tail), top));
    _mm256_store_ps(tail, e);
    for (int i = 0; j + i < span; ++i) scores[j + i] = tail[i];
    total = _mm256_add_ps(total, e);
  }
  const float inverse = 1.0f / sum_lanes(total);
  __m256 acc[16];
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < span; ++k) {
    const T* value = values + k * position_stride;
    const __m256 weight = _mm256_set1_ps(scores[k]);
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm256_fmadd_ps(weight, load8(value + c * 8), acc[c]);
  }
  for (int64_t c = 0; c < chunks; ++c) _mm256_storeu_ps(out + c * 8, _mm256_mul_ps(acc[c], _mm256_set1_ps(inverse)));
}

// the AVX-512 passes run here; read once per process. FASTGEN_CPU_ISA=avx2 keeps an AVX-512 CPU on the AVX2 ones.
bool use_avx512() {
  const char* isa = std::getenv("FASTGEN_CPU_ISA");
  static const bool supported = !(isa != nullptr && std::strcmp(isa, "avx2") == 0) &&
                                __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512dq");
  return supported;
}

}  // namespace

// q [R, H, Dh]; k_cache, v_cache [rows, H, positions, Dh] (one layer's cache: Dh contiguous, other strides free);
// cache_rows [R] int64, the cache row of each query row; the first ``span`` positions are read; bias [R, 1, 1, span]
// additive → [R, H, Dh] in q's dtype. The rows are read in place: no gather of the batch's rows, eager or compiled.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_rows, int64_t span, const at::Tensor& bias, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && bias.dim() == 4,
              "cpu_attention: q [R, H, Dh], caches [rows, H, positions, Dh], bias [R, 1, 1, span]");
  const int64_t R = q.size(0), H = q.size(1), dh = q.size(2);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == H && k_cache.size(3) == dh,
              "cpu_attention: the caches must be [rows, H, positions, Dh] matching q");
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1,
              "cpu_attention: the caches need the same strides, Dh contiguous");
  TORCH_CHECK(span >= 1 && span <= k_cache.size(2), "cpu_attention: span must be in [1, positions]");
  TORCH_CHECK(bias.size(0) == R && bias.size(3) == span, "cpu_attention: bias must be [R, 1, 1, span]");
  TORCH_CHECK(dh % 16 == 0 && dh <= 128, "cpu_attention: head size must be a multiple of 16, at most 128");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
              (k_cache.scalar_type() == at::kBFloat16 || k_cache.scalar_type() == at::kFloat),
              "cpu_attention: the cache must be bfloat16 or float32");
  TORCH_CHECK(cache_rows.dim() == 1 && cache_rows.size(0) == R && cache_rows.scalar_type() == at::kLong,
              "cpu_attention: cache_rows must be [R] int64");
  const at::Tensor rows = cache_rows.contiguous();
  const int64_t* row_of = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(row_of[r] >= 0 && row_of[r] < k_cache.size(0), "cpu_attention: cache row ", row_of[r],
                " out of range [0, ", k_cache.size(0), ")");
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = q.new_empty({R, H, dh}, q.options().dtype(at::kFloat));
  const Strides kv{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const bool avx512 = use_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, bias.scalar_type(), "cpu_attention_bias", [&] {
    using B = scalar_t;
    const B* bp = bias.data_ptr<B>();
    const int64_t bias_row = bias.stride(0), bias_stride = bias.stride(3);
    // threads only when each gets ~256K cached values (0.5-1 MB) to read: below that, opening a parallel region (a
    // system call to wake a sleeping thread) costs more than the reading; every (row, head) is computed alone, so
    // the result is the same either way
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(span * dh, 1));
    auto run = [&](auto* k0, auto* v0) {
      at::parallel_for(0, R * H, grain, [&](int64_t first, int64_t end) {
        std::vector<float> scores(span);
        for (int64_t task = first; task < end; ++task) {
          const int64_t r = task / H, h = task % H;
          const int64_t at = row_of[r] * kv.row + h * kv.head;
          if (avx512)
            attend(qp + task * dh, k0 + at, v0 + at, kv.position, bp + r * bias_row, bias_stride, span, dh, s,
                   scores.data(), op + task * dh);
          else
            attend_avx2(qp + task * dh, k0 + at, v0 + at, kv.position, bp + r * bias_row, bias_stride, span, dh,
                        s, scores.data(), op + task * dh);
        }
      });
    };
    if (k_cache.scalar_type() == at::kBFloat16)
      run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
    else
      run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  });
  return out.to(q.scalar_type());
}

#else

at::Tensor decode_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            const at::Tensor&, double) {
  TORCH_CHECK(false, "cpu_attention: built for a CPU that is not x86-64");
}

#endif

// span is a SymInt: the compiled step traces its read spans as symbols, and a plain int would specialise (recompile
// for every new span)
TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_rows, SymInt span, Tensor bias, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
