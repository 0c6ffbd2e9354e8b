"""EnCodec's convolutions on a CPU, made to give the same bits at any thread count.

oneDNN's convolution (aten's default CPU path) blocks its work by the thread count, so the same codes decoded by a
1-thread AsyncEngine and a 2-thread ``generate`` gave audio that differed in the last bits, and weight norm
recomputes each weight from its parts in every call. Here each weight is computed once, at load, and every Conv1d
and ConvTranspose1d calls aten's im2col + GEMM kernels directly (the path aten takes with oneDNN switched off, whose
per-element sums do not depend on the threads), without touching the process-wide oneDNN switch that the decoder's
own operators, running meanwhile in another thread, read. The audio moves by ~1e-7 against the stock path."""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.utils import parametrize


def make_thread_invariant(model: nn.Module) -> None:
    """In place, on a CPU model: weight norm folded into plain weights, every plain (ungrouped, undilated, unpadded:
    EnCodec pads before each call) 1-d convolution on aten's im2col path."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for module in model.modules():
        if not isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) or type(module) not in (nn.Conv1d,
                                                                                             nn.ConvTranspose1d):
            continue
        if module.groups != 1 or module.dilation != (1,) or module.padding != (0,) or module.padding_mode != "zeros":
            continue  # a shape the direct kernels do not take: the stock path (not in MusicGen's EnCodec)
        forward = _transposed_forward if isinstance(module, nn.ConvTranspose1d) else _forward
        module.forward = types.MethodType(forward, module)


def _forward(self: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    out = torch._C._nn.thnn_conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), (1, self.kernel_size[0]), self.bias,
                                   (1, self.stride[0]), (0, 0))
    return out.squeeze(2)


def _transposed_forward(self: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    out = torch._C._nn.slow_conv_transpose2d(x.unsqueeze(2), self.weight.unsqueeze(2), (1, self.kernel_size[0]),
                                             self.bias, (1, self.stride[0]), (0, 0), (0, self.output_padding[0]),
                                             (1, 1))
    return out.squeeze(2)
