"""Metric alignment of relative depth (cooper_ros.metric) and stamp pairing (cooper_ros.sync):
a synthetic scene with known metric depth, its relative version (unknown scale and shift), and
the sparse sources a robot has: a registered depth image, a point cloud, a laser scan."""
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 Python packages not installed (run scripts/setup.sh)")

from sensor_msgs.msg import CameraInfo, LaserScan  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from cooper_ros import image_codec as ic  # noqa: E402
from cooper_ros.camera import CameraModel  # noqa: E402
from cooper_ros.metric import AlignmentError, align, pose_matrix, sparse_target  # noqa: E402
from cooper_ros.pointcloud import depth_to_points, make_pointcloud2  # noqa: E402
from cooper_ros.sync import StampBuffer  # noqa: E402
from cooper_ros.testing import stamp  # noqa: E402

H, W = 60, 80
SCALE, SHIFT = 6.0, 0.7          # metric = SCALE * relative + SHIFT


def _scene():
    """Metric depth of a room corner (walls 2-6 m) and the model's relative version of it."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    metric = 2.0 + 4.0 * (u / W) * (0.5 + 0.5 * v / H)
    return metric.astype(np.float32), ((metric - SHIFT) / SCALE).astype(np.float32)


def _camera_info():
    ci = CameraInfo(width=W, height=H, distortion_model="plumb_bob")
    ci.k = [60.0, 0.0, 39.5, 0.0, 60.0, 29.5, 0.0, 0.0, 1.0]
    ci.p = [60.0, 0.0, 39.5, 0.0, 0.0, 60.0, 29.5, 0.0, 0.0, 0.0, 1.0, 0.0]
    ci.d = [0.0] * 5
    return ci


IDENTITY = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_registered_depth_image_recovers_scale_and_shift():
    metric, rel = _scene()
    sensor = np.zeros((H, W), np.uint16)                      # millimetres, sparse (0 = no reading)
    sensor[::6, ::4] = np.round(metric[::6, ::4] * 1000).astype(np.uint16)
    sensor[6, 8] = 60000                                      # a wrong reading (glass)
    target = sparse_target("depth", ic.array_to_image(sensor, "16UC1"), (H, W), None, IDENTITY)
    assert np.isfinite(target).sum() == (sensor > 0).sum()
    depth, fit = align(rel, target, min_points=20, min_inlier_fraction=0.5)
    assert fit.scale == pytest.approx(SCALE, rel=2e-3) and fit.shift == pytest.approx(SHIFT, abs=5e-3)
    assert fit.inlier_fraction < 1.0 and fit.num_points == np.isfinite(target).sum()
    np.testing.assert_allclose(depth, metric, atol=0.01)
    # a sensor at another resolution is resampled by nearest: every reading covers 2 x 2 pixels
    half = np.zeros((H // 2, W // 2), np.float32)
    half[::3, ::2] = 3.0
    t2 = sparse_target("depth", ic.array_to_image(half, "32FC1"), (H, W), None, IDENTITY)
    assert np.isfinite(t2).sum() == 4 * (half > 0).sum() and set(np.unique(t2[np.isfinite(t2)])) == {3.0}


def test_point_cloud_in_another_frame_is_moved_projected_and_fitted():
    metric, rel = _scene()
    cam = CameraModel.from_camera_info(_camera_info(), (H, W), rectified=False)
    xyz, _ = depth_to_points(metric, cam, 3)                  # camera-frame points of the scene
    pose = [0.1, -0.05, 0.02, 0.0, 0.0, np.sin(0.1), np.cos(0.1)]   # lidar -> camera
    t = pose_matrix(pose)
    in_lidar = (xyz - t[:3, 3]) @ t[:3, :3]                    # the same points in the lidar frame
    msg = make_pointcloud2(in_lidar.astype(np.float32), Header(frame_id="lidar"))
    target = sparse_target("points", msg, (H, W), cam, pose)
    depth, fit = align(rel, target, 20, 0.5)
    assert fit.scale == pytest.approx(SCALE, rel=1e-2) and fit.shift == pytest.approx(SHIFT, abs=0.03)
    np.testing.assert_allclose(depth, metric, atol=0.05)
    with pytest.raises(AlignmentError, match="camera_info"):
        sparse_target("points", msg, (H, W), None, pose)


def test_laser_scan_with_the_extrinsic():
    """A horizontal scan 0.2 m below the camera (laser frame: x forward, y left, z up)."""
    metric, rel = _scene()
    cam = CameraModel.from_camera_info(_camera_info(), (H, W), rectified=False)
    # where the scan plane (camera y = +0.2 m, i.e. below) meets the scene, per image column
    rows = []
    for u in range(W):
        for v in range(H):
            ray_y = (v - 29.5) / 60.0
            if ray_y > 0 and abs(ray_y * metric[v, u] - 0.2) < 0.02:
                rows.append((u, v))
                break
    xs = np.array([((u - 39.5) / 60.0) * metric[v, u] for u, v in rows])
    zs = np.array([metric[v, u] for u, v in rows])
    # laser -> camera optical: x_l forward = z_c, y_l left = -x_c, z_l up = -y_c, origin 0.2 m below
    ang = np.arctan2(-xs, zs)
    scan = LaserScan(angle_min=float(ang.min()), angle_max=float(ang.max()), range_min=0.1, range_max=30.0)
    n = 400
    scan.angle_increment = float((ang.max() - ang.min()) / (n - 1))
    grid = ang.min() + scan.angle_increment * np.arange(n)
    order = np.argsort(ang)
    scan.ranges = np.interp(grid, ang[order], np.hypot(xs, zs)[order]).astype(np.float32).tolist()
    q = [0.5, -0.5, 0.5, 0.5]           # rotation laser -> optical (as static_transform_publisher)
    target = sparse_target("scan", scan, (H, W), cam, [0.0, 0.2, 0.0] + q)
    assert 20 <= np.isfinite(target).sum() <= 2 * W
    depth, fit = align(rel, target, 20, 0.5)
    assert fit.scale == pytest.approx(SCALE, rel=0.05) and fit.shift == pytest.approx(SHIFT, abs=0.15)


def test_refused_fits_say_why():
    _metric, rel = _scene()
    few = np.full((H, W), np.nan, np.float32)
    few[0, :5] = 3.0
    with pytest.raises(AlignmentError, match="at least 20"):
        align(rel, few, 20, 0.5)
    metric, _ = _scene()
    wrong = metric.copy()                     # a fifth of the readings see something else
    rng = np.random.default_rng(0)
    mask = rng.random(metric.shape) < 0.2
    wrong[mask] = rng.uniform(20, 60, mask.sum())
    depth, fit = align(rel, wrong, 20, 0.7)   # robust: the fit ignores them ...
    assert fit.scale == pytest.approx(SCALE, rel=1e-4) and 0.75 < fit.inlier_fraction < 0.85
    with pytest.raises(AlignmentError, match="inliers"):
        align(rel, wrong, 20, 0.9)            # ... unless that leaves too few
    with pytest.raises(AlignmentError, match="not positive"):
        align(-rel, metric, 20, 0.5)
    with pytest.raises(AlignmentError, match="32FC1"):
        sparse_target("depth", ic.array_to_image(np.zeros((4, 4, 3), np.uint8), "rgb8"), (H, W), None, IDENTITY)


def test_stamp_buffer_pairs_nearest_within_tolerance():
    buf = StampBuffer(size=5)
    for i in range(8):                       # 10 Hz, the oldest fall out
        ci = CameraInfo()
        ci.header.stamp = stamp(100, i * 100_000_000)
        ci.width = i
        buf.add(ci)
    assert len(buf) == 5
    assert buf.nearest(stamp(100, 520_000_000), 0.05).width == 5
    assert buf.nearest(stamp(100, 700_000_000), 0.0).width == 7        # exact
    assert buf.nearest(stamp(100, 550_000_000), 0.04) is None            # between two, too far
    assert buf.nearest(stamp(100, 100_000_000), 0.01) is None            # fell out of the buffer
