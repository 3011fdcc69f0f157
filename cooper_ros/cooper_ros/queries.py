"""Questions: the /spatial_query service and the /spatial_query_stream action.

Both callbacks are coroutines on the node's single-threaded executor. They check the request
(cheap), hand the model work to the model worker as a :class:`~cooper_ros.worker.QueryJob` and
await its future, so the executor keeps taking camera frames, lifecycle requests and action
cancels meanwhile. The worker decodes the image (the request's or the newest frame), runs
``pipe.ask`` and fills the response; the action streams each reasoning turn and generated map
as feedback while it happens and can be cancelled: a queued goal is dropped at once, a running
one stops at its next turn or map.
"""
from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future

from builtin_interfaces.msg import Time as TimeMsg
from cooper_interfaces.action import SpatialQuery as SpatialQueryAction
from cooper_interfaces.srv import SpatialQuery

from . import image_codec as ic
from .params import MODE_ALIASES, MODES
from .perception import decode
from .sync import stamp_ns
from .worker import QueryCancelled, QueryJob, WorkerStopped

__all__ = ["QueryServer", "clean_text"]


def clean_text(text: Any) -> str:
    """A string rclpy can send: valid UTF-8, no NUL (a NUL cuts a ROS string short)."""
    s = "" if text is None else str(text)
    return s.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


class _Refused(Exception):
    """A request refused with a reason (the response's message)."""

    def __init__(self, message: str, level: str = "warning"):
        super().__init__(message)
        self.level = level


