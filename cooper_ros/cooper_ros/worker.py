"""The model worker: one thread that makes every model call of the node.

Why one thread, and why not the executor: rclpy's MultiThreadedExecutor busy-spins while
callbacks are in flight (ros2/rclpy#1452), and under a 60 Hz camera its spinning thread holds the
GIL most of the time and starves the model. So the node spins a SingleThreadedExecutor whose
callbacks only queue work, camera input has no callback at all (this thread takes the newest frame
when it wants one: ``intake.py``), and this thread runs the model:

* a queued question goes first; else one perception step (depth, or segmentation) of the newest
  frame. A step is given ``should_stop()``, true as soon as a question waits (or the worker is
  stopping): the model checks it between the stages of a map (prefill, each denoising step,
  decode), so a question waits for the stage in flight, not for the whole step
  (``perception.yield_to_questions``);
* depth and segmentation of a frame are two steps, so a question can go between them;
* nothing queues up for perception: each step takes the newest frame when it starts.

The model could run in a process of its own instead, which would remove the GIL coupling
altogether; with the executor idle at any camera rate the coupling left is small, and one
process keeps the model's errors, memory and lifecycle (load at configure, free at cleanup) where
ROS tools see them, and answers stream their progress without an IPC layer.
"""
from __future__ import annotations

import threading
import traceback
from collections import deque
from typing import Any, Callable

__all__ = ["ModelWorker", "QueryJob", "QueryCancelled", "WorkerStopped", "THREAD_NAME"]

THREAD_NAME = "cooper-model"


class QueryCancelled(Exception):
    """The question was cancelled (action cancel) before or while it ran."""


class WorkerStopped(Exception):
    """The question was dropped: the node was deactivated or cleaned up first."""


class QueryJob:
    """A question for the model: ``run(pipe)`` in the worker thread, then ``on_done(result,
    exception)`` (also called when the job is cancelled or dropped without running)."""

    def __init__(self, run: Callable[[Any], Any], on_done: Callable[[Any, BaseException | None], None]):
        self.run = run
        self._on_done = on_done
        self._done = threading.Event()
        self.cancel_requested = False

    def finish(self, result: Any = None, exc: BaseException | None = None) -> bool:
        if self._done.is_set():
            return False
        self._done.set()
        self._on_done(result, exc)
        return True

    @property
    def done(self) -> bool:
        return self._done.is_set()


class ModelWorker:
    """Owns the pipeline while the node is configured; see the module docstring.

    ``perception_ready()`` says when a perception step can run: None (nothing to do), 0 (now)
    or seconds to wait (rate limit); ``perception_step(pipe, should_stop)`` runs one, and may
    end it early when ``should_stop()`` turns true. Both are called from
    this thread only; ``perception_ready`` is called with the worker's lock held, so it must not
    take locks that are held while calling :meth:`notify`.
    """

    def __init__(self, pipe: Any, perception_ready: Callable[[], float | None],
                 perception_step: Callable[[Any], None], on_crash: Callable[[str], None],
                 cpu_threads: int = 0):
        self.pipe = pipe
        self._cpu_threads_wanted = cpu_threads
        self.cpu_threads: int | None = None  # torch's intra-op threads as this thread sees them
        self._ready = perception_ready
        self._step = perception_step
        self._on_crash = on_crash
        self._cv = threading.Condition()
        self._queue: deque[QueryJob] = deque()
        self._running: QueryJob | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> "ModelWorker":
        self._thread.start()
        return self

    def notify(self) -> None:
        """Something changed (a frame arrived, the node was activated): look again."""
        with self._cv:
            self._cv.notify()

    def submit(self, job: QueryJob) -> None:
        with self._cv:
            stopped = self._stop
            if not stopped:
                self._queue.append(job)
                self._cv.notify()
        if stopped:
            job.finish(exc=WorkerStopped("the model is being unloaded"))

    def cancel(self, job: QueryJob) -> None:
        """Cancel a question: a queued one is dropped now; a running one stops at its next
        progress event (see cooper_ros.queries)."""
        job.cancel_requested = True
        with self._cv:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        if queued:
            job.finish(exc=QueryCancelled("cancelled before it started"))

    def drop_queued(self, why: str) -> int:
        """Fail every queued question with ``why`` (deactivate); returns how many."""
        with self._cv:
            jobs = list(self._queue)
            self._queue.clear()
        for j in jobs:
            j.finish(exc=WorkerStopped(why))
        return len(jobs)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def should_stop_step(self) -> bool:
        """True when the perception step in flight should end early: a question waits, or the
        worker is stopping. Lock-free (asked many times a step); a stale answer costs one stage."""
        return bool(self._queue) or self._stop

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> bool:
        """Stop after the call in flight (a model call cannot be interrupted); fail the queued
        questions; release the pipeline. False when the thread is still busy after ``timeout``."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self.drop_queued("the model is being unloaded")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.pipe = None
        return True

    # ------------------------------------------------------------------ worker thread
    def _next(self) -> QueryJob | None | bool:
        """The next question, None for a perception step, False to stop."""
        with self._cv:
            while True:
                if self._stop:
                    return False
                if self._queue:
                    return self._queue.popleft()
                wait = self._ready()
                if wait is not None and wait <= 0:
                    return None
                self._cv.wait(0.5 if wait is None else min(wait, 0.5))

    def _set_cpu_threads(self) -> None:
        # set here, not at configure: OpenMP's thread count is per calling thread
        import torch

        if self._cpu_threads_wanted > 0:
            torch.set_num_threads(self._cpu_threads_wanted)
        self.cpu_threads = torch.get_num_threads()

    def _loop(self) -> None:
        try:
            self._set_cpu_threads()
        except Exception:  # noqa: BLE001 - reported, the worker still runs with torch's default
            self._on_crash(traceback.format_exc())
        while True:
            job = self._next()
            if job is False:
                return
            try:
                if job is None:
                    self._step(self.pipe, self.should_stop_step)
                    continue
                if job.cancel_requested:
                    job.finish(exc=QueryCancelled("cancelled before it started"))
                    continue
                try:
                    result = job.run(self.pipe)
                except Exception as exc:  # noqa: BLE001 - handed to the question's owner
                    job.finish(exc=exc)
                else:
                    job.finish(result)
            except Exception:  # noqa: BLE001 - the worker never dies; the node reports it
                self._on_crash(traceback.format_exc())
