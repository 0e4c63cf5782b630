"""Videos in and out, with PyAV (FFmpeg in its wheels): the header's checks, frames decoded a
run at a time, and the MP4 (H.264) a video job delivers.

A submitted video is checked from its container's header and its packets' index, before any
frame is decoded: the container (MP4, MOV, WebM, Matroska or GIF), a video codec we decode,
the frame size, the duration and the frame count, and that the packets the header announces
are there (a file cut short has fewer). Decoding and encoding stream: at most one decoded
frame of the source is held at a time, so memory does not grow with the video's length.
"""

from __future__ import annotations

import io
import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from PIL import Image

from shared.errors import ImageError, ImageTooLarge, UnsupportedImageFormat

log = logging.getLogger(__name__)

#: The containers accepted (FFmpeg's demuxer names) and what a refusal calls them.
CONTAINERS = {
    "mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV",
    "matroska,webm": "WebM/Matroska",
    "gif": "GIF",
}
#: Video codecs decoded (FFmpeg's names). Others (ProRes RAW, say, or image sequences in
#: odd codecs) are refused from the header.
CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "gif", "mjpeg"})
#: First bytes of the containers above but GIF, to tell a video from an image.
_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"))
#: Frame rates outside this are refused as implausible (or a broken header).
MIN_FPS, MAX_FPS = Fraction(1, 1), Fraction(120, 1)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header and packet index say."""

    width: int
    height: int
    frames: int
    fps: Fraction
    codec: str
    audio: bool
    container: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def seconds(self) -> float:
        return float(self.frames / self.fps)


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int
    max_seconds: float
    max_pixels: int


def is_video(data: bytes) -> bool:
    """True if ``data`` starts as a container we read videos from; a GIF only if animated
    (one of a single frame is an image, which the image checks refuse)."""
    if data.startswith(b"GIF8"):
        try:
            with Image.open(io.BytesIO(data), formats=("GIF",)) as image:
                return bool(getattr(image, "is_animated", False))
        except Exception:  # unreadable: the image checks say why
            return False
    return any(data[at : at + len(magic)] == magic for at, magic in _MAGIC)


def _open(source: bytes | str, name: str) -> Any:
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise ImageError(
            "not a readable video: its container cannot be parsed (cut short, or not a video)",
            field=name,
        ) from exc


def probe_video(data: bytes, limits: VideoLimits, *, name: str = "content") -> VideoInfo:
    """Check a video from its header and packets (no frame is decoded); its
    :class:`VideoInfo`. Raises :class:`UnsupportedImageFormat` (415) for a container or
    codec we refuse, :class:`ImageTooLarge` (413) over a limit, :class:`ImageError` (422)
    for a file that is unreadable or cut short."""
    with _open(data, name) as container:
        kind = CONTAINERS.get(container.format.name)
        if kind is None:
            raise UnsupportedImageFormat(
                f"{container.format.long_name or container.format.name} is not accepted; "
                "send MP4, MOV, WebM or an animated GIF",
                field=name,
            )
        if not container.streams.video:
            raise ImageError("the file has no video stream", field=name)
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in CODECS:
            raise UnsupportedImageFormat(
                f"video in {codec} is not accepted; use H.264, HEVC, VP8, VP9 or AV1",
                field=name,
            )
        width, height = stream.codec_context.width, stream.codec_context.height
        if width < 2 or height < 2:
            raise ImageError("the video has no picture size in its header", field=name)
        if width * height > limits.max_pixels:
            raise ImageTooLarge(
                f"frames of {width}×{height} are over the limit of {limits.max_pixels:,} pixels",
                field=name,
            )
        # The packets, demuxed but not decoded: their count is the frame count, and a file
        # cut short holds fewer than its header announces.
        packets = 0
        for packet in container.demux(stream):
            if packet.size:
                packets += 1
                if packets > limits.max_frames:
                    raise ImageTooLarge(
                        f"the video has more than {limits.max_frames} frames; the limit is "
                        f"{limits.max_frames} (trim it)",
                        field=name,
                    )
        announced = stream.frames
        if announced and packets < announced:
            raise ImageError(
                f"the video is cut short: its header announces {announced} frames, the file "
                f"holds {packets}",
                field=name,
            )
        fps = _frame_rate(stream, packets)
        if not MIN_FPS <= fps <= MAX_FPS:
            raise ImageError(f"a frame rate of {float(fps):g} per second is refused", field=name)
        if packets < 2:
            raise ImageError(
                "a video needs at least 2 frames; send a photo as an image", field=name
            )
        info = VideoInfo(
            width=width, height=height, frames=packets, fps=fps, codec=codec,
            audio=bool(container.streams.audio), container=kind,
        )  # fmt: skip
    if info.seconds > limits.max_seconds:
        raise ImageTooLarge(
            f"the video lasts {info.seconds:.1f} s; the limit is {limits.max_seconds:g} s",
            field=name,
        )
    return info


def _frame_rate(stream: Any, packets: int) -> Fraction:
    """The stream's average rate, or (a GIF's varying delays) frames over its duration."""
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return Fraction(rate).limit_denominator(1001)
    if stream.duration and stream.time_base:
        seconds = stream.duration * stream.time_base
        if seconds > 0:
            return Fraction(packets / seconds).limit_denominator(1001)
    return Fraction(10, 1)


def read_frames(
    source: bytes | str, start: int, stop: int, size: tuple[int, int], *, name: str = "content"
) -> list[Image.Image]:
    """Frames ``start`` to ``stop`` (0-based, stop excluded), each scaled to ``size`` as it
    is decoded: only those frames are kept."""
    return list(iter_frames(source, size, start=start, stop=stop, name=name))


def iter_frames(
    source: bytes | str, size: tuple[int, int], *, start: int = 0, stop: int | None = None,
    name: str = "content",
) -> Iterator[Image.Image]:  # fmt: skip
    """The video's frames from ``start`` to ``stop`` as RGB images of ``size``, one at a
    time. Frames before ``start`` are decoded (a run's first frame needs its keyframe and
    those after it) and dropped."""
    with _open(source, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if stop is not None and index >= stop:
                    break
                if index >= start:
                    yield frame.to_image().convert("RGB").resize(size, Image.Resampling.LANCZOS)
        except av.FFmpegError as exc:
            raise ImageError(f"the video cannot be decoded: {exc}", field=name) from exc


def encode_mp4(
    frames: Iterable[Image.Image], fps: Fraction, *, audio_from: bytes | str | None = None,
    crf: int = 18,
) -> bytes:  # fmt: skip
    """The frames as an H.264 MP4 (yuv420p, so every player shows it) at ``fps``, one frame
    per picture given, with the audio of ``audio_from`` (a source video) as AAC.

    The frames are encoded as they come (none is kept), into a temporary file, so only the
    finished MP4 is in memory at the end.
    """
    pictures = iter(frames)
    first = next(pictures, None)
    if first is None:
        raise ValueError("no frames to encode")
    with tempfile.NamedTemporaryFile(suffix=".mp4") as out:
        with av.open(out.name, mode="w", format="mp4") as container:
            # Every stream before the first packet: the muxer writes its header then.
            video = _video_stream(container, fps, first.size, crf)
            if audio_from is not None:
                # The audio first: the muxer then holds its packets (small) until the
                # video's come, not the whole encoded video until the audio's.
                _AudioCopy(audio_from, container).copy()
            even = (video.width, video.height)
            for frame in itertools.chain([first], pictures):
                if frame.size != even:  # an odd side loses its last row or column
                    frame = frame.crop((0, 0, *even))
                picture = av.VideoFrame.from_image(frame.convert("RGB"))
                for packet in video.encode(picture.reformat(format="yuv420p")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
        out.seek(0)
        return out.read()


def _video_stream(container: Any, fps: Fraction, size: tuple[int, int], crf: int) -> Any:
    video = container.add_stream("libx264", rate=fps)
    # yuv420p halves chroma in both directions: H.264 needs even sides.
    video.width, video.height = size[0] - size[0] % 2, size[1] - size[1] % 2
    video.pix_fmt = "yuv420p"
    video.options = {"crf": str(crf), "preset": "medium"}
    return video


class _AudioCopy:
    """The source's first audio stream, decoded and encoded again as AAC, streamed."""

    def __init__(self, source: bytes | str, container: Any) -> None:
        self.source = _open(source, "content")
        self.container = container
        self.stream = None
        if self.source.streams.audio:
            rate = self.source.streams.audio[0].codec_context.sample_rate or 48000
            self.stream = container.add_stream("aac", rate=rate)
            self.resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)

    def copy(self) -> None:
        with self.source:
            if self.stream is None:
                return
            for frame in self.source.decode(self.source.streams.audio[0]):
                frame.pts = None
                for resampled in self.resampler.resample(frame):
                    for packet in self.stream.encode(resampled):
                        self.container.mux(packet)
            for packet in self.stream.encode(None):
                self.container.mux(packet)


