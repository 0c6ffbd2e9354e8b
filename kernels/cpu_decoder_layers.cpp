// Every decoder layer of one CPU decode step in one operator call (see cpu_decoder_layers.py for why).
//
// Per layer, exactly the operators the eager step runs, in its order, so the result is bitwise the eager step's:
//   x = LayerNorm(hidden); qkv = gemv(x); K, V → the cache at (row, position); attn = decode_attention(q)
//   hidden = gemv(attn) + hidden; x = LayerNorm(hidden); q = gemv(x); attn = decode_attention(q) over the text
//   hidden = gemv(attn) + hidden; x = LayerNorm(hidden); hidden = gemv(activation(gemv(x))) + hidden
// The GEMVs and the attention are cpu_gemv.cpp's and cpu_attention.cpp's operators, called as C++ functions; what
// this file saves is the Python dispatch around them (~13 operator calls a layer, ~300 a musicgen-small step) and
// the index_put of the new K/V, which becomes one memcpy per (row, head).

// Narrow headers, as in cpu_gemv.cpp: <ATen/ATen.h> would add seconds to the build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <cstring>
#include <optional>

// defined in cpu_gemv.cpp and cpu_attention.cpp (same extension)
at::Tensor gemv_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scale);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_rows, int64_t span, const at::Tensor& bias, double scale);

namespace {

constexpr int64_t kLinearsPerLayer = 6;  // qkv, self_out, cross_q, cross_out, fc1, fc2
constexpr int64_t kNormsPerLayer = 6;    // (weight, bias) of the self, cross and FFN LayerNorms
constexpr int64_t kBlock = 16;           // output channels per packed GEMV block (cpu_gemv.cpp)

enum class Activation { kGelu, kGeluTanh, kRelu, kSilu };

Activation parse_activation(c10::string_view name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_new") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "cpu_decoder_layers: activation must be gelu, gelu_new, relu or silu, got ", name);
}

void activate_(at::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::kGelu: at::gelu_(x, "none"); break;
    case Activation::kGeluTanh: at::gelu_(x, "tanh"); break;
    case Activation::kRelu: at::relu_(x); break;
    case Activation::kSilu: at::silu_(x); break;
  }
}

}  // namespace

