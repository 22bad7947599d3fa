"""When a filling batch closes (service.engine.batches), without the collector's machinery."""

from __future__ import annotations

from service.engine.batches import LONG_BATCH_PATIENCE, BatchPolicy


def test_pipelined_batches_wait_max_wait_whatever_their_run_time():
    p = BatchPolicy(max_batch_size=8, max_wait=0.002)
    assert p.patience(runs_alone=False, recent_run_s=0.0) == 0.002
    assert p.patience(runs_alone=False, recent_run_s=10.0) == 0.002


def test_a_batch_that_runs_alone_waits_a_share_of_its_recent_run():
    p = BatchPolicy(max_batch_size=8, max_wait=0.002)
    assert p.patience(runs_alone=True, recent_run_s=0.0) == 0.002  # nothing measured yet
    assert p.patience(runs_alone=True, recent_run_s=5.0) == LONG_BATCH_PATIENCE * 5.0
    assert 0 < LONG_BATCH_PATIENCE < 1


def test_a_lone_client_closes_early_only_when_nothing_else_is_going_on():
    p = BatchPolicy(max_batch_size=8, max_wait=1.0)
    assert p.close_early(arriving=0, device_busy=False, last_batch_jobs=1)
    assert not p.close_early(arriving=1, device_busy=False, last_batch_jobs=1)  # one is coming
    assert not p.close_early(arriving=0, device_busy=True, last_batch_jobs=1)  # it would wait
    assert not p.close_early(arriving=0, device_busy=False, last_batch_jobs=3)  # under load


def test_eager_off_never_closes_early():
    p = BatchPolicy(max_batch_size=8, max_wait=1.0, eager=False)
    assert not p.close_early(arriving=0, device_busy=False, last_batch_jobs=1)
