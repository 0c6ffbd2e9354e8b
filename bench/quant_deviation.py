"""How far quantisation moves the decoder (int8 weight-only, int8 with dynamically quantised activations, int4
weight-only): teacher-forced guided logits (CFG 3) of each quantised model against the float32 model (and, for
scale, the plain bf16 model against float32) over the same input tokens, on random-weight checkpoints. Reports
relative logit error, KL(float ‖ quantised) of the temperature-1 distributions, and greedy-code agreement; plus
free-running greedy codes of whole generations, position by position. Real weights may differ.

    python bench/quant_deviation.py --models tiny,small --steps 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, machine_name, write_result  # noqa: E402


def main() -> None:
    import numpy as np
    import torch

    import fastgen
    from fastgen.model.musicgen import MusicgenModel
    from fastgen.model.deviation import deviation, teacher_forced_logits
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        folder = checkpoint(name, "float32")
        variants = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
                    "float32+int8": (torch.float32, "int8"), "bfloat16+int8": (torch.bfloat16, "int8"),
                    "float32+int8-dynamic": (torch.float32, "int8-dynamic"),
                    "bfloat16+int8-dynamic": (torch.bfloat16, "int8-dynamic"),
                    "float32+int4": (torch.float32, "int4"), "bfloat16+int4": (torch.bfloat16, "int4")}
        models = {label: MusicgenModel.load(folder, dtype=dtype, quantization=q)
                  for label, (dtype, q) in variants.items()}
        reference = models["float32"]
        states, mask = reference.text_encoder.encode([reference.text_encoder.tokenize(PROMPTS[0])])
        c = reference.config.decoder
        tokens = torch.randint(0, c.vocab_size, (c.num_codebooks, args.steps), generator=torch.Generator().manual_seed(0))
        ref_logits = teacher_forced_logits(reference.decoder, states, mask, tokens)
        row = {"model": name, "steps": args.steps}
        params = fastgen.SamplingParams(max_new_tokens=args.steps, do_sample=False, guidance_scale=3.0)
        greedy = {}
        for label, model in models.items():
            if label != "float32":
                row[label] = deviation(ref_logits, teacher_forced_logits(model.decoder, states, mask, tokens))
            engine = fastgen.MusicGen(fastgen.Engine(model, fastgen.EngineConfig(
                max_slots=1, backend="torch", quantization=variants[label][1])))
            greedy[label] = engine.generate([PROMPTS[0]], params)[0].codes
        for label in models:
            if label != "float32":
                same = greedy[label] == greedy["float32"]
                first = int(np.argmin(same.all(0))) if not same.all() else same.shape[1]
                row[label]["free_running_agreement"] = float(same.mean())
                row[label]["frames_before_first_difference"] = first
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k not in ("model", "steps")}, flush=True)
    write_result("quant-deviation", "cpu", machine_name("cpu"), args.out, {"rows": rows})


if __name__ == "__main__":
    main()
