"""CUDA graphs for the decode step: one graph per batch-size bucket, captured at start-up into one shared memory pool,
replayed with the batch padded up to its bucket (padding rows point at the runner's dummy slot). A graph holds the
runner's ``steps_per_call`` consecutive steps.

The step reads everything from device tensors indexed by slot, so a graph stays valid while requests come and go:
only the static slot-id buffer changes, and only when the batch's membership does.

Graphs, streams and synchronize come from ``DecodeGraphs.api``: ``torch.cuda``, or on a CPU the stand-in of
fastgen/engine/graph_standin.py (tests, the GPU report's dry run), which records and replays the step's operators."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from fastgen.model.ops import SamplerHints

BUCKET_STEP = 16


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_batch (as nano-vllm does), always ending at max_batch."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch]
    buckets += list(range(BUCKET_STEP, max_batch, BUCKET_STEP))
    return sorted(set(buckets + [max_batch]))


CUDA_GRAPHS = SimpleNamespace(device_type="cuda", CUDAGraph=torch.cuda.CUDAGraph, graph=torch.cuda.graph,
                              Stream=torch.cuda.Stream, stream=torch.cuda.stream,
                              current_stream=torch.cuda.current_stream, synchronize=torch.cuda.synchronize)


class DecodeGraphs:
    api = CUDA_GRAPHS  # what captures and replays: see the module docstring

    @classmethod
    def supported(cls, device: torch.device) -> bool:
        """Whether graphs can be captured for tensors on ``device`` (CUDA, or the CPU while the stand-in is in)."""
        return device.type == cls.api.device_type

    def __init__(self, runner, max_batch: int) -> None:
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        device = runner.device
        self.slot_ids = torch.full((self.buckets[-1],), runner.dummy_slot, dtype=torch.int64, device=device)
        # membership changes go through pinned memory, copied without a host wait; the event says when the last
        # copy has read the staging buffer, so the host never overwrites it under a pending copy
        pinned = device.type == "cuda"
        self._staging = torch.empty(self.slot_ids.shape, dtype=torch.int64, pin_memory=pinned)
        self._staged = torch.cuda.Event() if pinned else None
        self.graphs: dict[int, object] = {}
        self.hints = SamplerHints()  # the kernels take no hints; the captured step serves any batch

    def bucket_for(self, batch: int) -> int:
        for bucket in self.buckets:
            if bucket >= batch:
                return bucket
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up every bucket eagerly (Triton compiles its specialisations; one step runs every kernel a call
        does, so the warm-up runs steps, not whole calls), then capture largest first so the smaller graphs reuse the
        pool."""
        from fastgen.kernels.decode_attention import reserve_decode_scratch
        runner = self.runner
        reserve_decode_scratch(2 * self.buckets[-1], runner.config.num_heads,
                               max(runner.cache_positions, runner.max_text_tokens), runner.device,
                               runner.config.head_dim)
        api = self.api
        stream = api.Stream()
        stream.wait_stream(api.current_stream())
        with api.stream(stream):
            for bucket in self.buckets:
                for _ in range(2):
                    self.runner.decode_step(self.slot_ids[:bucket], self.hints, None, None)
        api.current_stream().wait_stream(stream)
        api.synchronize()
        pool = None
        for bucket in reversed(self.buckets):
            graph = api.CUDAGraph()
            with api.graph(graph, pool=pool):
                self._step(bucket)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        api.synchronize()

    def _step(self, bucket: int) -> None:
        for _ in range(self.runner.steps_per_call):  # one replay, several steps: one launch, one host round
            self.runner.decode_step(self.slot_ids[:bucket], self.hints, None, None)

    def set_batch(self, slots: list[int]) -> int:
        """Load the batch's slots into the static buffer (padding with the dummy slot); returns the bucket. On CUDA
        the copy is queued on the current stream, ahead of the replays that read it, and the host does not wait."""
        bucket = self.bucket_for(len(slots))
        padded = slots + [self.runner.dummy_slot] * (self.slot_ids.shape[0] - len(slots))
        if self._staged is not None:
            self._staged.synchronize()  # the previous batch's copy has read the buffer (long done, in practice)
        self._staging.copy_(torch.tensor(padded, dtype=torch.int64))
        self.slot_ids.copy_(self._staging, non_blocking=self._staged is not None)
        if self._staged is not None:
            self._staged.record()
        return bucket

    def replay(self, bucket: int) -> None:
        self.graphs[bucket].replay()
