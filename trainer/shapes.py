"""A synthetic "shapes" data set: pictures of one to three coloured shapes and their captions.

It exists so that the whole pipeline (data, training, checkpoint, worker, evaluation) trains and
is measurably right offline, with no download. Every sample is a pure function of ``(seed, index)``,
so a data set is just a seed and a length, and a validation set drawn from another seed is fresh.

The caption is fully determined by the picture, so a model can learn it exactly:

- objects sit in a fixed layout (one object; a pair side by side or one above the other; a pair
  above or below a single object) with small position jitter that never blurs the relation;
- objects are described in a canonical order (top to bottom, then left to right), so each
  picture has exactly one caption;
- two identical objects in one row or column are counted ("two small red circles");
- sizes, colours and shapes are far apart (big is twice small; saturated colours on light
  backgrounds; no rotation, which would turn a square into a diamond).

Examples: "a big green star", "a small red circle left of a big blue square",
"two small red circles above a big blue square", "a big orange diamond and a small purple
triangle above a small yellow star". At most 14 words, so a caption fits the worker's default
of 16 new tokens with a word-level tokenizer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (20, 150, 45),
    "blue": (25, 70, 215),
    "yellow": (240, 205, 0),
    "purple": (125, 35, 170),
    "orange": (245, 125, 0),
}
# Object diameter as a fraction of the image side; big is twice small so they never look alike.
SIZES: dict[str, float] = {"small": 0.19, "big": 0.38}

# Layouts and how often each is drawn: more weight on the harder multi-object layouts.
LAYOUTS = ("single", "row", "column", "pair_above", "pair_below")
LAYOUT_WEIGHTS = (1, 2, 2, 2, 2)

# Pictures are drawn this many times larger and reduced, which gives smooth (anti-aliased) edges.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    size: str
    colour: str
    shape: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    def plural(self) -> str:
        return f"two {self.size} {self.colour} {self.shape}s"


@dataclass(frozen=True)
class Placed:
    thing: Thing
    x: float  # centre, as a fraction of the image side
    y: float


@dataclass(frozen=True)
class Scene:
    layout: str
    objects: tuple[Placed, ...]  # in canonical order: top to bottom, then left to right
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # gradient from, to

    def caption(self) -> str:
        return caption_for(self.layout, [p.thing for p in self.objects])


def _group(a: Thing, b: Thing) -> str:
    """Two objects in one row or column: counted when they are the same."""
    return a.plural() if a == b else f"{a.phrase()} and {b.phrase()}"


def caption_for(layout: str, things: list[Thing]) -> str:
    if layout == "single":
        return things[0].phrase()
    if layout == "row":
        a, b = things
        return a.plural() if a == b else f"{a.phrase()} left of {b.phrase()}"
    if layout == "column":
        a, b = things
        return a.plural() if a == b else f"{a.phrase()} above {b.phrase()}"
    if layout == "pair_above":  # two side by side on top, one below
        a, b, c = things
        return f"{_group(a, b)} above {c.phrase()}"
    if layout == "pair_below":  # one on top, two side by side below
        a, b, c = things
        return f"{a.phrase()} above {_group(b, c)}"
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _random_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(tuple(SIZES)), rng.choice(tuple(COLOURS)), rng.choice(SHAPES))


def _things(rng: random.Random, count: int) -> list[Thing]:
    things = [_random_thing(rng) for _ in range(count)]
    # Identical neighbours ("two ...") would be rare (1 in 60) if left to chance; make them
    # common enough to learn by copying the first object into the second slot now and then.
    if count >= 2 and rng.random() < 0.15:
        things[1] = things[0]
    if count == 3 and rng.random() < 0.1:
        things[2] = things[1]
    return things


def _background(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Light, low-saturation colours, so every object stands out whatever its colour."""

    def light() -> tuple[int, int, int]:
        base = rng.randint(200, 250)
        return tuple(min(255, max(170, base + rng.randint(-25, 25))) for _ in range(3))  # type: ignore[return-value]

    return light(), light()


