"""The math: Gram matrices, loss terms, the sync-free L-BFGS."""

from __future__ import annotations

import pytest
import torch

from worker.engine.lbfgs import LBFGS, _Gathered, two_loop
from worker.engine.losses import (
    ContentLoss,
    StyleLoss,
    TotalVariationLoss,
    blend_grams,
    gram_matrix,
)


def test_gram_matrix_shape_and_values_by_hand() -> None:
    # Two channels over a 1×3 map: X = [[1, 2, 3], [0, 1, -1]], N = C·H·W = 6.
    features = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 1.0, -1.0]]]])
    gram = gram_matrix(features)
    assert gram.shape == (1, 2, 2)
    expected = torch.tensor([[14.0, -1.0], [-1.0, 2.0]]) / 6
    torch.testing.assert_close(gram[0], expected)


def test_gram_matrix_is_fp32_and_size_invariant_for_a_tiled_map() -> None:
    torch.manual_seed(0)
    tile = torch.rand(1, 8, 5, 5)
    tiled = tile.repeat(1, 1, 4, 4)  # the same statistics over 16× the pixels
    torch.testing.assert_close(gram_matrix(tiled), gram_matrix(tile))
    assert gram_matrix(tile.bfloat16()).dtype == torch.float32


def test_gram_matrix_stays_fp32_under_autocast() -> None:
    features = torch.rand(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = gram_matrix(features)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram, gram_matrix(features))


@pytest.mark.parametrize(
    ("shape", "memory_format", "sliced"),
    [
        ((2, 6, 5, 7), torch.contiguous_format, False),
        ((2, 6, 5, 7), torch.channels_last, False),
        ((1, 6, 1, 1), torch.channels_last, False),  # both layouts at once
        ((1, 1, 4, 3), torch.channels_last, False),
        ((1, 6, 4, 1), torch.channels_last, False),
        ((2, 6, 5, 7), torch.contiguous_format, True),  # neither layout
    ],
)
def test_gram_matrix_gradient_is_the_textbook_one_in_the_features_layout(
    shape: tuple[int, int, int, int], memory_format: torch.memory_format, sliced: bool
) -> None:
    torch.manual_seed(0)
    source = torch.randn(*shape[:3], shape[3] * (2 if sliced else 1))
    features = source[..., ::2] if sliced else source.contiguous(memory_format=memory_format)
    features.requires_grad_()
    weights = torch.randn(shape[0], shape[1], shape[1])
    (gradient,) = torch.autograd.grad((gram_matrix(features) * weights).sum(), features)
    if not sliced:  # the layout of what the Gram returns, before autograd stores it
        assert gradient.is_contiguous(memory_format=memory_format)

    textbook = features.detach().clone()
    textbook.requires_grad_()
    batch, channels, height, width = shape
    flat = textbook.reshape(batch, channels, height * width)
    gram = torch.bmm(flat, flat.transpose(1, 2)) / (channels * height * width)
    (expected,) = torch.autograd.grad((gram * weights).sum(), textbook)
    torch.testing.assert_close(gradient, expected)


def test_gram_of_bf16_features_is_fp32_and_its_gradient_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    values = torch.randn(1, 16, 12, 10).bfloat16().float()  # exactly representable in bf16
    weights = torch.randn(1, 16, 16)
    features = values.bfloat16().contiguous(memory_format=torch.channels_last)
    features.requires_grad_()
    gram = gram_matrix(features)
    (gradient,) = torch.autograd.grad((gram * weights).sum(), features)

    textbook = values.clone().requires_grad_()
    textbook_gram = gram_matrix(textbook)
    (expected,) = torch.autograd.grad((textbook_gram * weights).sum(), textbook)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram, textbook_gram)  # the same fp32 Gram of the same values
    assert gradient.dtype == torch.bfloat16
    assert gradient.is_contiguous(memory_format=torch.channels_last)
    # Within bf16's own rounding of the fp32 gradient (2⁻⁸ relative, a few units).
    error = (gradient.float() - expected).abs().max() / expected.abs().max()
    assert error < 2**-6, error


