"""Jobs of many parts, end to end with real worker processes: a batch of photos, and a
video cut into runs of frames on two workers, steadier than its frames styled one by one.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image

from shared.config import Settings
from shared.video import decode_frames, encode_mp4, pan_clip, video_info
from tests.service import (
    FAST_RECOVERY,
    Receiver,
    RedisServer,
    WorkerProcess,
    make_token,
    png_bytes,
    service_settings,
    submit,
    wait_for,
)
from tests.test_service import wait_status
from web import create_app
from worker.engine import stylize
from worker.flow import as_array, warping_error

ITERATIONS = 20
SIZE = 64
#: The clip: a pan across the photo, 10 frames at 12 per second, with a tone; in runs of 6
#: (the module's setting), it makes two runs: frames 0 to 5, and 4 to 9 (two at the seam).
FRAMES, FPS, CLIP_SIZE = 10, 12, (96, 72)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, FlaskClient]]:
    """Two workers for the module (the last test kills one and starts another)."""
    tmp_path = tmp_path_factory.mktemp("parts")
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    receiver = Receiver()  # a batch's callback, once, for the whole batch
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    settings = service_settings(
        tmp_path, redis.url, video_run_frames=6, video_seam_frames=2, batch_jobs=1,
        max_attempts=3, webhook_hosts=f"127.0.0.1:{receiver.server_address[1]}",
        webhook_secret="secret", webhook_networks="127.0.0.0/8", **FAST_RECOVERY,
    )  # fmt: skip
    app = create_app({"SETTINGS": settings})
    workers = [WorkerProcess(settings, f"w{i}", tmp_path / f"w{i}.log") for i in range(2)]
    for worker in workers:
        worker.start()
    app.config["WORKERS"] = workers  # a test may kill one, and start more
    app.config["RECEIVER"] = receiver
    yield settings, app.test_client()
    for worker in app.config["WORKERS"]:
        worker.stop()
    receiver.shutdown()
    receiver.server_close()
    app.extensions["stylequeue"]["engine"].dispose()
    redis.stop()


def test_a_batch_of_three_photos_gives_a_zip_and_a_contact_sheet(
    service: tuple[Settings, FlaskClient], sample_images: Path
) -> None:
    settings, client = service
    photos = [png_bytes(sample_images / "content" / name) for name in ("photo.jpg", "second.jpg")]
    photos.append(png_bytes(sample_images / "style" / "shipwreck.jpg"))
    painting = png_bytes(sample_images / "style" / "starry_night.jpg")
    response = submit(client, None, painting)
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "content"
    token = {"Authorization": f"Bearer {make_token(settings)}"}
    receiver = client.application.config["RECEIVER"]
    body = _submit_many(client, photos, painting, token, callback=receiver.url("/batch"))
    assert body["kind"] == "batch" and body["parts"]["total"] == 3
    done = wait_status(client, body["id"], {"succeeded", "failed", "canceled"}, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["parts"]["done"] == 3
    assert done["progress"] == {"iteration": 3 * ITERATIONS, "total": 3 * ITERATIONS}
    for item in done["parts"]["items"]:
        part = client.get(item["url"]).get_json()
        assert part["status"] == "succeeded" and part["parent"]["id"] == body["id"]
        points = client.get(f"{item['url']}/losses").get_json()["points"]
        assert [p["iteration"] for p in points] == list(range(1, ITERATIONS + 1))
    result = client.get(done["links"]["result"])
    assert result.status_code == 200 and result.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(result.data)) as archive:
        assert archive.namelist() == ["001.png", "002.png", "003.png", "contact-sheet.png"]
        sizes = [Image.open(io.BytesIO(archive.read(n))).size for n in archive.namelist()]
    # Each picture has its own photo's shape; the sheet has a photo over each picture.
    assert sizes[0] == (64, 48) and sizes[2][0] == 64 and sizes[2] != sizes[0]
    assert sizes[3] == (3 * 256, 2 * 256)
    # Parts are not listed as jobs of their own.
    listed = client.get("/api/jobs", headers=token).get_json()["jobs"]
    assert [job["id"] for job in listed] == [body["id"]]
    # One callback, the batch's, when its last part is put together (none for the parts).
    wait_for(lambda: receiver.deliveries, 30, "the batch's callback")
    time.sleep(0.5)
    assert len(receiver.deliveries) == 1
    path, _, sent = receiver.deliveries[0]
    notice = json.loads(sent)["job"]
    assert (path, notice["id"], notice["status"]) == ("/batch", body["id"], "succeeded")


def _submit_many(
    client: FlaskClient, photos: list[bytes], painting: bytes, headers: dict[str, str],
    callback: str,
) -> dict[str, Any]:  # fmt: skip
    from werkzeug.datastructures import FileStorage, MultiDict
    from werkzeug.test import encode_multipart

    data = MultiDict(
        {"backbone": "vgg19-random", "size": str(SIZE), "iterations": str(ITERATIONS), "seed": "1",
         "callback_url": callback}
    )  # fmt: skip
    for index, photo in enumerate(photos):
        data.add("content", FileStorage(io.BytesIO(photo), filename=f"photo{index}.png"))
    data.add("style", FileStorage(io.BytesIO(painting), filename="painting.png"))
    boundary, body = encode_multipart(data)
    response = client.post(
        "/api/jobs", data=body, headers=headers,
        content_type=f"multipart/form-data; boundary={boundary}",
    )  # fmt: skip
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def test_a_video_keeps_its_frames_rate_and_sound_and_flickers_less(
    service: tuple[Settings, FlaskClient], sample_images: Path
) -> None:
    _, client = service
    photo = Image.open(sample_images / "content" / "second.jpg")
    clip = pan_clip(photo, frames=FRAMES, size=CLIP_SIZE, fps=FPS, step=2, audio=True)
    painting = png_bytes(sample_images / "style" / "starry_night.jpg")
    response = submit(client, clip, painting, content_name="clip.mp4", iterations=ITERATIONS,
                      seed=3, size=SIZE)  # fmt: skip
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["kind"] == "video" and body["parts"]["total"] == 2
    firsts = [item["frames"] for item in body["parts"]["items"]]
    assert firsts == [{"first": 0, "start": 0, "stop": 6}, {"first": 4, "start": 6, "stop": 10}]
    done = wait_status(client, body["id"], {"succeeded", "failed", "canceled"}, timeout=300)
    assert done["status"] == "succeeded", done
    result = client.get(done["links"]["result"])
    assert result.status_code == 200 and result.mimetype == "video/mp4"
    frames, rate, audio = video_info(result.data)
    assert (frames, rate, audio) == (FRAMES, Fraction(FPS), True)
    # The two runs ran at once, one on each worker.
    parts = [client.get(item["url"]).get_json() for item in done["parts"]["items"]]
    assert {part["worker"] for part in parts} == {"w0", "w1"}
    # Each run's loss points, every iteration of every frame, in order.
    for item in done["parts"]["items"]:
        points = client.get(f"{item['url']}/losses?limit=1000").get_json()["points"]
        assert [p["iteration"] for p in points] == list(range(1, item["total"] + 1))
        assert any(p["temporal"] > 0 for p in points)

    # The same frames styled one by one, with the same options, through the same codec.
    sources = decode_frames(clip)
    steady = decode_frames(result.data)
    size = steady[0].size
    alone = [
        stylize(content=frame, styles=[Image.open(io.BytesIO(painting))], size=SIZE,
                iterations=ITERATIONS, seed=3, backbone="vgg19-random").image
        for frame in sources
    ]  # fmt: skip
    alone = decode_frames(encode_mp4(alone, Fraction(FPS)))
    small = [as_array(frame.resize(size)) for frame in sources]
    flicker_alone = warping_error([as_array(f) for f in alone], small)
    flicker_steady = warping_error([as_array(f) for f in steady], small)
    print(f"warping error: {flicker_steady:.3g} steady, {flicker_alone:.3g} frame by frame")
    assert flicker_steady < 0.5 * flicker_alone, (flicker_steady, flicker_alone)


def test_a_worker_killed_mid_video_loses_no_frame_and_no_loss_point(
    service: tuple[Settings, FlaskClient], sample_images: Path, tmp_path: Path
) -> None:
    settings, client = service
    workers = client.application.config["WORKERS"]
    photo = Image.open(sample_images / "content" / "photo.jpg")
    clip = pan_clip(photo, frames=FRAMES, size=CLIP_SIZE, fps=FPS, step=2)
    painting = png_bytes(sample_images / "style" / "starry_night.jpg")
    iterations = 40  # a frame lasts long enough to be killed in the middle of a run
    body = submit(client, clip, painting, content_name="clip.mp4", iterations=iterations,
                  seed=5, size=SIZE).get_json()  # fmt: skip
    first = body["parts"]["items"][0]["url"]

    def two_frames_in() -> dict[str, Any] | None:
        part = client.get(first).get_json()
        # Past its second frame, in its third: frames stored, points written after them.
        done = iterations + iterations // 2
        return (
            part
            if part["status"] == "running" and part["progress"]["iteration"] > done + 5
            else None
        )

    part = wait_for(two_frames_in, 120, "the first run's third frame", every=0.05)
    victim = next(w for w in workers if w.name == part["worker"])
    assert victim.process is not None
    victim.process.kill()  # SIGKILL: no cleanup
    victim.process.wait()
    spare = WorkerProcess(settings, "w2", tmp_path / "w2.log")
    spare.start()
    workers.append(spare)
    done = wait_status(client, body["id"], {"succeeded", "failed", "canceled"}, timeout=300)
    assert done["status"] == "succeeded", done
    resumed = client.get(first).get_json()
    assert resumed["attempts"] == 2
    # It went on after its stored frames: the third frame's start, not the first's.
    assert resumed["runs"][1]["resumed_from_iteration"] == iterations + iterations // 2
    for item in done["parts"]["items"]:
        points = client.get(f"{item['url']}/losses?limit=1000").get_json()["points"]
        assert [p["iteration"] for p in points] == list(range(1, item["total"] + 1))
    frames, rate, _ = video_info(client.get(done["links"]["result"]).data)
    assert (frames, rate) == (FRAMES, Fraction(FPS))
