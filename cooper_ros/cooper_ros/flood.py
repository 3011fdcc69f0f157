"""Flood benchmark: the node under a fast camera with a planner asking questions.

    python -m cooper_ros.bench --flood [--duration 600] [--rate 60] [--query-period 2]

Starts the node (separate process), then in one run:

1. idle baseline: frames sent one at a time (the node idle when each arrives) give the time of
   one perception cycle (depth + segmentation, all outputs subscribed) and the model's idle
   rate; questions asked with no camera running give the idle query latency; the same questions
   with the camera running at --rate and perception off give the latency under the camera's
   CPU load alone, with nothing for the question to wait for (what the machine costs, apart from
   what the node's scheduling costs);
2. flood: WxH rgb8 frames + CameraInfo at --rate Hz for --duration s, a question every
   --query-period s (about the newest frame; the next one starts when the previous answer came
   back if that took longer), every output subscribed, node RSS and CPU sampled every second;
3. after the camera stops: outputs still arriving (a backlog shows here), one more question;
4. lifecycle under load (``--lifecycle-s``, 0 skips it): the camera and the questions again, and
   meanwhile deactivate, activate, deactivate + cleanup, configure + activate; each transition's
   result and time, what was published while inactive, how every question in the phase ended
   (answered, refused as not active, other failure, no answer), model worker threads; then SIGINT
   and a look at the exit code and the log.

Prints frames sent / received by the node, depth outputs per second against the idle rate,
staleness (camera stamp -> depth received) p50/p95, query latency p50/p95 against idle and
against idle + one perception step, RSS start/end/slope, backlog, errors, shutdown cleanliness.
Nothing here is a pass/fail test: the numbers are the result.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

QUESTION = "How far is the chair from the table?"
LOG_PROBLEMS = ("Traceback", "RCLError", "context is invalid", "Exception", "[ERROR]")


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return float(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))])


def cpu_seconds(path: str) -> float:
    """utime + stime (seconds) of a /proc/<pid>[/task/<tid>]/stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fmt(x, unit="", digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def run(args) -> int:
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from cooper_interfaces.srv import SpatialQuery

    from .testing import NodeProcess, RosClient, SyntheticCamera, request, set_param

    W, H = args.width, args.height
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    params = {"model.checkpoint": args.checkpoint, "model.device": args.device,
              "generation.num_steps": args.num_steps, "query.max_new_tokens": args.max_new_tokens,
              "input.max_image_age_s": 0.0}
    if args.cpu_threads:  # only when asked: older nodes (--node-pythonpath) do not declare it
        params["model.cpu_threads"] = args.cpu_threads
    extra_env = {}
    if args.node_pythonpath:  # run another version of the node (e.g. a worktree of an old commit)
        extra_env["PYTHONPATH"] = os.pathsep.join(
            [args.node_pythonpath] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    node = NodeProcess(params=params, params_file=args.params_file or None,
                       remaps={"image": "/flood/image_raw", "camera_info": "/flood/camera_info"},
                       log_path=out_path.with_suffix(".node.log"), extra_env=extra_env).start()
    client = RosClient("cooper_flood_bench")
    res: dict = {"label": args.label, "width": W, "height": H, "rate_hz": args.rate,
                 "duration_s": args.duration, "query_period_s": args.query_period,
                 "num_steps": args.num_steps, "max_new_tokens": args.max_new_tokens,
                 "query_mode": args.query_mode, "cpu_threads": args.cpu_threads,
                 "loadavg_start": os.getloadavg()}
    try:
        if not client.wait_for_service(SpatialQuery, "/spatial_query", timeout=300):
            print(node.log_text()[-3000:], file=sys.stderr)
            return 1
        outs = {k: client.stamps(t, name) for k, (name, t) in {
            "depth_colored": ("/cooper/depth/colored", Image),
            "depth": ("/cooper/depth/image", Image),
            "depth_relative": ("/cooper/depth/relative", Image),
            "seg": ("/cooper/segmentation/image", Image),
            "labels": ("/cooper/segmentation/labels", Image),
            "points": ("/cooper/points", PointCloud2),
            "info": ("/cooper/depth/camera_info", CameraInfo)}.items()}
        synthetic = SyntheticCamera(client, "/flood/image_raw", "/flood/camera_info", W, H, "flood_cam")
        client.wait_for_subscribers(synthetic.image_pub, 1, 60)
        time.sleep(1.5)
        send = synthetic.send

        def got(key, stamp_ns):
            return next((r for r, s, _f in list(outs[key]) if s == stamp_ns), None)

        # ---- 1. idle baseline: one frame at a time
        cycles = []
        d_before = None
        for i in range(args.idle_frames + 1):
            k = send(i)
            end = time.monotonic() + 300
            while time.monotonic() < end and (got("depth_colored", k) is None or got("seg", k) is None):
                time.sleep(0.005)
            if got("seg", k) is None:
                print(f"no outputs for an idle frame\n{node.log_text()[-3000:]}", file=sys.stderr)
                return 1
            if i == 0:
                d_before = client.diagnostics()   # after the warm-up frame
            else:   # camera stamp -> the later of the two outputs received
                cycles.append((max(got("depth_colored", k), got("seg", k)) - k) / 1e9)
            time.sleep(0.2)
        d_idle = client.diagnostics()

        def mean_delta(d1, d0, key):
            c1, c0 = int(d1[f"{key}_count"]), int(d0[f"{key}_count"])
            m1, m0 = float(d1[f"{key}_mean_s"]), float(d0[f"{key}_mean_s"])
            return (m1 * c1 - m0 * c0) / max(1, c1 - c0)

        idle_depth_step = mean_delta(d_idle, d_before, "model_depth")
        idle_seg_step = mean_delta(d_idle, d_before, "model_seg")
        idle_cycle = statistics.median(cycles)
        query = request(QUESTION, mode=args.query_mode, max_turns=1)   # about the newest frame

        def ask():
            t0 = time.monotonic()
            try:
                r = client.call(SpatialQuery, "/spatial_query", query, timeout=args.query_timeout)
                return time.monotonic() - t0, r.success, r.message
            except TimeoutError as exc:
                return time.monotonic() - t0, False, f"timeout: {exc}"

        ask()  # warm-up
        idle_q = [ask() for _ in range(args.idle_queries)]
        bad = [m for _l, ok, m in idle_q if not ok]
        if bad:
            print(f"idle queries failed: {bad}", file=sys.stderr)
            return 1
        idle_lat = [lat for lat, _ok, _m in idle_q]
        d_q = client.diagnostics()

        # the same questions beside the running camera, perception off: the camera's CPU load alone
        cam_stop = threading.Event()

        def camera_only():
            i, t_cam = 0, time.monotonic()
            while not cam_stop.is_set():
                wait = t_cam + i / args.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                send(i)
                i += 1
        set_param(client, "perception.enabled", False)
        cam = threading.Thread(target=camera_only, daemon=True)
        cam.start()
        time.sleep(2.0)
        camera_q = [ask() for _ in range(args.idle_queries)]
        cam_stop.set()
        cam.join(10)
        set_param(client, "perception.enabled", True)
        camera_lat = [lat for lat, ok, _m in camera_q if ok]
        res["idle"] = {"perception_cycle_s": idle_cycle, "model_rate_hz": 1.0 / idle_cycle,
                       "depth_step_s": idle_depth_step, "seg_step_s": idle_seg_step,
                       "query_p50_s": statistics.median(idle_lat), "query_p95_s": _pct(idle_lat, 0.95),
                       "query_max_s": max(idle_lat),
                       "query_run_mean_s": (mean_delta(d_q, d_idle, "query_run")
                                            if "query_run_count" in d_q else None),
                       "camera_only_query_p50_s": statistics.median(camera_lat) if camera_lat else None,
                       "camera_only_query_max_s": max(camera_lat) if camera_lat else None,
                       "camera_only_failed": len(camera_q) - len(camera_lat)}
        print(f"[flood] idle: perception cycle {idle_cycle:.3f} s ({1 / idle_cycle:.2f} Hz; depth step "
              f"{idle_depth_step:.3f} s, segmentation step {idle_seg_step:.3f} s), query p50 "
              f"{res['idle']['query_p50_s']:.3f} s; beside the camera, perception off, p50 "
              f"{_fmt(res['idle']['camera_only_query_p50_s'], ' s')}", flush=True)

        # ---- 2. flood
        d0 = client.diagnostics()
        stop = threading.Event()
        sent = []
        queries: list[tuple[float, float, bool, str]] = []   # (start offset s, latency, ok, message)
        t_start = time.monotonic()

        def camera():
            i = 0
            while not stop.is_set():
                target = t_start + i / args.rate
                now = time.monotonic()
                if now - t_start >= args.duration:
                    break
                if now < target:
                    time.sleep(target - now)
                sent.append(send(i))
                i += 1

        def querier():
            next_t = t_start + args.query_period
            while not stop.is_set():
                now = time.monotonic()
                if now < next_t:
                    if stop.wait(next_t - now):
                        break
                if time.monotonic() - t_start >= args.duration:
                    break
                t0 = time.monotonic()
                lat, ok, msg = ask()
                queries.append((t0 - t_start, lat, ok, msg))
                next_t = max(t0 + args.query_period, time.monotonic())

        cam_t = threading.Thread(target=camera, daemon=True)
        q_t = threading.Thread(target=querier, daemon=True)
        pid = node.pid
        cpu0, main0, wall0 = cpu_seconds(f"/proc/{pid}/stat"), cpu_seconds(f"/proc/{pid}/task/{pid}/stat"), time.monotonic()
        cam_t.start()
        q_t.start()
        rss = []
        next_report = t_start + 60
        while cam_t.is_alive():
            rss.append((time.monotonic() - t_start, node.rss_mb()))
            if not node.alive():
                break
            if time.monotonic() >= next_report:
                next_report += 60
                print(f"[flood] {time.monotonic() - t_start:5.0f} s: sent {len(sent)}, depth outputs "
                      f"{len(outs['depth_colored'])}, queries {len(queries)}, rss {rss[-1][1]:.0f} MB",
                      flush=True)
            cam_t.join(timeout=1.0)
        stop_ns = client.now().nanoseconds
        cpu1, main1, wall1 = cpu_seconds(f"/proc/{pid}/stat"), cpu_seconds(f"/proc/{pid}/task/{pid}/stat"), time.monotonic()
        stop.set()
        q_t.join(timeout=args.query_timeout + 10)
        time.sleep(args.settle)
        d1 = client.diagnostics()
        alive = node.alive()

        sent_set = set(sent)
        flood_outs = {k: [(r, s) for r, s, f in list(q) if s in sent_set] for k, q in outs.items()}
        depth_recv = flood_outs["depth_colored"]
        stale = [(r - s) / 1e9 for r, s in depth_recv if r <= stop_ns]
        late = [r for r, s in depth_recv if r > stop_ns]
        lat = [q[1] for q in queries]
        ok = [q for q in queries if q[2]]
        failed = [q for q in queries if not q[2]]
        idle_p50 = res["idle"]["query_p50_s"]
        one_step = max(idle_depth_step, idle_seg_step)
        bound = idle_p50 + one_step
        # "every query within idle latency plus one step": the idle latency of the slowest idle
        # question, since the same question varies with the frame it is asked about
        bound_max = max(idle_lat) + one_step
        # the model's time the questions take, at their idle cost
        query_share = min(1.0, len(queries) * idle_p50 / args.duration)
        post = [(t, m) for t, m in rss if t >= args.warmup]

        def slope_mb_per_min(points):
            return float(np.polyfit(*zip(*points), 1)[0] * 60.0) if len(points) > 2 else None

        def diag_int(d, key):
            return int(d[key]) if key in d else None

        res["flood"] = {
            "frames_sent": len(sent), "send_rate_hz": len(sent) / args.duration,
            "frames_received_by_node": (diag_int(d1, "frames_received") - diag_int(d0, "frames_received")),
            # nodes that take frames on demand count the ones they never took (older nodes: 0)
            "frames_superseded_in_node": (diag_int(d1, "frames_superseded") - diag_int(d0, "frames_superseded")
                                          if "frames_superseded" in d1 else None),
            "depth_outputs": len(depth_recv), "depth_outputs_per_s": len(depth_recv) / args.duration,
            "metric_depth_outputs": len(flood_outs["depth"]),
            "relative_depth_outputs": len(flood_outs["depth_relative"]),
            "segmentation_outputs": len(flood_outs["seg"]), "label_outputs": len(flood_outs["labels"]),
            "point_clouds": len(flood_outs["points"]),
            "model_idle_rate_hz": 1.0 / idle_cycle,
            "query_share_of_time": query_share,
            "model_allowed_rate_hz": max(0.0, 1.0 - query_share) / idle_cycle,
            "staleness_p50_s": _pct(stale, 0.5), "staleness_p95_s": _pct(stale, 0.95),
            "queries": len(queries), "queries_ok": len(ok), "queries_failed": len(failed),
            "query_failures": sorted({q[3][:120] for q in failed}),
            "query_p50_s": _pct(lat, 0.5), "query_p95_s": _pct(lat, 0.95), "query_max_s": max(lat) if lat else None,
            "query_p50_over_idle": (_pct(lat, 0.5) / idle_p50) if lat else None,
            "query_bound_idle_plus_one_step_s": bound,
            "queries_over_bound": sum(1 for x in lat if x > bound),
            "query_bound_idle_max_plus_one_step_s": bound_max,
            "queries_over_bound_idle_max": sum(1 for x in lat if x > bound_max),
            # the same bound from the camera-only baseline: what the node's scheduling adds
            "query_bound_camera_only_max_plus_one_step_s": (res["idle"]["camera_only_query_max_s"] + one_step
                                                            if res["idle"]["camera_only_query_max_s"] else None),
            "queries_over_bound_camera_only_max": (sum(1 for x in lat if x > res["idle"]["camera_only_query_max_s"] + one_step)
                                                   if res["idle"]["camera_only_query_max_s"] else None),
            # the node's split of a question's latency (nodes without these timings: None)
            "query_wait_mean_s": mean_delta(d1, d0, "query_wait") if "query_wait_count" in d1 else None,
            "query_wait_max_s": float(d1["query_wait_max_s"]) if "query_wait_max_s" in d1 else None,
            "query_run_mean_s": mean_delta(d1, d0, "query_run") if "query_run_count" in d1 else None,
            "rss_mb_start": post[0][1] if post else None, "rss_mb_end": post[-1][1] if post else None,
            "rss_mb_max": max(m for _, m in post) if post else None, "rss_slope_mb_per_min": slope_mb_per_min(post),
            # the second half alone: growth that levels off (allocator warm-up) shows here
            "rss_slope_second_half_mb_per_min": slope_mb_per_min(post[len(post) // 2:]),
            "rss_mb_per_10s": [round(m, 1) for t, m in post[::10]],
            "depth_outputs_after_camera_stopped": len(late),
            "node_cpu_cores": (cpu1 - cpu0) / (wall1 - wall0),
            "node_main_thread_cpu_cores": (main1 - main0) / (wall1 - wall0),
            "node_model_errors": diag_int(d1, "model_errors") - diag_int(d0, "model_errors"),
            "node_frames_skipped": diag_int(d1, "frames_skipped") - diag_int(d0, "frames_skipped"),
            "node_frames_behind_max": diag_int(d1, "frames_behind_max"),
            # maps stopped because a question came (nodes without perception.yield_to_questions: None)
            "node_perception_preempted": (diag_int(d1, "perception_preempted") - diag_int(d0, "perception_preempted")
                                          if "perception_preempted" in d1 else None),
            "node_queries_waiting_after": diag_int(d1, "queries_waiting"),
            "node_alive_after": alive,
        }
        after = ask()
        res["after"] = {"query_ok": after[1], "query_s": after[0], "message": after[2][:200]}
        if args.lifecycle_s > 0:
            res["lifecycle"] = lifecycle_under_load(client, send, outs, ask, args)
    finally:
        client.close()
        t_sig = time.monotonic()
        rc = node.stop(timeout=60)
        res["shutdown"] = {"exit_code": rc, "seconds": time.monotonic() - t_sig}
    log = node.log_text()
    res["shutdown"]["log_problems"] = {p: log.count(p) for p in LOG_PROBLEMS if p in log}
    res["shutdown"]["clean"] = rc == 0 and not res["shutdown"]["log_problems"]
    res["loadavg_end"] = os.getloadavg()
    out_path.write_text(json.dumps(res, indent=1))
    report(res)
    print(f"  results: {out_path}  (node log: {out_path.with_suffix('.node.log')})")
    return 0


def lifecycle_under_load(client, send, outs, ask, args) -> dict:
    """Phase 4: lifecycle transitions while the camera runs at --rate and questions keep coming."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    stop = threading.Event()
    answers: list[tuple[bool, str]] = []
    t0 = time.monotonic()

    def camera():
        i = 0
        while not stop.is_set():
            wait = t0 + i / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            send(i)
            i += 1

    def querier():
        while not stop.is_set():
            _lat, ok, msg = ask()
            answers.append((ok, msg))
            stop.wait(args.query_period)

    def outputs():
        return len(outs["depth_relative"]) + len(outs["seg"])

    def transition(name, tid):
        req = ChangeState.Request()
        req.transition = Transition(id=tid)
        start = time.monotonic()
        try:
            ok = bool(client.call(ChangeState, "/cooper/change_state", req, timeout=120).success)
        except TimeoutError:
            ok = False
        steps.append({"transition": name, "ok": ok, "seconds": round(time.monotonic() - start, 3)})
        return ok

    def wait_outputs(n0, timeout=120.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and outputs() <= n0:
            time.sleep(0.05)
        return outputs() > n0

    steps: list[dict] = []
    threads = [threading.Thread(target=f, daemon=True) for f in (camera, querier)]
    for t in threads:
        t.start()
    phase = args.lifecycle_s / 4          # time given to each state before the next transition
    res: dict = {}
    try:
        time.sleep(phase)
        transition("deactivate", Transition.TRANSITION_DEACTIVATE)
        time.sleep(0.5)                   # what was in flight has been published or dropped
        n_off, d_off = outputs(), client.diagnostics()
        time.sleep(phase)
        res["outputs_while_inactive"] = outputs() - n_off
        res["frames_taken_while_inactive"] = (int(client.diagnostics()["frames_received"])
                                             - int(d_off["frames_received"]))
        n_on = outputs()
        transition("activate", Transition.TRANSITION_ACTIVATE)
        res["outputs_after_activate"] = wait_outputs(n_on)
        res["worker_threads_active"] = client.diagnostics().get("model_worker_threads")
        time.sleep(phase)
        transition("deactivate", Transition.TRANSITION_DEACTIVATE)
        transition("cleanup", Transition.TRANSITION_CLEANUP)
        time.sleep(0.5)
        res["worker_threads_unconfigured"] = client.diagnostics().get("model_worker_threads")
        n_on = outputs()
        transition("configure", Transition.TRANSITION_CONFIGURE)
        transition("activate", Transition.TRANSITION_ACTIVATE)
        res["outputs_after_configure"] = wait_outputs(n_on)
        res["worker_threads_reconfigured"] = client.diagnostics().get("model_worker_threads")
        time.sleep(phase)
    finally:
        stop.set()
        for t in threads:
            t.join(args.query_timeout + 10)
    final = ask()
    refused = [m for ok, m in answers if not ok and "not active" in m]
    timeouts = [m for ok, m in answers if not ok and m.startswith("timeout")]
    other = [m for ok, m in answers if not ok and m not in refused and m not in timeouts]
    res.update({"transitions": steps, "all_transitions_ok": all(x["ok"] for x in steps),
                "questions": len(answers), "answered": sum(ok for ok, _m in answers),
                "refused_not_active": len(refused), "timeouts": len(timeouts),
                "other_failures": sorted({m[:120] for m in other}),
                "question_after_ok": final[1]})
    return res


def report(res: dict) -> None:
    i, f, s = res["idle"], res.get("flood", {}), res["shutdown"]
    print(f"\ncooper flood benchmark [{res['label']}]: {res['width']}x{res['height']} rgb8 + CameraInfo at "
          f"{res['rate_hz']:g} Hz for {res['duration_s']:g} s, a '{res['query_mode']}' question every "
          f"{res['query_period_s']:g} s (num_steps {res['num_steps']}, max_new_tokens {res['max_new_tokens']}, "
          f"model.cpu_threads {res.get('cpu_threads') or 'default'}); "
          f"load average at start {res['loadavg_start'][0]:.2f}")
    if not f:
        print("  flood did not complete")
        return
    superseded = f.get("frames_superseded_in_node")
    print(f"  frames sent / received by the node   {f['frames_sent']} / {f['frames_received_by_node']}"
          + (f" taken, {superseded} superseded" if superseded is not None else "")
          + f"  ({f['send_rate_hz']:.1f} Hz sent)")
    print(f"  depth outputs per second             {f['depth_outputs_per_s']:.3f}  (idle model rate "
          f"{f['model_idle_rate_hz']:.3f} Hz; allowed with the queries' share "
          f"{100 * f['query_share_of_time']:.0f} %: {f['model_allowed_rate_hz']:.3f} Hz)")
    print(f"  outputs: depth colored {f['depth_outputs']}, metric {f['metric_depth_outputs']}, relative "
          f"{f['relative_depth_outputs']}, segmentation {f['segmentation_outputs']}, labels "
          f"{f['label_outputs']}, point clouds {f['point_clouds']}")
    print(f"  staleness stamp -> depth, p50 / p95  {_fmt(f['staleness_p50_s'], ' s')} / {_fmt(f['staleness_p95_s'], ' s')}")
    print(f"  query latency p50 / p95 / max        {_fmt(f['query_p50_s'], ' s')} / {_fmt(f['query_p95_s'], ' s')}"
          f" / {_fmt(f['query_max_s'], ' s')}  (idle p50 {i['query_p50_s']:.3f} s; p50 / idle "
          f"{_fmt(f['query_p50_over_idle'], 'x', 2)}; idle + one perception step = "
          f"{f['query_bound_idle_plus_one_step_s']:.3f} s, {f['queries_over_bound']} of {f['queries']} above it)")
    if "query_bound_idle_max_plus_one_step_s" in f:
        print(f"  queries above idle max + one step    {f['queries_over_bound_idle_max']} of {f['queries']}  (idle max "
              f"{i['query_max_s']:.3f} s + one step = {f['query_bound_idle_max_plus_one_step_s']:.3f} s)")
    if f.get("query_bound_camera_only_max_plus_one_step_s"):
        print(f"  queries above camera-only max + step {f['queries_over_bound_camera_only_max']} of {f['queries']}  "
              f"(camera running, perception off: p50 {i['camera_only_query_p50_s']:.3f} s, max "
              f"{i['camera_only_query_max_s']:.3f} s; + one step = {f['query_bound_camera_only_max_plus_one_step_s']:.3f} s)")
    if f.get("query_wait_mean_s") is not None:
        print(f"  question waits for the model, mean / max {f['query_wait_mean_s']:.3f} s / {f['query_wait_max_s']:.3f} s"
              f"  (one perception step {max(i['depth_step_s'], i['seg_step_s']):.3f} s); model time on it, mean "
              f"{f['query_run_mean_s']:.3f} s (idle {_fmt(i.get('query_run_mean_s'), ' s')})")
    print(f"  queries ok / failed                  {f['queries_ok']} / {f['queries_failed']} {f['query_failures'] or ''}")
    print(f"  node RSS start / end / max, slope    {_fmt(f['rss_mb_start'], ' MB', 0)} / {_fmt(f['rss_mb_end'], ' MB', 0)}"
          f" / {_fmt(f['rss_mb_max'], ' MB', 0)}, {_fmt(f['rss_slope_mb_per_min'], ' MB/min', 2)}"
          f" (second half {_fmt(f.get('rss_slope_second_half_mb_per_min'), ' MB/min', 2)})")
    print(f"  backlog: depth outputs after the camera stopped {f['depth_outputs_after_camera_stopped']}; "
          f"frames behind max {f['node_frames_behind_max']}; queries waiting {f['node_queries_waiting_after']}")
    if f.get("node_perception_preempted") is not None:
        print(f"  perception steps stopped for a question {f['node_perception_preempted']}")
    print(f"  node CPU: {f['node_cpu_cores']:.2f} cores, executor (main) thread {f['node_main_thread_cpu_cores']:.2f}")
    print(f"  errors: model {f['node_model_errors']}, frames skipped {f['node_frames_skipped']}, "
          f"node alive after {f['node_alive_after']}, question after the flood ok={res['after']['query_ok']}")
    lc = res.get("lifecycle")
    if lc:
        ts = ", ".join(f"{x['transition']} {'ok' if x['ok'] else 'FAILED'} {x['seconds']:.2f} s" for x in lc["transitions"])
        print(f"  lifecycle under load: {ts}")
        print(f"    while inactive: {lc['outputs_while_inactive']} outputs, {lc['frames_taken_while_inactive']} frames "
              f"taken; outputs again after activate {lc['outputs_after_activate']}, after configure "
              f"{lc['outputs_after_configure']}; model worker threads {lc['worker_threads_active']} / "
              f"{lc['worker_threads_unconfigured']} (unconfigured) / {lc['worker_threads_reconfigured']}")
        print(f"    questions {lc['questions']}: answered {lc['answered']}, refused as not active "
              f"{lc['refused_not_active']}, no answer {lc['timeouts']}, other failures {lc['other_failures'] or 0}; "
              f"question after ok={lc['question_after_ok']}")
    print(f"  shutdown: exit code {s['exit_code']} in {s['seconds']:.2f} s, log problems {s['log_problems'] or 'none'}"
          f" -> {'clean' if s['clean'] else 'NOT clean'}")
