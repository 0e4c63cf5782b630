"""CUDA graphs: an evaluation captured once per set of runs and scale, then replayed."""

from __future__ import annotations

import torch

from worker.engine.objective import Objective, evaluate

#: Eager evaluations of a set of runs, on the stream the capture will use, before their
#: evaluation is captured: the first pass sets up cuDNN's and cuBLAS's state for that
#: stream, which must not happen during a capture.
GRAPH_WARMUP = 2


class Evaluation:
    """:func:`evaluate` for one set of runs at one scale. On CUDA, after ``GRAPH_WARMUP``
    eager passes, the pass (forward, Grams, losses, backward, and for fp16 the loss scaling
    and the gradients' unscaling) is captured once as a CUDA graph and each later
    evaluation is one replay: run eagerly, a step of one image at small and medium sizes
    spends most of its time on the CPU launching some 350 short kernels, not in them
    (``bench/gpu.py``). The images (each run's ``param``, changed in place by its
    optimizer) are the graph's input; the loss parts and each ``param.grad`` (created
    during the capture, unscaled) are its outputs, rewritten by each replay.
    """

    def __init__(
        self,
        objectives: list[Objective],
        params: list[torch.Tensor],
        device: torch.device,
        *,
        graphs: bool,
    ) -> None:
        self.objectives, self.params = objectives, params
        self.graphed = graphs and device.type == "cuda"
        self.passes = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.parts: list[torch.Tensor] = []
        self.stream = torch.cuda.Stream(device) if self.graphed else None

    def __call__(self) -> list[torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.parts
        if self.stream is None:
            return evaluate(self.objectives, self.params)
        # Autograd's tape, warm-up and capture on one side stream, as CUDA graphs want.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.passes < GRAPH_WARMUP:
                self.passes += 1
                parts = evaluate(self.objectives, self.params)
            else:
                self.graph = torch.cuda.CUDAGraph()
                for param in self.params:
                    param.grad = None  # so that the capture makes the grads its own
                with torch.cuda.graph(self.graph, stream=self.stream):
                    self.parts = evaluate(self.objectives, self.params)
                parts = self.parts
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.graph is not None:
            self.graph.replay()  # the capture recorded the pass without running it
        return parts
