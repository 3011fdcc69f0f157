"""Ground truth of the synthetic scene generator checked against geometry."""

import numpy as np
import pybullet as pb
import pytest

from training.data import catalogue as cat
from training.data.geometry import Intrinsics, backproject, look_pose, points_in_box, project
from training.data.questions import make_questions
from training.data.scene import SceneBuilder, generate_scene

W, H = 128, 96


@pytest.fixture(scope="module")
def builder():
    b = SceneBuilder()
    yield b
    b.close()


@pytest.fixture(scope="module")
def random_views(builder):
    views = []
    for s in range(3):
        views += generate_scene(builder, np.random.SeedSequence([7, s]), 2, W, H, f"t{s}")
    return views


def test_catalogue_label_space():
    assert cat.CLASS_NAMES[0] == "background"
    assert len(cat.CLASS_NAMES) == len(set(cat.CLASS_NAMES)) <= 40
    kinds = {c.kind for c in cat.OBJECT_CLASSES}
    assert kinds == {"mesh", "parametric"}


def test_backprojected_object_pixels_land_in_their_box(random_views):
    checked = 0
    for s in random_views:
        for o in s.objects:
            if o.pixels < 10:
                continue
            pts = backproject(s.depth, s.intrinsics, s.instance_map == o.instance_id)
            # Margin: one pixel's footprint at that depth plus the renderer's depth quantisation.
            margin = 0.01 + float(np.nanmax(pts[:, 2])) / s.intrinsics.fx
            inside = points_in_box(pts, o.centre, o.size, np.array(o.rotation), margin)
            assert inside.mean() > 0.97, (s.sample_id, o.label, inside.mean())
            checked += 1
    assert checked >= 6


def test_instance_and_class_maps_match_objects(random_views):
    for s in random_views:
        ids = set(np.unique(s.instance_map)) - {0}
        assert ids == {o.instance_id for o in s.objects if o.pixels > 0}
        for o in s.objects:
            mask = s.instance_map == o.instance_id
            assert mask.sum() == o.pixels
            if o.pixels:
                assert np.all(s.class_map[mask] == o.class_id)
                ys, xs = np.nonzero(mask)
                assert o.bbox2d == [xs.min(), ys.min(), xs.max(), ys.max()]
        # Room surfaces carry their own classes and no instance.
        room = np.isin(s.class_map, [cat.CLASS_ID["floor"], cat.CLASS_ID["wall"]])
        assert room.any() and not s.instance_map[room].any()
        assert np.all(np.isnan(s.depth) == (s.class_map == 0))


def test_projected_box_centre_inside_2d_box(random_views):
    checked = 0
    for s in random_views:
        for o in s.objects:
            if o.pixels < 30:
                continue
            x0, y0, x1, y1 = o.bbox2d
            h, w = s.instance_map.shape
            # Only unoccluded, untruncated objects: their visible box is the full silhouette.
            touching_border = x0 == 0 or y0 == 0 or x1 == w - 1 or y1 == h - 1
            crop = s.instance_map[y0:y1 + 1, x0:x1 + 1]
            occluded = np.any((crop != o.instance_id) & (crop != 0))
            if touching_border or occluded:
                continue
            u, v = project(np.array([o.centre]), s.intrinsics)[0]
            assert x0 - 1 <= u <= x1 + 2 and y0 - 1 <= v <= y1 + 2, (s.sample_id, o.label)
            checked += 1
    assert checked >= 1


def test_hand_built_scene_boxes(builder):
    """No occlusion here: every projected centre must fall inside its visible 2-D box."""
    sample, layout, _ = _hand_built(builder)
    for o in sample.objects:
        x0, y0, x1, y1 = o.bbox2d
        u, v = project(np.array([o.centre]), sample.intrinsics)[0]
        assert x0 <= u <= x1 + 1 and y0 <= v <= y1 + 1, o.label
        pts = backproject(sample.depth, sample.intrinsics, sample.instance_map == o.instance_id)
        margin = 0.01 + pts[:, 2].max() / sample.intrinsics.fx  # one pixel's footprint
        assert points_in_box(pts, o.centre, o.size, np.array(o.rotation), margin).mean() > 0.99


def test_depth_is_metric_planar_depth(builder):
    """Depth of an empty 9 m room equals the analytic ray/plane intersection at every pixel."""
    scene = builder.build_fixed([], room=(9.0, 9.0))
    intr = Intrinsics(70.0, 72.0, 61.0, 50.0, W, H)
    pose = look_pose([0.5, -1.0, 1.2], np.radians(30), np.radians(-25), np.radians(3))
    s = builder.render(scene, pose, intr, np.random.default_rng(0), "room")
    v, u = np.mgrid[0:H, 0:W]
    rays = np.stack([(u + 0.5 - intr.cx) / intr.fx, (v + 0.5 - intr.cy) / intr.fy, np.ones_like(u, float)], -1)
    rays_w = rays @ pose[:3, :3].T  # planar-depth-1 rays in the world
    o = pose[:3, 3]
    # Planes: floor z = 0 and the four inner wall faces at +-4.5 m; the nearest positive hit wins.
    t = [np.where(rays_w[..., 2] < 0, -o[2] / rays_w[..., 2], np.inf)]
    for axis in (0, 1):
        for wall in (-4.5, 4.5):
            with np.errstate(divide="ignore", invalid="ignore"):
                ti = (wall - o[axis]) / rays_w[..., axis]
            t.append(np.where(ti > 0, ti, np.inf))
    expected = np.min(t, axis=0)
    valid = np.isfinite(s.depth)
    assert valid.mean() > 0.9
    rel = np.abs(s.depth[valid] - expected[valid]) / expected[valid]
    assert np.median(rel) < 1e-4 and np.mean(rel < 0.01) > 0.98


