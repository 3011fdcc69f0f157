"""The model worker (cooper_ros.worker): questions go before perception steps, a queued question
can be cancelled or dropped, stop ends the one thread. Ordering and counts, no timing."""
import threading

import pytest

from cooper_ros.worker import THREAD_NAME, ModelWorker, QueryCancelled, QueryJob, WorkerStopped


class Steps:
    """Perception that always has a frame; each step blocks until released (like a model call)."""

    def __init__(self):
        self.log = []
        self.release = threading.Semaphore(0)
        self.started = threading.Semaphore(0)

    def ready(self):
        return 0.0

    def step(self, pipe, should_stop):
        self.log.append(("step", pipe))
        self.started.release()
        assert self.release.acquire(timeout=30)


def _job(log, name):
    done = threading.Event()
    out = {}

    def on_done(result, exc):
        out["result"], out["exc"] = result, exc
        done.set()
    return QueryJob(lambda pipe: log.append((name, pipe)) or name, on_done), done, out


def test_questions_go_before_the_next_perception_step_and_stop_ends_the_thread():
    p = Steps()
    w = ModelWorker("PIPE", p.ready, p.step, on_crash=pytest.fail).start()
    assert p.started.acquire(timeout=30)           # a step is in flight
    jobs = [_job(p.log, f"q{i}") for i in range(3)]
    for j, _d, _o in jobs:
        w.submit(j)
    assert w.waiting == 3
    p.release.release()                            # the step ends: all questions, then a step
    for _j, d, o in jobs:
        assert d.wait(30) and o["exc"] is None
    assert p.started.acquire(timeout=30)
    assert [n for n, _ in p.log[:5]] == ["step", "q0", "q1", "q2", "step"]
    assert all(pipe == "PIPE" for _n, pipe in p.log)
    assert sum(t.name == THREAD_NAME for t in threading.enumerate()) == 1
    late, done, out = _job(p.log, "late")
    w.submit(late)
    stopper = threading.Thread(target=lambda: w.stop(30))
    stopper.start()                                # stop waits for the step in flight ...
    assert done.wait(30) and isinstance(out["exc"], WorkerStopped)   # ... queued ones are dropped
    p.release.release()
    stopper.join(30)
    assert not w.alive() and w.pipe is None
    assert sum(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate()) == 0
    j, d, o = _job(p.log, "after")
    w.submit(j)                                    # a stopped worker refuses at once
    assert d.is_set() and isinstance(o["exc"], WorkerStopped)


def test_a_question_stops_the_step_in_flight_and_so_does_stop():
    """The step is told to stop as soon as a question is queued (it then yields to it), and
    again when the worker is stopping; no step is told to stop for nothing."""
    told, started = [], threading.Semaphore(0)

    def step(_pipe, should_stop):
        started.release()
        for _ in range(30_000):                      # a model call that checks between its stages
            if should_stop():
                told.append("stopped")
                return
            threading.Event().wait(0.001)
        told.append("finished")

    w = ModelWorker("PIPE", lambda: 0.0, step, on_crash=pytest.fail).start()
    assert started.acquire(timeout=30)
    log = []
    job, done, out = _job(log, "q")
    w.submit(job)
    assert done.wait(30) and out["result"] == "q"
    assert told[0] == "stopped" and log == [("q", "PIPE")]
    assert started.acquire(timeout=30)               # perception goes on after the question
    assert not w.should_stop_step()
    assert w.stop(30)                                # stop ends the step in flight early too
    assert told[-1] == "stopped" and "finished" not in told


def test_cancel_and_drop_queued_questions():
    p = Steps()
    w = ModelWorker("PIPE", p.ready, p.step, on_crash=pytest.fail).start()
    assert p.started.acquire(timeout=30)
    a, da, oa = _job(p.log, "a")
    b, db, ob = _job(p.log, "b")
    c, dc, oc = _job(p.log, "c")
    for j in (a, b, c):
        w.submit(j)
    w.cancel(b)
    assert db.is_set() and isinstance(ob["exc"], QueryCancelled)
    assert w.drop_queued("deactivated") == 2
    assert isinstance(oa["exc"], WorkerStopped) and "deactivated" in str(oc["exc"])
    p.release.release()
    assert p.started.acquire(timeout=30)
    assert [n for n, _ in p.log] == ["step", "step"]   # none of them ran
    w.stop(0)
    p.release.release()
    w.stop(30)
    assert not w.alive()


def test_a_failing_question_or_step_does_not_kill_the_worker():
    crashes = []
    steps = iter([RuntimeError("boom")] + [None] * 1000)
    ran = threading.Semaphore(0)

    def step(_pipe, _should_stop):
        ran.release()
        e = next(steps)
        if e:
            raise e
        threading.Event().wait(0.01)
    w = ModelWorker("PIPE", lambda: 0.0, step, on_crash=crashes.append).start()
    assert ran.acquire(timeout=30) and ran.acquire(timeout=30)   # it went on after the crash
    assert len(crashes) == 1 and "boom" in crashes[0]
    done, out = threading.Event(), {}
    w.submit(QueryJob(lambda pipe: 1 / 0, lambda r, e: (out.update(exc=e), done.set())))
    assert done.wait(30) and isinstance(out["exc"], ZeroDivisionError)
    assert ran.acquire(timeout=30) and w.alive()
    assert w.stop(30)


