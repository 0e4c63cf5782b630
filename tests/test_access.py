"""Access: API tokens (own jobs only, admins see all), the web form's session-bound token
with its CSRF token, rate limits per token; and signed, retried, allow-listed webhooks.

Real parts: a redis-server of the test's own, SQLite, the Flask app, the ``stylequeue token``
command, and for webhooks a real worker process and a real HTTP receiver."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from shared import webhooks
from shared.config import Settings, parse_networks
from shared.errors import OptionError
from tests.conftest import REPO
from tests.service import (
    FAST_RECOVERY,
    Receiver,
    WorkerProcess,
    child_env,
    service_app,
    service_settings,
    wait_for,
)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    # Nobody consumes this queue: submitted jobs stay queued, which is all these tests need.
    return service_settings(tmp_path, redis_url, require_token=True)


def token_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stylequeue", "token", *args],
        cwd=REPO, env=child_env(settings), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def make_token(settings: Settings, name: str, *more: str) -> str:
    done = token_command(settings, "create", name, *more)
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert secret.startswith("sq_") and len(secret) > 40
    return secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def submit(client: FlaskClient, photo: Path, headers: dict[str, str]) -> Any:
    data = {
        "content": (io.BytesIO(photo.read_bytes()), "photo.jpg"),
        "style_preset": "starry-night",
        "backbone": "vgg19-random",
        "size": "64",
        "iterations": "2",
    }
    return client.post("/api/jobs", data=data, headers=headers, content_type="multipart/form-data")


def test_tokens_see_only_their_own_jobs_and_admins_see_all(
    settings: Settings, sample_images: Path
) -> None:
    photo = sample_images / "content" / "photo.jpg"
    alice, bob = make_token(settings, "alice"), make_token(settings, "bob")
    admin = make_token(settings, "ops", "--admin")
    duplicate = token_command(settings, "create", "alice")
    assert duplicate.returncode == 1 and "exists already" in duplicate.stderr
    assert "Traceback" not in duplicate.stderr

    with service_app(settings) as app:
        client = app.test_client()
        # Without a token: only the public endpoints answer.
        refused = client.get("/api/jobs")
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert refused.get_json()["error"]["code"] == "unauthorized"
        assert submit(client, photo, {}).status_code == 401
        for public in ("/api/openapi.json", "/api/presets", "/healthz"):
            assert client.get(public).status_code == 200, public
        for wrong in ({"Authorization": "Basic YWxpY2U6eA=="}, bearer("sq_not-a-token")):
            assert client.get("/api/jobs", headers=wrong).status_code == 401

        response = submit(client, photo, bearer(alice))
        assert response.status_code == 202, response.get_json()
        job = response.get_json()
        links = job["links"]
        assert client.get(links["self"], headers=bearer(alice)).status_code == 200
        assert client.get(links["self"], headers=bearer(admin)).status_code == 200
        # Bob cannot tell Alice's job from one that does not exist.
        for path in (links["self"], links["losses"], links["result"], links["events"]):
            hidden = client.get(path, headers=bearer(bob))
            assert hidden.status_code == 404, path
        assert client.post(links["cancel"], headers=bearer(bob)).status_code == 404

        def listed(secret: str) -> list[str]:
            page = client.get("/api/jobs", headers=bearer(secret)).get_json()
            return [entry["id"] for entry in page["jobs"]]

        assert listed(alice) == [job["id"]]
        assert listed(bob) == []
        assert listed(admin) == [job["id"]]
        # Keys are per owner: Bob's "k-1" is not Alice's, and leads to neither her job nor
        # a conflict with it.
        keyed = {"Idempotency-Key": "k-1"}
        first = submit(client, photo, bearer(alice) | keyed)
        assert first.status_code == 202
        bobs = submit(client, photo, bearer(bob) | keyed)
        assert bobs.status_code == 202 and bobs.get_json()["id"] != first.get_json()["id"]
        again = submit(client, photo, bearer(alice) | keyed)
        assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]

        # An admin cancels anyone's job; a revoked token stops working at once.
        assert client.post(links["cancel"], headers=bearer(admin)).status_code in (200, 202)
        listing = token_command(settings, "list")
        assert listing.returncode == 0 and "alice\tuser\tlive" in listing.stdout
        assert "ops\tadmin\tlive" in listing.stdout and "sq_" not in listing.stdout
        assert token_command(settings, "revoke", "alice").returncode == 0
        assert client.get(links["self"], headers=bearer(alice)).status_code == 401
        assert "alice\tuser\trevoked" in token_command(settings, "list").stdout


def csrf_token(client: FlaskClient) -> str:
    page = client.get("/").get_data(as_text=True)
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found, "the page carries no CSRF token"
    return found.group(1)


def sign_in(browser: FlaskClient, secret: str) -> Any:
    return browser.post("/sign-in", data={"csrf_token": csrf_token(browser), "token": secret})


def test_the_form_session_is_a_token_and_needs_its_csrf_token(
    settings: Settings, sample_images: Path
) -> None:
    photo = sample_images / "content" / "photo.jpg"
    alice, carol = make_token(settings, "alice"), make_token(settings, "carol")
    with service_app(settings) as app:
        browser = app.test_client()
        token = csrf_token(browser)
        cookie = browser.get_cookie("stylequeue_session")
        assert cookie is not None and cookie.http_only and cookie.same_site == "Lax"
        # Tokens required: whoever loads the form is asked for a token, and its session
        # alone submits nothing (before, any stranger's session could spend the GPUs).
        page = browser.get("/").get_data(as_text=True)
        assert 'id="sign-in"' in page and '<form id="job-form"' in page
        assert submit(browser, photo, {"X-CSRF-Token": token}).status_code == 401
        assert sign_in(browser, "sq_wrong").status_code == 401
        refused = browser.post("/sign-in", data={"csrf_token": "guess", "token": carol})
        assert refused.status_code == 403
        assert sign_in(browser, carol).status_code == 303
        assert "Signed in as <strong>carol</strong>" in browser.get("/").get_data(as_text=True)
        # The cookie alone (what another site can make a browser send) is not enough.
        forged = submit(browser, photo, {})
        assert forged.status_code == 403
        assert forged.get_json()["error"]["code"] == "forbidden"
        assert submit(browser, photo, {"X-CSRF-Token": "guess"}).status_code == 403
        response = submit(browser, photo, {"X-CSRF-Token": token})
        assert response.status_code == 202, response.get_json()
        job = response.get_json()
        assert browser.get(job["links"]["self"]).status_code == 200
        assert browser.get(job["links"]["page"]).status_code == 200
        assert app.test_client().get(job["links"]["self"], headers=bearer(carol)).status_code == 200
        # Another browser (another session) and another token do not see it.
        stranger = app.test_client()
        csrf_token(stranger)
        assert stranger.get(job["links"]["self"]).status_code == 401
        assert stranger.get(job["links"]["page"]).status_code == 404
        assert app.test_client().get(job["links"]["self"], headers=bearer(alice)).status_code == 404
        # The session id is signed: a tampered cookie is no session at all.
        tampered = app.test_client()
        tampered.set_cookie("stylequeue_session", cookie.value[:-4] + "AAAA")
        assert tampered.get(job["links"]["self"]).status_code == 401
        # Revoked, the token no longer speaks through the session; signed out, neither.
        assert token_command(settings, "revoke", "carol").returncode == 0
        assert submit(browser, photo, {"X-CSRF-Token": token}).status_code == 401
        assert 'id="sign-in"' in browser.get("/").get_data(as_text=True)
        sign_in(browser, alice)
        assert submit(browser, photo, {"X-CSRF-Token": token}).status_code == 202
        browser.post("/sign-out", data={"csrf_token": token})
        assert submit(browser, photo, {"X-CSRF-Token": token}).status_code == 401
    # The operator's opt-in: sessions of whoever loads the form, as in open mode.
    with service_app(dataclasses.replace(settings, open_form_sessions=True)) as app:
        browser = app.test_client()
        token = csrf_token(browser)
        assert 'id="sign-in"' not in browser.get("/").get_data(as_text=True)
        assert submit(browser, photo, {"X-CSRF-Token": token}).status_code == 202
    # With form sessions off, tokens required means token holders only.
    with service_app(dataclasses.replace(settings, form_sessions=False)) as app:
        browser = app.test_client()
        token = csrf_token(browser)
        assert submit(browser, photo, {"X-CSRF-Token": token}).status_code == 401


def test_rate_limits_are_per_token(settings: Settings) -> None:
    alice, bob = make_token(settings, "alice"), make_token(settings, "bob")
    limited = dataclasses.replace(settings, rate_limit_per_minute=3)
    with service_app(limited) as app:
        client = app.test_client()  # one address for both tokens
        codes = [client.get("/api/jobs", headers=bearer(alice)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert client.get("/api/jobs", headers=bearer(bob)).status_code == 200


def test_webhooks_are_signed_retried_with_backoff_and_allow_listed(
    tmp_path: Path, redis_url: str, sample_images: Path
) -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    secret = "webhook-secret"
    settings = service_settings(
        tmp_path, redis_url, **FAST_RECOVERY,
        webhook_hosts=f"127.0.0.1:{receiver.server_address[1]}", webhook_secret=secret,
        webhook_networks="127.0.0.0/8",
        webhook_retry_seconds=0.5, webhook_max_attempts=3,
    )  # fmt: skip
    receiver.answers = {"/flaky": [500, 200], "/broken": [302]}
    worker = WorkerProcess(settings, "hooks", tmp_path / "worker.log")
    worker.start()
    photo = sample_images / "content" / "photo.jpg"
    try:
        with service_app(settings) as app:
            client = app.test_client()

            def submit_with(callback: str) -> Any:
                data = {
                    "content": (io.BytesIO(photo.read_bytes()), "photo.jpg"),
                    "style_preset": "starry-night", "backbone": "vgg19-random",
                    "size": "32", "iterations": "3", "callback_url": callback,
                }  # fmt: skip
                return client.post("/api/jobs", data=data, content_type="multipart/form-data")

            for refused in ("http://127.0.0.1:1/elsewhere", "ftp://127.0.0.1/x",
                            receiver.url("/x").replace("http://", "http://user:pw@")):  # fmt: skip
                response = submit_with(refused)
                assert response.status_code == 422, refused
                assert response.get_json()["error"]["field"] == "callback_url"

            flaky = submit_with(receiver.url("/flaky")).get_json()
            broken = submit_with(receiver.url("/broken")).get_json()

            def callback(job: dict[str, Any]) -> dict[str, Any]:
                return client.get(job["links"]["self"]).get_json()["callback"]  # type: ignore[no-any-return]

            wait_for(lambda: callback(flaky)["delivered_at"], 120, "the flaky callback")
            wait_for(lambda: callback(broken)["next_attempt_at"] is None, 120, "giving up")
            assert callback(flaky)["attempts"] == 2
            gave_up = callback(broken)
            assert gave_up["attempts"] == 3 and gave_up["delivered_at"] is None
            assert gave_up["error"] == "HTTP 302"
    finally:
        worker.stop()
        receiver.shutdown()
        receiver.server_close()

    by_path: dict[str, list[tuple[dict[str, str], bytes]]] = {}
    for path, headers, body in receiver.deliveries:
        by_path.setdefault(path, []).append((headers, body))
    assert len(by_path["/flaky"]) == 2 and len(by_path["/broken"]) == 3
    assert set(by_path) == {"/flaky", "/broken"}  # the redirect was not followed
    # Backoff: retry n waits webhook_retry_seconds × 2^(n-1) after the attempt before it.
    first_gap, second_gap = (
        b - a
        for a, b in zip(receiver.times["/broken"][:-1], receiver.times["/broken"][1:], strict=True)
    )
    assert first_gap >= 0.45 and second_gap >= 0.95
    # Anonymous jobs' deliveries are signed with the secret derived for no owner, which no
    # token's receiver holds.
    signing = webhooks.owner_secret(secret, None)
    for headers, body in by_path["/flaky"] + by_path["/broken"]:
        assert webhooks.verify(signing, headers, body)
        assert not webhooks.verify(secret, headers, body)
        assert not webhooks.verify(webhooks.owner_secret(secret, "token:1"), headers, body)
        assert not webhooks.verify(secret, headers, body + b" ")
        event = json.loads(body)
        assert event["event"] == "job.finished" and event["job"]["status"] == "succeeded"
    assert json.loads(by_path["/flaky"][0][1])["job"]["id"] == flaky["id"]
    assert json.loads(by_path["/broken"][0][1])["job"]["id"] == broken["id"]


def test_callbacks_reach_only_listed_ports_and_public_addresses(tmp_path: Path) -> None:
    settings = service_settings(
        tmp_path, "redis://unused", webhook_secret="s", webhook_hosts="localhost,hooks.test:8443"
    )
    check = webhooks.check_callback_url
    assert check("https://localhost/done", settings) and check("http://localhost:80/", settings)
    assert check("https://hooks.test:8443/x", settings)
    for refused in ("http://localhost:22/", "https://localhost:6379/", "https://hooks.test/",
                    "http://elsewhere.test/"):  # fmt: skip
        with pytest.raises(OptionError):
            check(refused, settings)
    # Allowed by name, but it resolves to loopback: not called, and the submitter is told
    # why in general words only.
    with pytest.raises(webhooks.DeliveryFailed) as refused_address:
        webhooks.post("http://localhost/x", {"event": "job.finished"}, "k", settings)
    assert refused_address.value.public == "the receiver's address is not public"
    for address in ("10.0.0.1", "169.254.169.254", "192.168.1.1", "100.64.0.1", "::1",
                    "fe80::1", "::ffff:127.0.0.1", "0.0.0.0", "240.0.0.1"):  # fmt: skip
        assert not webhooks._address_allowed(address, [])
    assert webhooks._address_allowed("93.184.215.14", [])
    assert webhooks._address_allowed("127.0.0.1", parse_networks("127.0.0.0/8"))
    # IPv6 addresses that lead to a private IPv4 host, though ipaddress calls them global:
    # NAT64 (well-known and local-use prefixes), 6to4, IPv4-compatible; and the IPv4
    # dummy address.
    for address in ("64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",
                    "2002:7f00:1::", "2002:c0a8:101::1", "::127.0.0.1", "::10.0.0.1",
                    "192.0.0.8"):  # fmt: skip
        assert not webhooks._address_allowed(address, [])
    # The same forms of a public IPv4 address are public.
    for address in ("64:ff9b::5db8:d70e", "2002:5db8:d70e::1", "2606:2800:220:1::1"):
        assert webhooks._address_allowed(address, [])


def test_a_refused_connection_shows_the_submitter_no_details(tmp_path: Path) -> None:
    """What an unreachable port answered (an SSH banner, a refusal) stays in the log."""
    with socket.socket() as listener:  # a port that speaks no HTTP: it answers a banner
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def banner() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")

        threading.Thread(target=banner, daemon=True).start()
        settings = service_settings(
            tmp_path, "redis://unused", webhook_secret="s",
            webhook_hosts=f"127.0.0.1:{port}", webhook_networks="127.0.0.0/8",
        )  # fmt: skip
        with pytest.raises(webhooks.DeliveryFailed) as failed:
            webhooks.post(f"http://127.0.0.1:{port}/", {"event": "job.finished"}, "k", settings)
    assert failed.value.public == "the receiver could not be reached"
    assert "SSH" not in failed.value.public
