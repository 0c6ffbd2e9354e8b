"""Smoke run on the tiny model, step a of bench/gpu_report.sh: do the decode paths agree on this device?

- fp32 greedy codes, mono and stereo: transformers' generate vs fastgen's torch backend, eager Triton kernels and
  CUDA-graph replay (CUDA only);
- bf16 with sampling and guidance: every request finishes, codes in range, audio finite;
- steps_per_call 4 gives the codes of 1;
- the AsyncEngine with T5/EnCodec on the stage worker and an abort mid-way.

Every check is timed and caught on its own; the JSON file is rewritten after each check, so a timeout keeps the
finished ones. Needs no soundfile/soxr.

    python bench/gpu_smoke.py --device cuda --out smoke.json
    python bench/gpu_smoke.py --device cpu --dry-run --out smoke.json     (TRITON_INTERPRET=1; mono, fewer steps)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import atomic_write_text, machine_name  # noqa: E402

import fastgen  # noqa: E402
from fastgen.tiny import build_tiny_checkpoint  # noqa: E402

PROMPTS = ["80s pop track with bassy drums", "lofi"]


def transformers_codes(folder: Path, device: torch.device, steps: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    model = MusicgenForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    inputs = AutoTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt").to(device)
    captured = []
    original = model.audio_encoder.decode

    def spy(audio_codes, *args, **kwargs):
        captured.append(audio_codes[0].cpu())
        return original(audio_codes, *args, **kwargs)

    model.audio_encoder.decode = spy
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=steps, guidance_scale=3.0)
    codes = captured[0] if len(captured) == 1 else torch.stack(captured, dim=2).flatten(1, 2)
    return list(codes.numpy())


def parity(folder: Path, device: torch.device, steps: int) -> dict:
    expected = transformers_codes(folder, device, steps)
    paths = {"torch": {"backend": "torch", "enforce_eager": True},
             "triton-eager": {"backend": "triton", "enforce_eager": True}}
    if device.type == "cuda":
        paths["graph-replay"] = {"backend": "triton", "enforce_eager": False}
    params = fastgen.SamplingParams(max_new_tokens=steps, do_sample=False, guidance_scale=3.0)
    detail, mismatched = {}, []
    for path, options in paths.items():
        model = fastgen.MusicGen.from_pretrained(folder, device=device, dtype=torch.float32, max_slots=2,
                                                 max_duration_s=1.0, **options)
        start = time.perf_counter()
        outs = model.generate(PROMPTS, params)
        equal = [float((o.codes == ref).mean()) if o.codes.shape == ref.shape else 0.0
                 for o, ref in zip(outs, expected)]
        detail[path] = {"codes_equal_fraction": equal, "generate_s": time.perf_counter() - start,
                        "graphs": model.engine.runner.graphs is not None}
        if min(equal) < 1.0:
            mismatched.append(path)
        model.engine.close()
    if device.type != "cuda":
        detail["graph-replay"] = "not run: CUDA graphs need CUDA (the CPU stand-in is engineer graphs' part)"
    return {"ok": not mismatched, "mismatched": mismatched, **detail}


def engine(folder: Path, device: torch.device, dtype=torch.float32, **options) -> fastgen.Engine:
    return fastgen.Engine.from_pretrained(folder, device=device, dtype=dtype, max_slots=3, max_duration_s=1.0,
                                          **options)


def bf16_finite(folder: Path, device: torch.device, steps: int) -> dict:
    eng = engine(folder, device, torch.bfloat16)
    params = fastgen.SamplingParams(max_new_tokens=steps, seed=3, guidance_scale=3.0, top_k=20)
    requests = eng.run([eng.make_request(p, params) for p in PROMPTS + [None]])
    eng.close()
    vocab = eng.model.config.decoder.vocab_size
    ok = all(r.output is not None and r.output.codes.min() >= 0 and r.output.codes.max() < vocab
             and np.isfinite(r.output.audio).all() for r in requests)
    return {"ok": ok, "statuses": [r.status.value for r in requests], "backend": eng.ops.name,
            "graphs": eng.runner.graphs is not None}


def steps_per_call(folder: Path, device: torch.device, steps: int) -> dict:
    codes = {}
    for per_call in (1, 4):
        eng = engine(folder, device, steps_per_call=per_call)
        requests = [eng.add_request(p, fastgen.SamplingParams(max_new_tokens=steps + 5 * i, seed=i, top_k=5))
                    for i, p in enumerate(PROMPTS)]
        eng.step()
        requests.append(eng.add_request(None, fastgen.SamplingParams(max_new_tokens=steps - 1, do_sample=False)))
        while eng.has_unfinished():
            eng.step()
        eng.close()
        codes[per_call] = [r.output.codes if r.output is not None else None for r in requests]
    equal = [a is not None and b is not None and np.array_equal(a, b) for a, b in zip(codes[1], codes[4])]
    return {"ok": all(equal), "equal": equal}


def async_abort(folder: Path, device: torch.device, steps: int) -> dict:
    params = [fastgen.SamplingParams(max_new_tokens=steps + 3 * i, seed=i, guidance_scale=3.0, top_k=8)
              for i in range(3)]
    inline = engine(folder, device, overlap_stages=False)
    expected = [r.output.codes for r in inline.run([inline.make_request(f"p{i}", p) for i, p in enumerate(params)])]
    served = fastgen.AsyncEngine(engine(folder, device, overlap_stages=True))
    kinds: list[str] = []

    async def abort_once_running(handle):
        async for event in handle:
            kinds.append(event.kind)
            if event.kind == "progress" and kinds.count("progress") == 1:
                served.abort(handle.request_id)

    try:
        handles = [served.submit(f"p{i}", p) for i, p in enumerate(params)]
        doomed = served.submit("aborted", fastgen.SamplingParams(max_new_tokens=45, seed=9))
        asyncio.run(asyncio.wait_for(abort_once_running(doomed), 120))
        outputs = [h.result(timeout=120) for h in handles]
    finally:
        served.shutdown_sync()
    equal = [np.array_equal(o.codes, ref) for o, ref in zip(outputs, expected)]
    return {"ok": all(equal) and kinds[-1] == "aborted", "equal_to_inline": equal, "aborted_events": kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="fewer decode steps (CPU interpreter)")
    args = parser.parse_args()
    from fastgen.model.musicgen import normalize_device
    device = normalize_device(args.device)
    steps = 6 if args.dry_run else 16
    result = {"machine": machine_name(str(device)), "device": str(device), "torch": torch.__version__,
              "steps": steps, "checks": []}
    with tempfile.TemporaryDirectory() as scratch:
        mono = build_tiny_checkpoint(Path(scratch) / "mono")
        stereo = build_tiny_checkpoint(Path(scratch) / "stereo", stereo=True)
        checks = [("parity-fp32-mono", lambda: parity(mono, device, steps)),
                  ("bf16-finite", lambda: bf16_finite(stereo, device, steps)),
                  ("steps-per-call-4", lambda: steps_per_call(mono, device, steps)),
                  ("async-stage-worker-abort", lambda: async_abort(mono, device, steps))]
        if not args.dry_run:  # (the interpreter is slow: CI's dry run checks the mono layout only)
            checks.insert(1, ("parity-fp32-stereo", lambda: parity(stereo, device, steps)))
        for name, check in checks:
            start = time.perf_counter()
            try:
                entry = check()
            except Exception as exc:  # one failing check must not cost the others
                entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-3000:]}
            entry = {"name": name, "seconds": round(time.perf_counter() - start, 2), **entry}
            result["checks"].append(entry)
            atomic_write_text(args.out, json.dumps(result, indent=1, default=str))
            print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)"
                  + (f" {entry['error']}" if "error" in entry else ""), flush=True)
    sys.exit(0 if all(c["ok"] for c in result["checks"]) else 1)


if __name__ == "__main__":
    main()
