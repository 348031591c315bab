"""The server's settings: one frozen dataclass, the single source of every serve default."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from socialrec.serving.engine import EngineConfig

POINTER = "CURRENT"  # a bundle root may hold a pointer file naming the live bundle directory


@dataclass(frozen=True)
class ServerConfig:
    bundle: str  # a bundle directory, or a bundle root holding a CURRENT pointer
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "socialrec"  # Redis key prefix (several deployments can share a Redis)
    redis_client: str = "resp"  # the request path's Redis client: resp | redis-py
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1  # processes sharing the port (SO_REUSEPORT)
    metrics_port: int | None = None  # Prometheus /metrics on this port (None: off)
    max_k: int = 500  # largest k a request may ask for
    max_id_len: int = 256  # longest user/item id accepted, in characters
    max_concurrent_rpcs: int = 256  # per worker; beyond it calls get RESOURCE_EXHAUSTED
    write_token: str | None = None  # default: $SOCIALREC_WRITE_TOKEN or token_file
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    watch_interval_s: float = 2.0  # how often the CURRENT pointer is checked for a new bundle
    history_cap: int = 256  # history items kept per user in Redis
    # Exact result cache (socialrec.serving.cache): entries held per worker; 0 turns it off.
    result_cache_budget: int = 1_000_000
    engine: EngineConfig = field(default_factory=EngineConfig)


def resolve_bundle(path: str | Path) -> Path:
    """A bundle directory, or a root whose CURRENT file names the live bundle (relative to it)."""
    p = Path(path)
    pointer = p / POINTER
    if pointer.is_file():
        target = pointer.read_text().strip()
        return (p / target).resolve() if not os.path.isabs(target) else Path(target)
    return p.resolve()


def load_token(cfg: ServerConfig) -> str | None:
    """The write token: the config's, else the token file's, else $SOCIALREC_WRITE_TOKEN."""
    if cfg.write_token:
        return cfg.write_token
    if cfg.token_file:
        return Path(cfg.token_file).read_text().strip() or None
    return os.environ.get("SOCIALREC_WRITE_TOKEN") or None