def test_gram_of_bf16_features_with_bf16_products_matches_float64() -> None:
    # Large enough for oneDNN's matmul: its bf16 products of bf16 values are exact, so the
    # Gram agrees with float64 to fp32's summation error; the setting is restored after.
    torch.manual_seed(0)
    features = torch.randn(1, 64, 48, 64).bfloat16().contiguous(memory_format=torch.channels_last)
    before = torch.backends.mkldnn.matmul.fp32_precision
    gram = gram_matrix(features)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    flat = features.double().reshape(1, 64, -1)
    exact = flat @ flat.transpose(1, 2) / flat[0].numel()
    error = (gram.double() - exact).abs().max() / exact.abs().max()
    assert gram.dtype == torch.float32
    assert error < 1e-5, error


def test_each_loss_is_zero_at_its_target_and_positive_elsewhere() -> None:
    torch.manual_seed(0)
    features = torch.rand(1, 16, 8, 8)
    other = torch.rand(1, 16, 8, 8)
    content = ContentLoss(features)
    style = StyleLoss(gram_matrix(features))
    assert content(features).item() == 0.0
    assert style(features).item() == 0.0
    assert content(other).item() > 0.0
    assert style(other).item() > 0.0
    flat = torch.full((1, 3, 10, 10), 0.3)
    assert TotalVariationLoss()(flat).item() == 0.0
    assert TotalVariationLoss()(torch.rand(1, 3, 10, 10)).item() > 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_content_loss_is_mse_with_its_gradient_in_the_features_layout(
    dtype: torch.dtype, memory_format: torch.memory_format
) -> None:
    torch.manual_seed(0)
    values = torch.randn(1, 8, 6, 5).to(dtype).float()  # exactly representable in ``dtype``
    target = torch.randn(1, 8, 6, 5)
    features = values.to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    loss = ContentLoss(target)(features)
    (gradient,) = torch.autograd.grad(loss, features)

    textbook = values.clone().requires_grad_()
    expected_loss = torch.nn.functional.mse_loss(textbook, target)
    (expected,) = torch.autograd.grad(expected_loss, textbook)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss)
    assert gradient.dtype == dtype
    assert gradient.is_contiguous(memory_format=memory_format)
    # fp32: the same numbers; bf16: the fp32 gradient rounded once (2⁻⁸ relative).
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(gradient.float(), expected, rtol=tolerance, atol=0)


def test_total_variation_by_hand() -> None:
    image = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # one vertical edge
    # down: all 0; across: (1-0)² on both rows → mean 1.
    assert TotalVariationLoss()(image).item() == pytest.approx(1.0)


def test_blend_grams_is_the_weighted_sum() -> None:
    a, b = torch.eye(3), torch.ones(3, 3)
    torch.testing.assert_close(blend_grams([a, b], [0.25, 0.75]), 0.25 * a + 0.75 * b)


def test_lbfgs_takes_the_same_steps_as_torch_lbfgs() -> None:
    torch.manual_seed(0)
    matrix = torch.randn(12, 12)
    matrix = matrix @ matrix.T + torch.eye(12)
    offset = torch.randn(12)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x @ matrix @ x - offset @ x + 0.01 * x.pow(4).sum()

    ours_x = torch.zeros(12, requires_grad=True)
    torch_x = torch.zeros(12, requires_grad=True)
    ours = LBFGS(ours_x, history_size=5)
    reference = torch.optim.LBFGS([torch_x], lr=1, max_iter=1, history_size=5)

    def ours_closure() -> torch.Tensor:
        ours_x.grad = None
        loss = objective(ours_x)
        loss.backward()
        return loss.detach()

    def torch_closure() -> torch.Tensor:
        reference.zero_grad()
        loss = objective(torch_x)
        loss.backward()
        return loss.detach()

    first = ours.step(ours_closure)
    for _ in range(25):
        ours.step(ours_closure)
        reference.step(torch_closure)
    reference.step(torch_closure)
    torch.testing.assert_close(ours_x, torch_x, atol=1e-4, rtol=1e-4)
    assert objective(ours_x).item() < first.item()


