"""Settings read from ``STYLEQUEUE_*`` environment variables, with embedded defaults.

Every process (command line, web, worker) builds its settings the same way, so one set of
variables configures the whole service. The defaults run everything on one machine: a
SQLite file and files under ``./var``.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.errors import OptionError

PREFIX = "STYLEQUEUE_"
#: ``batch_max_size`` when it is 0, by the torch device's type (others: the CPU's).
BATCH_MAX_SIZE_BY_DEVICE = {"cpu": 256, "cuda": 128}


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(raw: str) -> list[IPNetwork]:
    """Comma-separated CIDR networks (a bare address: just itself)."""
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip()
    ]


def parse_address(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP (an IPv4-mapped IPv6 one as IPv4, a zone dropped); None if it
    is not one."""
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_in(address: str | None, networks: list[IPNetwork]) -> bool:
    """Whether ``address`` lies in one of ``networks``."""
    ip = parse_address(address)
    return ip is not None and any(ip in network for network in networks)


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(raw)


def preview_queue_of(queue: str) -> str:
    """The preview workers' queue beside the jobs' ``queue``."""
    return f"{queue}.preview"


def setting(default: Any, doc: str = "", *, same_as: str = "") -> Any:
    """A field of :class:`Settings`: its default and what it does, for docs/configuration.md
    (:func:`settings_reference`); ``same_as``: another field's text covers this one too."""
    return field(default=default, metadata={"doc": doc, "same_as": same_as})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The service's settings, each a ``STYLEQUEUE_<NAME>`` variable (:meth:`from_env`)."""

    database_url: str = setting(
        "sqlite:///var/stylequeue.db", "SQLAlchemy URL of the job database."
    )
    database_pool_size: int = setting(
        16,
        "Database connections the web keeps open per process (SQLAlchemy's ``pool_size``): at "
        "least its threads per process (gunicorn.conf.py: 16). With fewer, connections beyond the "
        "pool are opened and closed again per request under load (on PostgreSQL, a server process "
        "each time).",
    )
    event_streams: int = setting(
        8,
        "Event streams (``/api/jobs/<id>/events``, one per open job page) one web process serves "
        "at once. Under gunicorn's gevent workers (gunicorn.conf.py) a stream is a greenlet and "
        "gunicorn.conf.py makes this 5000 unless it is set. On a threaded server (``stylequeue "
        "web``, or gunicorn's gthread) each holds a thread for as long as it lasts, so this stays "
        "below the threads: the rest answer the status polls. A stream beyond it is refused at "
        "once (503 ``streams_busy``) and the page, like ``stylequeue submit --wait``, follows the "
        "job by polling instead. 0: no streams.",
    )
    event_streams_per_client: int = setting(
        2,
        "Of those, the most one client (token, session or address) holds at once: one client "
        "cannot take them all. Beyond it, 429 and the page polls.",
    )
    stream_check_seconds: float = setting(
        2.0,
        "How often each web process reads the status and iteration of the jobs its streams watch "
        "(one query for all of them), to catch what their live feeds missed: a publish lost while "
        "Redis was away, a status the reconciler wrote (web/feeds.py).",
    )
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "The Celery broker, and where workers publish their heartbeats and cancel flags.",
    )
    data_dir: Path = setting(
        Path("var"),
        "Where local files live: the default file store (``data_dir/files``), the session key. "
        "With several machines, use ``storage_url`` instead.",
    )
    storage_url: str = setting(
        "",
        "Where job files live (inputs, checkpoints, previews, results): empty for "
        "``data_dir/files``, a folder path, or ``s3://bucket/prefix`` for S3-compatible object "
        "storage (credentials from the usual AWS variables), which every machine can reach.",
    )
    s3_endpoint_url: str = setting(
        "", "The S3 endpoint (MinIO, Ceph, moto, ...); empty for AWS. And its region."
    )
    s3_region: str = setting("us-east-1", same_as="s3_endpoint_url")
    max_image_bytes: int = setting(20 * 1024 * 1024, "Largest accepted image file, in bytes.")
    max_image_pixels: int = setting(
        40_000_000, "Largest accepted image, in pixels (width × height), checked before decoding."
    )
    decode_concurrency: int = setting(
        2,
        "Uploads one web process decodes at once to check them (each holds up to "
        "``max_image_pixels`` × 4 bytes while it lasts; no decoded image is kept). The others wait "
        "their turn.",
    )
    upload_idle_seconds: float = setting(
        10.0,
        "An upload that sends nothing for this long is dropped (408); with gunicorn or "
        "``stylequeue web``, which give the connection's socket (0: no idle limit).",
    )
    upload_seconds: float = setting(
        120.0, "The most a whole upload (the body of ``POST /api/jobs``) may take (408 past it)."
    )
    uploads_per_client: int = setting(
        8,
        "Uploads one client (token, else address) may have in flight in a web process (429 "
        "beyond).",
    )
    upload_memory_bytes: int = setting(
        1024 * 1024,
        "Bytes of each file part an upload holds in memory; the rest waits in a temporary file.",
    )
    submissions_at_once: int = setting(
        4,
        "Complete submissions a web process reads into memory and checks at once (each up to its "
        "body limit); the others wait, their parts in temporary files.",
    )
    max_size: int = setting(2048, "Largest output long side a job may ask for, in pixels.")
    max_iterations: int = setting(5000, "Most iterations a job may ask for.")
    max_styles: int = setting(8, "Most style images (uploads and presets together) in one job.")
    max_batch_photos: int = setting(16, "Most content photos in one batch job.")
    max_video_frames: int = setting(
        240, "Most frames of a video job, counted from the container's packets before decoding."
    )
    max_video_seconds: float = setting(30.0, "Longest video a job may bring, in seconds.")
    max_job_work: int = setting(
        10_000_000_000,
        "Most work one batch or video job may ask for: output pixels × iterations over all its "
        "pictures or frames (a 240-frame video at 512×288 and the defaults is about 5.4e9).",
    )
    video_run_frames: int = setting(
        12,
        "Frames in each part of a video job: the parts run on as many workers at once, each "
        "frame after a part's first starting from the one before (Ruder et al.).",
    )
    video_seam_frames: int = setting(
        2,
        "Frames each video part but the first also makes before its own, blended with the "
        "previous part's at the seam; 0: cut straight.",
    )
    rate_limit_per_minute: int = setting(
        600,
        "Requests per minute one client (address, or token when tokens come) may make to the API, "
        "and job submissions per minute; 0 turns a limit off.",
    )
    submit_limit_per_minute: int = setting(30, same_as="rate_limit_per_minute")
    max_queued_per_client: int = setting(20, "Jobs one client may have queued at once.")
    loss_flush_seconds: float = setting(
        0.5,
        "Loss points are written at least this often (seconds), never one commit per iteration.",
    )
    preview_every: int = setting(
        10, "A job saves a preview every N iterations and a checkpoint every M."
    )
    checkpoint_every: int = setting(50, same_as="preview_every")
    soft_time_limit: float = setting(
        6 * 3600.0,
        "Per attempt: past the soft limit a job stops at its next iteration and fails with "
        "``time_limit``; past the hard limit (an iteration that never ends) the worker marks it "
        "failed and exits, to be restarted. The broker's visibility timeout is above both.",
    )
    hard_time_limit: float = setting(6 * 3600.0 + 600.0, same_as="soft_time_limit")
    job_ttl_seconds: float = setting(
        7 * 24 * 3600.0,
        "A finished job's files (inputs no other job uses, result, preview, checkpoint) are "
        "deleted this long after it finished; the job then says ``expired``. 0: never.",
    )
    queue: str = setting("stylequeue", "Name of the queue jobs are sent to.")
    fast_previews: bool = setting(
        True,
        "Send each optimization job to the preview workers too, for a feed-forward picture shown "
        "before its first iteration.",
    )
    preview_threads: int = setting(1, "onnxruntime threads per preview worker process.")
    lease_seconds: float = setting(
        30.0,
        "A running job's lease lasts this long unless its worker renews it (every third of it); a "
        "worker killed mid-job loses its jobs to others this many seconds later.",
    )
    heartbeat_seconds: float = setting(
        15.0, "A worker's heartbeat in Redis lives this long; it is refreshed every third of it."
    )
    reconcile_seconds: float = setting(
        10.0, "How often a worker looks for jobs to re-enqueue (lost messages, expired leases)."
    )
    max_attempts: int = setting(
        3, "A job that has been started this many times without finishing fails."
    )
    offline: bool = setting(
        False,
        "Never download weights. ``stylequeue serve`` and ``stylequeue worker`` make the default "
        "backbone's weights ready at start: converted from the installed package that ships them "
        "(no download), else fetched, unless this is set. Where neither gives them, jobs that name "
        "no backbone use the offline backbone ``vgg19-random``.",
    )
    backbones: str = setting(
        "",
        "The backbones a worker offers in its heartbeat, comma-separated (``vgg16-caffe,vgg19``); "
        "empty: every backbone whose weights it has. The form and the API choose a job's default "
        "backbone from what the live workers offer, and refuse one that none offers.",
    )
    device: str = setting(
        "auto", "The torch device a worker runs jobs on (``auto``: cuda, then mps, then cpu)."
    )
    cuda_graphs: bool = setting(
        True,
        "On CUDA the engine replays captured CUDA graphs instead of launching each kernel, so that "
        "the CPU's kernel launches do not set the time of a step (bench/gpu.py, whole runs with "
        "graphs on and off); false runs every pass eagerly, for a GPU or driver where a capture "
        "fails.",
    )
    batch_jobs: int = setting(
        4,
        "The most jobs a worker runs as one batch through the backbone: the job it starts, and "
        "queued ones it can run with it (the same batch key: device, backbone, pooling, precision, "
        "layers, iterations, pyramid and image shape). 1 turns batching off.",
    )
    batch_max_size: int = setting(
        0,
        "Only jobs whose size (long side, px) is at most this batch; larger ones run alone. 0: by "
        "the worker's device, up to the largest size where batches of 4 raise the throughput "
        "(bench/batching.py on a CPU, bench/gpu.py on a GPU): 256 px on a CPU, 128 px on a GPU, "
        "where the engine's CUDA graphs leave a lone image little idle time for a batch to fill.",
    )
    worker_name: str = setting(
        "", "A worker's name in heartbeats and in the jobs it runs (default: host and pid)."
    )
    host_name: str = setting(
        "", "The machine's name in heartbeats and job runs (default: the host name)."
    )
    worker_memory_gb: float = setting(
        0.0,
        "Memory (GiB) a worker offers jobs; 0: measured (free GPU memory, or available RAM for a "
        "CPU worker). Jobs are routed to workers with enough (shared/routing.py).",
    )
    log_format: str = setting(
        "text", "``text`` or ``json`` (one object per line, with the job id where there is one)."
    )
    require_token: bool = setting(
        False,
        "With tokens required, every API call but the public ones (OpenAPI document, presets, "
        "health) needs ``Authorization: Bearer <token>`` (``stylequeue token create``) or the web "
        "form's session; a token sees only its own jobs, an admin all.",
    )
    form_sessions: bool = setting(
        True,
        "Whether the web form's browser sessions act as tokens (off: with tokens required, only "
        "token holders can use the API; the form then cannot submit).",
    )
    open_form_sessions: bool = setting(
        False,
        "With tokens required, let whoever loads the form submit through its session, as in open "
        "mode. Off (the default), the form first asks for a token, and the browser's session then "
        "acts for that token's holder until the token is revoked or it signs out.",
    )
    secure_cookies: bool = setting(
        False,
        "Send the session cookie only over HTTPS (its ``Secure`` flag): set it where the service "
        "is served by TLS, directly or behind a proxy.",
    )
    trusted_hosts: str = setting(
        "localhost,127.0.0.1",
        "Host names the web answers for (the ``Host`` header, comma-separated; a leading dot takes "
        "subdomains too; ``*`` or empty: any host): another is refused with 400, so that a page "
        "elsewhere cannot reach this service by rebinding its own name to this address. "
        "``stylequeue web --host`` adds the address it binds. An IPv6 literal cannot be listed "
        "(werkzeug compares hosts up to their first colon): give such a host a name.",
    )
    proxy_hops: int = setting(
        0,
        "Reverse proxies in front of the web that append ``X-Forwarded-For`` (and ``-Proto``, "
        "``-Host``): their count, trusted by werkzeug's ProxyFix to find the client's address for "
        "rate limits. 0: the connection's address is the client's.",
    )
    metrics_networks: str = setting(
        "127.0.0.0/8,::1/128",
        "Networks (CIDR, comma-separated) whose clients may read ``/metrics`` without a token; "
        "anyone else needs an admin token (Prometheus: ``authorization``).",
    )
    secret_key: str = setting(
        "",
        "Signs the web form's session cookie (and its CSRF token). Every web process must share "
        "it; empty: a random key kept in ``data_dir/secret_key``.",
    )
    webhook_hosts: str = setting(
        "",
        "Hosts (``host``: its ports 80 and 443, or ``host:port``; comma-separated) a job's "
        "``callback_url`` may point at; empty: callbacks are refused. Each delivery is signed with "
        "HMAC-SHA256 under a secret derived from ``webhook_secret`` per job owner and retried with "
        "exponential backoff.",
    )
    webhook_secret: str = setting("", same_as="webhook_hosts")
    webhook_networks: str = setting(
        "",
        "Networks (CIDR, comma-separated) a callback may reach though they are not public: by "
        "default only public addresses are called, never loopback, link-local, private, shared or "
        "reserved ones (a receiver inside your network needs its range here).",
    )
    webhook_retry_seconds: float = setting(5.0, same_as="webhook_networks")
    webhook_max_attempts: int = setting(8, same_as="webhook_networks")

    @property
    def preview_queue(self) -> str:
        """The light queue of the feed-forward network (Ghiasi et al. 2017), served by
        preview workers (``stylequeue preview-worker``: onnxruntime on a CPU, no torch):
        each job's instant preview and the ``mode=fast`` jobs."""
        return preview_queue_of(self.queue)

    def trusted_host_list(self) -> list[str] | None:
        """``trusted_hosts`` for Flask's ``TRUSTED_HOSTS``: None for any host (``*``)."""
        hosts = [host.strip() for host in self.trusted_hosts.split(",") if host.strip()]
        return None if "*" in hosts or not hosts else hosts

    def batch_size_limit(self, device: str) -> int:
        """The largest job (long side, px) that a worker on ``device`` runs in a batch."""
        if self.batch_max_size:
            return self.batch_max_size
        return BATCH_MAX_SIZE_BY_DEVICE.get(device.split(":")[0], BATCH_MAX_SIZE_BY_DEVICE["cpu"])

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``STYLEQUEUE_<FIELD>`` variables; ``overrides`` win over both."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for each in fields(cls):
            raw = environ.get(PREFIX + each.name.upper())
            if raw is None:
                continue
            kind = type(each.default)
            try:
                values[each.name] = parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                raise OptionError(
                    f"cannot read {raw!r} as {kind.__name__}", field=PREFIX + each.name.upper()
                ) from exc
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def environ(self) -> dict[str, str]:
        """These settings as ``STYLEQUEUE_*`` variables, for a child process."""
        return {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}


def settings_reference() -> list[str]:
    """The Markdown table of every setting: its variable, default and what it does, from the
    fields' metadata (docs/configuration.md is made from it; a test keeps them equal)."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    described = {f.name: f.metadata["doc"] for f in fields(Settings)}
    for each in fields(Settings):
        default = each.default
        shown = "(empty)" if default == "" else f"`{default}`"
        about = described[each.metadata["same_as"] or each.name].replace("|", "\\|")
        rows.append(f"| `{PREFIX}{each.name.upper()}` | {shown} | {about} |")
    return rows


def rewrite_marked(target: Path, marker: str, lines: list[str]) -> None:
    """Replace what stands between ``<!-- marker: begin -->`` and ``<!-- marker: end -->``
    in ``target`` with ``lines`` (the docs' generated tables)."""
    begin, end = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    head, rest = target.read_text().split(begin, 1)
    target.write_text(head + "\n".join([begin, *lines, end]) + rest.split(end, 1)[1])


if __name__ == "__main__":
    # python -m shared.config docs/configuration.md: rewrite the file's table.
    rewrite_marked(Path(sys.argv[1]), "settings", settings_reference())