// hidden [R, D]; norms: 6 per layer; packed: 6 GEMV weights per layer (cpu_gemv layout), scales: their int8 scales
// (None for float weights); self_k / self_v [layers, rows, H, positions, Dh] and cross_k / cross_v [layers, rows,
// H, text, Dh] in hidden's dtype; rows, position [R] int64 (cache row and position of each row's new token); the
// attention spans and additive biases as decode_attention takes them → the hidden state [R, D] after the last layer.
// The new K/V of every layer are written into self_k / self_v at (rows, position).
at::Tensor decoder_layers(const at::Tensor& hidden, at::TensorList norms, at::TensorList packed,
                          const c10::List<std::optional<at::Tensor>>& scales, const at::Tensor& self_k,
                          const at::Tensor& self_v, const at::Tensor& cross_k, const at::Tensor& cross_v,
                          const at::Tensor& rows, const at::Tensor& position, int64_t kv_span,
                          const at::Tensor& self_bias, int64_t text_span, const at::Tensor& cross_bias,
                          double scale, double eps, c10::string_view activation_name) {
  const Activation activation = parse_activation(activation_name);
  TORCH_CHECK(hidden.dim() == 2, "cpu_decoder_layers: hidden must be [R, D]");
  const int64_t R = hidden.size(0), D = hidden.size(1);
  const int64_t layers = static_cast<int64_t>(packed.size()) / kLinearsPerLayer;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(packed.size()) == layers * kLinearsPerLayer &&
                  static_cast<int64_t>(scales.size()) == layers * kLinearsPerLayer &&
                  static_cast<int64_t>(norms.size()) == layers * kNormsPerLayer,
              "cpu_decoder_layers: 6 packed weights, 6 scales and 6 norm tensors per layer");
  for (const at::Tensor* cache : {&self_k, &self_v, &cross_k, &cross_v}) {
    TORCH_CHECK(cache->dim() == 5 && cache->size(0) == layers && cache->scalar_type() == hidden.scalar_type(),
                "cpu_decoder_layers: caches must be [layers, rows, H, positions, Dh] in hidden's dtype");
  }
  TORCH_CHECK(self_k.sizes() == self_v.sizes() && self_k.strides() == self_v.strides() && self_k.stride(4) == 1,
              "cpu_decoder_layers: self_k and self_v must match, Dh contiguous");
  const int64_t cache_rows = self_k.size(1), H = self_k.size(2), positions = self_k.size(3), dh = self_k.size(4);
  TORCH_CHECK(H * dh == D, "cpu_decoder_layers: heads x head size must be hidden's width");
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == R && rows.scalar_type() == at::kLong && position.dim() == 1 &&
                  position.size(0) == R && position.scalar_type() == at::kLong,
              "cpu_decoder_layers: rows and position must be [R] int64");
  const at::Tensor row_index = rows.contiguous(), position_index = position.contiguous();
  const int64_t* row_of = row_index.data_ptr<int64_t>();
  const int64_t* position_of = position_index.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(row_of[r] >= 0 && row_of[r] < cache_rows, "cpu_decoder_layers: cache row ", row_of[r],
                " out of range [0, ", cache_rows, ")");
    TORCH_CHECK(position_of[r] >= 0 && position_of[r] < positions, "cpu_decoder_layers: position ",
                position_of[r], " out of range [0, ", positions, ")");
  }
  for (int64_t index = 0; index < static_cast<int64_t>(packed.size()); ++index)
    TORCH_CHECK(packed[index].dim() >= 3, "cpu_decoder_layers: weight ", index, " is not in the packed GEMV layout");
  const int64_t item = hidden.element_size();
  const int64_t row_stride = self_k.stride(1), head_stride = self_k.stride(2), position_stride = self_k.stride(3);

  auto linear = [&](const at::Tensor& x, int64_t index, const std::optional<at::Tensor>& residual) {
    const at::Tensor& weight = packed[index];
    return gemv_linear(x, weight, weight.size(0) * kBlock, residual, scales.get(index));
  };
  auto layer_norm = [&](const at::Tensor& x, int64_t index) {
    return at::layer_norm(x, {D}, norms[index], norms[index + 1], eps);
  };

  at::Tensor state = hidden;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const int64_t w = layer * kLinearsPerLayer, n = layer * kNormsPerLayer;
    at::Tensor k_cache = self_k.select(0, layer), v_cache = self_v.select(0, layer);

    const at::Tensor qkv = linear(layer_norm(state, n), w, std::nullopt);  // [R, 3D], contiguous
    TORCH_CHECK(qkv.size(1) == 3 * D, "cpu_decoder_layers: the QKV weight must have 3 x hidden outputs");
    const char* fresh = static_cast<const char*>(qkv.data_ptr());
    char* k_base = static_cast<char*>(k_cache.data_ptr());
    char* v_base = static_cast<char*>(v_cache.data_ptr());
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = (row_of[r] * row_stride + h * head_stride + position_of[r] * position_stride) * item;
        std::memcpy(k_base + at, fresh + (r * 3 * D + D + h * dh) * item, dh * item);
        std::memcpy(v_base + at, fresh + (r * 3 * D + 2 * D + h * dh) * item, dh * item);
      }
    }
    const at::Tensor q = qkv.view({R, 3, H, dh}).select(1, 0);
    at::Tensor attn = decode_attention(q, k_cache, v_cache, rows, kv_span, self_bias, scale);
    state = linear(attn.reshape({R, D}), w + 1, state);

    const at::Tensor cross_q = linear(layer_norm(state, n + 2), w + 2, std::nullopt).view({R, H, dh});
    attn = decode_attention(cross_q, cross_k.select(0, layer), cross_v.select(0, layer), rows, text_span,
                            cross_bias, scale);
    state = linear(attn.reshape({R, D}), w + 3, state);

    at::Tensor inner = linear(layer_norm(state, n + 4), w + 4, std::nullopt);
    activate_(inner, activation);
    state = linear(inner, w + 5, state);
  }
  return state;
}

// the caches are written in place (annotated, so a tracer knows); the spans are SymInts as in decode_attention
TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("decoder_layers(Tensor hidden, Tensor[] norms, Tensor[] packed, Tensor?[] scales, Tensor(a!) self_k, "
        "Tensor(b!) self_v, Tensor cross_k, Tensor cross_v, Tensor rows, Tensor position, SymInt kv_span, "
        "Tensor self_bias, SymInt text_span, Tensor cross_bias, float scale, float eps, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("decoder_layers", &decoder_layers); }
