"""Run an engine's stages eagerly, or replay each from a CUDA graph captured on first use.

A stage is a function of no arguments that reads and writes only static tensors, so running it
twice gives the same result: that lets warm-up runs (which autotune Triton kernels, build cuBLAS
workspaces and allocate split-K counters, none of which may happen during capture) precede the
capture without disturbing the call that triggered it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class StageGraphs:
    def __init__(self, enabled: bool, warmup: int = 2) -> None:
        self.enabled = enabled
        self.warmup = warmup
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        # One pool for all stages: they replay one after another on one stream and keep nothing
        # alive in the pool between replays (outputs go to static tensors allocated outside it).
        self.pool = None

    def run(self, key: Hashable, stage: Callable[[], None]) -> None:
        if not self.enabled:
            stage()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(stage)
        graph.replay()

    def _capture(self, stage: Callable[[], None]) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                stage()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            stage()
        if self.pool is None:
            self.pool = graph.pool()
        return graph
