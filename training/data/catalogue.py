"""Object catalogue: the named classes the generator places, with their real-world sizes.

The class list is also the segmentation label space of the bundled checkpoint
(`default_palette(len(CLASS_NAMES))`), so its order is part of the data format: append, never
reorder. Index 0 is background (pixels that hit nothing), 1 and 2 are the room itself.

Each class is either a parametric shape (a few boxes / cylinders / spheres in a named colour) or a
mesh shipped by `pybullet_data`. Sizes are ranges in metres: (length x, width y, height z) for
parametric shapes; meshes are scaled uniformly so that their height falls in `height`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Named colours (RGB in 0..1). Names are what questions say ("the red chair").
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.10, 0.10),
    "green": (0.15, 0.60, 0.20),
    "blue": (0.15, 0.25, 0.80),
    "yellow": (0.92, 0.82, 0.15),
    "orange": (0.95, 0.50, 0.10),
    "purple": (0.50, 0.20, 0.65),
    "white": (0.92, 0.92, 0.92),
    "black": (0.08, 0.08, 0.08),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.45, 0.28, 0.12),
    "pink": (0.95, 0.55, 0.70),
    "cyan": (0.10, 0.75, 0.80),
}


@dataclass(frozen=True)
class Part:
    """One primitive of a parametric object, in units of the object's sampled size.

    `centre` and `half` are fractions of the full size (x, y, z) measured from the object's box
    centre; a cylinder/sphere uses half[0] as radius fraction of size x and half[2] for height.
    `colour` None means "the object's colour"; a name fixes it (legs stay brown, foliage green).
    """

    shape: str  # "box" | "cylinder" | "sphere"
    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    colour: str | None = None


@dataclass(frozen=True)
class ObjectClass:
    name: str
    kind: str  # "parametric" | "mesh"
    size_min: tuple[float, float, float]
    size_max: tuple[float, float, float]
    role: str  # "furniture" (floor only), "small" (floor or on a support)
    parts: tuple[Part, ...] = ()
    mesh: str = ""  # path inside pybullet_data
    mesh_up: str = "z"  # mesh axis that points up
    keep_texture: bool = False  # textured meshes keep their look and get no colour name
    colours: tuple[str, ...] = tuple(COLOURS)
    support: bool = False  # small objects may be placed on its top surface


def _legs(h_leg: float, inset: float = 0.45, w: float = 0.04, colour: str | None = "brown"):
    """Four legs of relative height h_leg under a top, as Parts."""
    z = -0.5 + h_leg / 2
    return tuple(
        Part("box", (sx * inset, sy * inset, z), (w, w, h_leg / 2), colour)
        for sx in (-1, 1)
        for sy in (-1, 1)
    )


_WOOD = ("brown", "white", "black", "gray", "orange")

OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass(
        "table", "parametric", (0.9, 0.6, 0.70), (1.6, 0.9, 0.78), "furniture",
        parts=(Part("box", (0, 0, 0.47), (0.5, 0.5, 0.03)),) + _legs(0.94),
        colours=_WOOD, support=True,
    ),
    ObjectClass(
        "chair", "parametric", (0.42, 0.42, 0.80), (0.52, 0.52, 0.95), "furniture",
        parts=(
            Part("box", (0, 0, -0.02), (0.5, 0.5, 0.03)),
            Part("box", (-0.45, 0, 0.25), (0.05, 0.5, 0.25)),
        ) + _legs(0.45, colour=None, w=0.05),
    ),
    ObjectClass(
        "sofa", "parametric", (1.5, 0.8, 0.75), (2.1, 0.95, 0.90), "furniture",
        parts=(
            Part("box", (0.05, 0, -0.2), (0.45, 0.5, 0.3)),
            Part("box", (-0.42, 0, 0.15), (0.08, 0.5, 0.35)),
            Part("box", (0.05, -0.44, 0.0), (0.45, 0.06, 0.2)),
            Part("box", (0.05, 0.44, 0.0), (0.45, 0.06, 0.2)),
        ),
        colours=("red", "green", "blue", "gray", "brown", "black", "purple", "orange"),
    ),
    ObjectClass(
        "bed", "parametric", (1.9, 0.9, 0.9), (2.1, 1.6, 1.1), "furniture",
        parts=(
            Part("box", (0.03, 0, -0.28), (0.47, 0.5, 0.22)),
            Part("box", (-0.48, 0, 0.0), (0.02, 0.5, 0.5), "brown"),
        ),
        colours=("white", "blue", "gray", "pink", "green", "yellow"), support=True,
    ),
    ObjectClass(
        "cabinet", "parametric", (0.5, 0.4, 0.7), (0.9, 0.6, 1.0), "furniture",
        parts=(Part("box", (0, 0, 0), (0.5, 0.5, 0.5)),), colours=_WOOD + ("blue",), support=True,
    ),
    ObjectClass(
        "bookshelf", "parametric", (0.7, 0.28, 1.5), (1.0, 0.35, 2.0), "furniture",
        parts=(
            Part("box", (0, 0.45, 0), (0.5, 0.05, 0.5)),  # back panel
            Part("box", (0, 0, -0.48), (0.5, 0.5, 0.02)),
            Part("box", (0, 0, -0.16), (0.5, 0.5, 0.015)),
            Part("box", (0, 0, 0.16), (0.5, 0.5, 0.015)),
            Part("box", (0, 0, 0.48), (0.5, 0.5, 0.02)),
            Part("box", (-0.48, 0, 0), (0.02, 0.5, 0.5)),
            Part("box", (0.48, 0, 0), (0.02, 0.5, 0.5)),
        ),
        colours=_WOOD,
    ),
    ObjectClass(
        "box", "parametric", (0.2, 0.2, 0.15), (0.5, 0.45, 0.4), "small",
        parts=(Part("box", (0, 0, 0), (0.5, 0.5, 0.5)),),
    ),
    ObjectClass(
        "bottle", "parametric", (0.06, 0.06, 0.2), (0.09, 0.09, 0.32), "small",
        parts=(
            Part("cylinder", (0, 0, -0.15), (0.5, 0.5, 0.35)),
            Part("cylinder", (0, 0, 0.35), (0.2, 0.2, 0.15)),
        ),
    ),
    ObjectClass(
        "trash bin", "parametric", (0.24, 0.24, 0.3), (0.36, 0.36, 0.5), "furniture",
        parts=(Part("cylinder", (0, 0, 0), (0.5, 0.5, 0.5)),),
    ),
    ObjectClass(
        "lamp", "parametric", (0.35, 0.35, 1.3), (0.45, 0.45, 1.7), "furniture",
        parts=(
            Part("cylinder", (0, 0, -0.49), (0.4, 0.4, 0.01), "black"),
            Part("cylinder", (0, 0, -0.1), (0.04, 0.04, 0.38), "black"),
            Part("cylinder", (0, 0, 0.39), (0.5, 0.5, 0.11)),
        ),
        colours=("white", "yellow", "red", "blue", "green", "orange"),
    ),
    ObjectClass(
        "ball", "parametric", (0.15, 0.15, 0.15), (0.3, 0.3, 0.3), "small",
        parts=(Part("sphere", (0, 0, 0), (0.5, 0.5, 0.5)),),
    ),
    ObjectClass(
        "plant", "parametric", (0.3, 0.3, 0.5), (0.45, 0.45, 0.9), "furniture",
        parts=(
            Part("cylinder", (0, 0, -0.35), (0.3, 0.3, 0.15), "brown"),
            Part("sphere", (0, 0, 0.2), (0.5, 0.5, 0.3), "green"),
        ),
        colours=("green",),
    ),
    ObjectClass("soccer ball", "mesh", (0, 0, 0.2), (0, 0, 0.24), "small",
                mesh="soccerball.obj", keep_texture=True),
    ObjectClass("mug", "mesh", (0, 0, 0.09), (0, 0, 0.13), "small", mesh="objects/mug.obj"),
    ObjectClass("toy duck", "mesh", (0, 0, 0.12), (0, 0, 0.25), "small", mesh="duck.obj",
                mesh_up="y", colours=("yellow", "orange", "white", "pink")),
    ObjectClass("teddy bear", "mesh", (0, 0, 0.25), (0, 0, 0.45), "small",
                mesh="teddy2_VHACD_CHs.obj", mesh_up="y",
                colours=("brown", "white", "pink", "orange", "gray")),
    ObjectClass("toy rabbit", "mesh", (0, 0, 0.15), (0, 0, 0.3), "small", mesh="bunny.obj",
                mesh_up="y", colours=("white", "gray", "pink", "brown")),
    ObjectClass("tray", "mesh", (0, 0, 0.04), (0, 0, 0.06), "small", mesh="tray/tray_textured.obj",
                colours=("gray", "black", "white", "blue", "red")),
)

# Label space: background, room surfaces, then the object classes in catalogue order.
CLASS_NAMES: tuple[str, ...] = ("background", "floor", "wall") + tuple(
    c.name for c in OBJECT_CLASSES
)
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
BY_NAME: dict[str, ObjectClass] = {c.name: c for c in OBJECT_CLASSES}

# Plural forms used by counting questions.
PLURAL: dict[str, str] = {name: name + ("es" if name.endswith(("x", "s")) else "s")
                          for name in CLASS_NAMES}
PLURAL["shelf"] = "shelves"
PLURAL["bookshelf"] = "bookshelves"

# pybullet_data textures for floors and walls (tinted by a random colour).
SURFACE_TEXTURES: tuple[str, ...] = (
    "checker_blue.png", "tex256.png", "table/table.png", "checker_grid.jpg", "cube.png",
)
