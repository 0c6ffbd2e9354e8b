"""The fused projection kernel (kernels/fused_linear.py) vs its PyTorch reference, every variant the decoder uses,
on odd shapes with and without split-K, poisoned outputs and scratch; and the launcher's input checks.
(Interpreter on a CPU: fp32 and fp16; bf16 only compiled on CUDA, the interpreter computes it wrongly.)"""
import pytest
import torch

from fastgen.kernels import fused_linear as module
from fastgen.kernels.fused_linear import fused_linear, fused_linear_ref, launch_config

from kernel_checks import DEVICE, assert_close_report

DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)]
if DEVICE == "cuda":
    DTYPES.append((torch.bfloat16, 1.6e-2, 1.6e-2))

# variant → fused_linear keyword arguments (besides x and the weight): the decoder's six roles and the heads
VARIANTS = {
    "plain": {},
    "norm": {"norm": True},                                     # QKV, cross-Q
    "norm-gelu": {"norm": True, "activation": "gelu"},          # FC1
    "residual": {"accumulate": True},                           # self-out, cross-out, FC2
    "norm-fp32-out": {"norm": True, "out_dtype": torch.float32},  # final LayerNorm + LM heads
    "int8-residual": {"int8": True, "accumulate": True},
    "int8-norm-gelu": {"int8": True, "norm": True, "activation": "gelu"},
}
# (M, N, K): odd everywhere; K long enough for split-K in both BLOCK_K families (fp32 64, 16-bit 128)
SHAPES = [(3, 40, 24), (5, 33, 300), (19, 17, 520)]


def split_of(n, k, weight_dtype):
    return launch_config(n, k, weight_dtype).split_k


def make_case(m, n, k, dtype, variant, seed):
    """Inputs of one call: (args, kwargs) for fused_linear and the reference, and the residual it starts from."""
    gen = torch.Generator().manual_seed(seed)
    spec = dict(VARIANTS[variant])
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5)
    kwargs = {}
    if spec.pop("int8", False):
        scale = weight.abs().amax(1) / 127
        weight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).to(DEVICE)
        kwargs["scale"] = scale.float().to(DEVICE)
    else:
        weight = weight.to(dtype).to(DEVICE)
    if spec.pop("norm", False):
        kwargs["norm"] = ((1 + 0.3 * torch.randn(k, generator=gen)).to(dtype).to(DEVICE),
                          (0.2 * torch.randn(k, generator=gen)).to(dtype).to(DEVICE))
        x = x * 3 + 1  # a row mean and scale far from 0 and 1: the statistics matter
    kwargs.update(spec)
    residual = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE) if kwargs.get("accumulate") else None
    return x, weight, kwargs, residual


def poison_scratch():
    for partials, _ in module._SCRATCH.buffers.values():
        partials.fill_(float("nan"))  # stale partials must never be read


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_reference(m, n, k, variant, dtype, atol, rtol):
    x, weight, kwargs, residual = make_case(m, n, k, dtype, variant, seed=m * 1000 + n + k)
    want_out = None if residual is None else residual.clone()
    want = fused_linear_ref(x, weight, out=want_out, **kwargs)
    out_dtype = kwargs.pop("out_dtype", dtype)
    # poison: every element is written (or, accumulating, the residual is what was there)
    out = residual.clone() if residual is not None else torch.full((m, n), float("nan"), dtype=out_dtype,
                                                                   device=DEVICE)
    poison_scratch()
    got = fused_linear(x, weight, out=out, **kwargs)
    assert got is out and out.dtype == out_dtype
    assert_close_report(out, want, atol, rtol * (3 if "int8" in variant else 1), what=f"{variant} out")


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu", "silu"])
def test_other_activations_match_reference(activation):
    """The activations of other checkpoints' FC1 (musicgen's own is exact GELU, tested above)."""
    x, weight, kwargs, _ = make_case(5, 33, 300, torch.float32, "norm", seed=4)
    got = fused_linear(x, weight, activation=activation, **kwargs)
    assert_close_report(got, fused_linear_ref(x, weight, activation=activation, **kwargs), 2e-5, 2e-5, activation)


def test_decoder_falls_back_to_torch_for_an_activation_the_kernel_lacks():
    from fastgen.model.linear import DenseLinear
    from fastgen.model.projections import FusedProjections

    x, weight, kwargs, _ = make_case(3, 40, 24, torch.float32, "norm", seed=5)
    doubled = FusedProjections("doubled", lambda y: 2 * y, kwargs["norm"], DenseLinear(weight), 1e-5)
    assert doubled.fused_activation is None
    got = doubled.normed_activated(DenseLinear(weight), x, kwargs["norm"])
    assert_close_report(got, 2 * fused_linear_ref(x, weight, **kwargs), 2e-5, 2e-5)


