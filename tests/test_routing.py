"""Routing by device class and memory, and one worker per GPU (unit tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.routing import (
    GIB,
    JobTooLarge,
    choose_queue,
    gpu_tier,
    job_memory_bytes,
    worker_queues,
)
from stylequeue.service import gpu_worker_env
from tests.conftest import REPO


def worker(kind: str, memory_gib: float, base: str = "sq") -> dict[str, object]:
    memory = int(memory_gib * GIB)
    return {"kind": kind, "memory_bytes": memory, "queues": worker_queues(base, kind, memory)}


def test_memory_grows_with_output_pixels_and_lbfgs_history() -> None:
    small = job_memory_bytes(output_pixels=512 * 384, optimizer="lbfgs")
    large = job_memory_bytes(output_pixels=1024 * 768, optimizer="lbfgs")
    assert large - small == pytest.approx(3 * (small - GIB), rel=0.01)  # 4× the pixels
    assert job_memory_bytes(output_pixels=1024 * 768, optimizer="adam") < large


def test_memory_counts_every_style_and_the_decoded_inputs() -> None:
    alone = job_memory_bytes(output_pixels=512 * 384, optimizer="lbfgs")
    one = job_memory_bytes(output_pixels=512 * 384, optimizer="lbfgs", style_pixels=[10**6])
    two = job_memory_bytes(output_pixels=512 * 384, optimizer="lbfgs", style_pixels=[10**6, 10**6])
    decoded = job_memory_bytes(
        output_pixels=512 * 384, optimizer="lbfgs", style_pixels=[10**6], input_pixels=10**7
    )
    # A style's forward pass costs more than holding its tensor; only one runs at a time.
    assert one - alone > 2 * (two - one) > 0
    assert decoded > one


def test_gpu_workers_consume_the_tiers_they_can_hold() -> None:
    assert worker_queues("sq", "gpu", 30 * GIB) == ["sq.gpu.2g", "sq.gpu.8g", "sq.gpu.24g", "sq"]
    assert worker_queues("sq", "cpu", 30 * GIB) == ["sq.cpu", "sq"]
    assert gpu_tier(3 * GIB) == "8g" and gpu_tier(200 * GIB) is None


def test_jobs_go_to_a_gpu_that_fits_then_to_cpus_then_are_refused() -> None:
    fleet = [worker("gpu", 10), worker("gpu", 30), worker("cpu", 64)]
    assert choose_queue("sq", 1 * GIB, fleet) == "sq.gpu.2g"
    assert choose_queue("sq", 20 * GIB, fleet) == "sq.gpu.24g"
    assert choose_queue("sq", 50 * GIB, fleet) == "sq.cpu"  # no GPU holds it: the fallback
    with pytest.raises(JobTooLarge, match=r"largest live worker offers 64\.0 GiB"):
        choose_queue("sq", 100 * GIB, fleet)
    assert choose_queue("sq", 100 * GIB, []) == "sq"  # nobody known yet: the shared queue
    # Workers of another service on the same Redis do not count.
    assert choose_queue("other", 1 * GIB, fleet) == "other"


def test_one_worker_per_gpu_sees_only_its_own() -> None:
    env = gpu_worker_env({"PATH": "/bin"}, 3, "node7")
    assert env == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "3",
        "STYLEQUEUE_DEVICE": "cuda:0",
        "STYLEQUEUE_WORKER_NAME": "node7-gpu3",
    }
    # Already narrowed to physical GPUs 4 and 6: index 1 is physical GPU 6.
    narrowed = gpu_worker_env({"CUDA_VISIBLE_DEVICES": "4,6"}, 1, "node7")
    assert narrowed["CUDA_VISIBLE_DEVICES"] == "6"


def test_gpus_on_a_machine_without_one_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(
        [sys.executable, "-m", "stylequeue", "worker", "--gpus", "all"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no CUDA GPU is visible here" in done.stderr and "Traceback" not in done.stderr


def test_lbfgs_history_shrinks_with_the_image_and_the_estimate_counts_it() -> None:
    from shared.pyramid import lbfgs_history_for

    assert lbfgs_history_for(512 * 512, None) == 100
    assert lbfgs_history_for(2048 * 2048, None) == 21  # 21 pairs × 24 B/px ≤ 2 GiB
    assert lbfgs_history_for(10**9, None) == 5
    assert lbfgs_history_for(2048 * 2048, 50) == 50  # asked for: kept
    full = job_memory_bytes(output_pixels=2048 * 2048, optimizer="lbfgs")
    short = job_memory_bytes(output_pixels=2048 * 2048, optimizer="lbfgs", lbfgs_history=21)
    assert full - short == 2048 * 2048 * 2_400 * 79 // 100
