"""The kernels are torch operators (fastgen::*): their schemas declare exactly what they write (opcheck runs each op
under torch's schema checker, which fails on an undeclared mutation), their fake implementations trace, a
TorchDispatchMode and the profiler see one op per launch, and torch.compile traces through a launcher."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastgen.kernels import decode_attention as decode_attention_module
from fastgen.kernels.codebook_embedding import codebook_embedding, codebook_embedding_ref
from fastgen.kernels.decode_attention import decode_attention_append, decode_attention_append_ref, scratch_buffer
from fastgen.kernels.counter_hash import counter_uniform  # noqa: F401  (registers fastgen::counter_uniform)
from fastgen.kernels.sampling import sample_next_tokens  # noqa: F401  (registers fastgen::sample_next_tokens)

from kernel_checks import DEVICE

OPS = torch.ops.fastgen
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def ints(*shape, high, dtype=torch.int64):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(high), dtype=dtype).to(DEVICE)


def attention_args(append: bool):
    rows, heads, dh, length = 2, 2, 16, 9
    q, k_new, v_new = rand(rows, heads, dh, seed=1), rand(rows, heads, dh, seed=2), rand(rows, heads, dh, seed=3)
    caches = rand(3, heads, length, dh, seed=4), rand(3, heads, length, dh, seed=5)
    cache_row = torch.tensor([2, 0], device=DEVICE)
    lengths = torch.tensor([9, 4], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    decode_attention_module.reserve_decode_scratch(rows, heads, length, DEVICE, head_dim=dh)
    tail = (cache_row, lengths, 0.25, length, out, scratch_buffer(DEVICE), torch.zeros(rows * heads,
                                                                                        dtype=torch.int32,
                                                                                        device=DEVICE))
    return (q, k_new, v_new, *caches, *tail) if append else (q, *caches, *tail)


def embedding_args():
    tokens, position = ints(3, 4, high=8), ints(3, high=5, dtype=torch.int32)
    return tokens, position, torch.tensor([2, 0], device=DEVICE), rand(4, 9, 16), rand(6, 16), rand(4, 16)


def sampling_args():
    slots, vocab, codebooks = 3, 16, 4
    state = [rand(slots).abs() + 1.0, rand(slots).abs() + 0.5, ints(slots, high=5, dtype=torch.int32),
             torch.full((slots,), 0.9, device=DEVICE), ints(slots, high=2**40),
             torch.full((slots,), 6, dtype=torch.int32, device=DEVICE),
             torch.full((slots,), 12, dtype=torch.int32, device=DEVICE), torch.zeros(slots, dtype=torch.int32,
                                                                                    device=DEVICE)]
    step_length = torch.tensor([4, 1, 4, 1], dtype=torch.int32, device=DEVICE)  # the step's: it advances position
    return (rand(4, codebooks, vocab), torch.tensor([2, 0], device=DEVICE), *state,
            torch.zeros(slots, codebooks, dtype=torch.int64, device=DEVICE), ints(slots, codebooks, 12, high=vocab),
            torch.zeros(slots, dtype=torch.int32, device=DEVICE), vocab, 1, step_length, 1)


def embedding_rows_args():
    tokens, position, slots, tables, sinusoid, out = embedding_args()
    text_length = ints(3, high=7, dtype=torch.int32)
    rows = [torch.empty(4, dtype=dtype, device=DEVICE) for dtype in (torch.int64, torch.int32, torch.int32)]
    return tokens, position, slots, tables, sinusoid, text_length, 3, out, *rows


CASES = {
    "codebook_embedding": embedding_args,
    "codebook_embedding_rows": embedding_rows_args,
    "decode_attention": lambda: attention_args(append=False),
    "decode_attention_append": lambda: attention_args(append=True),
    "sample_next_tokens": sampling_args,
    "counter_uniform": lambda: (ints(8, high=2**40), *(ints(8, high=50, dtype=torch.int32) for _ in range(3))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    torch.library.opcheck(getattr(OPS, name).default, CASES[name](), test_utils=CHECKS)


def test_undeclared_mutation_is_caught():
    """The schema check is live: the append kernel registered with k_cache read-only fails it."""
    lib = torch.library.Library("fastgen_test", "FRAGMENT")
    lib.define("append_k_read_only(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor(b!) v_cache, "
               "Tensor cache_row, Tensor length, float scale, int span, Tensor(c!) out, Tensor(d!) scratch, "
               "Tensor(e!) tickets) -> ()")
    for key in ("CPU", "CUDA"):
        lib.impl("append_k_read_only", decode_attention_module._run_kernel, key)
    with pytest.raises(Exception, match="k_cache"):
        torch.library.opcheck(torch.ops.fastgen_test.append_k_read_only.default, attention_args(append=True),
                              test_utils=("test_schema",))


class Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_one_dispatched_op_per_launch():
    """The launcher's work reaches the dispatcher as one fastgen op (the interpreter's own tensor copies inside it
    do not show), which is what lets the CPU graph stand-in record and replay it."""
    args = embedding_args()
    with Calls() as calls:
        out = codebook_embedding(*args)
    assert calls.names == ["fastgen.codebook_embedding"]
    torch.testing.assert_close(out, codebook_embedding_ref(*args[:5], torch.empty_like(args[5])))


def test_profiler_names_the_kernel():
    q, k_new, v_new, k, v, cache_row, lengths, scale, _, out, _, _ = attention_args(append=True)
    with torch.profiler.profile() as prof:
        decode_attention_append(q, k_new, v_new, k, v, cache_row, lengths, scale, out=out)
    assert "fastgen::decode_attention_append" in {event.key for event in prof.key_averages()}


def test_torch_compile_traces_a_launcher():
    """fullgraph: the launcher (checks, scratch lookup, op call) traces without a break; the fake implementation
    gives the graph its shapes, and the compiled call writes what the eager reference writes."""
    q, k_new, v_new, k, v, cache_row, lengths, scale, _, _, _, _ = attention_args(append=True)
    k_want, v_want = k.clone(), v.clone()
    want = decode_attention_append_ref(q, k_new, v_new, k_want, v_want, cache_row, lengths, scale)

    def step(q, k_new, v_new, k, v):
        return decode_attention_append(q * 1.0, k_new, v_new, k, v, cache_row, lengths, scale) + 0.0

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k_new, v_new, k, v)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert torch.equal(k, k_want) and torch.equal(v, v_want)
