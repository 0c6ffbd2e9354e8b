"""Serving: streamed requests with Poisson arrivals, in-process through the AsyncEngine (the baseline) and through HTTP
(`fastgen serve` in a subprocess, an httpx async client on loopback). Reports time to first audio (p50 / p95), total
latency and seconds of audio per wall second; and the seam figure of the chosen stream windows: the concatenated
stream against the one-shot EnCodec decode of the same codes (SNR in dB, max error) on a musicgen-size codec.

    python bench/serve.py                                   # tiny model, CPU
    python bench/serve.py --model small --device cuda --requests 64 --rate 4 --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPTS, checkpoint, machine_name, write_result  # noqa: E402


def schedule(requests: int, rate: float, seed: int = 0) -> list[float]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=requests)
    return list(np.cumsum(gaps) - gaps[0])


def summary(ttfa: list[float], latency: list[float], audio_s: float, wall: float) -> dict:
    return {"ttfa_p50_s": float(np.percentile(ttfa, 50)), "ttfa_p95_s": float(np.percentile(ttfa, 95)),
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
            "audio_s_per_s": audio_s / wall, "requests": len(ttfa)}


async def in_process(folder: Path, args, starts: list[float], stream: bool = True) -> dict:
    """The AsyncEngine in this process; ``stream=False``: the baseline, whole clips awaited (first audio = all of
    it)."""
    import fastgen
    engine = fastgen.AsyncEngine.from_pretrained(folder, device=args.device, **engine_options(args))
    warm = engine.submit(None, fastgen.SamplingParams(duration=0.2))
    async for _ in warm.stream_audio():
        pass

    async def one(i: int, at: float, t0: float):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        begin = time.perf_counter()
        handle = engine.submit(PROMPTS[i % len(PROMPTS)], fastgen.SamplingParams(duration=args.seconds, seed=i))
        if not stream:
            out = await handle
            return time.perf_counter() - begin, time.perf_counter() - begin, out.duration
        first, samples = None, 0
        async for chunk in handle.stream_audio():
            first = first or time.perf_counter() - begin
            samples += chunk.shape[-1]
        return first, time.perf_counter() - begin, samples / 32000

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, at, t0) for i, at in enumerate(starts)))
    wall = time.perf_counter() - t0
    await engine.shutdown()
    return summary([r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results), wall)


async def over_http(folder: Path, args, starts: list[float]) -> dict:
    import httpx
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "fastgen.cli", "serve", "--model", str(folder), "--port", str(port),
               "--log-level", "warning", "--device", args.device]
    if args.max_slots:
        command += ["--max-slots", str(args.max_slots)]
    server = subprocess.Popen(command, env={**os.environ, "FASTGEN_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0),
                                     limits=httpx.Limits(max_connections=len(starts) + 4)) as client:
            while True:
                if server.poll() is not None:
                    raise RuntimeError("fastgen serve exited during start-up")
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)

            async def one(i: int, at: float, t0: float):
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                begin = time.perf_counter()
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "duration": args.seconds, "seed": i, "stream": True,
                        "response_format": "pcm"}
                first, size = None, 0
                async with client.stream("POST", "/v1/audio/generate", json=body) as response:
                    response.raise_for_status()
                    async for piece in response.aiter_bytes():
                        first = first or time.perf_counter() - begin
                        size += len(piece)
                return first, time.perf_counter() - begin, size / 2 / 32000

            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(i, at, t0) for i, at in enumerate(starts)))
            wall = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return summary([r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results), wall)


def seam(seconds: float, configs: list[tuple[int, int, int]]) -> list[dict]:
    """Stream windows vs the one-shot decode on a random-weight EnCodec of musicgen's size (32 kHz, 4 codebooks of
    2048): random codes, the engine's AudioStreamer driven frame by frame as the decode loop would."""
    from types import SimpleNamespace

    import torch
    from transformers import EncodecModel

    from fastgen.engine.streaming import AudioStreamer, StreamConfig
    from fastgen.tiny import _encodec_config
    torch.manual_seed(0)
    model = EncodecModel(_encodec_config(hidden_size=128, num_filters=64, codebook_size=2048)).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:  # transformers leaves codebooks at zero
            layer.codebook.embed.normal_()
    frames, books = int(seconds * 50), 4
    codes = torch.randint(0, 2048, (books, frames))

    @torch.inference_mode()
    def decode(batch):
        return [model.decode(c[None, None], [None]).audio_values[0].numpy() for c in batch]
    reference = decode([codes])[0]
    rows = []
    for context, lookahead, fade in configs:
        config = StreamConfig(left_context_frames=context, lookahead_frames=lookahead, crossfade_frames=fade)
        request = SimpleNamespace(request_id="r", complete_frames=0)
        streamer = AudioStreamer(lambda r, a, b: codes[:, a:b], decode, 640, 50, config)
        streamer.start(request)
        chunks = []
        for step in range(1, frames + books):
            request.complete_frames = min(frames, max(0, step - (books - 1)))  # the delay pattern's lag
            last = step == frames + books - 1
            chunks += streamer.decode([streamer.final(request, codes)] if last else streamer.due([request]))
        error = np.concatenate(chunks, -1) - reference
        rows.append({"left_context_frames": context, "lookahead_frames": lookahead, "crossfade_frames": fade,
                     "snr_db": float(10 * np.log10(np.sum(reference ** 2) / np.sum(error ** 2))),
                     "max_error": float(np.abs(error).max()), "peak": float(np.abs(reference).max())})
        print(rows[-1], flush=True)
    return rows


def engine_options(args) -> dict:
    return {"max_slots": args.max_slots} if args.max_slots else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, small, medium, large or a checkpoint folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=6.0, help="Poisson arrivals per second")
    parser.add_argument("--seconds", type=float, default=2.0, help="audio per request")
    parser.add_argument("--max-slots", type=int, default=None)
    parser.add_argument("--seam-seconds", type=float, default=4.0, help="0: skip the seam measurement")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = checkpoint(args.model, args.dtype)
    starts = schedule(args.requests, args.rate)
    rows = {"in_process_whole": asyncio.run(in_process(folder, args, starts, stream=False))}
    print("in-process, whole clips", rows["in_process_whole"], flush=True)
    rows["in_process"] = asyncio.run(in_process(folder, args, starts))
    print("in-process", rows["in_process"], flush=True)
    rows["http"] = asyncio.run(over_http(folder, args, starts))
    print("http", rows["http"], flush=True)
    fields = {"model": args.model, "device": args.device, "requests": args.requests, "rate": args.rate,
              "seconds": args.seconds, "streaming": rows}
    if args.seam_seconds > 0:
        fields["seam"] = seam(args.seam_seconds, [(0, 0, 0), (16, 0, 0), (0, 4, 0), (8, 4, 1), (16, 4, 1)])
    write_result("serve", args.device, machine_name(args.device), args.out, fields)


if __name__ == "__main__":
    main()
