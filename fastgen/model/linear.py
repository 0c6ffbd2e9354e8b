"""The decoder's projections at decode shapes (a handful of rows: 2 per request under CFG), each in the layout its
path wants. Which path a role's weights take is fastgen.model.cpu_paths' rule, never a measurement.

On a CPU, the stock ``F.linear`` is MKL's SGEMM in fp32, whose small-M code streams weights far below the memory
bandwidth on some CPUs (AMD EPYCs: ~6 GB/s at 2 rows); oneDNN's inner product over a weight reordered once into
its blocked layout runs at ~0.75 of the read bandwidth, in fp32, and in bf16 where the CPU has AVX-512; and
fastgen's own GEMV (fastgen.kernels.cpu_gemv, AVX-512 or AVX2) over a weight packed into one stream per 16 outputs
runs at or near the read bandwidth. Weight-only int8 (fastgen.model.quantize) runs through the GEMV over int8 codes
or ``aten._weight_int8pack_mm`` on a CPU and as a Triton GEMV on CUDA; int8 with dynamically quantised activations
runs through fbgemm's dynamic linear (CPU only).

Every Linear computes y = x @ W^T for x [..., K] and ``add_to(residual, x)`` = residual + x @ W^T (fused where the
path can). torch.compile (compile_step) cannot trace the opaque packed weights of oneDNN and fbgemm, so under it
those two paths run as one custom operator (``fastgen::opaque_linear``) that inductor calls as it is; eagerly they
call their kernels directly. The GEMV is a registered operator with a fake, traced like any aten op."""
from __future__ import annotations

import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F

from fastgen.config import QUANTIZATIONS
from fastgen.model.quantize import INT4_GROUP_SIZE, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

# the rows a decode step multiplies: one request, its cond and uncond rows
DECODE_ROWS = 2
_INT8PACK_K_MULTIPLE = 16  # _weight_int8pack_mm crashes (segfault) on other K in torch 2.13
_INT4PACK_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu refuses other N


_OPAQUE: "weakref.WeakValueDictionary[int, PackedLinear | DynamicInt8Linear]" = weakref.WeakValueDictionary()
_OPAQUE_HANDLES = itertools.count()


@torch.library.custom_op("fastgen::opaque_linear", mutates_args=())
def opaque_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """x @ W^T of the packed Linear registered under ``handle``."""
    return _OPAQUE[handle].compute(x)


@opaque_linear.register_fake
def _opaque_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    # not from the registry: once dynamo has seen two engines' handles at one call site it may trace the handle as
    # a symbolic integer (a graph input, read from the Linear at each call), which indexes nothing at trace time
    return x.new_empty(*x.shape[:-1], out_features)


class _Opaque:
    """A Linear whose weight torch.compile cannot see: traced as fastgen::opaque_linear, called directly eagerly."""

    def _register(self) -> None:
        self.handle = next(_OPAQUE_HANDLES)
        _OPAQUE[self.handle] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return opaque_linear(x, self.handle, self.shape[0])
        return self.compute(x)


class DenseLinear:
    """The stock path: F.linear / addmm (MKL or oneDNN on a CPU, cuBLAS on CUDA). Also what torch.compile traces."""
    path = "aten"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight                 # [N, K]
        self.weight_t = weight.t()           # a view: addmm(residual, x, W^T) adds the residual in the GEMM

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return torch.addmm(residual, x, self.weight_t)
        return residual + x @ self.weight_t

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dense(self) -> "DenseLinear":
        return self


class PackedLinear(_Opaque):
    """oneDNN's inner product over a weight reordered once (at load) into oneDNN's blocked layout for ``rows``
    rows; any number of rows still works. CPU only; float32 and bfloat16."""
    path = "onednn-packed"

    def __init__(self, weight: torch.Tensor, rows: int = DECODE_ROWS) -> None:
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self._register()

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and residual.is_contiguous() and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, None, "add")
        return residual + self(x)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.tensor([], dtype=self.dtype).element_size()

    def dense(self) -> DenseLinear:
        return DenseLinear(self.packed.to_dense())


