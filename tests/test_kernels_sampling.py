"""Fused CFG + top-k/top-p + Gumbel-max sampling kernel vs its PyTorch reference (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch

from fastgen.kernels.counter_hash import counter_uniform, counter_uniform_ref, stream_key_ref
from fastgen.kernels.sampling import sample_next_tokens
from fastgen.kernels.sampling_ref import filter_logits_ref, guided_logits_ref, sample_next_tokens_ref

from kernel_checks import chi_square_p_value

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGIT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
PAD = 2048
POISON = -12345
FALSE_ALARM = 1e-4  # chi-square tests reject a correct sampler this rarely


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_state(slots: int, codebooks: int, max_frames: int, gen: torch.Generator, **overrides) -> dict:
    """Per-slot sampling parameters and buffers (random where unconstrained); everything sampled by default."""
    state = {
        "guidance_scale": torch.rand(slots, generator=gen) * 3.0 + 1.0,
        "temperature": torch.rand(slots, generator=gen) * 1.0 + 0.5,
        "top_k": torch.randint(0, 12, (slots,), generator=gen, dtype=torch.int32),
        "top_p": torch.rand(slots, generator=gen) * 0.5 + 0.5,
        "seed": torch.randint(0, 2**62, (slots,), generator=gen),
        "position": torch.randint(codebooks, max_frames, (slots,), generator=gen, dtype=torch.int32),
        "num_frames": torch.full((slots,), max_frames, dtype=torch.int32),
        "prompt_frames": torch.zeros(slots, dtype=torch.int32),
    }
    for name, value in overrides.items():
        state[name] = torch.as_tensor(value, dtype=state[name].dtype).expand(slots).clone()
    state["tokens"] = torch.full((slots, codebooks), POISON, dtype=torch.int64)
    state["codes"] = torch.randint(0, 2048, (slots, codebooks, max_frames), generator=gen)
    state["nonfinite"] = torch.zeros(slots, dtype=torch.int32)
    return {k: v.to(DEVICE) for k, v in state.items()}


def run(fn, logits, slots, state, channels=1, pad_id=PAD, **advance) -> dict:
    out = {k: v.clone() for k, v in state.items()}
    fn(logits, slots, out["guidance_scale"], out["temperature"], out["top_k"], out["top_p"], out["seed"],
       out["position"], out["num_frames"], out["prompt_frames"], out["tokens"], out["codes"], out["nonfinite"],
       pad_id, channels, **advance)
    return out


def assert_equal_report(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:10].tolist()
        details = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in bad]
        pytest.fail(f"{what}: {int((actual != expected).sum())} mismatches; first (index, got, want): {details}")


def assert_same_outputs(got: dict, want: dict) -> None:
    for name in ("tokens", "codes", "nonfinite"):
        assert_equal_report(got[name], want[name], name)


# exp is not correctly rounded on any platform (libdevice expf compiled, NumPy's in the interpreter, the reference's
# through torch.softmax) and the kernel sums the probabilities in another order than the reference's cumsum: a token
# whose mass above lies this close to top_p may be kept on one side and dropped on the other (kernels/sampling.py)
TOP_P_BOUNDARY = 1e-5


def accept_top_p_boundary(got: dict, want: dict, logits, slots, state) -> None:
    """Where kernel and reference disagree on a (row, codebook) whose top-p support changes within ±TOP_P_BOUNDARY
    of its top_p, the kernel's token must lie in the wider support; it is then taken as the reference's."""
    guided = guided_logits_ref(logits, state["guidance_scale"][slots])
    temperature = state["temperature"][slots].view(-1, 1, 1)
    scores = guided / torch.where(temperature == 0, 1.0, temperature)
    top_k, top_p = state["top_k"][slots], state["top_p"][slots]
    narrow = torch.isfinite(filter_logits_ref(scores, top_k, (top_p - TOP_P_BOUNDARY).clamp(min=0.0)))
    wide = torch.isfinite(filter_logits_ref(scores, top_k, (top_p + TOP_P_BOUNDARY).clamp(max=1.0 - 1e-7)))
    ambiguous = (narrow != wide).any(-1) & (temperature.view(-1, 1) > 0) & (top_p.view(-1, 1) < 1.0)
    differs = got["tokens"][slots] != want["tokens"][slots]
    for b, k in (ambiguous & differs).nonzero().tolist():
        slot, token = int(slots[b]), int(got["tokens"][slots[b], k])
        assert bool(wide[b, k, token]), f"row {b} codebook {k}: token {token} outside even the wider top-p support"
        got["tokens"][slot, k] = want["tokens"][slot, k]
        got["codes"][slot, k] = want["codes"][slot, k]


# ------------------------------------------------------------------------------------------------ random stream
def test_uniform_bits_match_reference():
    gen = generator(1)
    count = 4096
    seed = torch.cat([torch.randint(0, 2**63 - 1, (count - 3,), generator=gen), torch.tensor([0, 2**32, 2**63 - 1])])
    position = torch.randint(0, 3000, (count,), generator=gen, dtype=torch.int32)
    codebook = torch.randint(0, 8, (count,), generator=gen, dtype=torch.int32)
    token = torch.randint(0, 2049, (count,), generator=gen, dtype=torch.int32)
    got = counter_uniform(seed.to(DEVICE), position.to(DEVICE), codebook.to(DEVICE), token.to(DEVICE)).cpu()
    want = counter_uniform_ref(stream_key_ref(seed, position, codebook), token)
    assert_equal_report(got.view(torch.int32), want.view(torch.int32), "uniform bits")
    assert bool((want > 0).all() and (want < 1).all())


def test_uniform_never_reaches_one():
    bits_max = torch.tensor([0xFFFFFFFF])  # key ^ token chosen so the hash input is fixed; check the map itself
    u = ((bits_max >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)
    assert float(u) < 1.0
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


# ------------------------------------------------------------------------------------------------ exactness vs ref
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("batch,codebooks,vocab,channels", [(1, 4, 48, 1), (3, 4, 33, 1), (5, 8, 48, 2),
                                                            (2, 4, 2048, 1)])
def test_matches_reference(dtype, batch, codebooks, vocab, channels):
    gen = generator(hash((str(dtype), batch, codebooks, vocab)) % 2**31)
    slots_total = batch + 2
    logits = (torch.randn(2 * batch, codebooks, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    slots = torch.randperm(slots_total, generator=gen)[:batch].to(DEVICE)
    state = make_state(slots_total, codebooks, 16, gen)
    state["temperature"][0] = 0.0            # one greedy slot
    state["guidance_scale"][1 % slots_total] = 1.0  # one exact-cond slot
    want = run(sample_next_tokens_ref, logits, slots, state, channels)
    got = run(sample_next_tokens, logits, slots, state, channels)
    accept_top_p_boundary(got, want, logits, slots, state)
    assert_same_outputs(got, want)
    untouched = torch.ones(slots_total, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert bool((got["tokens"][untouched] == POISON).all()), "rows of inactive slots were written"
    assert bool((got["tokens"][slots] != POISON).all()), "an active row was not written"


@pytest.mark.parametrize("batch,padding,codebooks,vocab,channels", [(1, 0, 4, 48, 1), (3, 2, 4, 33, 1),
                                                                    (2, 3, 8, 48, 2)])
def test_advance_reads_the_step_positions_and_advances_them(batch, padding, codebooks, vocab, channels):
    """The decode step's form: positions come from step_length (the step's position + 1 of each row, as the
    embedding kernel wrote it), not from the per-slot positions, which the kernel then advances; padding rows all
    point at the dummy slot (the last), which goes back to 0; slots outside the batch keep theirs."""
    gen = generator(batch * 10 + padding)
    slots_total = batch + 3
    dummy = slots_total - 1
    slots = torch.cat([torch.randperm(slots_total - 1, generator=gen)[:batch], torch.full((padding,), dummy)])
    rows = batch + padding
    logits = (torch.randn(2 * rows, codebooks, vocab, generator=gen) * 3).to(DEVICE)
    slots = slots.to(DEVICE)
    state = make_state(slots_total, codebooks, 16, gen, top_k=0, top_p=1.0)  # the interpreter's bisection is slow
    state["position"][dummy] = 5
    step_length = torch.cat([state["position"][slots] + 1, torch.full((rows,), -77, device=DEVICE,
                                                                        dtype=torch.int32)]).int()  # [2B]: uncond copy
    plain = run(sample_next_tokens_ref, logits, slots, state, channels)  # positions read from the slots
    poisoned = dict(state, position=torch.full_like(state["position"], 3))  # must not be read when advancing
    advance = dict(step_length=step_length, dummy_slot=dummy)
    want = run(sample_next_tokens_ref, logits, slots, poisoned, channels, **advance)
    got = run(sample_next_tokens, logits, slots, poisoned, channels, **advance)
    assert_same_outputs(got, want)
    real = slots[:batch]
    assert_equal_report(want["tokens"][real], plain["tokens"][real], "advancing reads the step's positions")
    expected = poisoned["position"].clone()
    expected[real] = state["position"][real] + 1
    if padding:
        expected[dummy] = 0
    assert_equal_report(got["position"], expected, "positions after the step")
    assert_equal_report(want["position"], expected, "reference positions after the step")


def test_greedy_is_first_argmax_and_scale_one_is_exact_cond():
    gen = generator(7)
    batch, codebooks, vocab = 3, 4, 40
    cond = torch.randn(batch, codebooks, vocab, generator=gen)
    cond[:, :, 5] = 4.0
    cond[:, :, 17] = 4.0  # tie: the first index wins
    uncond = torch.randn(batch, codebooks, vocab, generator=gen) * 50  # would change the argmax unless scale == 1
    logits = torch.cat([cond, uncond]).to(DEVICE)
    slots = torch.tensor([2, 0, 1], device=DEVICE)
    state = make_state(batch, codebooks, 16, gen, temperature=0.0, guidance_scale=1.0)
    got = run(sample_next_tokens, logits, slots, state)
    want = run(sample_next_tokens_ref, logits, slots, state)
    assert_same_outputs(got, want)
    assert bool((got["tokens"] == 5).all())


# ------------------------------------------------------------------------------------------------ support and law
def support_mask(logits, slots, state) -> torch.Tensor:
    """[B, K, V] tokens the filters keep, from the reference filter (ties kept)."""
    guided = guided_logits_ref(logits, state["guidance_scale"][slots])
    scores = guided / state["temperature"][slots].view(-1, 1, 1)
    return torch.isfinite(filter_logits_ref(scores, state["top_k"][slots], state["top_p"][slots]))


def test_samples_stay_in_support_with_ties():
    gen = generator(11)
    batch, codebooks, vocab = 32, 4, 24
    base = torch.randn(codebooks, vocab, generator=gen).clamp(max=1.5)
    base[:, :6] = 2.0  # six-way tie at the top: top_k = 3 must keep all six
    logits = torch.cat([base.expand(batch, -1, -1), (base * 0.5).expand(batch, -1, -1)]).contiguous().to(DEVICE)
    slots = torch.arange(batch, device=DEVICE)
    state = make_state(batch, codebooks, 64, gen)
    state["top_k"][: batch // 2] = 3
    got = run(sample_next_tokens, logits, slots, state)
    keep = support_mask(logits, slots, state)
    chosen = keep.gather(-1, got["tokens"][slots].unsqueeze(-1)).squeeze(-1)
    assert bool(chosen.all()), f"tokens outside the top-k/top-p support at {(~chosen).nonzero()[:10].tolist()}"
    assert bool(keep[: batch // 2, :, :6].all()), "ties with the k-th value must be kept"
    assert_same_outputs(got, run(sample_next_tokens_ref, logits, slots, state))


def exact_probabilities(row_logits: torch.Tensor, scale: float, temperature: float, top_k: int,
                        top_p: float) -> torch.Tensor:
    """Exact sampling law (float64) of one [2, V] cond/uncond row pair after guidance and filters."""
    guided = guided_logits_ref(row_logits.view(2, 1, -1), torch.tensor([scale]))
    scores = guided / temperature
    kept = filter_logits_ref(scores, torch.tensor([top_k]), torch.tensor([top_p]))
    return torch.softmax(kept.double(), dim=-1).view(-1)


def chi_square_check(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    counts = torch.bincount(tokens.flatten().cpu(), minlength=probs.numel()).double()
    outside = counts[probs == 0].sum()
    assert outside == 0, f"{int(outside)} draws outside the support"
    expected = probs * counts.sum()
    big = expected >= 5  # pool the rare tokens into one bin so that every bin expects at least 5 draws
    observed = torch.cat([counts[big], counts[~big & (probs > 0)].sum().view(1)])
    expected = torch.cat([expected[big], expected[~big & (probs > 0)].sum().view(1)])
    if expected[-1] < 5:
        observed, expected = observed[:-1], expected[:-1]
        expected = expected * (observed.sum() / expected.sum())
    assert observed.numel() >= 3, "law too concentrated for a chi-square"
    p_value = chi_square_p_value(observed, expected)
    assert p_value > FALSE_ALARM, f"frequencies do not match the law: p = {p_value:.2e}\n{observed}\n{expected}"


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p,draws", [(0, 1.0, 1024), (6, 0.8, 320)])
def test_frequencies_match_exact_law(top_k, top_p, draws):
    """Many independent draws in one launch (distinct seeds and codebooks) against the exact probabilities."""
    if DEVICE == "cuda":
        draws *= 64
    gen = generator(23 + top_k)
    codebooks, vocab = 4, 16
    batch = draws // codebooks
    row = torch.randn(2, vocab, generator=gen) * 0.4
    logits = row.view(2, 1, 1, vocab).expand(2, batch, codebooks, vocab).reshape(2 * batch, codebooks, vocab)
    logits = logits.contiguous().to(DEVICE)
    slots = torch.arange(batch, device=DEVICE)
    state = make_state(batch, codebooks, 64, gen, guidance_scale=2.0, temperature=0.8, top_k=top_k, top_p=top_p,
                       position=10)
    state["seed"] = torch.arange(batch, device=DEVICE) * 7919 + 1
    got = run(sample_next_tokens, logits, slots, state)
    chi_square_check(got["tokens"], exact_probabilities(row, 2.0, 0.8, top_k, top_p))


def test_reference_frequencies_match_exact_law():
    """The shared random stream itself (reference path, many draws, varying position) is unbiased."""
    gen = generator(5)
    vocab, draws = 16, 200_000
    row = torch.randn(2, vocab, generator=gen)
    seed = torch.full((draws,), 1234)
    key = stream_key_ref(seed, torch.arange(draws), torch.zeros(draws, dtype=torch.int64))
    uniform = counter_uniform_ref(key.view(-1, 1), torch.arange(vocab).view(1, -1))
    guided = guided_logits_ref(row.view(2, 1, vocab), torch.tensor([1.5])).view(-1)
    tokens = (guided - torch.log(-torch.log(uniform))).argmax(dim=-1)
    chi_square_check(tokens, exact_probabilities(row, 1.5, 1.0, 0, 1.0))


# ------------------------------------------------------------------------------------------------ reproducibility
def test_same_seed_same_tokens_regardless_of_batch():
    gen = generator(31)
    codebooks, vocab, slots_total = 4, 48, 6
    per_slot = torch.randn(slots_total, 2, codebooks, vocab, generator=gen)
    state = make_state(slots_total, codebooks, 32, gen)

    def launch(order):
        order_t = torch.tensor(order)
        logits = torch.cat([per_slot[order_t, 0], per_slot[order_t, 1]]).to(DEVICE)
        return run(sample_next_tokens, logits, order_t.to(DEVICE), state)["tokens"]

    alone = launch([4])
    batched = launch([0, 4, 2])
    reversed_ = launch([5, 2, 1, 4, 3, 0])
    assert_equal_report(batched[4], alone[4], "slot 4 batched vs alone")
    assert_equal_report(reversed_[[0, 2, 4]], batched[[0, 2, 4]], "reordered batch")


# ------------------------------------------------------------------------------------------------ delay pattern
@pytest.mark.parametrize("channels,codebooks", [(1, 4), (2, 8)])
def test_delay_pattern(channels, codebooks):
    gen = generator(41 + channels)
    vocab, frames_max = 32, 12
    #            position, num_frames, prompt_frames
    cases = [(0, 10, 0),    # step 0: codebook 0 sampled, the others still pad
             (2, 10, 0),    # partial: channel codebooks > 2 pad
             (5, 10, 8),    # inside the prompt: prompt codes copied
             (8, 10, 7),    # straddles the prompt end
             (11, 10, 0),   # past the end for the first channel codebooks: pad
             (12, 10, 0),   # only the last channel codebook still has a frame (9)
             (13, 10, 10)]  # all done: pad everywhere
    slots_total = len(cases)
    state = make_state(slots_total, codebooks, frames_max, gen)
    state["position"] = torch.tensor([c[0] for c in cases], dtype=torch.int32, device=DEVICE)
    state["num_frames"] = torch.tensor([c[1] for c in cases], dtype=torch.int32, device=DEVICE)
    state["prompt_frames"] = torch.tensor([c[2] for c in cases], dtype=torch.int32, device=DEVICE)
    state["codes"] = torch.randint(0, vocab, (slots_total, codebooks, frames_max), generator=gen).to(DEVICE)
    logits = torch.randn(2 * slots_total, codebooks, vocab, generator=gen).to(DEVICE)
    slots = torch.arange(slots_total, device=DEVICE)
    got = run(sample_next_tokens, logits, slots, state, channels)
    assert_same_outputs(got, run(sample_next_tokens_ref, logits, slots, state, channels))

    for s, (position, frames, prompt) in enumerate(cases):
        for k in range(codebooks):
            frame = position - (k // channels if channels == 2 else k)
            token = int(got["tokens"][s, k])
            if frame < 0 or frame >= frames:
                assert token == PAD, (s, k, token)
                assert_equal_report(got["codes"][s, k], state["codes"][s, k], f"codes[{s}, {k}] must be untouched")
            elif frame < prompt:
                assert token == int(state["codes"][s, k, frame]), (s, k)
            else:
                assert 0 <= token < vocab and int(got["codes"][s, k, frame]) == token, (s, k)


def test_nonfinite_flag():
    gen = generator(53)
    batch, codebooks, vocab = 4, 4, 32
    logits = torch.randn(2 * batch, codebooks, vocab, generator=gen)
    logits[0, 1, 3] = float("nan")          # slot 0: NaN in cond → flagged
    logits[batch + 1, 2, 7] = float("inf")  # slot 1: inf in uncond, scale 1 → guided = cond, not flagged
    logits[2, 0, 0] = -float("inf")         # slot 2: -inf in cond, scale 2 → flagged
    logits = logits.to(DEVICE)
    slots = torch.arange(batch, device=DEVICE)
    state = make_state(batch, codebooks, 16, gen, guidance_scale=2.0)
    state["guidance_scale"][1] = 1.0
    state["nonfinite"][3] = 1  # an earlier flag is never cleared
    got = run(sample_next_tokens, logits, slots, state)
    want = run(sample_next_tokens_ref, logits, slots, state)
    assert got["nonfinite"].tolist() == [1, 0, 1, 1] == want["nonfinite"].tolist()
    assert_equal_report(got["tokens"][1:], want["tokens"][1:], "tokens of finite rows")


def test_launcher_rejects_bad_inputs():
    gen = generator(59)
    state = make_state(2, 4, 8, gen)
    logits = torch.randn(4, 4, 16).to(DEVICE)
    with pytest.raises(AssertionError, match="slots"):
        run(sample_next_tokens, logits, torch.zeros(2, dtype=torch.int32, device=DEVICE), state)
    with pytest.raises(AssertionError, match="audio_channels"):
        run(sample_next_tokens, logits, torch.zeros(2, dtype=torch.int64, device=DEVICE), state, channels=3)
    slots = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(AssertionError, match="step_length"):
        run(sample_next_tokens, logits, slots, state, step_length=torch.ones(2, device=DEVICE), dummy_slot=1)
    with pytest.raises(AssertionError, match="dummy_slot"):
        run(sample_next_tokens, logits, slots, state, step_length=torch.ones(2, dtype=torch.int32, device=DEVICE),
            dummy_slot=2)
