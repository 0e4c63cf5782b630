"""A job never takes more memory than the estimate it is routed by (shared/routing.py).

Each case is parsed as a submission is (``parse_request``, which gives the estimate), then
run by the engine in a process of its own, whose peak resident memory is measured: extreme
shapes (long strips, a style at four times the output's scale, large inputs at a small
size), where a style's or a decode's share is largest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shared.images import encode_png
from shared.jobs import Upload, parse_request
from tests.conftest import REPO
from tests.service import service_settings

# The child's peak is its VmHWM, the high-water mark of its own address space. Not
# getrusage's ru_maxrss: Linux carries that over from the parent through fork and exec, so
# the child reported the pytest process's own size (2038 MiB in two cases once the suite
# had run many engine tests in-process) instead of its own.
CHILD = """
import json, re, sys
from pathlib import Path
from shared.images import decode_image
from worker.engine import stylize
spec = json.loads(sys.argv[1])
limits = {"max_bytes": 10**9, "max_pixels": 10**9}
content = decode_image(spec["content"], **limits)
styles = [decode_image(path, **limits) for path in spec["styles"]]
stylize(content=content, styles=styles, **spec["options"])
status = Path("/proc/self/status").read_text()
print(int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.M).group(1)) * 1024)
"""

# (content size, style sizes, options): each extreme in one direction. The sizes are the
# smallest at which the style's share of the peak is still most of what torch itself does
# not take: the peaks sit as close under their estimates as at twice the sizes.
CASES = {
    "square style at 4x scale": ((256, 192), [(1100, 1100)], {"size": "256", "style_scale": "4"}),
    "strip style at 4x scale": ((256, 256), [(2000, 200)], {"size": "256", "style_scale": "4"}),
    "strip content and style": ((1000, 100), [(100, 1000)], {"size": "512", "style_scale": "4"}),
    "large inputs, small output": ((6000, 4000), [(6000, 4000)], {"size": "128"}),
    "eight styles": ((256, 256), [(500, 500)] * 8, {"size": "128", "style_scale": "2"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peak_memory_stays_under_the_routing_estimate(tmp_path: Path, case: str) -> None:
    content_size, style_sizes, fields = CASES[case]
    settings = service_settings(tmp_path, "redis://unused", max_image_pixels=30_000_000)

    def image(size: tuple[int, int], name: str, seed: int) -> Path:
        path = tmp_path / f"{name}.png"
        # Smooth (compresses small) with noise-free detail, so that large inputs fit the
        # file limit.
        gradient = Image.linear_gradient("L").rotate(30 * seed).resize(size)
        path.write_bytes(encode_png(Image.merge("RGB", [gradient] * 3)))

        return path

    content = image(content_size, "content", 0)
    styles = [image(size, f"style{i}", i) for i, size in enumerate(style_sizes)]
    form = {"iterations": ["2"], "scales": ["1"], "backbone": ["vgg19-random"]}
    form.update({name: [value] for name, value in fields.items()})
    uploads = [Upload("content", "c.png", content.read_bytes())]
    uploads += [Upload("style", p.name, p.read_bytes()) for p in styles]
    request = parse_request(form, uploads, settings)
    estimate = request.memory_bytes()

    options = {**request.options.stored(), "style_weights": request.style_weights}
    spec = {"content": str(content), "styles": [str(p) for p in styles], "options": options}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak = int(child.stdout.split()[-1])
    print(f"{case}: peak {peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB")
    assert peak < estimate, f"{case}: peak {peak / 2**20:.0f} MiB > estimate {estimate / 2**20:.0f}"


VIDEO_CHILD = """
import re, sys
from pathlib import Path
from shared.video import encode_mp4, iter_frames, probe_video
data = Path(sys.argv[1]).read_bytes()
info = probe_video(data, __import__("shared.video").video.VideoLimits(10**4, 10**4, 10**8))
out = encode_mp4(iter_frames(data, info.size), info.fps, audio_from=data)
status = Path("/proc/self/status").read_text()
print(len(out), int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.M).group(1)) * 1024)
"""


def test_decoding_and_encoding_a_video_holds_a_frame_at_a_time(tmp_path: Path) -> None:
    """Decoding, re-encoding and the audio of a clip five times as long take about the same
    peak memory: frames are streamed, not kept. (Both clips are longer than what the
    decoder's threads and x264's lookahead hold, a bounded few dozen frames.)"""
    from shared.video import pan_clip

    photo = Image.open(REPO / "examples" / "coffee.jpg")
    peaks = {}
    for frames in (96, 480):
        path = tmp_path / f"clip{frames}.mp4"
        path.write_bytes(pan_clip(photo, frames=frames, size=(320, 240), fps=24, audio=True))
        child = subprocess.run(
            [sys.executable, "-c", VIDEO_CHILD, str(path)],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        size, peak = (int(value) for value in child.stdout.split()[-2:])
        peaks[frames] = peak - size  # the finished MP4 is in memory at the end, by design
    decoded = (480 - 96) * 320 * 240 * 3  # what keeping the extra decoded frames would cost
    print(f"peaks: {peaks[96] / 2**20:.0f} and {peaks[480] / 2**20:.0f} MiB")
    assert peaks[480] - peaks[96] < decoded / 10, peaks
