"""The server's settings: one frozen dataclass, the single source of every serve default."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from socialrec.serving import signing
from socialrec.serving.bundle import BundleError
from socialrec.serving.engine import EngineConfig
from socialrec.serving.fresh import FoldInConfig
from socialrec.serving.schema import MAX_ID_LEN

POINTER = "CURRENT"  # a bundle root may hold a pointer file naming the live bundle directory


@dataclass(frozen=True)
class ServerConfig:
    bundle: str  # a bundle directory, or a bundle root holding a CURRENT pointer
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "socialrec"  # Redis key prefix (several deployments can share a Redis)
    redis_client: str = "resp"  # the request path's Redis client: resp | redis-py
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    # Durability of acknowledged writes: > 0 acknowledges a write only after WAIT confirms this
    # many replicas of its primary have it (else UNAVAILABLE, retry-safe with the request_id).
    ack_replicas: int = 0
    ack_timeout_ms: int = 500  # how long a write waits for those replicas
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1  # processes sharing the port (SO_REUSEPORT)
    metrics_port: int | None = None  # Prometheus /metrics on this port (None: off)
    max_k: int = 500  # largest k a request may ask for
    # Longest user/item id accepted, in characters: at most schema.MAX_ID_LEN (the store's
    # own limit, which offline loads and the Redis keys share).
    max_id_len: int = MAX_ID_LEN
    max_concurrent_rpcs: int = 256  # per worker; beyond it calls get RESOURCE_EXHAUSTED
    # Largest request message accepted, in bytes (gRPC answers RESOURCE_EXHAUSTED beyond it,
    # before parsing): room for 1,000 exclude ids of 250 bytes; it bounds what one in-flight
    # call can hold (docs/operations.md "Memory").
    max_request_bytes: int = 256 << 10
    # Streams (health Watch, reflection) open at once per worker; beyond it RESOURCE_EXHAUSTED.
    # Each holds a gRPC call slot while open: uncapped, idle ones could lock every RPC out.
    max_open_streams: int = 32
    write_token: str | None = None  # default: $SOCIALREC_WRITE_TOKEN or token_file
    token_file: str | None = None
    admin_token: str | None = None  # RemoveItem/RestoreItem; default $SOCIALREC_ADMIN_TOKEN
    admin_token_file: str | None = None
    max_exclude: int = 1000  # exclude_ids a request may carry
    tls_cert: str | None = None
    tls_key: str | None = None
    watch_interval_s: float = 2.0  # how often the CURRENT pointer is checked for a new bundle
    # Ed25519 public key (PEM) bundles must be signed with; default $SOCIALREC_BUNDLE_PUBLIC_KEY.
    # None: bundles are not checked for a signature (a warning at start).
    bundle_key: str | None = None
    history_cap: int = 256  # history items kept per user in Redis
    # Exact result cache (socialrec.serving.cache): MiB it may hold per worker; 0 turns it off.
    result_cache_mb: int = 64
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Dynamic batching (docs/design.md "Dynamic batching"): most requests per engine batch
    # (1: off) and how long a queued request may wait for others still reading features.
    batch_max: int = 8
    batch_wait_us: int = 0
    # Each worker's asyncio event loop: "uvloop" (libuv, in the serving install) or "asyncio"
    # (the standard library's); docs/design.md "Performance rules".
    event_loop: str = "uvloop"
    # Fresh items (docs/design.md "Fresh items: serving"): on when the bundle has a prior.
    fresh_items: bool = True
    fresh_poll_s: float = 0.25  # how often a worker polls the fresh-item registry's version
    fresh: FoldInConfig | None = None  # None: the settings the bundle carries (manifest fresh)
    # Set by the supervisor: where workers record the last bundle they loaded, so a worker
    # started while the pointer is bad serves that one instead of nothing.
    last_good_file: str | None = None

    def __post_init__(self) -> None:
        if not 1 << 10 <= self.max_request_bytes <= 64 << 20:  # gRPC reads -1 as "no limit"
            raise ValueError(
                f"max_request_bytes must be between 1024 and {64 << 20}, got {self.max_request_bytes}"
            )
        if not 1 <= self.max_id_len <= MAX_ID_LEN:
            raise ValueError(
                f"max_id_len must be between 1 and {MAX_ID_LEN}, got {self.max_id_len}"
            )


def resolve_bundle(path: str | Path) -> Path:
    """The bundle directory to serve: ``path`` itself, or, when ``path`` holds a CURRENT
    pointer, the directory it names inside ``path``.

    BundleError for a pointer that is unreadable, not UTF-8, empty, holds control
    characters, or names anything outside the bundle root (``..``, an absolute path elsewhere,
    a symlink leading out).
    """
    root = Path(path)
    pointer = root / POINTER
    if not pointer.is_file():
        return root.resolve()
    try:
        raw = pointer.read_bytes()[:4097]
        name = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{pointer}: unreadable pointer ({e})") from None
    if not name or len(raw) > 4096 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BundleError(f"{pointer}: pointer must be one line naming a bundle directory")
    real_root = root.resolve()
    target = (real_root / name).resolve()
    if target == real_root or real_root not in target.parents:
        raise BundleError(f"{pointer}: names {name!r}, which is outside the bundle root")
    return target


def bundle_key(cfg: ServerConfig) -> Ed25519PublicKey | None:
    """The public key bundles must be signed with (config, else $SOCIALREC_BUNDLE_PUBLIC_KEY)."""
    path = cfg.bundle_key or os.environ.get(signing.PUBLIC_KEY_ENV)
    return signing.load_public_key(path) if path else None


def _token(value: str | None, file: str | None, env: str) -> str | None:
    if value:
        return value
    if file:
        return Path(file).read_text().strip() or None
    return os.environ.get(env) or None


def load_token(cfg: ServerConfig) -> str | None:
    """The write token: the config's, else the token file's, else $SOCIALREC_WRITE_TOKEN."""
    return _token(cfg.write_token, cfg.token_file, "SOCIALREC_WRITE_TOKEN")


def load_admin_token(cfg: ServerConfig) -> str | None:
    """The admin token (takedowns): config, else file, else $SOCIALREC_ADMIN_TOKEN."""
    return _token(cfg.admin_token, cfg.admin_token_file, "SOCIALREC_ADMIN_TOKEN")
