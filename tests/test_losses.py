"""The math: Gram matrices, loss terms, the sync-free L-BFGS, fp16 loss scaling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from worker.engine import device as engine_device
from worker.engine import prepare
from worker.engine.device import (
    AUTOCAST_DTYPES,
    FP16_LOSS_SCALE,
    load_extractor,
    loss_scale,
    scaled_backward,
)
from worker.engine.lbfgs import LBFGS, _Gathered, two_loop
from worker.engine.losses import (
    ContentLoss,
    StyleLoss,
    TotalVariationLoss,
    WassersteinStyleLoss,
    blend_grams,
    channel_means,
    gram_matrix,
)
from worker.engine.objective import evaluate
from worker.engine.optimize import _RunState


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
    # Relative to the target's mean square (losses.relative_scale).
    expected_loss = torch.nn.functional.mse_loss(textbook, target) / target.square().mean()
    (expected,) = torch.autograd.grad(expected_loss, textbook)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss)
    assert gradient.dtype == dtype
    assert gradient.is_contiguous(memory_format=memory_format)
    # fp32: the same numbers; bf16: the fp32 gradient rounded once (2⁻⁸ relative).
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(gradient.float(), expected, rtol=tolerance, atol=0)


def test_each_term_is_relative_to_its_target_whatever_the_feature_scale() -> None:
    # Features k times larger (a backbone fed 0-255, a layer's filters rescaled) leave each
    # term unchanged; the raw squared errors of Gatys et al. would move by k² and k⁴.
    torch.manual_seed(0)
    features, target = torch.rand(1, 16, 8, 8), torch.rand(1, 16, 8, 8)
    for k in (255.0, 1e-3):
        content, scaled_content = ContentLoss(target), ContentLoss(k * target)
        torch.testing.assert_close(scaled_content(k * features), content(features))
        style, scaled_style = StyleLoss(gram_matrix(target)), StyleLoss(gram_matrix(k * target))
        torch.testing.assert_close(scaled_style(k * features), style(features))
    # 1 for a Gram of zeros: a relative error.
    zeros = torch.zeros(1, 16, 8, 8)
    assert StyleLoss(gram_matrix(target))(zeros).item() == pytest.approx(1.0)
    assert ContentLoss(target)(zeros).item() == pytest.approx(1.0)


def _gaussian_features(mean: torch.Tensor, root: torch.Tensor, n: int) -> torch.Tensor:
    """(1, C, 1, n) features whose channels have exactly ``mean`` and the covariance
    ``root @ root.T`` (whitened noise, coloured)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(root.shape[0], n, generator=generator, dtype=torch.float64)
    noise = noise - noise.mean(1, keepdim=True)
    # Whiten the sample: its covariance is exactly the identity.
    values, vectors = torch.linalg.eigh(noise @ noise.T / n)
    noise = vectors @ torch.diag(values.rsqrt()) @ vectors.T @ noise
    return (root.double() @ noise + mean.double()[:, None]).float().view(1, -1, 1, n)


def test_wasserstein_style_loss_is_the_closed_form_distance() -> None:
    # Diagonal covariances: W2² = |μ - μₜ|² + Σ (σ - σₜ)², per channel here (a mean).
    mean_t, sigma_t = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.0])
    mean_x, sigma_x = torch.tensor([0.0, -1.0, 0.5]), torch.tensor([1.0, 1.5, 1.0])
    target = _gaussian_features(mean_t, torch.diag(sigma_t), 4000)
    loss = WassersteinStyleLoss(gram_matrix(target), channel_means(target))
    x = _gaussian_features(mean_x, torch.diag(sigma_x), 4000).requires_grad_()
    expected = ((mean_x - mean_t).square().mean() + (sigma_x - sigma_t).square().mean()) / (
        mean_t.square().mean() + sigma_t.square().mean()
    )
    value = loss(x)
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=1e-5)
    assert abs(float(loss(target))) < 1e-4
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().amax() > 0


def test_wasserstein_style_loss_sees_the_mean_apart_from_the_spread() -> None:
    # A channel alternating ±2 and one constant at 2 have the same Gram (E[x²] = 4): the
    # Gram loss cannot tell them apart, the Wasserstein one sees mean 0 against mean 2.
    a = torch.tensor([2.0, -2.0, 2.0, -2.0]).view(1, 1, 1, 4)
    b = torch.full((1, 1, 1, 4), 2.0)
    torch.testing.assert_close(gram_matrix(a), gram_matrix(b))
    assert float(StyleLoss(gram_matrix(a))(b)) == 0.0
    assert float(WassersteinStyleLoss(gram_matrix(a), channel_means(a))(b)) > 0.5


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
    assert optimizer.s_ring is not None and optimizer.y_ring is not None
    assert optimizer.rho_ring is not None and optimizer.h_diag is not None
    grad = torch.randn(300)
    order = (torch.arange(5) + optimizer.oldest) % 5
    rho = optimizer.rho_ring.index_select(0, order)
    pairs = _Gathered(optimizer.s_ring, optimizer.y_ring, rho, order)
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