def test_intake_counts_superseded_frames_from_publisher_sequence_numbers():
    """Frames replaced in the middleware before a take are counted from the gaps in each
    publisher's sequence numbers (no ROS needed: the takes are given)."""
    from cooper_ros.intake import _Source

    src = _Source(sub=None, on_message=None, newest_only=True)

    def info(seq, gid=b"a"):
        return {"publication_sequence_number": seq, "publisher_gid": {"data": gid}}

    assert src.superseded([("m1", info(1))]) == 0                  # the first take: nothing before it counts
    assert src.superseded([("m5", info(5))]) == 3                  # 2, 3, 4 were superseded
    assert src.superseded([("m6", info(6)), ("m7", info(7))]) == 1  # two in one take: the older one
    assert src.superseded([("x1", info(1, b"b"))]) == 0            # another publisher has its own numbers
    assert src.superseded([("y", {"publication_sequence_number": None})]) == 0  # middleware without numbers


class StandInNode:
    """What Perception uses of CooperNode (settings, counters, publishers), without ROS."""

    def __init__(self, pipe):
        from cooper_ros.diagnostics import Stats
        from cooper_ros.params import PARAMS, Settings

        values = {p.name: p.default for p in PARAMS}
        values.update({"generation.num_steps": 3, "outputs.points": False})
        self.settings = Settings(values)
        self.model_info = {"depth_is_metric": pipe.depth_is_metric, "has_palette": pipe.has_palette}
        self.stats, self.active, self.published = Stats(), True, []

    def publish(self, key, msg):
        self.published.append((key, msg.header.frame_id))
        return True

    def subscribed(self, *keys):
        return True

    def age_s(self, stamp):
        return 0.0

    def log_throttled(self, *args, **kwargs):
        pass

    def model_failed(self, what, exc):
        raise AssertionError(f"model failed on {what}: {exc!r}")


def test_a_preempted_step_publishes_nothing_and_its_frame_is_done_after_the_question():
    """The real pipeline, stopped by should_stop: a stopped depth step publishes nothing and takes
    the same frame again (no newer one came); a stopped segmentation is redone for that frame;
    a newer frame supersedes a stopped one. Counted in perception_preempted."""
    import numpy as np

    from cooper_model import BUNDLED_CHECKPOINT, CooperPipeline
    from cooper_ros.perception import POLL_S, Perception
    from cooper_ros.testing import make_image, pattern_frame

    pipe = CooperPipeline.from_pretrained(BUNDLED_CHECKPOINT)
    node = StandInNode(pipe)
    p = Perception(node)
    counter = lambda: int(node.stats.values()["perception_preempted"])  # noqa: E731
    p.on_frame(make_image(pattern_frame(48, 64), frame_id="f1"), False)
    assert p.ready() == 0.0
    p.step(pipe, should_stop=lambda: True)                 # depth stopped at its first stage
    assert node.published == [] and counter() == 1
    assert p.ready() == 0.0                                # the same frame, again
    p.step(pipe, should_stop=lambda: False)                # its depth
    assert [k for k, _f in node.published] == ["depth_relative", "depth_colored", "depth"]
    assert {f for _k, f in node.published} == {"f1"}
    n_depth = len(node.published)
    asked = []
    p.step(pipe, should_stop=lambda: asked.append(1) or len(asked) >= 2)   # segmentation, stopped mid-way
    assert len(node.published) == n_depth and counter() == 2
    p.step(pipe, should_stop=lambda: False)                # redone: the same frame's segmentation
    assert [k for k, _f in node.published[n_depth:]] == ["seg", "labels"]
    assert {f for _k, f in node.published} == {"f1"}
    assert p.ready() == POLL_S                             # nothing new: the frame is done
    # a stopped frame that a newer one superseded is not redone: the next step takes the newer one
    p.on_frame(make_image(pattern_frame(48, 64, 1.0), frame_id="f2"), False)
    p.step(pipe, should_stop=lambda: True)
    p.on_frame(make_image(np.zeros((48, 64, 3), np.uint8), frame_id="f3"), False)
    p.step(pipe, should_stop=lambda: False)
    assert counter() == 3 and "f2" not in {f for _k, f in node.published}
    assert "f3" in {f for _k, f in node.published}
    # with perception.yield_to_questions off the step ignores should_stop
    node.settings.values["perception.yield_to_questions"] = False
    p.step(pipe, should_stop=lambda: True)                 # f3's segmentation, to the end
    assert node.published[-2:] == [("seg", "f3"), ("labels", "f3")] and counter() == 3
