"""Server settings, read from environment variables prefixed `TAMING_` (plus `HOST` and `PORT`).

Every setting has a default that works for the shipped checkpoints on one CPU. List settings
(`TAMING_MODELS`, `TAMING_API_KEYS`, `TAMING_CORS_ORIGINS`) are comma-separated.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


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
        "torch intra-op threads of the model worker; 0: one less than the CPU cores (at least "
        "1), so the event loop keeps a core (on 2 cores, 2 threads made /generate 3x slower)."))
    device_workers: int = Field(2, ge=1, description=(
        "Model threads, each computing a batch of its own (on CPU, with torch_threads each). "
        "/generate batches always run alone (one KV cache). On 2 cores at 64 clients, two "
        "threads at model_thread_nice 10 served /encode at 1,341-1,427 images/s against "
        "1,096-1,149 for one thread; without the nice, two fought the event loop for the "
        "second core and gained nothing (1,172-1,193; BENCHMARKS.md)."))
    model_thread_nice: int = Field(10, ge=0, le=19, description=(
        "Added to the niceness of the model threads (Linux, per thread), so the event loop "
        "gets a core first whenever it has work; 0 leaves them as they are."))
    warmup: bool = Field(True, description="Run every model once before /readyz turns 200.")
    torchscript: bool = Field(True, description=(
        "Run /encode and /decode (and /generate's final decode) through frozen TorchScript "
        "graphs of the VQ-VAE: same outputs, and the model thread no longer queues for the "
        "GIL after every op while the event loop is busy. Off: eager PyTorch."))
    switch_interval_ms: float = Field(0.2, gt=0, le=100, description=(
        "Python's thread switch interval (sys.setswitchinterval; Python's default is 5 ms). "
        "Shorter hands the GIL back to the model thread sooner when the event loop is busy."))
    opentelemetry: bool = Field(False, description=(
        "FastAPI's native OpenTelemetry (traces, metrics and logs to the globally configured "
        "providers). Off by default: /metrics serves Prometheus, and the provider lookup "
        "costs every request."))
    direct_routes: bool = Field(True, description=(
        "Serve POST /generate, /encode and /decode from the ASGI layer, past FastAPI's "
        "routing and dependency solving (same handlers, same answers, less CPU per request)."))

    # batching engine
    max_batch_size: int = Field(64, ge=1, description=(
        "Images per batched forward; 1 turns batching off."))
    max_wait_ms: float = Field(2.0, ge=0, description=(
        "How long a batch waits for company after its first request arrived."))
    eager_batching: bool = Field(True, description=(
        "Close a filling batch early when no other inference request is being received (a "
        "lone client then never waits max_wait_ms). Off: a batch always waits max_wait_ms."))
    max_queue: int = Field(512, ge=1, description=(
        "Images waiting in all queues together; past it requests get 503 with Retry-After."))
    request_timeout_s: float = Field(30.0, gt=0, description=(
        "Deadline from arrival; a request still queued when it passes gets 504."))
    retry_after_s: int = Field(1, ge=0, description="Retry-After value sent with 503 answers.")

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

    # operations
    log_level: str = Field("info", description="Log level of the server's own logs.")
    shutdown_grace_s: float = Field(0.0, ge=0, description=(
        "After SIGTERM, keep accepting connections this long (answering /readyz and new "
        "inference requests with 503) before closing the port; queued work drains meanwhile."))
    drain_timeout_s: float = Field(60.0, gt=0, description=(
        "Longest wait for in-flight and queued requests at shutdown."))
    fault_oom_above: int = Field(0, ge=0, description=(
        "TEST ONLY: raise a fake out-of-memory error for batches larger than this (0 = off)."))

    def worker_threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) - 1)

    @field_validator("models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()
