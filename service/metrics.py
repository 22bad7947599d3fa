"""Prometheus metrics, with the stable names of docs/api.md, in one registry per app.

A dedicated CollectorRegistry per app keeps tests that build many apps independent.
Labels are bounded: endpoints are route templates, models are loaded names (or "").
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series double /metrics and no dashboard reads them

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OPERATIONS = ("generate", "encode", "decode")
REJECT_REASONS = ("queue_full", "deadline", "client_gone", "draining", "out_of_memory")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # the standard process_* and python_* series that dashboards and alerts expect
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("taming_requests", "HTTP requests answered.",
                                ["endpoint", "model", "status"], registry=r)
        self.request_duration = Histogram(
            "taming_request_duration_seconds", "Time from request arrival to response.",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "taming_queue_wait_seconds", "Time a request waited before its batch ran.",
            ["operation", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "taming_batch_duration_seconds", "Time one batched forward took.",
            ["operation", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("taming_batch_size", "Images per batched forward.",
                                    ["operation", "model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("taming_queue_depth", "Images waiting in the queue.",
                                 ["operation", "model"], registry=r)
        self.in_flight = Gauge("taming_in_flight_requests",
                               "Inference requests being handled now.", registry=r)
        self.rejected = Counter("taming_rejected", "Requests refused or dropped, by reason.",
                                ["reason"], registry=r)
        self.images_generated = Counter("taming_images_generated", "Images sampled.",
                                        ["model"], registry=r)
        self.tokens_sampled = Counter("taming_tokens_sampled", "Grid tokens sampled.",
                                      ["model"], registry=r)
        self.oom_splits = Counter("taming_oom_splits", "Batches split after out-of-memory.",
                                  ["operation", "model"], registry=r)
        # the name predates the glossary (a slot is room for a guided image); dashboards read it
        self.slots_active = Gauge("taming_slots_active",
                                  "Images sampling now: in the lanes' rows, and canvases.",
                                  ["model"], registry=r)
        self.step_duration = Histogram(
            "taming_step_duration_seconds", "Time one generation step took, by padded size.",
            ["model", "size"], buckets=STEP_BUCKETS, registry=r)
        self.time_to_first_row = Histogram(
            "taming_time_to_first_row_seconds",
            "Time from a /generate request's arrival to its first complete token row.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("taming_model_info", "Loaded models (value 1).",
                                ["model", "digest", "device"], registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)

    def add_model(self, name: str, digest: str, device: str, operations=OPERATIONS) -> None:
        """Create the label sets of a loaded model so its series exist from the start."""
        self.model_info.labels(name, digest, device).set(1)
        for op in operations:
            self.queue_depth.labels(op, name).set(0)
            self.batch_size.labels(op, name)
            self.queue_wait.labels(op, name)
            self.batch_duration.labels(op, name)
        if "generate" in operations:
            self.slots_active.labels(name).set(0)
            self.time_to_first_row.labels(name)
            self.images_generated.labels(name)
            self.tokens_sampled.labels(name)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
