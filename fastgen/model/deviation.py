"""How far a quantised decoder's logits are from the float decoder's: teacher-forced logits of one request, and the
deviation measures (bench/quant_deviation.py, tests/test_quantize.py). Kept apart from fastgen.model.quantize, which the
decoder imports, since this drives a whole decoder."""
from __future__ import annotations

import torch

from fastgen.model.decoder import KVCache
from fastgen.model.ops import TorchOps


@torch.inference_mode()
def teacher_forced_logits(decoder, text_states: torch.Tensor, text_mask: torch.Tensor, tokens: torch.Tensor
                          ) -> torch.Tensor:
    """Guided logits [T, K, V] (float32, guidance scale 3) of one request whose delayed input tokens [K, T] are
    given: every position sees the same inputs whatever the decoder predicted, so two decoders (say, float and int8)
    can be compared position by position. text_states [1, L, Dt] / text_mask [1, L] from the T5 encoder."""
    c = decoder.config
    steps = tokens.shape[1]
    device = decoder.device
    cache = KVCache.allocate(c, 1, steps, max(text_mask.shape[1], 1), decoder.dtype, device)
    rows = torch.tensor([0, 1], device=device)
    decoder.write_cross_kv(cache, rows[:1], decoder.project_text(text_states.to(device), text_mask.to(device)))
    text_length = torch.tensor([int(text_mask.sum()), 0], dtype=torch.int32, device=device)
    codebook = torch.arange(c.num_codebooks, device=device)
    ops, guided = TorchOps(), []
    for t in range(steps):
        hidden = (decoder.embed[codebook, tokens[:, t].to(device)].sum(0) + decoder.sinusoid[t]).expand(2, -1)
        position = torch.full((2,), t, dtype=torch.int64, device=device)
        ctx = ops.context(rows, position, text_length, t + 1, text_mask.shape[1], decoder.dtype)
        logits = decoder.decode(ops, hidden.contiguous(), cache, ctx).float()
        guided.append(logits[1] + 3.0 * (logits[0] - logits[1]))
    return torch.stack(guided)


def deviation(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """How far quantised logits [..., V] are from the reference's: relative error (max |Δ| over max |ref|, and RMS
    over RMS), KL(reference ‖ quantised) of the temperature-1 distributions (mean and max over positions), and how
    often the two argmaxes (greedy codes) agree."""
    ref, quant = reference.float(), quantized.float()
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - quant.log_softmax(-1))).sum(-1)
    return {"max_rel_error": float((quant - ref).abs().max() / ref.abs().max()),
            "rms_rel_error": float((quant - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "greedy_agreement": float((quant.argmax(-1) == ref.argmax(-1)).float().mean())}