def test_physics_settles_without_interpenetration_and_cameras_are_robot_like(random_views):
    for s in random_views:
        assert s.meta["max_penetration_m"] < 0.01
        height = s.cam_to_world[2, 3]
        assert 0.3 <= height <= 1.8
        x_axis = s.cam_to_world[:3, 0]
        assert abs(x_axis[2]) < np.sin(np.radians(5.01))  # roll near zero: image x stays level
        assert s.intrinsics.width == W and s.intrinsics.height == H


def test_generation_is_deterministic(builder):
    a = generate_scene(builder, np.random.SeedSequence([3, 1]), 1, 64, 48, "d")[0]
    b = generate_scene(builder, np.random.SeedSequence([3, 1]), 1, 64, 48, "d")[0]
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.instance_map, b.instance_map)
    assert np.allclose(np.nan_to_num(a.depth), np.nan_to_num(b.depth))
    assert [o.centre for o in a.objects] == [o.centre for o in b.objects]


HAND_BUILT = [
    # Camera at 0.8 m looking along +x; red box ahead, blue box to its left and behind it.
    [{"class": "box", "size": (0.4, 0.4, 0.4), "colour": "red", "xy": (2.0, 0.0)},
     {"class": "box", "size": (0.3, 0.3, 0.3), "colour": "blue", "xy": (3.5, 1.2)},
     {"class": "cabinet", "size": (0.6, 0.5, 0.9), "colour": "white", "xy": (2.5, -1.4)}],
    # A green box stacked on a brown cabinet, a yellow bin and a second cabinet on the floor.
    [{"class": "cabinet", "size": (0.8, 0.5, 0.8), "colour": "brown", "xy": (2.6, 0.3)},
     {"class": "box", "size": (0.3, 0.3, 0.25), "colour": "green", "xy": (2.6, 0.3), "base": 0.8},
     {"class": "trash bin", "size": (0.3, 0.3, 0.4), "colour": "yellow", "xy": (1.9, -0.9)},
     {"class": "cabinet", "size": (0.6, 0.5, 0.9), "colour": "blue", "xy": (3.4, 1.6)}],
]


def _hand_built(builder, layout=HAND_BUILT[0]):
    scene = builder.build_fixed(layout)
    pose = look_pose([0.0, 0.0, 0.8], 0.0, np.radians(-10), 0.0)
    intr = Intrinsics(100.0, 100.0, 80.0, 60.0, 160, 120)
    sample = builder.render(scene, pose, intr, np.random.default_rng(0), "hand")
    return sample, layout, pose


@pytest.mark.parametrize("layout", HAND_BUILT)
def test_hand_built_scene_answers_match_independent_geometry(builder, layout):
    sample, layout, pose = _hand_built(builder, layout)
    cam = pose[:3, 3]
    world = {it["colour"]: np.array([*it["xy"], it.get("base", 0.0) + it["size"][2] / 2]) for it in layout}
    bottom = {it["colour"]: it.get("base", 0.0) for it in layout}
    top = {it["colour"]: it.get("base", 0.0) + it["size"][2] for it in layout}
    classes = [it["class"] for it in layout]
    expected = {
        "distance_camera": {c: np.linalg.norm(p - cam) for c, p in world.items()},
        "size": {c: max(it["size"]) for c, it in zip(world, layout)},
        "height": {c: it["size"][2] for c, it in zip(world, layout)},
    }
    assert len(sample.objects) == len(layout)
    by_colour = {o.colour: o for o in sample.objects}
    for c, o in by_colour.items():
        assert o.pixels > 0
        assert np.linalg.norm(o.centre) == pytest.approx(expected["distance_camera"][c], abs=0.01)
        assert o.height == pytest.approx(expected["height"][c], abs=0.005)
    # Every generated question on this scene must agree with the hand computation.
    questions = []
    for seed in range(12):
        questions += make_questions(sample, np.random.default_rng(seed), 10)
    colour_of = {o.instance_id: o.colour for o in sample.objects}
    seen = set()
    for q in questions:
        cols = [colour_of[i] for i in q["objects"]]
        value = q["answer"] if q["form"] == "numeric" else q.get("answer_text", q["answer"])
        if q["form"] == "choice" and q["category"] in ("distance_camera", "size", "height", "distance_objects"):
            value = float(value.split()[0])
        cat_ = q["category"]
        seen.add(cat_)
        if cat_ in expected:
            assert value == pytest.approx(expected[cat_][cols[0]], abs=0.011), q
        elif cat_ == "distance_objects":
            assert value == pytest.approx(np.linalg.norm(world[cols[0]] - world[cols[1]]), abs=0.011), q
        elif cat_ == "left_right":  # world +y is the camera's left when looking along +x
            left = world[cols[0]][1] > world[cols[1]][1]
            assert value == ("left" if left else "right"), q
        elif cat_ in ("front_behind", "closer"):
            d = [np.linalg.norm(world[c] - cam) for c in cols]
            if cat_ == "closer":
                nearer = cols[int(np.argmin(d))]
                assert value.startswith(nearer), q
            else:
                assert value == ("in front" if world[cols[0]][0] < world[cols[1]][0] else "behind"), q
        elif cat_ == "above_below":
            above = bottom[cols[0]] >= top[cols[1]] - 0.01
            assert above or bottom[cols[1]] >= top[cols[0]] - 0.01, q
            assert value == ("above" if above else "below"), q
        elif cat_ == "counting":
            assert int(value) == classes.count(q["class_name"]), q
        elif cat_ == "existence":
            assert value == ("yes" if q["class_name"] in classes else "no"), q
    assert {"distance_camera", "distance_objects", "left_right", "counting", "existence"} <= seen
    if any(it.get("base") for it in layout):
        assert "above_below" in seen
