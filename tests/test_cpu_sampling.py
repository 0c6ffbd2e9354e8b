"""fastgen.kernels.cpu_sampling (the CPU step's sampler as one C++ operator) against its PyTorch reference: every
sampling setting on odd shapes, mono and stereo, prompt and padding frames, slots out of order; non-finite logits
flagged on their own slot; a row's tokens independent of the thread count and of its batch-mates; frequencies
against the exact law; inside a compiled graph; through the engine, the same codes as the reference sampler. Skipped,
with the reason, where the CPU kernels cannot be built."""
from __future__ import annotations

import pytest
import torch

import fastgen
from fastgen.kernels.counter_hash import seed_key
from fastgen.kernels import cpu_sampling
from fastgen.kernels.cpu_sampling import cpu_sample_next_tokens, cpu_sample_next_tokens_ref, unavailable_reason

from test_kernels_sampling import assert_equal_report, chi_square_check, exact_probabilities

PAD = 2048
OUTPUTS = ("tokens", "codes", "nonfinite", "position")

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def random_state(slots: int, codebooks: int, vocab: int, frames: int, gen: torch.Generator) -> dict:
    """Per-slot settings drawn from every case the sampler branches on (greedy, guidance 1, top-k off / 1 / above
    the vocabulary, top-p off or on), positions spread over the prompt, the frames and the padding after them."""
    def pick(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype)[torch.randint(0, len(values), (slots,), generator=gen)]
    return {
        "guidance_scale": pick([1.0, 3.0, 1.7]), "temperature": pick([0.0, 0.7, 1.0, 1.3]),
        "top_k": pick([0, 1, 5, 250, vocab + 10], torch.int32), "top_p": pick([1.0, 0.5, 0.9, 0.99]),
        "seed": torch.tensor([seed_key(int(s)) for s in torch.randint(0, 2**62, (slots,), generator=gen)]),
        "position": torch.randint(0, frames + 4, (slots,), generator=gen, dtype=torch.int32),
        "num_frames": torch.randint(1, frames + 1, (slots,), generator=gen, dtype=torch.int32),
        "prompt_frames": torch.randint(0, 5, (slots,), generator=gen, dtype=torch.int32),
        "tokens": torch.full((slots, codebooks), -1, dtype=torch.int64),
        "codes": torch.randint(0, vocab, (slots, codebooks, frames), generator=gen),
        "nonfinite": torch.zeros(slots, dtype=torch.int32),
    }


def run(fn, logits, slots, state, channels: int, dummy_slot: int) -> dict:
    out = {name: tensor.clone() for name, tensor in state.items()}
    fn(logits, slots, out["guidance_scale"], out["temperature"], out["top_k"], out["top_p"], out["seed"],
       out["position"], out["num_frames"], out["prompt_frames"], out["tokens"], out["codes"], out["nonfinite"], PAD,
       channels, dummy_slot)
    return out


def assert_same(got: dict, want: dict, what: str) -> None:
    for name in OUTPUTS:
        assert_equal_report(got[name], want[name], f"{what}: {name}")


@pytest.mark.parametrize("batch,codebooks,vocab,channels", [(1, 4, 2048, 1), (5, 8, 37, 2), (3, 4, 301, 1),
                                                            (6, 8, 2048, 2)])
def test_matches_the_reference(batch, codebooks, vocab, channels):
    gen = torch.Generator().manual_seed(batch * 100 + vocab)
    slots_total, frames = batch + 3, 12
    for trial in range(12):
        state = random_state(slots_total, codebooks, vocab, frames, gen)
        logits = torch.randn(2 * batch, codebooks, vocab, generator=gen) * 3
        slots = torch.randperm(slots_total - 1, generator=gen)[:batch]  # out of order, never the dummy
        got = run(cpu_sample_next_tokens, logits, slots, state, channels, slots_total - 1)
        want = run(cpu_sample_next_tokens_ref, logits, slots, state, channels, slots_total - 1)
        assert_same(got, want, f"trial {trial}")


def test_padding_rows_on_the_dummy_slot_leave_it_at_position_zero():
    gen = torch.Generator().manual_seed(3)
    state = random_state(4, 4, 64, 8, gen)
    slots = torch.tensor([1, 3, 3, 3])  # a real row, then graph padding on the dummy slot 3
    logits = torch.randn(8, 4, 64, generator=gen)
    # padding rows embed the dummy slot's one input, so their logits are one row's (whichever row writes the dummy's
    # token last then writes the same token)
    logits[2:4] = logits[1]
    logits[6:8] = logits[5]
    got = run(cpu_sample_next_tokens, logits, slots, state, 1, 3)
    assert_same(got, run(cpu_sample_next_tokens_ref, logits, slots, state, 1, 3), "padding rows")
    assert got["position"][3] == 0 and got["position"][1] == state["position"][1] + 1


def test_non_finite_logits_flag_their_own_slot():
    gen = torch.Generator().manual_seed(4)
    state = random_state(4, 4, 64, 8, gen)
    logits = torch.randn(6, 4, 64, generator=gen)
    logits[3 + 1, 2, 17] = float("nan")  # the uncond row of batch row 1
    logits[2, 0, 5] = float("inf")       # the cond row of batch row 2
    slots = torch.tensor([0, 2, 1])
    got = run(cpu_sample_next_tokens, logits, slots, state, 1, 3)
    assert got["nonfinite"].tolist() == [0, 1, 1, 0]
    assert_same(got, run(cpu_sample_next_tokens_ref, logits, slots, state, 1, 3), "non-finite")


