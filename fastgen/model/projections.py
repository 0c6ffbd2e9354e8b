"""How a decode step runs the decoder's projections with their LayerNorms, activation and residual adds: the
``linear_backend`` of EngineConfig.

- "torch": F.layer_norm, then the role's Linear (fastgen.model.linear: cuBLAS, oneDNN, MKL, int8), then the
  activation and the residual add as separate operators. On a GPU cuBLAS picks its algorithm by the row count, so a
  row's low bits (and so its sampled codes) can change with its batch-mates.
- "triton": fastgen.kernels.fused_linear, one launch per projection with the LayerNorm fused in front and the
  activation or the in-place residual add behind, on the plain [N, K] weights (or int8 codes and scales); the final
  LayerNorm and every codebook's LM head in one launch writing fp32 logits. Its reduction order depends only on
  the weight's shape, so a row's output is bitwise independent of its batch-mates (batch-invariant).

Prefill always runs on the torch path (its rows are a prompt's positions, not requests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen.model.linear import Int8Linear, Linear

LINEAR_BACKENDS = ("triton", "torch")
# decoder activation name → the fused kernel's; others run FC1 fused without it and the activation in torch
FUSED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}


class TorchProjections:
    name = "torch"

    def __init__(self, activation, final_norm, head_logits, eps: float) -> None:
        self.activation, self.final_norm, self.head_logits, self.eps = activation, final_norm, head_logits, eps

    def normed(self, linear: Linear, hidden: torch.Tensor, norm) -> torch.Tensor:
        """linear(LayerNorm(hidden))"""
        return linear(F.layer_norm(hidden, (hidden.shape[-1],), *norm, self.eps))

    def normed_activated(self, linear: Linear, hidden: torch.Tensor, norm) -> torch.Tensor:
        """activation(linear(LayerNorm(hidden))): FC1"""
        return self.activation(self.normed(linear, hidden, norm))

    def add_to(self, linear: Linear, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """hidden + x @ Wᵀ (a new tensor)"""
        return linear.add_to(hidden, x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, K·V] of the final LayerNorm and the LM heads."""
        return self.head_logits(F.layer_norm(hidden, (hidden.shape[-1],), *self.final_norm, self.eps))


class FusedProjections:
    """The fused kernels; ``add_to`` writes into ``hidden`` in place (the step's hidden state is its own buffer)."""
    name = "triton"

    def __init__(self, activation_name: str, activation, final_norm, lm_heads: Linear, eps: float) -> None:
        from fastgen.kernels.fused_linear import fused_linear  # needs triton (or its interpreter on a CPU)
        self._kernel = fused_linear
        self.fused_activation = FUSED_ACTIVATIONS.get(activation_name)
        self.activation = activation
        self.final_norm, self.lm_heads, self.eps = final_norm, lm_heads, eps

    def _run(self, linear: Linear, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if isinstance(linear, Int8Linear):
            return self._kernel(x, linear.q, linear.scale, eps=self.eps, **kwargs)
        return self._kernel(x, linear.weight, eps=self.eps, **kwargs)

    def normed(self, linear: Linear, hidden: torch.Tensor, norm) -> torch.Tensor:
        return self._run(linear, hidden, norm=norm)

    def normed_activated(self, linear: Linear, hidden: torch.Tensor, norm) -> torch.Tensor:
        if self.fused_activation is None:
            return self.activation(self._run(linear, hidden, norm=norm))
        return self._run(linear, hidden, norm=norm, activation=self.fused_activation)

    def add_to(self, linear: Linear, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._run(linear, x, out=hidden, accumulate=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._run(self.lm_heads, hidden, norm=self.final_norm, out_dtype=torch.float32)
