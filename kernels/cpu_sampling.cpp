// The sampler of a CPU decode step in one operator call: classifier-free guidance, temperature, top-k, top-p, the
// counter-hash Gumbel draw, the delay pattern and the position advance, as kernels/sampling_ref.py spells them in
// ~90 aten operators (see cpu_sampling.py for the contract and how it compares with the reference).
//
// One task per (row, codebook), independent of every other: a row's tokens depend on its own logits, slot
// parameters and position only, so the result is the same at any thread count and with any batch-mates. The
// arithmetic is scalar and in the reference's order: guidance as uncond + g·(cond − uncond) with a rounding after
// each operation (this file has no FMA target, so the compiler cannot contract it), an IEEE division by the
// temperature, the k-th largest score as the top-k threshold (ties kept), softmax probabilities as exp(s − max) ·
// (1 / Σ) with the cumulative mass summed in double as aten's CPU cumsum does, and Gumbel-max over the kept tokens
// only (a removed token's score is −inf, which no finite noise can lift).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr uint32_t kHashMul1 = 0x7FEB352Du;  // lowbias32, as fastgen.kernels.counter_hash
constexpr uint32_t kHashMul2 = 0x846CA68Bu;
constexpr int64_t kCodebookStride = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kHashMul1;
  x ^= x >> 15;
  x *= kHashMul2;
  x ^= x >> 16;
  return x;
}

// uniform in (0, 1) from 23 bits, exactly counter_uniform_ref
inline float counter_uniform(uint32_t key, int64_t token) {
  const uint32_t bits = mix32(key ^ static_cast<uint32_t>(token));
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// first index of the largest value; a NaN counts as the largest (torch.argmax's rule)
int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

struct Slot {
  float guidance, temperature, top_p;
  int64_t top_k, seed, position, num_frames, prompt_frames;
};

// Top-k then top-p on scores[V] in place (removed tokens become −inf), as filter_logits_ref.
void filter(float* scores, int64_t vocab, const Slot& p, std::vector<float>& scratch, std::vector<int64_t>& order) {
  const int64_t k = std::min(p.top_k, vocab);
  if (k > 0) {
    scratch.assign(scores, scores + vocab);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    const float kth = scratch[k - 1];
    for (int64_t v = 0; v < vocab; ++v)
      if (scores[v] < kth) scores[v] = kNegInf;
  }
  if (!(p.top_p < 1.0f)) return;
  // softmax over the kept tokens (the removed ones have probability 0 and stay removed)
  float top = kNegInf;
  for (int64_t v = 0; v < vocab; ++v) top = std::max(top, scores[v]);
  order.clear();
  for (int64_t v = 0; v < vocab; ++v)
    if (scores[v] != kNegInf) order.push_back(v);
  scratch.assign(vocab, 0.0f);  // probabilities
  float total = 0.0f;
  for (int64_t v : order) total += (scratch[v] = std::exp(scores[v] - top));
  const float inverse = 1.0f / total;
  for (int64_t v : order) scratch[v] *= inverse;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });
  // a token is removed when the probability mass strictly above its score's group is ≥ top_p
  double cumulative = 0.0;
  float group_mass = 0.0f;
  for (size_t i = 0; i < order.size(); ++i) {
    const int64_t v = order[i];
    const float mass_before = static_cast<float>(cumulative + scratch[v]) - scratch[v];
    if (i == 0 || scores[v] != scores[order[i - 1]]) group_mass = mass_before;
    cumulative += scratch[v];
    if (group_mass >= p.top_p) scores[v] = kNegInf;
  }
}

// The token of one (row, codebook) whose frame is neither padding nor prompt.
int64_t draw(float* guided, int64_t vocab, const Slot& p, int64_t codebook, std::vector<float>& scratch,
             std::vector<int64_t>& order) {
  if (p.temperature == 0.0f) return argmax(guided, vocab);
  for (int64_t v = 0; v < vocab; ++v) guided[v] = guided[v] / p.temperature;
  filter(guided, vocab, p, scratch, order);
  const int64_t counter = p.position * kCodebookStride + codebook;
  const uint32_t key = mix32(static_cast<uint32_t>(p.seed) ^ static_cast<uint32_t>(counter));
  for (int64_t v = 0; v < vocab; ++v)
    if (guided[v] != kNegInf) guided[v] = guided[v] - std::log(-std::log(counter_uniform(key, v)));
  return argmax(guided, vocab);
}

}  // namespace

