"""The decoder's linear paths: every candidate computes the same product, the choice is a rule (the first path
that runs the shape here, never a timing), the opaque packed paths run under torch.compile as one custom operator, and the fused
kernels get plain weights back."""
from __future__ import annotations

import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from fastgen.kernels import cpu_gemv
from fastgen.model import cpu_paths
from fastgen.model.cpu_paths import CPU_PATHS, build_linears, choose_cpu_path, make_linear
from fastgen.model.linear import DenseLinear, DynamicInt8Linear, Int4Linear, PackedLinear
from fastgen.model.musicgen import MusicgenModel, cpu_has_native_bf16, parse_dtype


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paths_compute_the_same_product(path, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen).to(dtype)
    try:
        linear = make_linear(weight, path)
    except RuntimeError as exc:  # the path does not run on this CPU (oneDNN's bf16 reorder needs AVX-512 or AVX-NE)
        pytest.skip(str(exc))
    for shape in ((2, 40), (1, 40), (3, 5, 40)):   # decode rows, one row, a prefill block
        x = torch.randn(*shape, generator=gen).to(dtype)
        torch.testing.assert_close(linear(x).float(), F.linear(x.float(), weight.float()), atol=tol * 10, rtol=tol)
    x, residual = torch.randn(2, 40, generator=gen).to(dtype), torch.randn(2, 48, generator=gen).to(dtype)
    torch.testing.assert_close(linear.add_to(residual, x).float(), (residual.float() + F.linear(x, weight).float()),
                               atol=tol * 10, rtol=tol)
    dense = linear.dense()
    assert isinstance(dense, DenseLinear) and torch.equal(dense.weight, weight)
    assert linear.nbytes == weight.numel() * weight.element_size()


def test_the_choice_is_a_rule_not_a_race(monkeypatch):
    """The path is the first of CPU_PATHS that runs the shape here, nothing is timed, and every weight of the role
    takes it: the same in every process on this machine."""
    gemv_runs = cpu_gemv.unavailable_reason(torch.float32) is None  # builds the kernels first, if need be
    monkeypatch.setattr(cpu_paths, "_CHOSEN", {})
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("a load-time choice timed something"))
    weights = [torch.randn(80, 56) for _ in range(3)]
    expected = "gemv" if gemv_runs else choose_cpu_path(weights[0])
    assert choose_cpu_path(weights[0]) == expected and expected in CPU_PATHS
    built = build_linears([lambda w=w: w for w in weights], device=torch.device("cpu"), dtype=torch.float32,
                          quantization=None)
    assert {b.path for b in built} == {expected}
    assert choose_cpu_path(torch.randn(72, 56)) != "gemv"  # N not a multiple of 16: the next path that runs it
    assert cpu_paths.chosen_paths() == {(torch.float32, (80, 56)): expected,
                                        (torch.float32, (72, 56)): choose_cpu_path(torch.randn(72, 56))}


def test_int8_takes_the_gemv_where_it_runs(monkeypatch):
    """quantization="int8" on a CPU: the GEMV over int8 codes where it runs, else aten's int8 kernel, for every
    weight of the role."""
    monkeypatch.setattr(cpu_paths, "_CHOSEN", {})
    weights = [torch.randn(64, 48) for _ in range(3)]
    built = build_linears([lambda w=w: w for w in weights], device=torch.device("cpu"), dtype=torch.float32,
                          quantization="int8")
    gemv_runs = cpu_gemv.unavailable_reason(torch.int8) is None
    assert cpu_paths.chosen_paths()[("int8", (64, 48))] == ("int8-gemv" if gemv_runs else "int8")
    assert {b.kernel for b in built} == {"gemv" if gemv_runs else "int8pack"}
    x = torch.randn(2, 48)
    for linear in built:  # the quantised product (aten's kernel rounds x to bf16)
        expected = F.linear(x, linear.q.float() * linear.scale[:, None])
        assert float((linear(x) - expected).abs().max() / expected.abs().max()) < 2e-2


def test_default_dtype_follows_native_bf16():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert parse_dtype(None, torch.device("cpu")) == expected
    assert parse_dtype("float32", torch.device("cpu")) == torch.float32
    for quantization in ("int8", "int8-dynamic", "int4"):  # quantised projections: fp32 is faster eagerly
        assert parse_dtype(None, torch.device("cpu"), quantization) == torch.float32
        # a compiled step reads its KV cache faster in bf16
        assert parse_dtype(None, torch.device("cpu"), quantization, compiled=True) == expected
        assert parse_dtype("bfloat16", torch.device("cpu"), quantization) == torch.bfloat16


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
def test_opaque_linears_run_inside_a_compiled_graph():
    """oneDNN's and fbgemm's packed weights are opaque to dynamo: under torch.compile (fullgraph, C++ wrapper, as
    compile_step) they run as fastgen::opaque_linear, the same product as eagerly; int4 runs as aten's op."""
    gen = torch.Generator().manual_seed(5)
    linears = [PackedLinear(torch.randn(64, 32, generator=gen)), DynamicInt8Linear.from_float(torch.randn(32, 64)),
               Int4Linear.from_float(torch.randn(32, 64, generator=gen))]

    def block(x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(linears[0](x))
        return linears[2](linears[0].add_to(hidden, x) * 0.5) + linears[1].add_to(x, hidden)
    x = torch.randn(2, 32, generator=gen)
    with torch.inference_mode():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, options={"cpp_wrapper": True})(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
def test_compiled_code_serves_many_opaque_linears():
    """One compiled function over several engines' Linears (a process holding more than one compiled engine):
    after a recompile dynamo may trace the handle as a symbolic integer, and each call must still reach its own
    weight."""
    gen = torch.Generator().manual_seed(6)
    linears = [DynamicInt8Linear.from_float(torch.randn(24, 32, generator=gen)) for _ in range(3)]
    run = torch.compile(lambda linear, x: F.relu(linear(x)), fullgraph=True, options={"cpp_wrapper": True})
    x = torch.randn(2, 32, generator=gen)
    with torch.inference_mode():
        for linear in linears + linears[::-1]:
            torch.testing.assert_close(run(linear, x), F.relu(linear(x)))


def test_stock_linears_for_the_fused_kernels(tiny_mono_dir):
    model = MusicgenModel.load(tiny_mono_dir, dtype=torch.float32)
    before = [linear(torch.ones(2, linear_in(linear))) for linear in model.decoder.linears()]
    model.decoder.use_stock_linears()
    assert all(isinstance(linear, DenseLinear) for linear in model.decoder.linears())
    after = [linear(torch.ones(2, linear_in(linear))) for linear in model.decoder.linears()]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def linear_in(linear) -> int:
    return linear.weight.shape[1] if isinstance(linear, DenseLinear) else linear.shape[1]
