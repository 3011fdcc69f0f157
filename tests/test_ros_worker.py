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

    def step(self, pipe):
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

    def step(_pipe):
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
