"""Finding and checking ImageNet weights, with a file in torchvision's format written here.

The file has torchvision's keys and shapes and random values: no real weights can be
downloaded on these machines, and none are needed to test the lookup, the checksum and the
loading.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from PIL import Image
from torch.nn import functional as F

from shared.backbones import BACKBONES
from shared.errors import WeightsError
from worker.engine import stylize
from worker.engine.backbones import build_layers, load_backbone, seed_filters
from worker.engine.weights import WeightsLocations, sha256_of

VGG19 = BACKBONES["vgg19"]
VGG19_CAFFE = BACKBONES["vgg19-caffe"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A VGG19 state dict as torchvision saves it (features.* and classifier.*)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / VGG19.weights_file
    torch.save(torchvision.models.vgg19(weights=None).state_dict(), path)
    return path, sha256_of(path)


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache and no STYLEQUEUE_WEIGHTS_* variables."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    for name in list(os.environ):
        if name.startswith("STYLEQUEUE_WEIGHTS") or name == "STYLEQUEUE_ALLOW_DOWNLOAD":
            monkeypatch.delenv(name)
    return hub


def test_loads_torchvision_format_from_the_weights_dir(
    torchvision_file: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, digest = torchvision_file
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_DIR", str(path.parent))
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_VGG19_SHA256", digest)
    backbone = load_backbone("vgg19", device=CPU, locations=WeightsLocations.from_env())
    state = torch.load(path, weights_only=True)
    torch.testing.assert_close(backbone.layers.conv1_1.weight, state["features.0.weight"])
    torch.testing.assert_close(backbone.layers.conv5_4.bias, state["features.34.bias"])
    assert not any(p.requires_grad for p in backbone.parameters())
    # Once per process: the same file gives the same module, without reading it again.
    assert load_backbone("vgg19", device=CPU, locations=WeightsLocations.from_env()) is backbone

    # And the engine runs with it, finding it through the same settings.
    image = Image.new("RGB", (32, 32), (120, 80, 40))
    result = stylize(content=image, styles=[image], size=32, iterations=2, device="cpu")
    assert result.image.size == (32, 32)


def test_found_in_the_torch_hub_cache(
    torchvision_file: tuple[Path, str], isolated_lookup: Path
) -> None:
    path, digest = torchvision_file
    cached = isolated_lookup / "checkpoints" / VGG19.weights_file
    cached.parent.mkdir(parents=True)
    cached.symlink_to(path)
    locations = WeightsLocations(sha256={"vgg19": digest})
    assert locations.find(VGG19) == cached
    assert load_backbone("vgg19", device=CPU, locations=locations).layers.conv1_1.weight.shape == (
        64,
        3,
        3,
        3,
    )


def test_an_explicit_file_wins_over_the_directories(tmp_path: Path, isolated_lookup: Path) -> None:
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    in_dir = tmp_path / "dir" / VGG19.weights_file
    in_dir.parent.mkdir()
    in_dir.write_bytes(b"y")
    locations = WeightsLocations.from_env(
        {"STYLEQUEUE_WEIGHTS_VGG19": str(explicit), "STYLEQUEUE_WEIGHTS_DIR": str(in_dir.parent)}
    )
    assert locations.candidates(VGG19) == [
        explicit,
        in_dir,
        isolated_lookup / "checkpoints" / VGG19.weights_file,
    ]
    assert locations.find(VGG19) == explicit


def test_missing_weights_name_the_file_the_places_and_the_fix(tmp_path: Path) -> None:
    locations = WeightsLocations(weights_dir=tmp_path / "empty")
    with pytest.raises(WeightsError) as caught:
        load_backbone("vgg19", device=CPU, locations=locations)
    message = str(caught.value)
    assert "vgg19-dcbb9e9d.pth" in message
    assert str(tmp_path / "empty") in message
    assert "hub" in message
    assert "stylequeue weights fetch vgg19" in message


def test_a_file_failing_the_published_checksum_is_refused(
    torchvision_file: tuple[Path, str], tmp_path: Path
) -> None:
    # The right name, keys and shapes, but not torchvision's bytes: its SHA-256 does not
    # start with the "dcbb9e9d" published in the name.
    path, digest = torchvision_file
    assert not digest.startswith(VGG19.sha256_prefix)
    copy = tmp_path / VGG19.weights_file
    shutil.copyfile(path, copy)
    with pytest.raises(WeightsError, match=r"checksum mismatch.*expects dcbb9e9d"):
        load_backbone("vgg19", device=CPU, locations=WeightsLocations(weights_dir=tmp_path))
    wrong = WeightsLocations(weights_dir=tmp_path, sha256={"vgg19": "0" * 64})
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_backbone("vgg19", device=CPU, locations=wrong)


def test_a_state_dict_of_the_wrong_network_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vgg16-as-vgg19.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
    locations = WeightsLocations(paths={"vgg19": path}, sha256={"vgg19": sha256_of(path)})
    with pytest.raises(WeightsError, match="lack"):
        load_backbone("vgg19", device=CPU, locations=locations)


@pytest.fixture(scope="module")
def caffe_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Seeded VGG19 filters (and biases) saved as neural-style's converted file is keyed."""
    layers = build_layers(VGG19_CAFFE, "max")
    seed_filters(layers, 5)
    generator = torch.Generator().manual_seed(6)
    state = {}
    for index, module in enumerate(layers):
        if isinstance(module, torch.nn.Conv2d):
            with torch.no_grad():
                module.bias.normal_(0.0, 1.0, generator=generator)
            state[f"features.{index}.weight"] = module.weight.detach().clone()
            state[f"features.{index}.bias"] = module.bias.detach().clone()
    path = tmp_path_factory.mktemp("caffe") / "converted.pth"
    torch.save(state, path)
    return path, state