def decode_frames(data: bytes) -> list[Image.Image]:
    """Every frame of a short video (tests and benches: all are kept)."""
    with _open(data, "video") as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


def video_info(data: bytes) -> tuple[int, Fraction, bool]:
    """An encoded result's frame count, frame rate and whether it has audio (for tests and
    benches): frames decoded and counted."""
    with _open(data, "result") as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, Fraction(stream.average_rate), bool(container.streams.audio)


def pan_clip(
    photo: Image.Image, *, frames: int, size: tuple[int, int], fps: int = 12,
    step: int = 2, audio: bool = False,
) -> bytes:  # fmt: skip
    """A clip that pans across ``photo`` by ``step`` pixels a frame (its frames ``size``),
    as H.264 MP4, with a 440 Hz tone if ``audio``: the steady video the tests and benches
    style, whose true motion is known."""
    width, height = size
    wide = photo.convert("RGB").resize((width + step * frames, height), Image.Resampling.LANCZOS)
    pictures = (wide.crop((i * step, 0, i * step + width, height)) for i in range(frames))
    if not audio:
        return encode_mp4(pictures, Fraction(fps))
    return _with_tone(encode_mp4(pictures, Fraction(fps)), frames / fps)


def _with_tone(video: bytes, seconds: float) -> bytes:
    import numpy as np

    rate = 16000
    samples = np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate).astype(np.float32)
    with tempfile.NamedTemporaryFile(suffix=".mp4") as out:
        with _open(video, "video") as src, av.open(out.name, mode="w", format="mp4") as dst:
            stream_in = src.streams.video[0]
            stream_out = dst.add_stream_from_template(stream_in)
            tone = dst.add_stream("aac", rate=rate)
            for packet in src.demux(stream_in):
                if packet.dts is not None:
                    packet.stream = stream_out
                    dst.mux(packet)
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = rate
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
            for chunk in resampler.resample(frame):
                for packet in tone.encode(chunk):
                    dst.mux(packet)
            for packet in tone.encode(None):
                dst.mux(packet)
        out.seek(0)
        return out.read()
