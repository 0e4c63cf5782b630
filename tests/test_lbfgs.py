"""The sync-free L-BFGS when its direction is not a descent direction: it resets."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from worker.engine.lbfgs import LBFGS

SIZE = 20


def quadratic(device: str = "cpu") -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """½xᵀAx - bᵀx with A symmetric positive definite, and its minimum A⁻¹b."""
    generator = torch.Generator().manual_seed(5)
    factor = torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64)
    matrix = (factor @ factor.T / SIZE + 0.25 * torch.eye(SIZE, dtype=torch.float64)).float()
    offset = torch.randn(SIZE, generator=generator)
    matrix, offset = matrix.to(device), offset.to(device)
    minimum = torch.linalg.solve(matrix.double(), offset.double()).float()

    def objective(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ matrix @ x - offset @ x

    return objective, minimum


def closure_for(
    x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        x.grad = None
        loss = objective(x)
        loss.backward()
        return loss.detach()

    return closure


def poison(
    optimizer: LBFGS, x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Overwrite every stored pair with one of negative curvature along the gradient at
    ``x``: s = g, y = -10⁻³·g, ρ = 1/(y·s) < 0. The next step stores its own pair over the
    oldest slot; the poisoned ones left make H indefinite, -H·g an ascent direction."""
    assert optimizer.s_ring is not None and optimizer.y_ring is not None
    assert optimizer.rho_ring is not None
    with torch.enable_grad():
        probe = x.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(objective(probe), probe)
    optimizer.s_ring.copy_(grad.expand_as(optimizer.s_ring))
    optimizer.y_ring.copy_((-1e-3 * grad).expand_as(optimizer.y_ring))
    optimizer.rho_ring.fill_(1.0 / (-1e-3 * grad.dot(grad)).item())


def test_a_non_descent_direction_resets_the_history_and_steps_down_the_gradient() -> None:
    objective, _ = quadratic()
    x = torch.zeros(SIZE, requires_grad=True)
    optimizer = LBFGS(x, history_size=5)
    closure = closure_for(x, objective)
    for _ in range(5):  # 4 pairs stored: the step after the poisoning fills the rings
        optimizer.step(closure)
    poison(optimizer, x, objective)
    assert optimizer.rho_ring is not None

    before = x.detach().clone()
    grad = torch.autograd.functional.jacobian(objective, before)
    optimizer.step(closure)
    # The reset: every pair a no-op, H₀ = I, and the first step's steepest descent.
    assert torch.count_nonzero(optimizer.rho_ring).item() == 0
    assert optimizer.h_diag is not None and optimizer.h_diag.item() == 1.0
    expected = before - grad * min(1.0, 1.0 / grad.abs().sum().item())
    torch.testing.assert_close(x.detach(), expected)

    # From there the loss falls at every step. Without the reset the run stood still for
    # 4 steps: the step length 0 stored a zero pair and the poisoned pairs gave the same
    # ascent direction until they rolled out of the history.
    lowest = objective(quadratic()[1]).item()
    gaps = [objective(before).item() - lowest, objective(x.detach()).item() - lowest]
    for _ in range(5):
        optimizer.step(closure)
        gaps.append(objective(x.detach()).item() - lowest)
    assert all(b < a for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < 0.1 * gaps[0], gaps
    assert optimizer.rho_ring.abs().sum().item() > 0  # new pairs are stored again


def test_the_reset_keeps_the_box_and_the_trust_region() -> None:
    objective, _ = quadratic()
    x = torch.full((SIZE,), 0.5, requires_grad=True)
    optimizer = LBFGS(x, history_size=5, bounds=(0.0, 1.0), max_step=0.05)
    closure = closure_for(x, objective)
    for _ in range(7):
        optimizer.step(closure)
    poison(optimizer, x, objective)
    losses = [objective(x.detach()).item()]
    for _ in range(5):
        before = x.detach().clone()
        optimizer.step(closure)
        assert (x.detach() - before).abs().max().item() <= 0.05 + 1e-6
        assert x.min().item() >= 0.0 and x.max().item() <= 1.0
        losses.append(objective(x.detach()).item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_an_ordinary_quadratic_converges_as_before_without_a_reset() -> None:
    """No direction fails the descent test here: the steps are torch.optim.LBFGS's
    (which stops instead of resetting), and the run reaches the minimum."""
    objective, minimum = quadratic()
    ours_x = torch.zeros(SIZE, requires_grad=True)
    torch_x = torch.zeros(SIZE, requires_grad=True)
    ours = LBFGS(ours_x, history_size=5)
    reference = torch.optim.LBFGS([torch_x], lr=1, max_iter=1, history_size=5)
    ours_closure, torch_closure = closure_for(ours_x, objective), closure_for(torch_x, objective)
    ours.step(ours_closure)
    for _ in range(15):
        ours.step(ours_closure)
        reference.step(torch_closure)
        assert ours.h_diag is not None and ours.h_diag.item() != 1.0  # never reset
    reference.step(torch_closure)
    torch.testing.assert_close(ours_x, torch_x, atol=1e-4, rtol=1e-4)
    for _ in range(40):
        ours.step(ours_closure)
    torch.testing.assert_close(ours_x.detach(), minimum, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_on_cuda_the_graphed_recursion_sees_the_reset() -> None:
    """The graph reads ρ from the ring at each replay: a reset there is the eager one."""

    def run(graphs: bool) -> torch.Tensor:
        objective, _ = quadratic("cuda")
        x = torch.zeros(SIZE, device="cuda", requires_grad=True)
        optimizer = LBFGS(x, history_size=5, graphs=graphs)
        closure = closure_for(x, objective)
        for _ in range(9):  # the recursion captured by now
            optimizer.step(closure)
        assert not graphs or optimizer.recursion is not None
        poison(optimizer, x, objective)
        for _ in range(6):
            optimizer.step(closure)
        return x.detach()

    torch.testing.assert_close(run(graphs=True), run(graphs=False), rtol=1e-6, atol=1e-7)