def bounded_quadratic_steps(steps: int, device: str, graphs: bool) -> tuple[LBFGS, torch.Tensor]:
    """``steps`` L-BFGS steps (a history of 5) on Σ wᵢ(xᵢ - tᵢ)² + 0.1 Σ xᵢ⁴ in [0, 1]."""
    generator = torch.Generator().manual_seed(3)
    target = (torch.rand(300, generator=generator) * 1.6 - 0.3).to(device)
    weight = (torch.rand(300, generator=generator) + 0.1).to(device)
    x = torch.full((300,), 0.5, device=device, requires_grad=True)
    optimizer = LBFGS(x, history_size=5, bounds=(0.0, 1.0), graphs=graphs)

    def closure() -> torch.Tensor:
        x.grad = None
        loss = (weight * (x - target).pow(2)).sum() + 0.1 * x.pow(4).sum()
        loss.backward()
        return loss.detach()

    for _ in range(steps):
        optimizer.step(closure)
    return optimizer, x.detach()


def test_the_pairs_read_through_the_device_order_give_the_same_direction() -> None:
    # What a CUDA graph replays, run eagerly: the same numbers, bit for bit.
    # 13 steps store 12 pairs: the rings of 5 filled, then wrapped 7 times.
    optimizer, _ = bounded_quadratic_steps(13, "cpu", graphs=False)
    assert optimizer.count == 5 and optimizer.oldest == 2
    assert optimizer.s_ring is not None and optimizer.rho_y_ring is not None
    assert optimizer.rho_ring is not None and optimizer.h_diag is not None
    grad = torch.randn(300)
    order = (torch.arange(5) + optimizer.oldest) % 5
    rho = optimizer.rho_ring.index_select(0, order)
    pairs = _Gathered(optimizer.s_ring, optimizer.rho_y_ring, rho, order)
    gathered = two_loop(pairs, grad, optimizer.h_diag)
    assert torch.equal(gathered, optimizer._direction(grad))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_on_cuda_the_graphed_recursion_takes_the_eager_steps() -> None:
    """Run on a GPU machine (``bench/gpu.sh``): 30 steps, the last 24 with full rings."""
    graphed, x_graphed = bounded_quadratic_steps(30, "cuda", graphs=True)
    assert graphed.recursion is not None and graphed.recursion.graph is not None
    _, x_eager = bounded_quadratic_steps(30, "cuda", graphs=False)
    torch.testing.assert_close(x_graphed, x_eager, rtol=1e-6, atol=1e-7)


def test_bounded_lbfgs_stays_in_its_box_and_finds_the_constrained_minimum() -> None:
    # Minimum of Σ (x - t)² with t partly outside [0, 1]: x = clamp(t, 0, 1).
    target = torch.tensor([-0.5, 0.25, 0.5, 1.75])
    x = torch.full((4,), 0.5, requires_grad=True)
    optimizer = LBFGS(x, bounds=(0.0, 1.0))

    def closure() -> torch.Tensor:
        x.grad = None
        loss = (x - target).pow(2).sum()
        loss.backward()
        return loss.detach()

    for _ in range(20):
        optimizer.step(closure)
        assert x.min().item() >= 0.0 and x.max().item() <= 1.0
    torch.testing.assert_close(x.detach(), target.clamp(0, 1), atol=1e-5, rtol=0)


def test_lbfgs_with_max_step_moves_no_component_further_and_still_converges() -> None:
    # A badly scaled quadratic: unbounded, the second step overshoots by far.
    scales = torch.tensor([1e-3, 1.0, 1e3, 10.0])
    target = torch.tensor([0.9, 0.1, 0.6, 0.3])
    x = torch.full((4,), 0.5, requires_grad=True)
    optimizer = LBFGS(x, bounds=(0.0, 1.0), max_step=0.05)

    def closure() -> torch.Tensor:
        x.grad = None
        loss = (scales * (x - target).pow(2)).sum()
        loss.backward()
        return loss.detach()

    for _ in range(200):
        before = x.detach().clone()
        optimizer.step(closure)
        assert (x.detach() - before).abs().max().item() <= 0.05 + 1e-6
    torch.testing.assert_close(x.detach(), target, atol=1e-3, rtol=0)
