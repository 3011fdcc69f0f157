"""Synthetic indoor scenes on PyBullet with exact ground truth.

A scene is a textured room with furniture and small objects from the catalogue, laid out without
overlap, dropped and settled with physics, then seen from several robot-like camera poses. Every
view is rendered with PyBullet's CPU renderer (RGB, depth buffer, body segmentation) and becomes a
`Sample` with metric planar depth, class and instance maps, intrinsics, pose and per-object boxes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pybullet as pb
import pybullet_data
from PIL import Image

from . import catalogue as cat
from .geometry import (Intrinsics, linearize_depth_buffer, look_pose, opengl_projection,
                       opengl_view, project, quat_to_matrix)
from .schema import ObjectAnnotation, Sample

NEAR, FAR = 0.05, 30.0
DEPTH_RANGE = (1e-3, 10.0)  # metric range of Stage-1 depth targets (COOPER's NYU indoor range)
DATA = pybullet_data.getDataPath()
STACK_P = 0.85  # chance that a small object goes onto a support (table, cabinet, bed) if one fits
STACK_SUPPORTS = ("table", "cabinet")  # flat-topped supports: preferred, and added to a scene lacking one
# Left on the floor by the stacking layout: balls roll off tops and the teddy bear topples
# (3 of 15 stayed up in a 40-scene trial, knocking neighbours off with it).
FLOOR_ONLY = ("ball", "soccer ball", "teddy bear")
STACKED_VIEW_P = 0.65  # chance that a camera aims at an object resting on another ...
STACKED_VIEW_RANGE_M = 3.0  # ... from at most this far (horizontally)


@dataclass
class PlacedObject:
    body: int
    cls: cat.ObjectClass
    colour: str | None
    size: np.ndarray  # tight box extents in the object frame
    points: np.ndarray  # [N,3] object-frame points on the surface, for the vertical extent
    on: PlacedObject | None = None  # the support it was placed on (None: the floor)


@functools.lru_cache(maxsize=None)
def _mesh_vertices(rel_path: str) -> np.ndarray:
    """Vertices of a pybullet_data .obj (cached: read once per process)."""
    with open(os.path.join(DATA, rel_path)) as f:
        return np.array([[float(x) for x in line.split()[1:4]] for line in f if line.startswith("v ")])


_UP_ROTATION = {"z": np.eye(3), "y": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])}


def _primitive_points(shape: str, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Points bounding a primitive tightly enough for extents (corners / rims / sphere samples)."""
    if shape == "box":
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
        return centre + signs * half
    if shape == "cylinder":
        a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        rim = np.stack([np.cos(a) * half[0], np.sin(a) * half[0], np.zeros_like(a)], 1)
        return centre + np.concatenate([rim + [0, 0, half[2]], rim - [0, 0, half[2]]])
    # Fibonacci sphere: even coverage so every tilt gives the right extent within ~1%.
    i = np.arange(200) + 0.5
    phi, theta = np.arccos(1 - 2 * i / 200), np.pi * (1 + 5 ** 0.5) * i
    return centre + half[0] * np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)


def _parametric_parts(cls: cat.ObjectClass, size: np.ndarray):
    """Surface points of a parametric object of `size` (object frame) and each part's
    (part, centre, PyBullet dimensions)."""
    points, dims = [], []
    for part in cls.parts:
        centre = np.array(part.centre) * size
        if part.shape == "box":
            half = np.array(part.half) * size
            d = half
        else:
            r = part.half[0] * size[0]
            half = np.array([r, r, part.half[2] * size[2] if part.shape == "cylinder" else r])
            d = (r, 2 * half[2])
        points.append(_primitive_points(part.shape, centre, half))
        dims.append((part, centre, d))
    return np.concatenate(points), dims


def typical_extents(cls: cat.ObjectClass) -> np.ndarray:
    """Tight box extents (x, y, z) of an object of this class at the middle of its size range,
    as the builder makes it (a mesh is scaled to the middle of its height range)."""
    mid = (np.array(cls.size_min) + np.array(cls.size_max)) / 2
    if cls.kind == "mesh":
        v = _mesh_vertices(cls.mesh) @ _UP_ROTATION[cls.mesh_up].T
        extent = v.max(0) - v.min(0)
        return extent * mid[2] / extent[2]
    points, _ = _parametric_parts(cls, mid)
    return points.max(0) - points.min(0)