def sample_scene(seed: int, index: int) -> Scene:
    """The ``index``-th scene of the data set named by ``seed``; a pure function of both."""
    # A string seed hashes deterministically (unlike hash() of a tuple across processes).
    rng = random.Random(f"shapes:{seed}:{index}")
    layout = rng.choices(LAYOUTS, weights=LAYOUT_WEIGHTS)[0]
    jitter = 0.06  # at most this far from the slot centre: relations stay unambiguous

    def j() -> float:
        return rng.uniform(-jitter, jitter)

    if layout == "single":
        things = _things(rng, 1)
        slots = [(0.5 + 2 * j(), 0.5 + 2 * j())]
    elif layout == "row":
        things = _things(rng, 2)
        y = 0.5 + 2 * j()
        slots = [(0.25 + j(), y + j() / 2), (0.75 + j(), y + j() / 2)]
    elif layout == "column":
        things = _things(rng, 2)
        x = 0.5 + 2 * j()
        slots = [(x + j() / 2, 0.25 + j()), (x + j() / 2, 0.75 + j())]
    elif layout == "pair_above":
        things = _things(rng, 3)
        slots = [(0.25 + j(), 0.25 + j()), (0.75 + j(), 0.25 + j()), (0.5 + 2 * j(), 0.75 + j())]
    else:  # pair_below
        things = _things(rng, 3)
        slots = [(0.5 + 2 * j(), 0.25 + j()), (0.25 + j(), 0.75 + j()), (0.75 + j(), 0.75 + j())]
    objects = tuple(Placed(t, x, y) for t, (x, y) in zip(things, slots, strict=True))
    return Scene(layout, objects, _background(rng))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.86  # same visual weight as a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"{shape!r} is not a polygon shape")


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene as an RGB image of ``image_size`` pixels per side."""
    side = image_size * SUPERSAMPLE
    start, end = (np.asarray(c, dtype=np.float32) for c in scene.background)
    # A diagonal gradient, so backgrounds vary within a picture as well as between pictures.
    # Computed at the output size and enlarged: smooth anyway, and far cheaper than at full size.
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    t = (ramp[:, None] + ramp[None, :]) / 2
    pixels = start + (end - start) * t[..., None]
    small = Image.fromarray(pixels.astype(np.uint8), "RGB")
    canvas = small.resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for placed in scene.objects:
        cx, cy = placed.x * side, placed.y * side
        r = SIZES[placed.thing.size] * side / 2
        colour = COLOURS[placed.thing.colour]
        if placed.thing.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(placed.thing.shape, cx, cy, r), fill=colour)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def sample(seed: int, index: int, image_size: int) -> tuple[Image.Image, str]:
    scene = sample_scene(seed, index)
    return render(scene, image_size), scene.caption()


class ShapesDataset:
    """``length`` pictures drawn from ``seed``, rendered on demand (nothing is kept in memory)."""

    def __init__(self, seed: int, length: int, image_size: int) -> None:
        if length < 1:
            raise ValueError(f"a shapes data set needs at least one picture, got length={length}")
        self.seed = seed
        self.length = length
        self.image_size = image_size

    def __len__(self) -> int:
        return self.length

    def image(self, index: int) -> Image.Image:
        return render(sample_scene(self.seed, index), self.image_size)

    def captions(self, index: int) -> list[str]:
        return [sample_scene(self.seed, index).caption()]

    def describe(self) -> dict[str, object]:
        return {"kind": "shapes", "seed": self.seed, "length": self.length, "image_size": self.image_size}


def all_captions_sample(seed: int, count: int) -> list[str]:
    """Captions only (no rendering): cheap, for training a tokenizer or counting variety."""
    return [sample_scene(seed, i).caption() for i in range(count)]