class QueryServer:
    def __init__(self, node, service_name: str, action_name: str):
        self.node = node
        self.names = (service_name, action_name)
        group = ReentrantCallbackGroup()   # several questions may wait for the model at once
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self._srv = node.create_service(SpatialQuery, service_name, self._on_service, qos_profile=qos,
                                        callback_group=group)
        self._jobs: dict[bytes, QueryJob] = {}   # running action goals, for cancel
        self._action = None
        if action_name:
            self._action = ActionServer(node, SpatialQueryAction, action_name, self._on_goal,
                                        goal_callback=lambda _g: GoalResponse.ACCEPT,
                                        cancel_callback=self._on_cancel, callback_group=group)

    def destroy(self) -> None:
        self.node.destroy_service(self._srv)
        if self._action is not None:
            self._action.destroy()

    # ------------------------------------------------------------------ callbacks (executor)
    async def _on_service(self, req, resp):
        await self._answer(req, resp)
        return resp

    async def _on_goal(self, goal_handle):
        t0 = time.monotonic()
        result = SpatialQueryAction.Result()
        turns: list[str] = []

        def on_event(kind, value):  # in the worker, as each turn / map is produced
            if goal_handle.is_cancel_requested:
                raise QueryCancelled("cancelled while running")
            fb = SpatialQueryAction.Feedback()
            fb.stage, fb.elapsed_s = kind, float(time.monotonic() - t0)
            if kind == "turn":
                fb.turn_index, fb.turn_text = len(turns), clean_text(value)
                turns.append(value)
            else:
                fb.turn_index, fb.tool = max(len(turns) - 1, 0), clean_text(value)
            goal_handle.publish_feedback(fb)

        goal_handle.publish_feedback(SpatialQueryAction.Feedback(stage="running"))
        cancelled = await self._answer(goal_handle.request, result, on_event,
                                       goal_id=bytes(goal_handle.goal_id.uuid))
        if cancelled and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif result.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return result

    def _on_cancel(self, goal_handle):
        job = self._jobs.get(bytes(goal_handle.goal_id.uuid))
        worker = self.node.worker
        if job is not None and worker is not None:
            worker.cancel(job)
        return CancelResponse.ACCEPT

    # ------------------------------------------------------------------ answering
    async def _answer(self, req, resp, on_event=None, goal_id: bytes | None = None) -> bool:
        """Fill ``resp``; True when the question was cancelled."""
        t0 = time.monotonic()
        node = self.node
        try:
            s = node.settings
            self._check(req, s)
            worker = node.worker
            if worker is None:
                raise _Refused(f"node is not active (lifecycle state: {node.state_label})")
            done: Future = Future()
            executor = node.executor

            def on_done(result, exc):   # in the worker thread (or the executor, for a cancel)
                done.set_result(exc)
                if executor is not None:
                    executor.wake()

            job = QueryJob(lambda pipe: self._run(pipe, req, resp, s, on_event, t0), on_done)
            if goal_id is not None:
                self._jobs[goal_id] = job
            worker.submit(job)
            try:
                exc = await done
            finally:
                if goal_id is not None:
                    self._jobs.pop(goal_id, None)
            if exc is not None:
                raise exc
        except QueryCancelled as exc:
            node.stats.inc("queries_cancelled")
            resp.success, resp.message = False, f"cancelled: {exc}"
            resp.latency_s = float(time.monotonic() - t0)
            return True
        except WorkerStopped as exc:
            self._fail(resp, t0, f"node is not active any more: {exc}")
        except _Refused as exc:
            self._fail(resp, t0, str(exc), exc.level)
        except Exception as exc:  # noqa: BLE001 - the service must always answer
            node.get_logger().error(traceback.format_exc())
            self._fail(resp, t0, f"internal error: {type(exc).__name__}: {exc}", "error")
        else:
            resp.latency_s = float(time.monotonic() - t0)
            node.stats.inc("queries_ok")
            node.stats.time("query", resp.latency_s)
        return False

    def _check(self, req, s) -> None:
        """Refusals that need no model (executor thread)."""
        node = self.node
        if not node.active:
            raise _Refused(f"node is not active (lifecycle state: {node.state_label})")
        question = req.question or ""
        if not question.strip():
            raise _Refused("question is empty")
        limit = s["query.max_question_chars"]
        if len(question) > limit:
            raise _Refused(f"question too long: {len(question)} characters, the limit is {limit} "
                           f"(parameter query.max_question_chars)")
        if (req.mode or "").strip().lower() not in MODE_ALIASES:
            raise _Refused(f"unknown mode {req.mode!r}: use one of "
                           f"{', '.join(repr(m) for m in MODES)} or empty (adaptive)")

    def _image(self, req, s):
        """(rgb, header) of the request's image or of the newest camera frame."""
        img, max_px = req.image, s["input.max_pixels"]
        if not (img.width == 0 and img.height == 0 and len(img.data) == 0 and not img.encoding):
            try:
                return ic.image_to_rgb8(img, max_px), img.header
            except ic.ImageConversionError as exc:
                raise _Refused(f"invalid image in request: {exc}") from exc
        node = self.node
        node.perception.poll()   # worker thread: the newest frame received, not the last one taken
        frame = node.perception.newest()
        if frame is None:
            raise _Refused(f"no camera frame received yet on {node.image_topic} and the request "
                           f"has no image")
        header = frame.msg.header
        max_age = s["input.max_image_age_s"]
        if max_age > 0 and stamp_ns(header.stamp) > 0:
            age = node.age_s(header.stamp)
            if age > max_age:
                raise _Refused(f"newest camera frame is {age:.2f} s old, the limit is {max_age} s "
                               f"(parameter input.max_image_age_s)")
        try:
            return decode(frame, max_px), header
        except ic.ImageConversionError as exc:
            raise _Refused(f"newest camera frame is unusable: {exc}") from exc

    def _run(self, pipe, req, resp, s, on_event, t_request: float) -> None:
        """The model part (worker thread)."""
        from cooper_model.pipeline import CooperInputError

        node = self.node
        t_start = time.monotonic()
        # the wait for the worker (the map in flight, questions before it) apart from the run
        # itself: latency = query_wait + query_run (+ the executor's hand-over)
        node.stats.time("query_wait", t_start - t_request)
        if not node.active:
            raise _Refused(f"node is not active (lifecycle state: {node.state_label})")
        rgb, header = self._image(req, s)
        mode = MODE_ALIASES[(req.mode or "").strip().lower()] or MODE_ALIASES[s["query.default_mode"]]
        max_turns = int(req.max_turns) or int(s["query.max_turns"])
        try:
            out = pipe.ask(rgb, req.question, mode=mode, max_turns=max_turns, on_event=on_event,
                           **s.generation_overrides(for_query=True))
        except (QueryCancelled, _Refused):
            raise
        except CooperInputError as exc:
            raise _Refused(f"the model refused the input: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            what = node.model_failed("query", exc)
            raise _Refused(f"{what} during inference: {type(exc).__name__}: {exc}", "error") from exc
        resp.success = True
        if not node.model_info["trained"]:
            resp.message = "warning: the model's weights are untrained; the answer is meaningless"
        elif not node.model_info["reasoning_trained"]:
            resp.message = "warning: the model's reasoning is untrained (stage 1 only); the answer is meaningless"
        else:
            resp.message = ""
        resp.answer = clean_text(out.answer)
        resp.boxed_answer = clean_text(out.boxed_answer)
        resp.reasoning_turns = [clean_text(t) for t in out.turns]
        resp.tools_used = [clean_text(t) for t in out.tools_used]
        if s["query.return_images"]:
            resp.auxiliary_images = [ic.array_to_image(np.asarray(im, dtype=np.uint8), "rgb8", header)
                                     for _name, im in out.images]
            resp.auxiliary_image_names = [clean_text(n) for n, _im in out.images]
        resp.image_stamp = TimeMsg(sec=header.stamp.sec, nanosec=header.stamp.nanosec)
        resp.image_frame_id = header.frame_id
        node.stats.time("query_run", time.monotonic() - t_start)

    def _fail(self, resp, t0: float, text: str, level: str = "warning") -> None:
        resp.success = False
        resp.message = clean_text(text)
        resp.latency_s = float(time.monotonic() - t0)
        self.node.stats.inc("queries_failed")
        self.node.log(level, f"spatial_query refused: {text}")