def test_loss_scaling_is_for_fp16_only() -> None:
    assert loss_scale(torch.float16) == FP16_LOSS_SCALE == 2.0**12
    assert loss_scale(torch.bfloat16) == 1.0
    assert loss_scale(None) == 1.0


def fp16_gradient(
    loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """The gradient at fp32 ``x`` of ``loss_of(x in fp16)``: by scaled_backward at
    ``scale``, or with the loss times 2¹² and no cut (``None``)."""
    param = x.clone().requires_grad_()
    loss = loss_of(param.half())
    if scale is None:
        (loss * 2.0**12).backward()
        assert param.grad is not None
        return param.grad / 2.0**12
    scaled_backward(loss, [param], scale)
    assert param.grad is not None
    return param.grad


def test_scaled_backward_keeps_an_fp16_gradient_that_would_underflow() -> None:
    # d loss / d(x in fp16) = 2⁻³⁰, below fp16's smallest subnormal (2⁻²⁴): it rounds to 0.
    # Scaled by 2¹², it is 2⁻¹⁸ there, exact; unscaled in fp32 after, 2⁻³⁰ again.
    def loss_of(half: torch.Tensor) -> torch.Tensor:
        return half.float().sum() * 2.0**-30

    x = torch.rand(8)
    assert torch.count_nonzero(fp16_gradient(loss_of, x, 1.0)).item() == 0
    gradient = fp16_gradient(loss_of, x, FP16_LOSS_SCALE)
    assert gradient.dtype == torch.float32
    assert torch.equal(gradient, torch.full((8,), 2.0**-30))


def test_scaled_backward_cuts_the_scale_for_a_large_loss() -> None:
    # A loss of 2²¹ whose fp16 gradients are 2⁸: times the full 2¹² they would be 2²⁰,
    # beyond fp16's 65504 (inf); the scale is cut so the scaled loss stays at 2²⁰.
    def loss_of(half: torch.Tensor) -> torch.Tensor:
        return half.float().sum() * 2.0**8

    x = torch.full((4096,), 2.0)
    assert torch.isinf(fp16_gradient(loss_of, x, None)).all()
    assert torch.equal(fp16_gradient(loss_of, x, FP16_LOSS_SCALE), torch.full((4096,), 2.0**8))


def evaluate_once(
    content: Image.Image, style: Image.Image, precision: str, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """One engine evaluation (forward, losses, backward) of a 64 px run from noise: its
    weighted loss parts and its image's gradient, as the optimizers get them."""
    run = prepare(
        content=content, styles=[style], precision=precision, size=64, scales=1,
        backbone="vgg19-random", device="cpu", init="noise", seed=0, **options,
    )  # fmt: skip
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    cpu = torch.device("cpu")
    extractor = load_extractor("vgg19-random", device=cpu, precision=precision)
    state = _RunState(run, 0)
    state.start_scale(
        0, 64, extractor.truncated("relu5_1"), cpu, autocast_dtype, autocast_dtype is not None,
        None,
    )  # fmt: skip
    assert state.objective is not None and state.param is not None
    (parts,) = evaluate([state.objective], [state.param])
    assert state.param.grad is not None
    return parts, state.param.grad.clone()


def test_an_fp16_run_gets_the_fp32_gradient_of_a_term_that_underflows_unscaled(
    content_image: Image.Image, style_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A content term weighted 2⁻¹²: its gradient in the fp16 backbone is 2¹² times smaller
    than at weight 1, as it would be on an image of 4096 times the pixels. Unscaled, every
    component of the image's gradient underflows to 0; scaled, it is the fp32 gradient to
    fp16's rounding (6 % at any weight), and the loss reported is the unscaled one."""
    options = {"content_weight": 2.0**-12, "style_weight": 0.0, "tv_weight": 0.0}
    fp32_parts, fp32_gradient = evaluate_once(content_image, style_image, "fp32", **options)
    fp16_parts, fp16_gradient = evaluate_once(content_image, style_image, "fp16", **options)
    assert fp16_gradient.dtype == torch.float32
    error = (fp16_gradient - fp32_gradient).norm() / fp32_gradient.norm()
    assert error < 0.1, error
    torch.testing.assert_close(fp16_parts, fp32_parts, rtol=1e-2, atol=0)

    monkeypatch.setattr(engine_device, "FP16_LOSS_SCALE", 1.0)
    _, unscaled = evaluate_once(content_image, style_image, "fp16", **options)
    assert torch.count_nonzero(unscaled).item() == 0