def test_shapes_exercise_split_k_and_several_row_tiles():
    """The cases above are only worth something if they reach the split-K reduction and more than one tile of rows
    (and the unsplit path)."""
    splits = {split_of(n, k, dtype) for _, n, k in SHAPES for dtype in (torch.float32, torch.float16)}
    assert 1 in splits and max(splits) >= 2, splits
    assert any(m > module.BLOCK_M for m, _, _ in SHAPES)


def test_tickets_are_reset_and_a_second_call_repeats_the_first():
    """The last program of each tile resets its arrival counter, so the next launch (another graph replay) reduces
    again; a stale counter would make the wrong program finish the tile."""
    x, weight, kwargs, residual = make_case(19, 17, 520, torch.float32, "norm-gelu", seed=1)
    assert split_of(17, 520, torch.float32) > 1
    first = fused_linear(x, weight, **kwargs).clone()
    for _, tickets in module._SCRATCH.buffers.values():
        assert int(tickets.abs().sum()) == 0
    poison_scratch()
    torch.testing.assert_close(fused_linear(x, weight, **kwargs), first, rtol=0, atol=0)


def test_runs_as_one_fastgen_op():
    """One dispatcher op per launch (what the graph stand-in records and the launch count counts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, weight, kwargs, residual = make_case(5, 33, 300, torch.float32, "residual", seed=2)
    fused_linear(x, weight, out=residual, **kwargs)  # warm: the scratch exists
    with Calls() as calls:
        fused_linear(x, weight, out=residual, **kwargs)
    assert calls.names == ["fastgen.fused_linear.default"], calls.names


def test_empty_rows_launch_nothing():
    x = torch.empty(0, 24, device=DEVICE)
    assert fused_linear(x, torch.randn(8, 24, device=DEVICE)).shape == (0, 8)


BAD_INPUTS = {
    "x must be": lambda x, w: dict(x=x.to(torch.int32), weight=w),
    "weight must be \\[N, 24\\]": lambda x, w: dict(x=x, weight=w[:, :20]),
    "in x's dtype": lambda x, w: dict(x=x, weight=w.half()),
    "scale must be given exactly": lambda x, w: dict(x=x, weight=w.to(torch.int8)),
    "scale must be a contiguous float32": lambda x, w: dict(x=x, weight=w.to(torch.int8),
                                                            scale=torch.ones(7, device=DEVICE)),
    "norm must be": lambda x, w: dict(x=x, weight=w, norm=(torch.ones(24, device=DEVICE),)),
    "activation must be one of": lambda x, w: dict(x=x, weight=w, activation="tanh"),
    "accumulate=True adds into out": lambda x, w: dict(x=x, weight=w, accumulate=True),
    "out must be a float \\[3, 8\\]": lambda x, w: dict(x=x, weight=w, out=torch.empty(3, 9, device=DEVICE)),
    "contiguous last dim": lambda x, w: dict(x=x, weight=w, out=torch.empty(8, 3, device=DEVICE).t()),
}


@pytest.mark.parametrize("message", list(BAD_INPUTS))
def test_bad_inputs_raise_before_launching(message):
    x, w = torch.randn(3, 24, device=DEVICE), torch.randn(8, 24, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        fused_linear(**BAD_INPUTS[message](x, w))


@pytest.mark.parametrize("variant", ["residual", "norm-gelu"])
def test_opcheck(variant):
    """The op's schema declares what it writes (out, the split-K partials and tickets) and its fake traces."""
    x, weight, kwargs, residual = make_case(5, 33, 300, torch.float32, variant, seed=3)
    assert split_of(33, 300, torch.float32) > 1
    out = residual if residual is not None else torch.empty(5, 33, device=DEVICE)
    fused_linear(x, weight, out=out, **kwargs)  # sizes the scratch
    partials, tickets = module._SCRATCH.current(x.device)
    norm = kwargs.get("norm") or (None, None)
    args = (x, weight, None, *norm, 1e-5, kwargs.get("activation", "none"), bool(kwargs.get("accumulate")), out,
            partials, tickets)
    torch.library.opcheck(torch.ops.fastgen.fused_linear.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
