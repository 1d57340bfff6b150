"""The pure rules of `--ray` runs (coordinator.cluster.plan): pipeline counts, the shared queue, resume,
progress. Milliseconds, no Ray."""
import pytest

from coordinator.cluster.plan import (MAX_ATTEMPTS, PlanError, WorkQueue, choose_pipelines, finished_samples,
                                      gpus_per_pipeline, progress_line, shift_stamps, trace_events)


def test_gpus_per_pipeline_follows_placement_and_devices():
    assert gpus_per_pipeline([None, None], 8) == 1
    assert gpus_per_pipeline(["cuda", "cuda:0"], 8) == 1
    assert gpus_per_pipeline(["cuda:1", "cuda:0"], 8) == 2
    assert gpus_per_pipeline([None, None], 8, placement="two-gpu") == 2
    assert gpus_per_pipeline(["cuda:1", "cuda:0"], 8, placement="same-gpu") == 1
    assert gpus_per_pipeline(["cpu", "cpu"], 8) == 0
    assert gpus_per_pipeline([None, None], 0) == 0


def test_choose_pipelines_defaults_and_limits():
    assert choose_pipelines(None, cpus=64, gpus=8, gpus_each=1)[0] == 8
    assert choose_pipelines(None, cpus=64, gpus=8, gpus_each=2)[0] == 4
    assert choose_pipelines(None, cpus=7, gpus=3, gpus_each=2)[0] == 1
    n, why = choose_pipelines(None, cpus=16, gpus=0, gpus_each=0)
    assert n == 8 and "per 2 CPUs" in why
    assert choose_pipelines(None, cpus=1, gpus=0, gpus_each=0)[0] == 1
    assert choose_pipelines(3, cpus=4, gpus=0, gpus_each=0)[0] == 3
    with pytest.raises(PlanError, match="--pipelines 5.*at most 4"):
        choose_pipelines(5, cpus=64, gpus=8, gpus_each=2)
    with pytest.raises(PlanError, match="needs 2"):
        choose_pipelines(None, cpus=8, gpus=1, gpus_each=2)


def test_queue_gives_one_sample_at_a_time_per_pipeline():
    q = WorkQueue.of([0, 1, 2])
    assert q.take("a") == 0
    assert q.take("a") is None           # a busy pipeline takes nothing more
    assert q.take("b") == 1
    assert q.finish(0, "a") and q.take("a") == 2
    assert not q.finished
    assert q.finish(1, "b") and q.finish(2, "a")
    assert q.finished and q.done == {0, 1, 2}


def test_queue_requeues_a_dead_pipelines_sample_first_and_drops_late_duplicates():
    q = WorkQueue.of([0, 1, 2])
    q.take("a"), q.take("b")
    assert q.pipeline_died("a", "killed") == []
    assert q.take("c") == 0               # the lost sample comes back before the untouched ones
    assert q.finish(0, "c") is True
    assert q.finish(0, "a") is False      # a result for it that arrives anyway is not kept twice
    assert q.attempts == {0: 1}


def test_queue_gives_up_on_a_sample_that_kills_every_pipeline():
    q = WorkQueue.of([7])
    for i in range(MAX_ATTEMPTS):
        assert q.take(f"p{i}") == 7
        given_up = q.pipeline_died(f"p{i}", "segfault")
    assert given_up == [7] and "segfault" in q.failed[7]
    assert q.finished and q.take("x") is None


def test_finished_samples_need_every_mode_ok():
    recs = [{"sample_id": "a", "mode": "baseline", "status": "ok"}, {"sample_id": "a", "mode": "parallel", "status": "ok"},
            {"sample_id": "b", "mode": "baseline", "status": "ok"},
            {"sample_id": "c", "mode": "baseline", "status": "ok"}, {"sample_id": "c", "mode": "parallel", "status": "error"}]
    assert finished_samples(recs, ["baseline", "parallel"]) == {"a"}
    assert finished_samples(recs, ["baseline"]) == {"a", "b", "c"}


def test_progress_line_rates_and_eta():
    line = progress_line(10, 30, {"p0": (6, 0.0), "p1": (4, 2.0)}, now_s=10.0, started_s=0.0)
    # p0 0.6/s, p1 0.5/s: 20 left at 1.1/s is 18 s
    assert "10/30 samples" in line and "p0 0.60/s" in line and "p1 0.50/s" in line and "ETA 18 s" in line
    assert "done" in progress_line(30, 30, {"p0": (30, 0.0)}, now_s=60.0, started_s=0.0)
    assert "ETA —" in progress_line(0, 5, {}, now_s=1.0, started_s=0.0)


def test_stamps_move_onto_the_driver_clock_and_trace_groups_by_pipeline():
    event = {"kind": "message", "src": "draft", "dst": "coordinator", "sent_ns": 100, "recv_ns": 150,
             "msg_id": 7, "pipeline": 1}
    assert shift_stamps(event, 0) is event
    moved = shift_stamps(event, 1000)
    assert (moved["sent_ns"], moved["recv_ns"], moved["msg_id"]) == (1100, 1150, 7)
    renamed = trace_events([event, {"kind": "span", "proc": "target", "start_ns": 1, "end_ns": 2}])
    assert (renamed[0]["src"], renamed[0]["dst"]) == ("p1 draft", "p1 coordinator")
    assert renamed[1]["proc"] == "target" and event["src"] == "draft"
