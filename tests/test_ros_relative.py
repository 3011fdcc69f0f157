"""A checkpoint with relative depth and no palette (as the released COOPER checkpoints are):
the node publishes no metres, no point cloud and no labels; relative depth goes to its own
topic; with a sparse metric source (a registered depth image) each frame's depth is fitted by
robust scale and shift, published as metres, and the fit shows in /diagnostics.

The bundled checkpoint is copied to a temporary folder and its cooper_config.json edited
(depth_kind "relative", no class_names / palette)."""
import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="ROS 2 not installed (run scripts/setup.sh)")
pytest.importorskip("cooper_interfaces.srv", reason="cooper_interfaces not built (run scripts/setup.sh)")

from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from cooper_interfaces.srv import SpatialQuery  # noqa: E402
from cooper_ros import image_codec as ic  # noqa: E402
from cooper_ros.testing import (FAST, NodeProcess, RosClient, camera_info, checkpoint_variant,  # noqa: E402
                                make_image, now_stamp, pattern_frame, wait_for)

CAM, INFO, SPARSE = "/rel_camera/image_raw", "/rel_camera/camera_info", "/rel_camera/sparse_depth"
W, H, FID = 64, 48, "rel_cam"
SCALE, SHIFT = 3.0, 0.5


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relative")
    ckpt = checkpoint_variant(tmp / "cooper-relative", depth_kind="relative", palette=False)
    params = dict(FAST, **{"model.checkpoint": str(ckpt), "alignment.source": "depth",
                           "alignment.min_points": 20, "input.max_image_age_s": 0.0})
    proc = NodeProcess(params=params, log_path=tmp / "cooper_node.log",
                       remaps={"image": CAM, "camera_info": INFO, "alignment/depth": SPARSE}).start()
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


@pytest.fixture(scope="module")
def client(node):
    c = RosClient("cooper_relative_client")
    assert c.wait_for_service(SpatialQuery, "/spatial_query", timeout=120), node.log_text()[-3000:]
    yield c
    c.close()


TOPICS = {"depth": ("/cooper/depth/image", Image), "relative": ("/cooper/depth/relative", Image),
          "info": ("/cooper/depth/camera_info", CameraInfo), "points": ("/cooper/points", PointCloud2),
          "labels": ("/cooper/segmentation/labels", Image), "seg": ("/cooper/segmentation/image", Image)}


def _key(m):
    return m.header.stamp.sec, m.header.stamp.nanosec


def _send(client, pubs, frame, sparse=None):
    """Camera_info, the sparse depth (if any) and the frame, all with one new stamp."""
    st = now_stamp(client)
    info = camera_info(W, H, FID)
    info.header.stamp = st
    pubs["info"].publish(info)
    if sparse is not None:
        sparse.header.stamp = st
        pubs["sparse"].publish(sparse)
    frame.header.stamp = st
    pubs["image"].publish(frame)
    return st.sec, st.nanosec


def _pubs(client):
    pubs = {"image": client.publisher(Image, CAM), "info": client.publisher(CameraInfo, INFO),
            "sparse": client.publisher(Image, SPARSE)}
    assert client.wait_for_subscribers(pubs["image"], 1, 60)
    assert client.wait_for_subscribers(pubs["sparse"], 1, 60)
    return pubs


def test_relative_checkpoint_publishes_no_metres_no_cloud_no_labels(node, client):
    outs = {k: client.collect(t, name) for k, (name, t) in TOPICS.items()}
    pubs = _pubs(client)
    frame = make_image(pattern_frame(H, W), "rgb8", frame_id=FID)
    d0 = client.diagnostics()
    assert d0["model_depth_is_metric"] == "False" and d0["model_has_palette"] == "False"
    sent = set()

    def both():
        sent.add(_send(client, pubs, frame))     # no sparse source: alignment cannot run
        return all(any(_key(m) in sent for _t, m in outs[k]) for k in ("relative", "seg"))
    assert wait_for(both, timeout=120, period=0.5), node.log_text()[-3000:]
    time.sleep(1.0)
    rel = [m for _t, m in outs["relative"] if _key(m) in sent][-1]
    assert (rel.encoding, rel.width, rel.height, rel.header.frame_id) == ("32FC1", W, H, FID)
    r = ic.image_to_array(rel)
    assert r.min() >= 0.0 and r.max() <= 1.0                     # unitless, never metres
    seg = [m for _t, m in outs["seg"] if _key(m) in sent][-1]
    assert seg.encoding == "rgb8" and (seg.width, seg.height) == (W, H)
    for k in ("depth", "info", "points", "labels"):
        assert not outs[k], f"{k} published for a relative checkpoint without alignment"
    d1 = client.diagnostics()
    assert int(d1["alignment_failed"]) > int(d0["alignment_failed"])
    assert "no alignment depth message" in d1["alignment_last_failure"]
    assert d1["metric_depth_published"] == d1["points_published"] == d1["labels_published"] == "0"
    for topic in ("/cooper/segmentation/labels", "/cooper/segmentation/classes"):
        assert client.node.count_publishers(topic) == 0, topic     # not even advertised
    for q in outs.values():
        client.unsubscribe(q)


def test_alignment_recovers_a_known_scale_and_shift(node, client):
    """The model is deterministic for one image and seed: its relative depth R of a frame is
    learned first; then the same frame comes with a sparse depth image of SCALE * R + SHIFT metres
    at every 4th pixel (and a few wrong readings). The node must publish metres equal to it, and
    a point cloud."""
    outs = {k: client.collect(t, name) for k, (name, t) in TOPICS.items()}
    pubs = _pubs(client)
    frame = make_image(pattern_frame(H, W, t=2.0), "rgb8", frame_id=FID)
    sent = set()

    def got_relative():
        sent.add(_send(client, pubs, frame))
        return [m for _t, m in outs["relative"] if _key(m) in sent]
    r = ic.image_to_array(wait_for(got_relative, timeout=120, period=0.5)[-1])
    truth = SCALE * r + SHIFT
    sparse_arr = np.zeros((H, W), np.float32)
    sparse_arr[::4, ::4] = truth[::4, ::4]
    sparse_arr[0, 0:12:4] = 50.0                                   # wrong readings
    sparse = ic.array_to_image(sparse_arr, "32FC1")
    sparse.header.frame_id = FID
    aligned = set()

    def got_metric():
        aligned.add(_send(client, pubs, frame, sparse))
        return [m for _t, m in outs["depth"] if _key(m) in aligned]
    d = wait_for(got_metric, timeout=120, period=0.5)
    assert d, node.log_text()[-3000:]
    depth = ic.image_to_array(d[-1])
    assert d[-1].encoding == "32FC1" and depth.shape == (H, W)
    np.testing.assert_allclose(depth, truth, rtol=1e-3, atol=1e-3)
    diag = client.diagnostics()
    assert float(diag["alignment_scale"]) == pytest.approx(SCALE, rel=1e-3)
    assert float(diag["alignment_shift"]) == pytest.approx(SHIFT, abs=1e-3)
    assert float(diag["alignment_inlier_fraction"]) < 1.0 and int(diag["alignment_points"]) == (sparse_arr > 0).sum()
    assert int(diag["alignment_ok"]) >= 1
    assert wait_for(lambda: any(_key(m) in aligned for _t, m in outs["points"]), timeout=30)
    assert any(_key(m) in aligned for _t, m in outs["info"])
    assert not outs["labels"]
    for q in outs.values():
        client.unsubscribe(q)