// logits [2B, K, V] float32 (rows [0, B) conditional, [B, 2B) unconditional; row b is slot slots[b]); the per-slot
// parameters [S]; tokens [S, K] and codes [S, K, F] int64, nonfinite [S] int32 and position [S] int32 updated in
// place: the next input tokens, the sampled (or prompt, or pad) codes, the non-finite flag, position + 1 (the
// dummy slot and any after it back to 0).
void sample_next_tokens(const at::Tensor& logits, const at::Tensor& slots, const at::Tensor& guidance_scale,
                        const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                        const at::Tensor& seed, const at::Tensor& position, const at::Tensor& num_frames,
                        const at::Tensor& prompt_frames, const at::Tensor& tokens, const at::Tensor& codes,
                        const at::Tensor& nonfinite, int64_t pad_id, int64_t audio_channels, int64_t dummy_slot) {
  TORCH_CHECK(logits.dim() == 3 && logits.size(0) % 2 == 0 && logits.scalar_type() == at::kFloat &&
                  logits.is_contiguous(), "sample_next_tokens: logits must be contiguous float32 [2B, K, V]");
  const int64_t batch = logits.size(0) / 2, books = logits.size(1), vocab = logits.size(2);
  const int64_t slot_count = tokens.size(0), frames = codes.size(2);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == batch && slots.is_contiguous(),
              "sample_next_tokens: slots must be int64 [B]");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 2 && tokens.size(1) == books &&
                  codes.scalar_type() == at::kLong && codes.dim() == 3 && codes.size(0) == slot_count &&
                  codes.size(1) == books, "sample_next_tokens: tokens [S, K] and codes [S, K, F] must be int64");
  const std::pair<const at::Tensor*, at::ScalarType> params[] = {
      {&guidance_scale, at::kFloat}, {&temperature, at::kFloat}, {&top_k, at::kInt}, {&top_p, at::kFloat},
      {&seed, at::kLong}, {&position, at::kInt}, {&num_frames, at::kInt}, {&prompt_frames, at::kInt},
      {&nonfinite, at::kInt}};
  for (const auto& [tensor, dtype] : params)
    TORCH_CHECK(tensor->scalar_type() == dtype && tensor->numel() >= slot_count && tensor->is_contiguous(),
                "sample_next_tokens: a per-slot parameter has the wrong dtype or size");
  TORCH_CHECK(audio_channels == 1 || audio_channels == 2, "sample_next_tokens: audio_channels must be 1 or 2");
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(slot_of[b] >= 0 && slot_of[b] < slot_count, "sample_next_tokens: slot out of range");

  const float* logit = logits.data_ptr<float>();
  int64_t* token_out = tokens.data_ptr<int64_t>();
  int64_t* code = codes.data_ptr<int64_t>();
  int32_t* pos = position.data_ptr<int32_t>();
  const auto tk = tokens.strides(), cs = codes.strides();
  std::vector<uint8_t> bad(batch * books, 0);
  // rows are independent: threads only when there are enough of them to pay for waking a second thread
  const int64_t grain = batch * books >= 16 ? 1 : batch * books;
  at::parallel_for(0, batch * books, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> guided(vocab), scratch;
    std::vector<int64_t> order;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / books, k = task % books, s = slot_of[b];
      const Slot p{guidance_scale.data_ptr<float>()[s], temperature.data_ptr<float>()[s], top_p.data_ptr<float>()[s],
                   top_k.data_ptr<int32_t>()[s], seed.data_ptr<int64_t>()[s], pos[s], num_frames.data_ptr<int32_t>()[s],
                   prompt_frames.data_ptr<int32_t>()[s]};
      const float* cond = logit + (b * books + k) * vocab;
      const float* uncond = logit + ((batch + b) * books + k) * vocab;
      bool finite = true;
      for (int64_t v = 0; v < vocab; ++v) {
        const float g = p.guidance == 1.0f ? cond[v] : uncond[v] + p.guidance * (cond[v] - uncond[v]);
        guided[v] = g;
        finite &= std::isfinite(g);
      }
      bad[task] = !finite;
      const int64_t frame = p.position - (audio_channels == 1 ? k : k / 2);
      int64_t* here = code + s * cs[0] + k * cs[1] + std::clamp<int64_t>(frame, 0, frames - 1) * cs[2];
      int64_t token = pad_id;
      if (frame >= 0 && frame < p.num_frames) {
        token = frame < p.prompt_frames ? *here : draw(guided.data(), vocab, p, k, scratch, order);
        *here = token;
      }
      token_out[s * tk[0] + k * tk[1]] = token;
    }
  });
  int32_t* flag = nonfinite.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < books; ++k)
      if (bad[b * books + k]) flag[slot_of[b]] = 1;
  for (int64_t b = 0; b < batch; ++b) pos[slot_of[b]] += 1;
  for (int64_t s = std::max<int64_t>(dummy_slot, 0); s < position.numel(); ++s) pos[s] = 0;
}

TORCH_LIBRARY_FRAGMENT(fastgen_cpu, m) {
  m.def("sample_next_tokens(Tensor logits, Tensor slots, Tensor guidance_scale, Tensor temperature, Tensor top_k, "
        "Tensor top_p, Tensor seed, Tensor(a!) position, Tensor num_frames, Tensor prompt_frames, Tensor(b!) tokens, "
        "Tensor(c!) codes, Tensor(d!) nonfinite, int pad_id, int audio_channels, int dummy_slot) -> ()");
}

TORCH_LIBRARY_IMPL(fastgen_cpu, CPU, m) { m.impl("sample_next_tokens", &sample_next_tokens); }
