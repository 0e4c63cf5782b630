"""L-BFGS for one tensor, one function evaluation per step and no host synchronisation.

``torch.optim.LBFGS`` reads several scalars back to the host on every step (the loss, the
curvature test, the descent test, the first step's length) and each read stalls a GPU until
its queue drains. This version takes the same steps as ``torch.optim.LBFGS(max_iter=1,
line_search_fn=None)`` called repeatedly, but keeps every decision on the device with
``torch.where``: a pair failing the curvature test is stored with ρ = 0, which makes it a
no-op in the two-loop recursion, instead of being skipped by a Python ``if``. Two
differences remain. ``torch.optim.LBFGS`` keeps the last ``history_size`` *valid* pairs,
this keeps the pairs of the last ``history_size`` steps. And where the direction fails the
descent test (g·d > -tolerance_change) ``torch.optim.LBFGS`` stops; this resets the history
instead, on the device: every ρ in the ring is multiplied by 0 (all stored pairs become
no-ops until new ones overwrite them), H₀ goes back to I, and the step is a steepest-descent
one, -g with the first step's length min(1, 1/|g|₁)·lr. (A step of length 0 there would
store a zero pair and leave the history as it is: the same bad direction would come back
on every later step and the run would stand still.)

The curvature pairs live in two ``(history_size, n)`` rings. On CUDA (``graphs``), once the
history is full, the two-loop recursion (some 600 small kernels with 100 pairs) is one
replay of a CUDA graph: it reads the pairs oldest first through an index tensor on the
device, so the same graph serves every later step whichever slot is the oldest. While the
history fills, and elsewhere, the recursion runs eagerly on views of the rings; both take
the same arithmetic in the same order.

With ``bounds`` it is a projected method: after each step the parameter is clamped into the
box, the curvature pairs use the step actually taken, and gradient components that push a
value already at a bound further out are zeroed, so that pixels pinned at 0 or 1 do not
corrupt the curvature estimate. Without the zeroing, clamping alone makes runs diverge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class LBFGS:
    def __init__(
        self,
        param: torch.Tensor,
        *,
        lr: float = 1.0,
        history_size: int = 100,
        tolerance_change: float = 1e-9,
        bounds: tuple[float, float] | None = None,
        max_step: float | None = None,
        graphs: bool = False,
    ) -> None:
        self.param = param
        self.max_step = max_step
        self.bounds = bounds
        self.prev_param: torch.Tensor | None = None
        self.lr = lr
        self.tolerance_change = tolerance_change
        self.history_size = history_size
        # The rings, made at the first pair: slot (oldest + i) % history_size holds the
        # i-th oldest pair, as s, y and ρ; ρ = 0 marks a pair that failed the curvature test
        # or was dropped by a reset, which makes it a no-op.
        self.s_ring: torch.Tensor | None = None
        self.y_ring: torch.Tensor | None = None
        self.rho_ring: torch.Tensor | None = None
        self.pair_views: list[Pair] = []  # each slot's (s, y, ρ), made once, written in place
        self.count = 0  # pairs stored
        self.oldest = 0  # slot of the oldest pair once the rings are full
        self.prev_grad: torch.Tensor | None = None
        self.h_diag: torch.Tensor | None = None
        self.graphed = graphs and param.device.type == "cuda"
        self.recursion: _GraphedRecursion | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Evaluate ``closure`` (which must run backward) once and take one step."""
        with torch.enable_grad():
            loss = closure()
        assert self.param.grad is not None
        grad = self.param.grad.detach().reshape(-1).float()
        # Kept as the next step's previous gradient: a copy, since the closure may write the
        # next gradient into the same tensor (a CUDA graph's replay does).
        grad = self._projected(grad) if self.bounds is not None else grad.clone()
        # As torch.optim.LBFGS: a first step of length at most lr along -g/|g|₁; the same
        # after a reset.
        steepest_length = torch.clamp(1.0 / grad.abs().sum(), max=1.0) * self.lr
        if self.prev_grad is None:
            direction = grad.neg()
            step_length = steepest_length
            self.h_diag = torch.ones((), device=grad.device)
        else:
            y = grad - self.prev_grad
            # The step actually taken: the direction times its length, unless the clamp into
            # the box (``bounds``) shortened it.
            s = self.param.detach().reshape(-1).float() - self.prev_param
            ys = y.dot(s)
            valid = ys > 1e-10
            rho = torch.where(valid, 1.0 / torch.where(valid, ys, 1.0), 0.0)
            self._store(s, y, rho)
            self.h_diag = torch.where(valid, ys / torch.where(valid, y.dot(y), 1.0), self.h_diag)
            direction = self._direction(grad)
            # Not a descent direction (torch.optim.LBFGS stops there): forget the history
            # and take a steepest-descent step. With ρ = 0 every stored pair is a no-op
            # until a new one takes its slot; the graphed recursion reads the same ring.
            descent = grad.dot(direction) <= -self.tolerance_change
            assert self.rho_ring is not None
            self.rho_ring.mul_(descent)
            self.h_diag = torch.where(descent, self.h_diag, 1.0)
            direction = torch.where(descent, direction, grad.neg())
            step_length = torch.where(descent, self.lr, steepest_length)
        update = direction * step_length
        if self.max_step is not None:
            # A trust region in the max norm: no component moves further than max_step in
            # one step (on the device, no read back).
            largest = update.abs().amax().clamp(min=1e-12)
            update = update * torch.clamp(self.max_step / largest, max=1.0)
        self.prev_param = self.param.detach().reshape(-1).float().clone()
        self.param.add_(update.view_as(self.param))
        if self.bounds is not None:
            self.param.clamp_(*self.bounds)
        self.prev_grad = grad
        return loss

    def _projected(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with the components that push a pixel out of its box set to zero.

        A pixel at a bound whose descent direction leaves the box cannot move: letting its
        gradient into the curvature pairs would only corrupt them.
        """
        assert self.bounds is not None
        low, high = self.bounds
        x = self.param.detach().reshape(-1)
        blocked = ((x <= low) & (grad > 0)) | ((x >= high) & (grad < 0))
        return torch.where(blocked, 0.0, grad)

    def _store(self, s: torch.Tensor, y: torch.Tensor, rho: torch.Tensor) -> None:
        if self.s_ring is None:
            size = (self.history_size, s.numel())
            self.s_ring, self.y_ring = s.new_empty(size), s.new_empty(size)
            self.rho_ring = s.new_zeros(self.history_size)
            self.pair_views = [
                (self.s_ring[i], self.y_ring[i], self.rho_ring[i]) for i in range(self.history_size)
            ]
        if self.count < self.history_size:
            slot = self.count
            self.count += 1
        else:  # the oldest pair makes room
            slot = self.oldest
            self.oldest = (self.oldest + 1) % self.history_size
        slot_s, slot_y, slot_rho = self.pair_views[slot]
        slot_s.copy_(s)
        slot_y.copy_(y)
        slot_rho.copy_(rho)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """-H·grad by the two-loop recursion over the stored pairs, oldest first."""
        assert self.s_ring is not None and self.y_ring is not None
        assert self.rho_ring is not None and self.h_diag is not None
        if self.graphed and self.count == self.history_size:
            if self.recursion is None:
                rings = (self.s_ring, self.y_ring, self.rho_ring)
                self.recursion = _GraphedRecursion(*rings)
            return self.recursion(grad, self.h_diag, self.oldest)
        pairs = [self.pair_views[(self.oldest + i) % self.history_size] for i in range(self.count)]
        return two_loop(pairs, grad, self.h_diag)


Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (s, y, ρ)


def two_loop(pairs: Sequence[Pair], grad: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor:
    """-H·grad for the pairs (s, y, ρ), oldest first, and H₀ = h_diag·I (Nocedal and
    Wright, algorithm 7.4, with α - β regrouped).

    Six ops a pair, not seven: the second loop's α - β = α - ρ·(y·r) is one fused op, which
    on a GPU is 100 kernels fewer a step with 100 pairs. A pair with ρ = 0 has α = 0 and
    α - β = 0, so it changes neither q nor r: that is how a pair failing the curvature test,
    or the whole history at a reset, drops out without a host sync. (Storing y times ρ
    would make it five ops, but a reset would then have to zero a whole ring of vectors.)
    With a full history this reads 200 vectors twice, a sizeable part of a step on a CPU,
    so the vector updates are in place (addcmul_): no temporary vector per op."""
    q = grad.neg()
    alphas = []
    for s, y, rho in reversed(pairs):
        alpha = s.dot(q).mul_(rho)
        q.addcmul_(y, alpha, value=-1.0)  # q -= α·y
        alphas.append(alpha)
    r = q.mul_(h_diag)
    for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
        alpha_minus_beta = torch.addcmul(alpha, rho, y.dot(r), value=-1.0)
        r.addcmul_(s, alpha_minus_beta)  # r += s·(α - β)
    return r


class _GraphedRecursion:
    """:func:`two_loop` over full rings as one CUDA graph replay. With 100 pairs the
    recursion is some 600 kernels, each a launch for a few microseconds of work, so run
    eagerly the CPU's launches, not the GPU, set the time of a late step; one replay
    launches them all at once (``bench/gpu.py``, whole runs).

    The graph reads the pairs through ``order`` (slot of the i-th oldest, on the device),
    one gathered copy of s and of y per use (so 10 kernels a pair, against 6 eagerly), and
    its inputs and output are fixed tensors, so one capture serves every later step. The
    first call runs eagerly on the capture's stream (cuBLAS sets itself up there), the
    second captures.
    """

    def __init__(self, s_ring: torch.Tensor, y_ring: torch.Tensor, rho_ring: torch.Tensor) -> None:
        self.rings = (s_ring, y_ring, rho_ring)
        size = rho_ring.numel()
        self.slots = torch.arange(size, device=rho_ring.device)
        self.order = torch.empty_like(self.slots)
        self.grad = torch.empty_like(s_ring[0])
        self.h_diag = torch.empty((), device=rho_ring.device)
        self.stream = torch.cuda.Stream(rho_ring.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.direction: torch.Tensor | None = None
        self.warmed = False

    def recursion(self) -> torch.Tensor:
        s_ring, y_ring, rho_ring = self.rings
        # All of them at once, a small vector, read at each replay: a reset's zeros included.
        rho = rho_ring.index_select(0, self.order)
        return two_loop(_Gathered(s_ring, y_ring, rho, self.order), self.grad, self.h_diag)

    def __call__(self, grad: torch.Tensor, h_diag: torch.Tensor, oldest: int) -> torch.Tensor:
        torch.remainder(self.slots + oldest, self.slots.numel(), out=self.order)
        self.grad.copy_(grad)
        self.h_diag.copy_(h_diag)
        if self.graph is not None:
            self.graph.replay()
            assert self.direction is not None
            return self.direction
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if not self.warmed:
                self.warmed = True
                direction = self.recursion()
            else:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=self.stream):
                    self.direction = self.recursion()
                direction = self.direction
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.graph is not None:
            self.graph.replay()
        return direction


class _Gathered(Sequence[Pair]):
    """The pairs oldest first, s and y gathered from the rings when the recursion reaches
    them (gathering all at once would copy the whole history); ``rho`` is already in that
    order."""

    def __init__(
        self, s_ring: torch.Tensor, y_ring: torch.Tensor, rho: torch.Tensor,
        order: torch.Tensor,
    ) -> None:  # fmt: skip
        self.rings = (s_ring, y_ring)
        self.rho = rho
        self.order = order

    def __len__(self) -> int:
        return self.order.numel()

    def __getitem__(self, index: int) -> Pair:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        slot = self.order[index : index + 1]
        s, y = (ring.index_select(0, slot)[0] for ring in self.rings)
        return s, y, self.rho[index]
