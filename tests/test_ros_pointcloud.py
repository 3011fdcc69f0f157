"""Depth + CameraInfo -> PointCloud2 (cooper_ros.pointcloud): geometry and message layout."""
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 Python packages not installed (run scripts/setup.sh)")

from std_msgs.msg import Header  # noqa: E402

from cooper_ros.pointcloud import depth_to_points, make_pointcloud2  # noqa: E402


def test_back_projection_matches_pinhole_model():
    h, w, fx, fy, cx, cy = 6, 8, 10.0, 12.0, 3.5, 2.5
    depth = np.full((h, w), 2.0, np.float32)
    depth[0, 0] = np.nan
    depth[1, 1] = np.inf
    depth[2, 2] = -np.inf
    k = [fx, 0, cx, 0, fy, cy, 0, 0, 1]
    xyz, col = depth_to_points(depth, k, 1, np.zeros((h, w, 3), np.uint8))
    assert xyz.shape == (h * w - 3, 3) and col.shape == (h * w - 3, 3)
    v, u = np.mgrid[0:h, 0:w]
    ok = np.isfinite(depth)
    np.testing.assert_allclose(xyz[:, 0], (u[ok] - cx) * 2.0 / fx, rtol=1e-6)
    np.testing.assert_allclose(xyz[:, 1], (v[ok] - cy) * 2.0 / fy, rtol=1e-6)
    assert (xyz[:, 2] == 2.0).all()
    xyz2, _ = depth_to_points(depth, k, 2)
    assert xyz2.shape[0] == np.isfinite(depth[::2, ::2]).sum()
    with pytest.raises(ValueError, match="focal length"):
        depth_to_points(depth, [0] * 9)


def test_pointcloud2_layout():
    xyz = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    rgb = np.array([[255, 0, 1], [0, 128, 255]], np.uint8)
    m = make_pointcloud2(xyz, Header(frame_id="cam"), rgb)
    assert (m.height, m.width, m.point_step, m.row_step) == (1, 2, 16, 32)
    assert [(f.name, f.offset) for f in m.fields] == [("x", 0), ("y", 4), ("z", 8), ("rgb", 12)]
    raw = np.frombuffer(bytes(m.data), "<f4").reshape(2, 4)
    np.testing.assert_array_equal(raw[:, :3], xyz)
    packed = raw[:, 3].view("<u4")
    assert packed.tolist() == [(255 << 16) | 1, (128 << 8) | 255]
    m2 = make_pointcloud2(xyz, Header(frame_id="cam"))
    assert m2.point_step == 12 and len(m2.data) == 24
