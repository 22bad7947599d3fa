"""When a filling batch closes: the policy the collector asks, kept apart from its mechanics."""

from __future__ import annotations

from dataclasses import dataclass

# A batch that runs alone waits this share of its recent run time for company (see patience)
LONG_BATCH_PATIENCE = 0.1


@dataclass
class BatchPolicy:
    max_batch_size: int
    max_wait: float  # seconds after the first job's arrival
    eager: bool = True  # close early for a lone client

    def patience(self, runs_alone: bool, recent_run_s: float) -> float:
        """How long a batch waits for company after its first job. A batch that runs alone
        costs about the same nearly empty as full, so closing it while answered clients are
        still coming back would make them wait a whole run: it waits a share of a run."""
        if not runs_alone:
            return self.max_wait
        return max(self.max_wait, LONG_BATCH_PATIENCE * recent_run_s)

    def close_early(self, arriving: int, device_busy: bool, last_batch_jobs: int) -> bool:
        """A lone client never waits: nothing on its way, the device idle, and the last batch
        a single request. Under load, requests still in socket buffers count as nothing on
        its way, so closing on that alone would make batches of two or three."""
        return self.eager and arriving <= 0 and not device_busy and last_batch_jobs <= 1
