"""Server settings, read from environment variables prefixed `TAMING_` (plus `HOST` and `PORT`).

Every setting has a default that works for the shipped checkpoints on one CPU. List settings
(`TAMING_MODELS`, `TAMING_API_KEYS`, `TAMING_CORS_ORIGINS`) are comma-separated.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]

# ---- how many CPU cores this process may really use ---------------------------------------
# Affinity and the cgroup quota, not the host: a pod limited to 2 CPUs on a 64-core node sees
# 64 in os.cpu_count(); sizing threads from that oversubscribes the quota and the kernel
# throttles the whole process.
CGROUP = Path("/sys/fs/cgroup")


def _quota_v2(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cpu_budget(root: Path = CGROUP) -> int:
    """Cores usable now: the affinity mask, capped by a cgroup v2 or v1 CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _quota_v2(root)
    if quota is None:
        quota = _quota_v1(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAMING_", extra="ignore")

    # where and what to serve
    host: str = Field("0.0.0.0", validation_alias=AliasChoices("TAMING_HOST", "HOST"),
                      description="Interface to listen on (HOST or TAMING_HOST).")
    port: int = Field(8000, ge=0, le=65535, validation_alias=AliasChoices("TAMING_PORT", "PORT"),
                      description="TCP port (PORT or TAMING_PORT).")
    checkpoint_dir: Path = Field(Path("checkpoints"),
                                 description="Folder whose sub-folders are model checkpoints.")
    models: CommaList = Field(default_factory=list, description=(
        "Checkpoint folders to serve: names under checkpoint_dir or paths. Empty: every "
        "sub-folder of checkpoint_dir that holds a config.json."))
    default_model: str = Field("mnist", description=(
        "Model used when a request names none (the first loaded one if this is not loaded)."))
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda or cuda:N.")
    torch_threads: int = Field(0, ge=0, description=(
        "CPU cores the models may use; 0: the process's CPU budget (its cgroup quota or "
        "affinity). On CPU each core gets a generation lane and a tokenizer thread of its own."))
    quantize: CommaList = Field(default_factory=list, description=(
        "Transformers served with int8 weights on CPU, as NAME=int8 entries (`*=int8`: "
        "every model); on CUDA they run as loaded. Cuts a large model's step by reading a "
        "quarter of the bytes (BENCHMARKS.md, \"int8\")."))
    compile: bool = Field(True, description=(
        "torch.compile the generation step at each padded size during start-up (CUDA graphs "
        "on GPU), before /readyz turns 200. Off: the eager step, a faster start."))

    # batching
    generate_slots: int = Field(64, ge=1, description=(
        "Guided images sampling at once per transformer: the static KV cache holds twice as "
        "many rows, a guided image takes two, an unguided one one. Requests join and leave "
        "at every sampling step."))
    max_batch_size: int = Field(64, ge=1, description=(
        "Images per /encode, /decode or wide-grid /generate batch; 1 turns batching off."))
    max_wait_ms: float = Field(2.0, ge=0, description=(
        "How long such a batch waits for company after its first request arrived."))
    max_queue: int = Field(512, ge=1, description=(
        "Images waiting in all queues together; past it requests get 503 with Retry-After."))
    request_timeout_s: float = Field(30.0, gt=0, description=(
        "Deadline from arrival; a request still queued when it passes gets 504."))

    # limits
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description=(
        "Largest request body (Content-Length and streamed bytes); 413 past it."))
    max_image_pixels: int = Field(2048 * 2048, ge=1, description=(
        "Largest width*height of an uploaded image, read from its header; 413 past it."))
    max_images: int = Field(64, ge=1, description="Most images per /encode or /decode request.")
    max_grid: int = Field(32, ge=1, description=(
        "Largest rows and columns of a token grid for /generate and /decode."))

    # security
    api_keys: CommaList = Field(default_factory=list, description=(
        "Bearer tokens; when set, /generate /encode /decode /models need one."))
    protect_metrics: bool = Field(False, description="Also require an API key for /metrics.")
    cors_origins: CommaList = Field(default_factory=list, description=(
        "Origins allowed by CORS; empty (the default) sends no CORS headers."))
    header_timeout_s: float = Field(10.0, gt=0, description=(
        "A connection must deliver a complete request header this long after it opens (or "
        "after the first byte of its next request); past it the client gets 408 and the "
        "connection closes. Requests in flight are not affected."))
    body_timeout_s: float = Field(20.0, gt=0, description=(
        "A request's whole body must arrive this long after its header was complete; past "
        "it the client gets 408 and the connection closes. Other requests, in flight or on "
        "other connections, are not affected. The request deadline runs from the header too, "
        "so time spent sending the body is time taken from the work."))

    # operations
    log_level: str = Field("info", description="Log level of the server's own logs.")
    shutdown_grace_s: float = Field(0.0, ge=0, description=(
        "After SIGTERM, keep accepting connections this long (answering /readyz and new "
        "inference requests with 503) before closing the port; queued work drains meanwhile."))

    def cpu_budget(self) -> int:
        return self.torch_threads or cpu_budget()

    @field_validator("models", "api_keys", "cors_origins", "quantize", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()