def _gemv_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] (float, or int8 codes) in fastgen.kernels.cpu_gemv's layout; RuntimeError where that kernel
    cannot run (no AVX2, no compiler, not a CPU tensor, a shape it does not take)."""
    from fastgen.kernels import cpu_gemv
    try:  # the shape first (pack's own check), so odd test models never build the kernel
        packed = cpu_gemv.pack(weight)
    except ValueError as exc:
        raise RuntimeError(f"the gemv path cannot run here: {exc}") from None
    reason = "not a CPU tensor" if weight.device.type != "cpu" else cpu_gemv.unavailable_reason(weight.dtype)
    if reason is not None:  # unavailable_reason builds the kernel the first time
        raise RuntimeError(f"the gemv path cannot run here: {reason}")
    return packed


class GemvLinear:
    """fastgen's own AVX-512 / AVX2 GEMV (fastgen.kernels.cpu_gemv) over a weight packed at load into one sequential stream
    per block of 16 output channels; float32 and bfloat16. It reads the weights at the rate of a plain sum, where
    oneDNN's inner product reaches ~0.75 of it at decode rows; from ~8 rows on it is compute-bound and oneDNN's GEMM
    is as fast or faster (docs/cpu.md). A registered C++ operator: torch.compile traces it and
    inductor calls it directly. Raises RuntimeError where it cannot run (no AVX-512, no compiler, odd shapes)."""
    path = "gemv"

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed = _gemv_pack(weight)
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        out = torch.ops.fastgen_cpu.gemv_linear(x.reshape(-1, k), self.packed, self.shape[0], None)
        return out.view(*lead, self.shape[0])

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return residual + self(x)
        return torch.ops.fastgen_cpu.gemv_linear(x, self.packed, self.shape[0], residual)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def dense(self) -> DenseLinear:
        from fastgen.kernels import cpu_gemv
        return DenseLinear(cpu_gemv.unpack(self.packed).contiguous())


class Int8Linear:
    """Weight-only int8: y = (x @ q^T) * scale, per output channel. On a CPU, one of two kernels, chosen at load by
    fastgen.model.cpu_paths: fastgen's GEMV (fastgen.kernels.cpu_gemv, ``cpu_kernel="gemv"``: the codes packed in
    its layout, widened to fp32 in registers) or, where that cannot run, ``aten._weight_int8pack_mm`` with bf16
    activations (its fp32 path is several times slower, so fp32 inputs go through bf16 and come back); shapes neither
    takes multiply by the dequantised weight, made once. CUDA: the Triton GEMV in fastgen.kernels.int8_linear."""
    path = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, cpu_kernel: str | None = None) -> None:
        if cpu_kernel not in (None, "gemv"):
            raise ValueError(f"cpu_kernel must be None or 'gemv', got {cpu_kernel!r}")
        self.shape = tuple(q.shape)
        self.scale = scale.float()           # [N] float32
        self.scale_bf16 = scale.to(torch.bfloat16)
        self.packed = _gemv_pack(q) if cpu_kernel == "gemv" else None
        self.kernel = cpu_kernel or ("int8pack" if q.shape[1] % _INT8PACK_K_MULTIPLE == 0 else "dequantised")
        self._q = None if self.packed is not None else q.contiguous()  # [N, K] int8, or only the packed copy
        # shapes the CPU kernels do not take (tiny test models with odd widths): the dequantised weight, made once
        self.fallback_weight = (dequantize_int8(q, scale) if self.kernel == "dequantised" and q.device.type == "cpu"
                                else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, cpu_kernel: str | None = None) -> "Int8Linear":
        return cls(*quantize_int8(weight), cpu_kernel=cpu_kernel)

    @property
    def q(self) -> torch.Tensor:
        """The [N, K] int8 codes (for the fused Triton kernels, which read them every step): where only the GEMV's
        packed copy was kept, unpacked once on first use and kept from then on."""
        if self._q is None:
            from fastgen.kernels import cpu_gemv
            self._q = cpu_gemv.unpack(self.packed).contiguous()
        return self._q

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, k)
        if x.device.type == "cuda":
            from fastgen.kernels.int8_linear import int8_linear
            out = int8_linear(flat, self._q, self.scale)
        elif self.kernel == "gemv":
            out = torch.ops.fastgen_cpu.gemv_linear(flat, self.packed, self.shape[0], None, self.scale)
        elif self.kernel == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), self._q,
                                                     self.scale_bf16).to(x.dtype)
        else:
            out = F.linear(flat.float(), self.fallback_weight).to(x.dtype)
        return out.view(*lead, self.shape[0])

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "gemv" and x.dim() == 2 and x.device.type == "cpu":
            return torch.ops.fastgen_cpu.gemv_linear(x, self.packed, self.shape[0], residual, self.scale)
        return residual + self(x)

    @property
    def nbytes(self) -> int:
        # int8 codes + the scales the kernel reads: fp32 for the GEMV, bf16 for aten's (fp32 on CUDA: ~same)
        return self.shape[0] * self.shape[1] + self.shape[0] * (4 if self.kernel == "gemv" else 2)

    def dense(self) -> "Int8Linear":
        return self


class DynamicInt8Linear(_Opaque):
    """int8 weights and int8 activations: fbgemm's dynamic linear quantises x [.., K] to uint8 per call (one scale
    and zero point over the call's rows), multiplies in integers and rescales per output channel. CPU only. On a CPU
    without VNNI its 8-bit multiply-adds saturate 16-bit sums, so activations are kept to 7 bits there
    (reduce_range)."""
    path = "int8-dynamic"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.shape = tuple(q.shape)
        self.scale = scale.float()
        with warnings.catch_warnings():  # a quantized tensor is the only way into fbgemm's packed weight (deprecated)
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(q.contiguous(), self.scale.double(),
                                                              torch.zeros_like(self.scale, dtype=torch.int64), 0)
            self.packed = torch.ops.quantized.linear_prepack(weight, None)
        self.reduce_range = not cpu_has_vnni()
        self._register()

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "DynamicInt8Linear":
        return cls(*quantize_int8(weight))

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        out = torch.ops.quantized.linear_dynamic(x.reshape(-1, k).float(), self.packed, self.reduce_range)
        return out.view(*lead, self.shape[0]).to(x.dtype)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self(x)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.shape[0] * 4  # int8 codes + fp32 scales

    def dense(self) -> "DynamicInt8Linear":
        return self


class Int4Linear:
    """Weight-only int4, asymmetric per group of ``group_size`` along K (fastgen.model.quantize.quantize_int4). CPU:
    ``aten._weight_int4pack_mm_for_cpu`` over the codes packed two to a byte, with bf16 activations (its fp32 path
    is ~80× slower); shapes it does not take (N not a multiple of 16: tiny test models) multiply by the dequantised
    weight (made once, in fp32) instead, the same values."""
    path = "int4"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        self.shape = tuple(codes.shape)
        self.group_size = codes.shape[1] // scale.shape[1]
        self.fast_cpu = codes.shape[0] % _INT4PACK_N_MULTIPLE == 0
        if self.fast_cpu:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # [N, K/2]
            # the kernel's layout: [K/g, N, 2], scale then offset
            self.scale_offset = torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        else:
            self.weight = dequantize_int4(codes, scale, offset)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        return cls(*quantize_int4(weight, group_size))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, k)
        if self.fast_cpu:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16).contiguous(), self.packed,
                                                              self.group_size, self.scale_offset).to(x.dtype)
        else:
            out = F.linear(flat.float(), self.weight).to(x.dtype)
        return out.view(*lead, self.shape[0])

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self(x)

    @property
    def nbytes(self) -> int:
        groups = self.shape[0] * (self.shape[1] // self.group_size)
        return self.shape[0] * self.shape[1] // 2 + groups * 2 * 2  # 4-bit codes + bf16 scale and offset per group

    def dense(self) -> "Int4Linear":
        return self


def cpu_has_vnni() -> bool:
    """AVX512-VNNI (8-bit dot products in hardware), from torch's own CPU feature check (as cpu_has_native_bf16).
    A CPU with only AVX-VNNI reads False: it then keeps activations to 7 bits, safe if not needed."""
    return getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


Linear = DenseLinear | PackedLinear | GemvLinear | Int8Linear | DynamicInt8Linear | Int4Linear
QUANTIZED_PATHS = tuple(q for q in QUANTIZATIONS if q)  # Linear.path of the quantised kinds