def test_a_rows_tokens_depend_on_neither_threads_nor_batch_mates():
    gen = torch.Generator().manual_seed(5)
    batch, codebooks, vocab = 8, 4, 2048  # 32 (row, codebook) tasks: the operator runs them on every thread
    state = random_state(batch + 1, codebooks, vocab, 12, gen)
    state["temperature"].fill_(1.0)
    state["position"].fill_(6)
    state["num_frames"].fill_(12)
    state["prompt_frames"].zero_()
    logits = torch.randn(2 * batch, codebooks, vocab, generator=gen)
    slots = torch.arange(batch)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(run(cpu_sample_next_tokens, logits, slots, state, 1, batch))
    finally:
        torch.set_num_threads(before)
    assert_same(runs[0], runs[1], "1 thread vs 2")
    for row in (0, 5):
        alone = run(cpu_sample_next_tokens, logits[[row, batch + row]], slots[[row]], state, 1, batch)
        assert torch.equal(alone["tokens"][row], runs[1]["tokens"][row])
    assert len({tuple(t) for t in runs[1]["tokens"][:batch].tolist()}) == batch  # the rows did sample


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 0.8)])
def test_frequencies_match_the_exact_law(top_k, top_p):
    gen = torch.Generator().manual_seed(23 + top_k)
    codebooks, vocab, batch = 4, 16, 1024
    row = torch.randn(2, vocab, generator=gen) * 0.4
    logits = row.view(2, 1, 1, vocab).expand(2, batch, codebooks, vocab).reshape(2 * batch, codebooks, vocab)
    state = random_state(batch + 1, codebooks, vocab, 64, gen)
    for name, value in (("guidance_scale", 2.0), ("temperature", 0.8), ("top_k", top_k), ("top_p", top_p),
                        ("position", 10), ("num_frames", 64), ("prompt_frames", 0)):
        state[name].fill_(value)
    state["seed"] = torch.tensor([seed_key(i) for i in range(batch + 1)])
    got = run(cpu_sample_next_tokens, logits.contiguous(), torch.arange(batch), state, 1, batch)
    chi_square_check(got["tokens"][:batch], exact_probabilities(row, 2.0, 0.8, top_k, top_p))


def test_inside_a_compiled_graph():
    gen = torch.Generator().manual_seed(6)
    state = random_state(5, 4, 128, 10, gen)
    logits = torch.randn(8, 4, 128, generator=gen)
    slots = torch.tensor([2, 0, 3, 1])

    def step(logits, *tensors):
        cpu_sample_next_tokens(logits * 1.0, slots, *tensors, PAD, 1, 4)  # (an op before it, as in the step)

    want = run(cpu_sample_next_tokens, logits, slots, state, 1, 4)
    compiled = torch.compile(step, fullgraph=True)
    got = {name: tensor.clone() for name, tensor in state.items()}
    compiled(logits, *(got[name] for name in ("guidance_scale", "temperature", "top_k", "top_p", "seed", "position",
                                              "num_frames", "prompt_frames", "tokens", "codes", "nonfinite")))
    assert_same(got, want, "compiled")


def test_bad_arguments_are_refused():
    state = random_state(3, 4, 16, 8, torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match="logits must be contiguous float32"):
        run(cpu_sample_next_tokens, torch.zeros(4, 4, 16, dtype=torch.float16), torch.tensor([0, 1]), state, 1, 2)
    with pytest.raises(RuntimeError, match="slot out of range"):
        run(cpu_sample_next_tokens, torch.zeros(2, 4, 16), torch.tensor([7]), state, 1, 2)


def test_the_engine_samples_with_the_operator_and_gives_the_reference_codes(tiny_mono_dir, monkeypatch):
    params = [fastgen.SamplingParams(max_new_tokens=24, seed=s, guidance_scale=g, top_k=k, top_p=p)
              for s, g, k, p in ((1, 3.0, 250, 1.0), (2, 1.0, 0, 0.9), (3, 2.0, 5, 1.0))]
    calls = []
    real = torch.ops.fastgen_cpu.sample_next_tokens

    def counted(*args):
        calls.append(1)
        return real(*args)

    def generate():
        engine = fastgen.Engine.from_pretrained(tiny_mono_dir, max_slots=3, dtype=torch.float32)
        requests = [engine.add_request(f"prompt {i}", p) for i, p in enumerate(params)]
        engine.run([])
        return [r.output.codes for r in requests]

    monkeypatch.setattr(torch.ops.fastgen_cpu, "sample_next_tokens", counted)
    with_operator = generate()
    assert calls, "the engine did not sample with the operator"
    calls.clear()
    monkeypatch.setattr(cpu_sampling, "unavailable_reason", lambda: "off for this test")  # the aten reference
    reference = generate()
    assert not calls
    for a, b in zip(with_operator, reference):
        assert (a == b).all()
