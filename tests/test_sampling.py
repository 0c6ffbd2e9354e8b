"""Sampling semantics of the engine's torch path: support and frequencies against exact probabilities computed with
transformers' own warpers, greedy, and per-request seeds (same seed → same audio, whatever the batch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastgen
from fastgen.kernels.counter_hash import seed_key
from fastgen.kernels.sampling_ref import sample_next_tokens_ref

from kernel_checks import chi_square_p_value

FALSE_ALARM = 1e-4


def exact_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' order and semantics: temperature → top-k → top-p → softmax."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    scores = logits.clone().view(1, -1)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1).view(-1)


def draw(logits: torch.Tensor, n: int, *, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0, seed0=0):
    """n independent draws for one codebook: n slots with the same logits and distinct seeds."""
    vocab = logits.shape[-1]
    full = logits.view(1, 1, vocab).expand(2 * n, 1, vocab).contiguous()
    slots = torch.arange(n)
    state = dict(
        guidance_scale=torch.full((n,), guidance), temperature=torch.full((n,), temperature),
        top_k=torch.full((n,), top_k, dtype=torch.int32), top_p=torch.full((n,), top_p),
        seed=torch.tensor([seed_key(s) for s in range(seed0, seed0 + n)]), position=torch.full((n,), 5, dtype=torch.int32),
        num_frames=torch.full((n,), 10, dtype=torch.int32), prompt_frames=torch.zeros(n, dtype=torch.int32))
    tokens = torch.full((n, 1), -1, dtype=torch.int64)
    codes = torch.full((n, 1, 10), -1, dtype=torch.int64)
    nonfinite = torch.zeros(n, dtype=torch.int32)
    sample_next_tokens_ref(full, slots, **state, tokens=tokens, codes=codes, nonfinite=nonfinite, pad_id=vocab,
                           audio_channels=1)
    assert torch.equal(codes[:, 0, 5], tokens[:, 0]), "sampled frame must be written to the codes buffer"
    return tokens[:, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7)])
def test_frequencies_match_exact_probabilities(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(int(temperature * 100) + top_k)
    logits = torch.randn(12, generator=gen) * 1.5
    n = 20000
    samples = draw(logits, n, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = exact_probabilities(logits, temperature, top_k, top_p)
    support = probs > 0
    assert bool(support[samples].all()), "a sample fell outside the top-k/top-p support"
    counts = torch.bincount(samples, minlength=12)[support].numpy()
    kept = probs[support].double().numpy()
    expected = kept / kept.sum() * n
    p_value = chi_square_p_value(counts, expected)
    assert p_value > FALSE_ALARM, f"chi-square p={p_value:.2e}: counts {counts} vs {expected.round()}"


def test_guidance_is_applied_before_sampling():
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    scale, n = 2.5, 20000
    vocab = 8
    logits = torch.stack([cond, uncond]).view(2, 1, 1, vocab).expand(2, n, 1, vocab).reshape(2 * n, 1, vocab)
    slots = torch.arange(n)
    tokens = torch.zeros((n, 1), dtype=torch.int64)
    sample_next_tokens_ref(
        logits.contiguous(), slots, torch.full((n,), scale), torch.ones(n), torch.zeros(n, dtype=torch.int32),
        torch.ones(n), torch.arange(n, dtype=torch.int64), torch.full((n,), 3, dtype=torch.int32),
        torch.full((n,), 9, dtype=torch.int32), torch.zeros(n, dtype=torch.int32), tokens,
        torch.zeros((n, 1, 9), dtype=torch.int64), torch.zeros(n, dtype=torch.int32), vocab, 1)
    probs = (uncond + scale * (cond - uncond)).softmax(-1)
    expected = probs.double().numpy()
    counts = torch.bincount(tokens[:, 0], minlength=vocab)
    assert chi_square_p_value(counts, expected / expected.sum() * n) > FALSE_ALARM


def test_chi_square_p_value_matches_closed_forms_and_scipy():
    """The tests' own p-value (no scipy on the lent GPU machine): 3 bins are 2 degrees of freedom, whose upper tail is
    exp(-x / 2); 2 bins are 1, erfc(sqrt(x / 2)); where scipy is installed, its chisquare on random tables."""
    assert chi_square_p_value([15, 5, 10], [10, 10, 10]) == pytest.approx(np.exp(-2.5), rel=1e-12)  # statistic 5
    assert chi_square_p_value([12, 8], [10, 10]) == pytest.approx(float(torch.special.erfc(torch.tensor(
        0.4, dtype=torch.float64).sqrt())), rel=1e-12)  # statistic 0.8
    assert chi_square_p_value([10, 10, 10], [10, 10, 10]) == 1.0
    try:
        from scipy import stats
    except ImportError:
        return
    rng = np.random.default_rng(0)
    for bins in (2, 5, 12, 300):
        probs = rng.dirichlet(np.ones(bins))
        counts = rng.multinomial(5000, probs)
        assert chi_square_p_value(counts, probs * 5000) == pytest.approx(stats.chisquare(counts, probs * 5000).pvalue,
                                                                         rel=1e-8)


def test_greedy_is_argmax_and_ignores_filters():
    logits = torch.randn(40, 1, 16)
    tokens = draw(logits[0, 0], 3, temperature=0.0, top_k=3, top_p=0.5)
    assert (tokens == logits[0, 0].argmax()).all()


def test_same_seed_same_tokens_any_row():
    logits = torch.randn(16)
    a = draw(logits, 50, seed0=100)
    b = draw(logits, 80, seed0=100)[:50]  # same seeds, different batch size
    assert torch.equal(a, b)
    c = draw(logits, 50, seed0=1000)
    assert not torch.equal(a, c)


# -------------------------------------------------------------------------------------------------- engine level
@pytest.fixture(scope="module")
def mono(tiny_mono_dir):
    return fastgen.MusicGen.from_pretrained(tiny_mono_dir, max_slots=3, backend="torch", dtype=torch.float32)


def test_seeded_request_is_reproducible_and_independent_of_neighbours(mono):
    params = fastgen.SamplingParams(max_new_tokens=20, seed=1234, top_k=10, guidance_scale=3.0)
    alone = mono.generate(["lofi beat"], params)[0]
    again = mono.generate(["lofi beat"], params)[0]
    np.testing.assert_array_equal(alone.codes, again.codes)
    # 5 requests through 3 slots: the target joins mid-way after others retire, at a different row and slot
    others = [fastgen.SamplingParams(max_new_tokens=n, seed=n, top_p=0.9) for n in (8, 30, 12, 16)]
    mixed = mono.generate(["rock", "jazz", "x", "lofi beat", "y"], [others[0], others[1], others[2], params,
                                                                    others[3]])
    np.testing.assert_array_equal(mixed[3].codes, alone.codes)
    assert mixed[3].seed == 1234


def test_unseeded_requests_differ_and_report_their_seed(mono):
    params = fastgen.SamplingParams(max_new_tokens=20)
    a, b = mono.generate(["same", "same"], params)
    assert a.seed != b.seed
    assert not np.array_equal(a.codes, b.codes)
    replay = mono.generate(["same"], fastgen.SamplingParams(max_new_tokens=20, seed=a.seed))[0]
    np.testing.assert_array_equal(replay.codes, a.codes)


def test_guidance_at_or_below_one_means_no_guidance(mono):
    """As in transformers (CFG only for guidance_scale > 1): 0.5 gives exactly the codes of 1.0."""
    params = dict(max_new_tokens=12, do_sample=False)
    low = mono.generate(["x"], fastgen.SamplingParams(guidance_scale=0.5, **params))[0]
    one = mono.generate(["x"], fastgen.SamplingParams(guidance_scale=1.0, **params))[0]
    np.testing.assert_array_equal(low.codes, one.codes)