def _matrix_to_quat(R: np.ndarray) -> list[float]:
    """3x3 rotation -> (x, y, z, w). Only used for the fixed axis-permutation rotations above."""
    w = np.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    return [(R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w), w]


class SceneBuilder:
    """Owns one PyBullet DIRECT client; builds, settles and renders scenes in it."""

    def __init__(self):
        self.cid = pb.connect(pb.DIRECT)
        self._white_png = os.path.join(tempfile.mkdtemp(prefix="cooper_tex_"), "white.png")
        Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(self._white_png)

    def close(self):
        pb.disconnect(self.cid)

    # ---- construction --------------------------------------------------------------------------
    def _reset(self):
        pb.resetSimulation(physicsClientId=self.cid)
        pb.setGravity(0, 0, -9.81, physicsClientId=self.cid)
        # Textures are per-simulation in PyBullet: reload after every reset.
        self.white_tex = pb.loadTexture(self._white_png, physicsClientId=self.cid)
        self.textures = [pb.loadTexture(os.path.join(DATA, t), physicsClientId=self.cid)
                         for t in cat.SURFACE_TEXTURES]

    def _static_box(self, centre, half, rgb, texture):
        c = self.cid
        col = pb.createCollisionShape(pb.GEOM_BOX, halfExtents=half, physicsClientId=c)
        vis = pb.createVisualShape(pb.GEOM_BOX, halfExtents=half, physicsClientId=c)
        body = pb.createMultiBody(0, col, vis, basePosition=centre, physicsClientId=c)
        pb.changeVisualShape(body, -1, textureUniqueId=texture, rgbaColor=list(rgb) + [1],
                             physicsClientId=c)
        return body

    def _shape(self, part_shape: str, dims, rgba, frame_pos, frame_orn=(0, 0, 0, 1), mesh=None):
        """Collision and visual shape of one primitive or mesh."""
        c = self.cid
        kw_common = dict(physicsClientId=c)
        if part_shape == "box":
            args = dict(shapeType=pb.GEOM_BOX, halfExtents=list(dims))
        elif part_shape == "cylinder":
            args = dict(shapeType=pb.GEOM_CYLINDER, radius=dims[0], height=dims[1])
        elif part_shape == "sphere":
            args = dict(shapeType=pb.GEOM_SPHERE, radius=dims[0])
        else:  # mesh
            args = dict(shapeType=pb.GEOM_MESH, fileName=os.path.join(DATA, mesh), meshScale=list(dims))
        col = pb.createCollisionShape(**args, collisionFramePosition=list(frame_pos),
                                      collisionFrameOrientation=list(frame_orn), **kw_common)
        if "height" in args:  # the visual API calls a cylinder's height "length"
            args["length"] = args.pop("height")
        vis = pb.createVisualShape(**args, rgbaColor=rgba, visualFramePosition=list(frame_pos),
                                   visualFrameOrientation=list(frame_orn), **kw_common)
        return col, vis

    def _parametric(self, cls: cat.ObjectClass, size: np.ndarray, colour: str, pos, orn):
        """Multi-link body, one fixed link per part; the base frame is the tight box centre."""
        points, dims = _parametric_parts(cls, size)
        lo, hi = points.min(0), points.max(0)
        offset = (lo + hi) / 2  # recentre so the base frame is the tight box centre
        links_col, links_vis, links_pos = [], [], []
        for part, centre, d in dims:
            rgb = cat.COLOURS[part.colour or colour]
            col, vis = self._shape(part.shape, d, list(rgb) + [1], (0, 0, 0))
            links_col.append(col)
            links_vis.append(vis)
            links_pos.append((centre - offset).tolist())
        n = len(links_col)
        mass = float(np.prod(hi - lo)) * 200.0  # rough furniture density, kg
        body = pb.createMultiBody(
            baseMass=mass / (n + 1), baseCollisionShapeIndex=-1, baseVisualShapeIndex=-1,
            basePosition=pos, baseOrientation=orn,
            linkMasses=[mass / (n + 1)] * n, linkCollisionShapeIndices=links_col,
            linkVisualShapeIndices=links_vis, linkPositions=links_pos,
            linkOrientations=[[0, 0, 0, 1]] * n, linkInertialFramePositions=[[0, 0, 0]] * n,
            linkInertialFrameOrientations=[[0, 0, 0, 1]] * n, linkParentIndices=[0] * n,
            linkJointTypes=[pb.JOINT_FIXED] * n, linkJointAxis=[[0, 0, 1]] * n,
            physicsClientId=self.cid)
        return body, hi - lo, points - offset

    def _mesh(self, cls: cat.ObjectClass, height: float, colour: str | None, pos, orn):
        R = _UP_ROTATION[cls.mesh_up]
        v = _mesh_vertices(cls.mesh) @ R.T
        lo, hi = v.min(0), v.max(0)
        s = height / (hi - lo)[2]
        frame_pos = -s * (lo + hi) / 2
        rgba = [1, 1, 1, 1] if colour is None else list(cat.COLOURS[colour]) + [1]
        col, vis = self._shape("mesh", (s, s, s), rgba, frame_pos, _matrix_to_quat(R), mesh=cls.mesh)
        mass = float(np.prod(s * (hi - lo))) * 300.0
        body = pb.createMultiBody(mass, col, vis, basePosition=pos, baseOrientation=orn,
                                  physicsClientId=self.cid)
        if colour is not None:  # plain white texture so the named colour is the colour seen
            pb.changeVisualShape(body, -1, textureUniqueId=self.white_tex, rgbaColor=rgba,
                                 physicsClientId=self.cid)
        return body, s * (hi - lo), s * v + frame_pos

    # ---- layout --------------------------------------------------------------------------------
    def _room(self, rng, room: np.ndarray, wall_h: float) -> set[int]:
        """Textured floor and four walls; returns their body ids."""
        tint = lambda: rng.uniform(0.55, 1.0, 3)  # noqa: E731  (light tints keep textures visible)
        self._static_box([0, 0, -0.05], [room[0] / 2 + 0.2, room[1] / 2 + 0.2, 0.05], tint(),
                         self.textures[rng.integers(len(self.textures))])
        wall_tex, wall_rgb = self.textures[rng.integers(len(self.textures))], tint()
        for axis in (0, 1):
            for sign in (-1, 1):
                centre = [0.0, 0.0, wall_h / 2]
                centre[axis] = sign * (room[axis] / 2 + 0.05)
                half = [room[0] / 2 + 0.1, room[1] / 2 + 0.1, wall_h / 2]
                half[axis] = 0.05
                self._static_box(centre, half, wall_rgb, wall_tex)
        return set(range(pb.getNumBodies(physicsClientId=self.cid)))

    def _add(self, cls: cat.ObjectClass, size, colour, pos, yaw) -> PlacedObject:
        orn = pb.getQuaternionFromEuler([0, 0, yaw])
        make = self._mesh if cls.kind == "mesh" else self._parametric
        body, box, points = make(cls, size if cls.kind != "mesh" else size[2], colour, pos, orn)
        return PlacedObject(body, cls, colour, box, points)

    def _finish(self, room, wall_h, static, objects) -> dict:
        """Settle with physics, drop anything that left the room, measure interpenetration."""
        self._settle()
        kept = []
        for o in objects:
            pos, _ = pb.getBasePositionAndOrientation(o.body, physicsClientId=self.cid)
            if abs(pos[0]) > room[0] / 2 or abs(pos[1]) > room[1] / 2 or pos[2] < 0:
                pb.removeBody(o.body, physicsClientId=self.cid)
            else:
                kept.append(o)
        contacts = pb.getContactPoints(physicsClientId=self.cid)
        penetration = max([0.0] + [-c[8] for c in contacts])
        return {"room": np.asarray(room, float), "wall_height": wall_h, "objects": kept,
                "static": static, "max_penetration_m": float(penetration)}

    def build(self, rng: np.random.Generator, min_objects: int = 3, max_objects: int = 15,
              stacking: bool = True) -> dict:
        """Build and settle a random room; returns the scene description used for rendering.

        With `stacking` (the data engine's layout) furniture is placed before small objects, a
        scene with a small object gets a support (table or cabinet) if it drew none, small objects
        (except FLOOR_ONLY ones, which roll or topple off) go onto a support with probability STACK_P, tables and
        cabinets first, and the first one always does where one fits,
        so most scenes hold an object resting on another (what above/below questions need).
        `stacking=False` is the original interleaved layout, kept so that renders made with it
        (the ROS demo sequence) stay reproducible."""
        self._reset()
        room = rng.uniform([3.5, 3.5], [7.0, 7.0])
        wall_h = rng.uniform(2.6, 3.2)
        static = self._room(rng, room, wall_h)
        n = int(rng.integers(min_objects, max_objects + 1))
        furniture = [c for c in cat.OBJECT_CLASSES if c.role == "furniture"]
        small = [c for c in cat.OBJECT_CLASSES if c.role == "small"]
        if stacking:
            return self._finish(room, wall_h, static, self._stacked_layout(rng, room, n, furniture, small))
        footprints: list[tuple[np.ndarray, float]] = []  # (xy, radius) on the floor
        supports: list[tuple[PlacedObject, list]] = []  # support object, items placed on it
        objects: list[PlacedObject] = []
        for _ in range(n):
            cls = furniture[rng.integers(len(furniture))] if rng.random() < 0.45 else small[rng.integers(len(small))]
            size = self._sample_size(cls, rng)
            colour = None if cls.keep_texture else cls.colours[rng.integers(len(cls.colours))]
            yaw = rng.uniform(-np.pi, np.pi)
            placed = None
            if cls.role == "small" and supports and rng.random() < 0.75:
                placed = self._place_on_support(size, supports, rng)
            if placed is None:
                placed = self._place_on_floor(size, room, footprints, rng)
            if placed is None:
                continue
            obj = self._add(cls, size, colour, placed, yaw)
            objects.append(obj)
            if cls.support:
                supports.append((obj, []))
        return self._finish(room, wall_h, static, objects)

    def _stacked_layout(self, rng, room, n, furniture, small) -> list[PlacedObject]:
        classes = [furniture[rng.integers(len(furniture))] if rng.random() < 0.45 else small[rng.integers(len(small))]
                   for _ in range(n)]
        # At least one support and one small object that can go on it (n >= 2 leaves room).
        if n >= 2 and not any(c.support for c in classes):
            i = next((i for i, c in enumerate(classes) if c.role == "furniture"), 0)
            tops = [c for c in furniture if c.name in STACK_SUPPORTS]
            classes[i] = tops[rng.integers(len(tops))]
        stackable = [c for c in small if c.name not in FLOOR_ONLY]
        if n >= 2 and not any(c in stackable for c in classes):
            i = next((i for i, c in enumerate(classes) if not c.support), n - 1)  # keeps a support
            classes[i] = stackable[rng.integers(len(stackable))]
        classes.sort(key=lambda c: c.role != "furniture")  # stable: furniture first, then small
        footprints: list[tuple[np.ndarray, float]] = []
        supports: list[tuple[PlacedObject, list]] = []
        objects: list[PlacedObject] = []
        stacked = False
        for cls in classes:
            size = self._sample_size(cls, rng)
            colour = None if cls.keep_texture else cls.colours[rng.integers(len(cls.colours))]
            yaw = rng.uniform(-np.pi, np.pi)
            placed, on = None, None
            if cls.role == "small" and cls.name not in FLOOR_ONLY and supports and (not stacked or rng.random() < STACK_P):
                # Any support it fits on, flat tops first: on a bed it sits below the headboard,
                # inside the bed's box, so it is neither above nor below the bed.
                for k in sorted(rng.permutation(len(supports)),
                                key=lambda k: supports[k][0].cls.name not in STACK_SUPPORTS):
                    placed = self._place_on_support(size, [supports[k]], rng)
                    if placed is not None:
                        on = supports[k][0]
                        break
            if placed is None:
                placed = self._place_on_floor(size, room, footprints, rng)
            if placed is None:
                continue
            obj = self._add(cls, size, colour, placed, yaw)
            obj.on = on
            stacked |= on is not None
            objects.append(obj)
            if cls.support:
                supports.append((obj, []))
        return objects

    def build_fixed(self, layout: list[dict], room=(9.0, 9.0), wall_h: float = 3.0) -> dict:
        """A hand-specified scene: items {class, size (x,y,z), colour, xy, yaw, base} whose bottom
        starts at height `base` (default 0: the floor; use a support's height to stack)."""
        self._reset()
        static = self._room(np.random.default_rng(0), np.asarray(room, float), wall_h)
        objects = [self._add(cat.BY_NAME[it["class"]], np.asarray(it["size"], float), it.get("colour"),
                             [it["xy"][0], it["xy"][1], it.get("base", 0.0) + it["size"][2] / 2 + 0.002],
                             it.get("yaw", 0.0))
                   for it in layout]
        return self._finish(room, wall_h, static, objects)

    @staticmethod
    def _sample_size(cls: cat.ObjectClass, rng) -> np.ndarray:
        lo, hi = np.array(cls.size_min), np.array(cls.size_max)
        round_shape = cls.kind == "mesh" or any(p.shape != "box" for p in cls.parts)
        t = rng.random() if round_shape else rng.random(3)  # round things scale uniformly
        return lo + t * (hi - lo)

    @staticmethod
    def _place_on_floor(size, room, footprints, rng):
        r = 0.5 * float(np.hypot(size[0], size[1]))
        for _ in range(30):
            xy = rng.uniform(-room / 2 + r + 0.05, room / 2 - r - 0.05)
            if all(np.linalg.norm(xy - c) > r + cr + 0.05 for c, cr in footprints):
                footprints.append((xy, r))
                return [xy[0], xy[1], size[2] / 2 + 0.005]
        return None

    def _place_on_support(self, size, supports, rng):
        sup, items = supports[rng.integers(len(supports))]
        pos, orn = pb.getBasePositionAndOrientation(sup.body, physicsClientId=self.cid)
        R = quat_to_matrix(orn)
        r = 0.5 * float(np.hypot(size[0], size[1]))
        free = sup.size[:2] / 2 - r
        if np.any(free <= 0):
            return None
        for _ in range(20):
            local = rng.uniform(-free, free)
            if all(np.linalg.norm(local - c) > r + cr + 0.02 for c, cr in items):
                items.append((local, r))
                p = np.array(pos) + R @ np.array([local[0], local[1], sup.size[2] / 2 + size[2] / 2 + 0.01])
                return p.tolist()
        return None

    def _settle(self, steps: int = 360):
        for _ in range(steps):
            pb.stepSimulation(physicsClientId=self.cid)

    # ---- cameras and rendering -----------------------------------------------------------------
    def sample_view(self, scene: dict, rng, width: int, height: int, min_visible: int = 2,
                    stacked_view_p: float = STACKED_VIEW_P):
        """A robot-like camera (height 0.3-1.8 m, small roll) that sees >= min_visible objects.

        It aims near a random object, or with probability `stacked_view_p` near one that was
        placed on a support, from within STACKED_VIEW_RANGE_M (so that the pair is in view)."""
        room = scene["room"]
        centres = [np.array(pb.getBasePositionAndOrientation(o.body, physicsClientId=self.cid)[0])
                   for o in scene["objects"]]
        stacked = [i for i, o in enumerate(scene["objects"]) if o.on is not None]
        radii = [0.5 * float(np.hypot(*o.size[:2])) for o in scene["objects"]]
        for _ in range(200):
            hfov = np.radians(rng.uniform(55, 90))
            fx = width / 2 / np.tan(hfov / 2)
            intr = Intrinsics(fx, fx * rng.uniform(0.98, 1.02), width / 2 + rng.normal(0, 0.01 * width),
                              height / 2 + rng.normal(0, 0.01 * height), width, height)
            xy = rng.uniform(-room / 2 + 0.3, room / 2 - 0.3)
            if any(np.linalg.norm(xy - c[:2]) < r + 0.25 for c, r in zip(centres, radii)):
                continue
            pos = np.array([xy[0], xy[1], rng.uniform(0.3, 1.8)])
            at_stack = bool(stacked) and stacked_view_p > 0 and rng.random() < stacked_view_p
            aim = stacked[rng.integers(len(stacked))] if at_stack else rng.integers(len(centres))
            target = centres[aim] + rng.normal(0, 0.3, 3)
            d = target - pos
            if at_stack and np.hypot(d[0], d[1]) > STACKED_VIEW_RANGE_M:
                continue  # too far for the small object on top to be clearly visible
            yaw = np.arctan2(d[1], d[0])
            pitch = np.clip(np.arctan2(d[2], np.hypot(d[0], d[1])), np.radians(-60), np.radians(15))
            roll = np.clip(rng.normal(0, np.radians(2)), -np.radians(5), np.radians(5))
            pose = look_pose(pos, yaw, pitch, roll)
            # Cheap pre-check before rendering: enough object centres in front and in frame.
            cam = (np.array(centres) - pose[:3, 3]) @ pose[:3, :3]
            in_front = cam[:, 2] > 0.3
            uv = project(cam[in_front], intr)
            inside = (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
            if inside.sum() >= min_visible:
                return pose, intr
        raise RuntimeError("no camera pose sees enough objects")

    def render(self, scene: dict, pose: np.ndarray, intr: Intrinsics, rng, sample_id: str) -> Sample:
        light_dir = [*rng.normal(0, 1, 2), rng.uniform(1.0, 3.0)]
        # TinyRenderer samples pixel (u, v) at screen point (u, v + 1) rather than at its centre
        # (u + 0.5, v + 0.5); shifting the principal point makes every pixel see its centre ray.
        sampled = dataclasses.replace(intr, cx=intr.cx - 0.5, cy=intr.cy + 0.5)
        _, _, rgba, dbuf, seg = pb.getCameraImage(
            intr.width, intr.height, opengl_view(pose), opengl_projection(sampled, NEAR, FAR),
            renderer=pb.ER_TINY_RENDERER, lightDirection=light_dir,
            lightColor=rng.uniform(0.85, 1.0, 3).tolist(), lightDistance=10.0,
            shadow=int(rng.random() < 0.5), lightAmbientCoeff=rng.uniform(0.45, 0.7),
            lightDiffuseCoeff=rng.uniform(0.3, 0.55), lightSpecularCoeff=rng.uniform(0.0, 0.15),
            physicsClientId=self.cid)
        h, w = intr.height, intr.width
        rgb = np.asarray(rgba, np.uint8).reshape(h, w, 4)[..., :3].copy()
        seg = np.asarray(seg, np.int64).reshape(h, w)
        depth = linearize_depth_buffer(np.asarray(dbuf, np.float32).reshape(h, w), NEAR, FAR)
        depth[seg < 0] = np.nan  # rays that hit nothing have no depth

        n_bodies = max(list(scene["static"]) + [o.body for o in scene["objects"]]) + 1
        uid_class = np.zeros(n_bodies + 1, np.int32)  # index uid+1 so that -1 (nothing) maps to 0
        uid_inst = np.zeros(n_bodies + 1, np.int32)
        floor_uid = min(scene["static"])
        for uid in scene["static"]:
            uid_class[uid + 1] = cat.CLASS_ID["floor" if uid == floor_uid else "wall"]
        world_to_cam = np.linalg.inv(pose)
        objects = []
        for k, o in enumerate(scene["objects"], start=1):
            uid_class[o.body + 1] = cat.CLASS_ID[o.cls.name]
            uid_inst[o.body + 1] = k
        class_map = uid_class[seg + 1]
        instance_map = uid_inst[seg + 1]
        for k, o in enumerate(scene["objects"], start=1):
            pos, orn = pb.getBasePositionAndOrientation(o.body, physicsClientId=self.cid)
            R_wo = quat_to_matrix(orn)
            centre = world_to_cam[:3, :3] @ np.array(pos) + world_to_cam[:3, 3]
            rotation = world_to_cam[:3, :3] @ R_wo
            z_world = (o.points @ R_wo.T)[:, 2]
            ys, xs = np.nonzero(instance_map == k)
            objects.append(ObjectAnnotation(
                instance_id=k, class_name=o.cls.name, class_id=cat.CLASS_ID[o.cls.name], colour=o.colour,
                centre=centre.tolist(), size=o.size.tolist(), rotation=rotation.tolist(),
                height=float(z_world.max() - z_world.min()),
                bbox2d=[int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] if len(xs) else None,
                pixels=int(len(xs))))
        return Sample(
            sample_id=sample_id, source="synth", rgb=rgb, depth=depth, class_map=class_map,
            instance_map=instance_map, class_names=list(cat.CLASS_NAMES), intrinsics=intr,
            cam_to_world=pose, depth_range=DEPTH_RANGE, objects=objects,
            meta={"room_size_m": scene["room"].tolist(), "wall_height_m": float(scene["wall_height"]),
                  "max_penetration_m": scene["max_penetration_m"], "light_direction": light_dir})


def generate_scene(builder: SceneBuilder, seed_seq: np.random.SeedSequence, views: int, width: int,
                   height: int, scene_id: str) -> list[Sample]:
    """One scene seen from `views` cameras; deterministic in `seed_seq`."""
    rng = np.random.default_rng(seed_seq)
    scene = builder.build(rng)
    while len(scene["objects"]) < 2:  # a degenerate layout: draw again from the same stream
        scene = builder.build(rng)
    samples = []
    for v in range(views):
        pose, intr = builder.sample_view(scene, rng, width, height)
        samples.append(builder.render(scene, pose, intr, rng, f"{scene_id}_v{v:02d}"))
    return samples