def test_caffe_vgg19_sees_bgr_0_255_minus_the_mean_pixel(
    caffe_file: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert VGG19_CAFFE.preprocessing == "caffe" and VGG19.preprocessing == "torchvision"
    assert VGG19_CAFFE.weights_file == "vgg19-d01eb7cb.pth"
    assert VGG19_CAFFE.weights_url == (
        "https://web.eecs.umich.edu/~justincj/models/vgg19-d01eb7cb.pth"
    )
    path, state = caffe_file
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_VGG19_CAFFE", str(path))
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_VGG19_CAFFE_SHA256", sha256_of(path))
    backbone = load_backbone("vgg19-caffe", device=CPU, locations=WeightsLocations.from_env())

    torch.manual_seed(0)
    image = torch.rand(2, 3, 20, 24)  # RGB in [0, 1]
    mean_pixel = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)  # B, G, R
    x = 255 * image[:, [2, 1, 0]] - mean_pixel
    x = F.pad(x, [1, 1, 1, 1], mode="replicate")  # conv1_1 replicates the edges
    relu1_1 = F.relu(F.conv2d(x, state["features.0.weight"], state["features.0.bias"]))
    relu1_2 = F.relu(
        F.conv2d(relu1_1, state["features.2.weight"], state["features.2.bias"], padding=1)
    )
    for extractor in (backbone, backbone.truncated("relu1_2")):
        with torch.no_grad():
            features = extractor(image, ["relu1_1", "relu1_2"])
        torch.testing.assert_close(features["relu1_1"], relu1_1, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(features["relu1_2"], relu1_2, rtol=1e-5, atol=1e-3)


def test_caffe_vgg19_is_checked_against_its_published_prefix(
    caffe_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    # A copy: the extractor loaded from the original is cached, checked once.
    path = tmp_path / VGG19_CAFFE.weights_file
    shutil.copyfile(caffe_file[0], path)
    with pytest.raises(
        WeightsError, match=r"expects d01eb7cb.*STYLEQUEUE_WEIGHTS_VGG19_CAFFE_SHA256"
    ):
        load_backbone(
            "vgg19-caffe", device=CPU, locations=WeightsLocations(paths={"vgg19-caffe": path})
        )
    missing = WeightsLocations(weights_dir=path.parent / "empty")
    with pytest.raises(WeightsError, match="stylequeue weights fetch vgg19-caffe"):
        load_backbone("vgg19-caffe", device=CPU, locations=missing)


def test_downloads_only_when_allowed() -> None:
    assert not WeightsLocations.from_env({}).allow_download
    assert WeightsLocations.from_env({"STYLEQUEUE_ALLOW_DOWNLOAD": "1"}).allow_download


@pytest.fixture
def mirror(torchvision_file: tuple[Path, str]) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server holding the torchvision-format file: a weights mirror
    (STYLEQUEUE_WEIGHTS_MIRROR); yields its URL and the paths it was asked for."""
    folder = str(torchvision_file[0].parent)
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args: Any) -> None:
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", asked
    finally:
        server.shutdown()
        server.server_close()


def test_serve_and_worker_fetch_the_weights_at_start_and_check_them(
    tmp_path: Path,
    torchvision_file: tuple[Path, str],
    mirror: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from shared.config import Settings
    from stylequeue.service import fetch_default_weights

    url, asked = mirror
    weights_dir = tmp_path / "weights"
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_MIRROR", url)
    online, offline = Settings.from_env({}), Settings.from_env({}, offline=True)

    # Offline: not a single request, one line saying what it means.
    assert not fetch_default_weights(offline, "vgg19")
    assert asked == []
    said = capfd.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "offline" in said[0] and "vgg19-random" in said[0]

    # A file that is not the one expected is refused and not kept.
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_VGG19_SHA256", "0" * 64)
    assert not fetch_default_weights(online, "vgg19")
    assert asked == [f"/{VGG19.weights_file}"]
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stylequeue: could not get the vgg19 weights (checksum mismatch")
    assert not (weights_dir / VGG19.weights_file).exists()

    # The right one: fetched with a progress bar, checked, then found and loadable.
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_VGG19_SHA256", torchvision_file[1])
    assert fetch_default_weights(online, "vgg19")
    err = capfd.readouterr().err
    assert "fetching the vgg19 weights" in err and "100%" in err
    assert "checksum verified" in err
    assert sha256_of(weights_dir / VGG19.weights_file) == torchvision_file[1]
    assert fetch_default_weights(online, "vgg19") and len(asked) == 2  # found: no third request
    load_backbone("vgg19", device=CPU)

    # Nobody answers: one line, and the service goes on offline.
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_MIRROR", "http://127.0.0.1:9/")
    capfd.readouterr()
    assert not fetch_default_weights(online, "vgg19")
    said = capfd.readouterr().err.strip().splitlines()
    assert said[-1].startswith("stylequeue: could not get the vgg19 weights (could not download")
    assert "vgg19-random" in said[-1]
