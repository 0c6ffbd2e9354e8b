"""Kernel launches per decode step (issue 14), counted on the CPU by fastgen.engine.launch_count without running the
Triton kernels: one call of ModelRunner.decode_step on the triton backend at graph-bucket shapes (no host spans, a
bucket padded with the dummy slot), the call a CUDA graph captures and every replay repeats.

The decoder has musicgen-small's structure (24 layers, 4 codebooks mono, 8 stereo) at a tiny width, since the count
does not depend on width, and a cache longer than one 256-key split (self-attention merges its splits, as
musicgen-small's 30 s slots do, inside its one launch; the 256-token text cache is one split). Per-layer and fixed launches come
from the difference between a 24-layer and a 1-layer decoder."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from fastgen.config import DecoderConfig
from fastgen.engine.launch_count import LaunchCount, count_decode_step, count_launches
from fastgen.engine.runner import ModelRunner
from fastgen.kernels.decode_attention import SPLIT
from fastgen.model.decoder import MusicgenDecoder
from fastgen.model.ops import SamplerHints, TritonOps

LAYERS = 24
MAX_FRAMES = 300        # cache positions 300 + codebooks > SPLIT: self-attention merges splits
MAX_TEXT_TOKENS = 256   # the engine's default: cross-attention in one split
BEFORE = 401            # musicgen-small's step before issue 14 (16 per layer + 17 fixed)

EMBEDDING, SAMPLER = "fastgen.codebook_embedding_rows", "fastgen.sample_next_tokens"
NORMS = ("aten.layer_norm", "aten.native_layer_norm")  # inference mode dispatches the first, grad mode the second
PROJECTIONS = ("aten.linear", "aten.mm", "aten.addmm", "fastgen.fused_linear")
ACTIVATIONS = ("aten.gelu",)
ATTENTION = Counter({"fastgen.decode_attention_append": 1, "fastgen.decode_attention": 1})  # the merge folded in

has_fused_projections = hasattr(MusicgenDecoder, "set_linear_backend")


def structure(layers: int, channels: int) -> DecoderConfig:
    return DecoderConfig(vocab_size=48, hidden_size=32, num_layers=layers, num_heads=2, ffn_dim=64,
                         num_codebooks=4 * channels, audio_channels=channels, max_position_embeddings=2048,
                         activation="gelu", pad_token_id=48)


def random_weights(config: DecoderConfig) -> dict[str, torch.Tensor]:
    """Checkpoint-named decoder weights (text states already at the decoder's width: no projection)."""
    gen = torch.Generator().manual_seed(config.num_layers)
    d, prefix = config.hidden_size, "decoder.model.decoder."

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1
    weights = {f"{prefix}layer_norm.weight": 1 + rand(d), f"{prefix}layer_norm.bias": rand(d)}
    for k in range(config.num_codebooks):
        weights[f"{prefix}embed_tokens.{k}.weight"] = rand(config.vocab_size + 1, d)
        weights[f"decoder.lm_heads.{k}.weight"] = rand(config.vocab_size, d)
    for i in range(config.num_layers):
        layer = f"{prefix}layers.{i}."
        for attention in ("self_attn", "encoder_attn"):
            for name in ("q", "k", "v", "out"):
                weights[f"{layer}{attention}.{name}_proj.weight"] = rand(d, d)
        weights[f"{layer}fc1.weight"], weights[f"{layer}fc2.weight"] = rand(config.ffn_dim, d), rand(d, config.ffn_dim)
        for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            weights[f"{layer}{norm}.weight"], weights[f"{layer}{norm}.bias"] = 1 + rand(d), rand(d)
    return weights


def make_runner(layers: int, channels: int, linear_backend: str) -> ModelRunner:
    config = structure(layers, channels)
    decoder = MusicgenDecoder(config, random_weights(config), text_hidden_size=config.hidden_size,
                              device=torch.device("cpu"), dtype=torch.float32)
    decoder.use_stock_linears()  # CUDA's path: F.linear / addmm (a CPU may have chosen oneDNN's packed weights)
    if has_fused_projections:
        decoder.set_linear_backend(linear_backend)
    return ModelRunner(decoder, None, None, TritonOps(), num_slots=3, max_frames=MAX_FRAMES,
                       max_text_tokens=MAX_TEXT_TOKENS)


def step_launches(runner: ModelRunner, run_kernels: bool = False) -> LaunchCount:
    """The launches of one graph-bucket step with two requests in a bucket of 4 (two padding rows on the dummy
    slot), after a first step, as before a capture (launchers may grow their scratch once)."""
    slot_ids = torch.tensor([2, 0, runner.dummy_slot, runner.dummy_slot])
    for _ in range(2):
        with torch.inference_mode(), count_launches(run_kernels) as count:
            runner.decode_step(slot_ids, SamplerHints(), None, None)
    return count


def split(channels: int, linear_backend: str) -> tuple[LaunchCount, LaunchCount, LaunchCount]:
    """(whole step, per layer, fixed) launches."""
    full = step_launches(make_runner(LAYERS, channels, linear_backend))
    one = step_launches(make_runner(1, channels, linear_backend))
    layers = full - one
    assert all(n % (LAYERS - 1) == 0 for n in layers.by_op.values()), f"layers differ: {layers}"
    per_layer = LaunchCount(Counter({name: n // (LAYERS - 1) for name, n in layers.by_op.items()}))
    return full, per_layer, one - per_layer


def test_cache_takes_the_split_path():
    runner = make_runner(1, 1, "torch")
    assert runner.cache.self_k.shape[3] > SPLIT >= runner.cache.cross_k.shape[3]


def test_a_step_as_the_graphs_capture_it():
    """count_decode_step (for benchmarks and reports): a bucket all on the dummy slot counts what the step with
    requests in it counts, and the state of the slots does not move."""
    runner = make_runner(LAYERS, 1, "torch")
    before = runner.state.position.clone()
    for bucket in (1, 4):
        assert count_decode_step(runner, bucket).by_op == step_launches(runner).by_op
    assert torch.equal(runner.state.position, before)  # the kernels are not run


@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
def test_bookkeeping_runs_inside_the_kernels(channels):
    """Outside the layers a step launches the embedding (which writes the rows' cache rows and lengths), the final
    LayerNorm and the LM heads, and the sampler (which advances the positions): nothing else. Inside a layer,
    besides the projections with their LayerNorms and GELU (what the fused projections absorb), only attention."""
    full, per_layer, fixed = split(channels, "torch")
    bookkeeping = fixed.excluding(EMBEDDING, SAMPLER, *NORMS, *PROJECTIONS)
    assert not bookkeeping, f"ops outside the kernels: {dict(bookkeeping)}; fixed launches: {fixed}"
    assert fixed.of(EMBEDDING) == fixed.of(SAMPLER) == fixed.of(*NORMS) == fixed.of(*PROJECTIONS) == 1, str(fixed)
    assert fixed.total <= 4, str(fixed)
    attention = per_layer.excluding(*NORMS, *PROJECTIONS, *ACTIVATIONS)
    assert attention == ATTENTION and sum(attention.values()) == 2, f"per layer: {per_layer}"
    assert full.total == 15 * LAYERS + 4 == BEFORE - 13 - LAYERS, f"step: {full}"  # the README's figure


@pytest.mark.skipif(not has_fused_projections, reason="the fused projections (EngineConfig.linear_backend, issue 14 "
                    "item 1) are not on this branch")
@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
def test_launch_budget_with_fused_projections(channels):
    """Issue 14's budget: at most 9 launches per layer and 220 per musicgen-small step (from 401); 8 and 195 here."""
    full, per_layer, fixed = split(channels, "triton")
    assert per_layer.total <= 9, f"per layer: {per_layer}"
    assert full.total <= 220, f"step: {full}"
    assert full.total == 8 * LAYERS + 3, f"step: {full}"  # the README's figure
    assert per_layer.by_op == Counter({"fastgen.fused_linear": 6}) + ATTENTION, f"per layer: {per_layer}"
    assert fixed.by_op == Counter({EMBEDDING: 1, "fastgen.fused_linear": 1, SAMPLER: 1}), f"fixed: {fixed}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels under Triton's interpreter")
@pytest.mark.parametrize("linear_backend", ["torch", "triton"] if has_fused_projections else ["torch"])
def test_each_kernel_op_is_one_launch(linear_backend, monkeypatch):
    """The counter's fastgen ops are the Triton launches the step really makes (the kernels run here, under the
    interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    launched = Counter()
    run = InterpretedFunction.run

    def counted(kernel, *args, **kwargs):
        launched[kernel.__name__] += 1
        return run(kernel, *args, **kwargs)
    runner = make_runner(1, 1, linear_backend)
    step_launches(runner, run_kernels=True)  # warm-up outside the count
    monkeypatch.setattr(InterpretedFunction, "run", counted)
    count = step_launches(runner, run_kernels=True)
    fastgen_ops = sum(n for name, n in count.by_op.items() if name.startswith("fastgen."))
    assert sum(launched.values()) == 2 * fastgen_ops, f"ran {dict(launched)}; counted {count}"  # two steps ran
