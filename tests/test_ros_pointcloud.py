"""Depth + CameraInfo -> PointCloud2 (cooper_ros.camera, cooper_ros.pointcloud): the camera
model (K + D for raw images, P for rectified ones), flying-pixel removal, message layout."""
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 Python packages not installed (run scripts/setup.sh)")

from sensor_msgs.msg import CameraInfo  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from cooper_ros.camera import CameraModel, CameraModelError  # noqa: E402
from cooper_ros.pointcloud import cloud_xyz, depth_to_points, edge_mask, make_pointcloud2  # noqa: E402


def _info(w=80, h=60, k=(50.0, 52.0, 39.5, 29.5), d=(), model="plumb_bob", p=None):
    ci = CameraInfo(width=w, height=h, distortion_model=model)
    fx, fy, cx, cy = k
    ci.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    ci.d = list(d)
    ci.p = list(p) if p is not None else [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return ci


def test_back_projection_matches_pinhole_model():
    h, w, fx, fy, cx, cy = 6, 8, 10.0, 12.0, 3.5, 2.5
    depth = np.full((h, w), 2.0, np.float32)
    depth[0, 0] = np.nan
    depth[1, 1] = np.inf
    depth[2, 2] = -np.inf
    cam = CameraModel.from_camera_info(_info(w, h, (fx, fy, cx, cy)), depth.shape, rectified=False)
    xyz, col = depth_to_points(depth, cam, 1, np.zeros((h, w, 3), np.uint8))
    assert xyz.shape == (h * w - 3, 3) and col.shape == (h * w - 3, 3)
    v, u = np.mgrid[0:h, 0:w]
    ok = np.isfinite(depth)
    np.testing.assert_allclose(xyz[:, 0], (u[ok] - cx) * 2.0 / fx, rtol=1e-6)
    np.testing.assert_allclose(xyz[:, 1], (v[ok] - cy) * 2.0 / fy, rtol=1e-6)
    assert (xyz[:, 2] == 2.0).all()
    xyz2, _ = depth_to_points(depth, cam, 2)
    assert xyz2.shape[0] == np.isfinite(depth[::2, ::2]).sum()
    with pytest.raises(CameraModelError, match="focal length"):
        CameraModel.from_camera_info(_info(k=(0.0, 0.0, 1.0, 1.0)), depth.shape, rectified=False)


@pytest.mark.parametrize("model, d", [
    ("plumb_bob", (-0.28, 0.07, 0.001, -0.0005, 0.0)),
    ("rational_polynomial", (-0.2, 0.05, 0.001, 0.002, 0.01, 0.1, -0.02, 0.005)),
    ("equidistant", (0.05, -0.01, 0.002, -0.0003)),
])
def test_raw_image_rays_undo_the_lens_distortion(model, d):
    """Points seen through a distorting lens (projected with K and D) come back where they were."""
    cam = CameraModel.from_camera_info(_info(640, 480, (400.0, 402.0, 321.0, 239.0), d, model),
                                       (480, 640), rectified=False)
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(-1.2, 1.2, 500), rng.uniform(-0.9, 0.9, 500), rng.uniform(1.0, 5.0, 500)], -1)
    u, v, z = cam.project(pts)
    inside = (u >= 0) & (u < 640) & (v >= 0) & (v < 480)
    # a depth image holding these z values at those pixels (one point per pixel)
    ui, vi = np.round(u[inside]).astype(int), np.round(v[inside]).astype(int)
    ui, first = np.unique(vi * 640 + np.clip(ui, 0, 639), return_index=True)
    sel = np.flatnonzero(inside)[first]
    depth = np.full((480, 640), np.nan, np.float32)
    depth.flat[ui] = z[sel]
    xyz, _ = depth_to_points(depth, cam)
    # compare with the true points of the same pixels (pixel rounding: within a pixel's ray)
    back = {int(i): p for i, p in zip(np.flatnonzero(np.isfinite(depth.ravel())), xyz)}
    err = [np.linalg.norm(back[int(i)] - pts[s]) / pts[s, 2] for i, s in zip(ui, sel)]
    assert np.median(err) < 2e-3 and max(err) < 6e-3
    # ignoring D would put the cloud somewhere else
    no_d = CameraModel.from_camera_info(_info(640, 480, (400.0, 402.0, 321.0, 239.0)), (480, 640), False)
    xyz_k, _ = depth_to_points(depth, no_d)
    assert np.abs(xyz_k - xyz).max() > 0.05


def test_rectified_image_uses_p_not_k_or_d():
    """image_rect comes with the raw camera's K and D; its pixels follow P."""
    ci = _info(80, 60, (50.0, 52.0, 39.5, 29.5), (-0.3, 0.1, 0.0, 0.0, 0.0),
               p=[45.0, 0.0, 41.0, 0.0, 0.0, 46.0, 30.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    cam = CameraModel.from_camera_info(ci, (60, 80), rectified=True)
    assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.d) == (45.0, 46.0, 41.0, 30.0, ())
    depth = np.full((60, 80), 3.0, np.float32)
    xyz, _ = depth_to_points(depth, cam)
    v, u = np.mgrid[0:60, 0:80]
    np.testing.assert_allclose(xyz[:, 0], (u.ravel() - 41.0) * 3.0 / 45.0, rtol=1e-5)
    np.testing.assert_allclose(xyz[:, 1], (v.ravel() - 30.0) * 3.0 / 46.0, rtol=1e-5)


def test_intrinsics_follow_the_image_size_and_odd_camera_infos_are_refused():
    cam = CameraModel.from_camera_info(_info(80, 60, (50.0, 52.0, 40.0, 30.0)), (30, 40), rectified=False)
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == (25.0, 26.0, 20.0, 15.0)
    with pytest.raises(CameraModelError, match="not supported"):
        CameraModel.from_camera_info(_info(d=(0.1, 0.0, 0.0, 0.0, 0.0), model="fov"), (60, 80), False)
    binned = _info()
    binned.binning_x = 2
    with pytest.raises(CameraModelError, match="binning"):
        CameraModel.from_camera_info(binned, (60, 80), False)


def test_no_flying_pixels_between_object_and_background():
    """A box at 1 m in front of a wall at 4 m, upsampled bilinearly 4x as the model's depth is:
    the cloud keeps both surfaces and drops the ramp in between."""
    low = np.full((15, 20), 4.0, np.float32)
    low[5:10, 6:14] = 1.0
    import torch
    up = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], size=(60, 80), mode="bilinear",
                                         align_corners=False)[0, 0].numpy()
    assert ((up > 1.05) & (up < 3.95)).sum() > 50          # the ramp is there
    cam = CameraModel.from_camera_info(_info(), up.shape, rectified=False)
    xyz, _ = depth_to_points(up, cam, 1, max_edge_jump=0.05)
    z = xyz[:, 2]
    assert ((z > 1.1) & (z < 3.9)).sum() == 0              # ... but not in the cloud
    assert (z < 1.05).sum() > 100 and (z > 3.95).sum() > 2000
    kept_all, _ = depth_to_points(up, cam, 1, max_edge_jump=0.0)
    assert kept_all.shape[0] == up.size
    plane = np.full((60, 80), 2.0, np.float32)            # a flat wall loses nothing
    assert not edge_mask(plane, 0.05).any()


def test_pointcloud2_layout_and_reading_back():
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
    np.testing.assert_array_equal(cloud_xyz(m), xyz)
    m.fields = m.fields[:2]
    with pytest.raises(ValueError, match="z"):
        cloud_xyz(m)
