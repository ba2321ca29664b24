"""The scene3d task: procedural rooms of boxes, spheres and cylinders, seen from posed RGB-D views, with
questions that need 3-D.

Rooms (`sample_scene`)
    A 4 x 4 m room (floor checkered in 0.5 m tiles, walls 2.4 m high) with one magenta door on one of its four
    walls, and 3 to 5 objects standing on the floor, at least 1 m apart (centre to centre), each of a different
    easy-VQA colour. Kinds have fixed sizes (so that a kind is also told apart by its shape and height):
    box 0.5 x 0.5 x 0.8 m (random yaw), sphere radius 0.28 m, cylinder radius 0.3 m and 0.3 m high. At most 3
    objects of one kind. Each object is textured from one easy-VQA image of its colour (`object_texture`):
    the shape keeps its pixels and the image's background takes a darker shade of the shape's colour, so the
    whole object reads as that colour. Train scenes use only easy-VQA train images and test scenes only test
    images; the scene geometry comes from a seed string that names the split, so train and test scenes differ.

Views (`render_scene`), exact depth
    `views` cameras (default 4) stand near the room's corners at about 2 m height and look at the middle of
    the room (position and target jittered), with a horizontal field of view of 80 degrees. Each view is
    ray-cast by `scene3d_render` against the analytic surfaces: RGB uint8, z-depth in metres (0 where a ray
    leaves the room), per-pixel labels. The scene is "scanned" in a raw frame: a random rigid motion (yaw
    and translation) of the aligned room frame; the camera-to-world poses are given in that raw frame and
    `axis_align` (4 x 4) maps raw to aligned coordinates (p_aligned = axis_align @ p_raw), as ScanNet's
    axis-alignment matrices do. Questions speak of the aligned room.

Question types (`qtype`), one-word answers
    ``nearest``  "what color is the object nearest the red box?"   -> a colour. Distance: between the
                 centres of the objects' bounding volumes, in 3-D; asked only when the nearest object is at
                 least `NEAREST_MARGIN` closer than the second nearest.
    ``count``    "how many spheres are there?"                      -> a digit (0 to 3)
    ``left``     "is the blue object left of the green one, seen from the door?" -> yes / no. Seen from the
                 door: standing in the doorway and looking straight into the room (along the door wall's
                 inward normal); "left of" compares the two objects' centres along that viewer's left axis,
                 asked only when they differ by at least `LEFT_MARGIN`. Balanced 50/50.

Determinism
    `make_samples(split, n, seed, ...)` is a pure function of its arguments (a `random.Random` seeded with a
    string of them); the first k samples of a call with n > k equal a call with n = k. Question types cycle
    through `qtypes`, so any n divisible by 3 is balanced over types.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.mosaic import COLORS, Cell, DataError, _pixels, load_cells
from . import scene3d_render as R

KINDS: tuple[str, ...] = ("box", "sphere", "cylinder")
PLURAL = {"box": "boxes", "sphere": "spheres", "cylinder": "cylinders"}
QTYPES: tuple[str, ...] = ("nearest", "count", "left")
SIZES: dict[str, tuple[float, ...]] = {"box": (0.5, 0.5, 0.8), "sphere": (0.28,), "cylinder": (0.3, 0.3)}
MIN_OBJECTS, MAX_OBJECTS, MAX_PER_KIND = 3, 5, 3
MIN_SEPARATION = 1.0  # metres between object centres
PLACE_HALF = 1.35  # object centres lie in [-PLACE_HALF, PLACE_HALF]^2
NEAREST_MARGIN = 0.25
LEFT_MARGIN = 0.3
FOV_DEG = 80.0
FG_THRESHOLD = 40
ROOM = R.Room()


@dataclass(frozen=True)
class SceneObject:
    """One object: kind, colour, footprint centre (x, y) in the aligned room frame, yaw, easy-VQA texture image."""

    kind: str
    color: str
    center: tuple[float, float]
    yaw: float = 0.0
    image: Cell | None = None

    @property
    def size(self) -> tuple[float, ...]:
        return SIZES[self.kind]

    @property
    def centroid(self) -> np.ndarray:
        """Centre of the bounding volume, (3,)."""
        height = 2 * self.size[0] if self.kind == "sphere" else self.size[-1]
        return np.array([self.center[0], self.center[1], height / 2.0])

    def solid(self) -> R.Solid:
        texture = object_texture(self.image.path) if self.image is not None else _flat_texture(self.color)
        return R.Solid(self.kind, self.center, self.size, texture, self.yaw)


@dataclass(frozen=True)
class Scene:
    """A room, its objects (aligned frame), the raw-to-aligned transform and the cameras (raw frame)."""

    objects: tuple[SceneObject, ...]
    room: R.Room = ROOM
    axis_align: np.ndarray = field(default_factory=lambda: np.eye(4), compare=False)
    poses_aligned: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 4)), compare=False)
    split: str = "test"

    def by_color(self, color: str) -> int:
        for i, obj in enumerate(self.objects):
            if obj.color == color:
                return i
        raise DataError(f"no {color} object in the scene")

    def left_axis(self) -> np.ndarray:
        """The left axis (3,) of a viewer in the doorway looking into the room."""
        return R.wall_frame(self.room, self.room.door_wall)[2]


@dataclass
class SceneViews:
    """What a sensor gives: V views of RGB, z-depth (0 = invalid) and labels, intrinsics, raw-frame
    camera-to-world poses and the raw-to-aligned transform."""

    rgb: np.ndarray  # (V, H, W, 3) uint8
    depth: np.ndarray  # (V, H, W) float32 metres
    labels: np.ndarray  # (V, H, W) int64 (see scene3d_render LABEL_* and object indices)
    intrinsics: np.ndarray  # (V, 4, 4)
    poses: np.ndarray  # (V, 4, 4) camera-to-world, raw frame
    axis_align: np.ndarray  # (4, 4)


@dataclass(frozen=True)
class QuestionSpec:
    """One question: its type and the objects it names (indices into the scene's objects)."""

    qtype: str
    target: int = -1  # nearest: the reference object; left: the first object
    other: int = -1  # left: the second object
    kind: str = ""  # count: the kind counted

    def text(self, scene: Scene) -> str:
        if self.qtype == "nearest":
            obj = scene.objects[self.target]
            return f"what color is the object nearest the {obj.color} {obj.kind}?"
        if self.qtype == "count":
            return f"how many {PLURAL[self.kind]} are there?"
        if self.qtype == "left":
            a, b = scene.objects[self.target], scene.objects[self.other]
            return f"is the {a.color} object left of the {b.color} one, seen from the door?"
        raise DataError(f"unknown question type {self.qtype!r}; expected one of {QTYPES}")

    def answer(self, scene: Scene) -> str:
        if self.qtype == "nearest":
            return scene.objects[nearest_object(scene, self.target)[0]].color
        if self.qtype == "count":
            return str(sum(o.kind == self.kind for o in scene.objects))
        if self.qtype == "left":
            axis = scene.left_axis()
            a, b = scene.objects[self.target].centroid, scene.objects[self.other].centroid
            return "yes" if float((a - b) @ axis) > 0 else "no"
        raise DataError(f"unknown question type {self.qtype!r}; expected one of {QTYPES}")


@dataclass
class SceneSample:
    """One scene with one question; `views` is rendered when the sample is made with render=True."""

    scene: Scene
    question: str
    answer: str
    qtype: str
    spec: QuestionSpec
    views: SceneViews | None = None
    split: str = "test"


# ---------------------------------------------------------------------------------------------- textures
@functools.lru_cache(maxsize=4096)
def object_texture(path: str) -> np.ndarray:
    """(64, 64, 3) uint8 texture of an easy-VQA image: its shape kept, its background replaced by 0.6 x the
    shape's mean colour (so the whole object shows the shape's colour)."""
    img = _pixels(path).astype(np.float32)
    bg = img[0, 0]
    fg = np.abs(img - bg).max(-1) > FG_THRESHOLD
    color = img[fg].mean(0) if fg.any() else bg
    out = np.where(fg[..., None], img, 0.6 * color)
    return np.clip(out, 0, 255).astype(np.uint8)


_FLAT = {
    "red": (220, 30, 30), "green": (40, 180, 40), "blue": (40, 60, 220), "yellow": (230, 220, 40),
    "teal": (30, 160, 160), "brown": (140, 80, 30), "gray": (128, 128, 128), "black": (20, 20, 20),
}  # fmt: skip


def _flat_texture(color: str) -> np.ndarray:
    """A plain texture for hand-built scenes without easy-VQA images."""
    return np.broadcast_to(np.array(_FLAT[color], np.uint8), (8, 8, 3)).copy()


@functools.cache
def _cells_by_color(split: str) -> dict[str, tuple[Cell, ...]]:
    cells = load_cells(split)
    return {c: tuple(x for x in cells if x.color == c) for c in COLORS}


# ---------------------------------------------------------------------------------------------- geometry
def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rigid(yaw: float, translation: Sequence[float]) -> np.ndarray:
    """4 x 4 rotation about z by `yaw` followed by `translation` (3,)."""
    m = np.eye(4)
    m[:3, :3] = _rot_z(yaw)
    m[:3, 3] = translation
    return m


def nearest_object(scene: Scene, ref: int) -> tuple[int, float]:
    """(index of the object nearest object `ref`, margin to the second nearest in metres; inf if only one)."""
    c = scene.objects[ref].centroid
    dists = sorted((float(np.linalg.norm(o.centroid - c)), i) for i, o in enumerate(scene.objects) if i != ref)
    if not dists:
        raise DataError("a nearest-object question needs at least two objects")
    margin = dists[1][0] - dists[0][0] if len(dists) > 1 else math.inf
    return dists[0][1], margin


def default_cameras(rng: random.Random, views: int, room: R.Room = ROOM) -> np.ndarray:
    """`views` aligned-frame camera-to-world poses (V, 4, 4) around the room, looking at its middle."""
    poses = []
    for v in range(views):
        angle = 2 * math.pi * (v + 0.5) / views + rng.uniform(-0.15, 0.15)
        radius = room.half * math.sqrt(2) * 0.82 + rng.uniform(-0.1, 0.1)
        eye = (radius * math.cos(angle), radius * math.sin(angle), 2.0 + rng.uniform(-0.15, 0.15))
        eye = (float(np.clip(eye[0], -room.half + 0.15, room.half - 0.15)),
               float(np.clip(eye[1], -room.half + 0.15, room.half - 0.15)), eye[2])  # fmt: skip
        target = (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 0.2)
        poses.append(R.look_at(eye, target))
    return np.stack(poses)


# ---------------------------------------------------------------------------------------------- sampling
def _place(rng: random.Random, n: int) -> list[tuple[float, float]] | None:
    centers: list[tuple[float, float]] = []
    for _ in range(400):
        p = (rng.uniform(-PLACE_HALF, PLACE_HALF), rng.uniform(-PLACE_HALF, PLACE_HALF))
        if all(math.dist(p, q) >= MIN_SEPARATION for q in centers):
            centers.append(p)
            if len(centers) == n:
                return centers
    return None


def sample_scene(rng: random.Random, split: str, views: int = 4) -> Scene:
    """Draw one room (see the module docstring); the cameras are drawn too (`Scene.poses_aligned`)."""
    pool = _cells_by_color(split)
    while True:
        n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        centers = _place(rng, n)
        if centers is None:
            continue
        kinds = [rng.choice(KINDS) for _ in range(n)]
        if max(kinds.count(k) for k in KINDS) > MAX_PER_KIND:
            continue
        break
    colors = rng.sample(COLORS, n)
    objects = tuple(
        SceneObject(
            kind=k,
            color=c,
            center=(round(x, 4), round(y, 4)),
            yaw=rng.uniform(0, math.pi / 2) if k == "box" else 0.0,
            image=rng.choice(pool[c]),
        )
        for k, c, (x, y) in zip(kinds, colors, centers)
    )
    room = R.Room(door_wall=rng.randrange(4), door_offset=rng.uniform(-0.8, 0.8))
    axis_align = rigid(rng.uniform(0, 2 * math.pi), (rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-0.2, 0.2)))
    poses = default_cameras(rng, views, room)
    return Scene(objects, room, axis_align, poses, split)


def sample_question(rng: random.Random, scene: Scene, qtype: str) -> QuestionSpec | None:
    """One question of `qtype` about `scene`, or None when the scene has none with a clear answer."""
    objs = scene.objects
    if qtype == "nearest":
        refs = [i for i in range(len(objs)) if nearest_object(scene, i)[1] >= NEAREST_MARGIN]
        return QuestionSpec("nearest", target=rng.choice(refs)) if refs else None
    if qtype == "count":
        return QuestionSpec("count", kind=rng.choice(KINDS))
    if qtype == "left":
        axis = scene.left_axis()
        lateral = [float(o.centroid @ axis) for o in objs]
        pairs = [(a, b) for a in range(len(objs)) for b in range(len(objs))
                 if a != b and lateral[a] - lateral[b] >= LEFT_MARGIN]  # fmt: skip
        if not pairs:
            return None
        a, b = rng.choice(pairs)  # a is left of b
        if rng.random() < 0.5:
            a, b = b, a
        return QuestionSpec("left", target=a, other=b)
    raise DataError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def render_scene(scene: Scene, height: int = 128, width: int | None = None) -> SceneViews:
    """Ray-cast every camera of `scene` (see the module docstring); poses returned in the raw frame."""
    width = width or height
    k = R.pinhole(FOV_DEG, height, width)
    solids = [o.solid() for o in scene.objects]
    rgb, depth, labels = zip(
        *(R.render_view(scene.room, solids, k, pose, height, width) for pose in scene.poses_aligned)
    )
    raw_poses = np.linalg.inv(scene.axis_align)[None] @ scene.poses_aligned
    return SceneViews(
        rgb=np.stack(rgb),
        depth=np.stack(depth),
        labels=np.stack(labels),
        intrinsics=np.repeat(k[None], len(scene.poses_aligned), axis=0),
        poses=raw_poses,
        axis_align=scene.axis_align.copy(),
    )


def make_samples(
    split: str,
    n: int,
    seed: int = 0,
    *,
    qtypes: Sequence[str] = QTYPES,
    views: int = 4,
    image_size: int = 128,
    render: bool = True,
) -> list[SceneSample]:
    """`n` scenes of `split` ("train" or "test") with one question each; deterministic in its arguments."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    if n < 0 or views < 1:
        raise DataError(f"n must be >= 0 and views >= 1, got n={n}, views={views}")
    qtypes = tuple(qtypes)
    if not qtypes or any(q not in QTYPES for q in qtypes):
        raise DataError(f"question types must be a non-empty subset of {QTYPES}, got {qtypes}")
    rng = random.Random(f"vlm_prune.scene3d/{split}/views={views}/seed={seed}")
    out: list[SceneSample] = []
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        while True:
            scene = sample_scene(rng, split, views)
            spec = sample_question(rng, scene, qtype)
            if spec is not None:
                break
        out.append(
            SceneSample(
                scene=scene,
                question=spec.text(scene),
                answer=spec.answer(scene),
                qtype=qtype,
                spec=spec,
                views=render_scene(scene, image_size) if render else None,
                split=split,
            )
        )
    return out


def eval_samples(n: int = 150, seed: int = 1234, **kwargs) -> list[SceneSample]:
    """Held-out test samples, as the bench and the demo model's report use them."""
    return make_samples("test", n, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------------- labels, metrics
def surface_distance(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    """Unsigned distance (N,) from aligned-frame points (N, 3) to the surface of `obj` (exact for the sphere
    and the box, the capped-cylinder distance for the cylinder)."""
    q = points - np.array([obj.center[0], obj.center[1], 0.0])
    if obj.kind == "sphere":
        r = obj.size[0]
        return np.abs(np.linalg.norm(q - [0, 0, r], axis=-1) - r)
    if obj.kind == "box":
        half = np.array(obj.size) / 2
        local = (q - [0, 0, half[2]]) @ _rot_z(obj.yaw)
        d = np.abs(local) - half
        outside = np.linalg.norm(np.maximum(d, 0), axis=-1)
        return np.abs(outside + np.minimum(d.max(-1), 0))
    r, h = obj.size
    radial = np.linalg.norm(q[:, :2], axis=-1) - r
    axial = np.abs(q[:, 2] - h / 2) - h / 2
    d = np.stack([radial, axial], -1)
    return np.abs(np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0))


def point_labels(scene: Scene, points: np.ndarray, tolerance: float = 0.15) -> np.ndarray:
    """(N,) int64 label of aligned-frame points (N, 3): the index of the object whose surface is nearest when
    within `tolerance` metres, else `LABEL_DOOR` for points on the door, `LABEL_FLOOR`, or `LABEL_WALL`."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    labels = np.where(points[:, 2] < 0.1, R.LABEL_FLOOR, R.LABEL_WALL).astype(np.int64)
    room = scene.room
    origin, normal, along = R.wall_frame(room, room.door_wall)
    on_door = (
        ((points - origin) @ normal < 0.25)
        & (np.abs(points @ along - room.door_offset) <= room.door_width / 2 + 0.1)
        & (points[:, 2] <= room.door_height + 0.1)
        & (points[:, 2] >= 0.1)
    )
    labels[on_door] = R.LABEL_DOOR
    if scene.objects:
        dists = np.stack([surface_distance(o, points) for o in scene.objects], -1)
        best = dists.argmin(-1)
        near = dists[np.arange(len(points)), best] <= tolerance
        labels[near] = best[near]
    return labels


def score(samples: Sequence[SceneSample], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per question type and over all ("all"); predictions are normalised words."""
    if len(samples) != len(predictions):
        raise DataError(f"{len(samples)} samples but {len(predictions)} predictions")
    right: dict[str, list[bool]] = {}
    for s, p in zip(samples, predictions):
        right.setdefault(s.qtype, []).append(str(p).strip().lower().rstrip(".") == s.answer)
    out = {q: sum(v) / len(v) for q, v in right.items()}
    out["all"] = sum(sum(v) for v in right.values()) / max(1, len(samples))
    return out


def task_corpus() -> list[str]:
    """Every word the task uses (questions and answers), e.g. to build a tokenizer."""
    texts = []
    for kind in KINDS:
        for color in COLORS:
            texts.append(f"what color is the object nearest the {color} {kind}?")
        texts.append(f"how many {PLURAL[kind]} are there?")
    for a in COLORS:
        texts.append(f"is the {a} object left of the {a} one, seen from the door?")
    return texts + ["yes", "no", *(str(k) for k in range(MAX_PER_KIND + 1))]


# ---------------------------------------------------------------------------------------------- model inputs
#: the embedded LLaVA-3D demo model trained on this task (benchmarks/train_scene3d_model.py)
DEMO_MODEL = "llava3d_scene"
#: the side of its views: render at the vision tower's input size so the processor does not resize
DEMO_IMAGE_SIZE = 96


TOKENIZER_SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<unk>", "<boxes>")


def build_tokenizer():
    """The word-level tokenizer of the task (every word of `task_corpus`, the chat template's "USER:" /
    "ASSISTANT:"): <pad> 0, <s> 1, </s> 2, <image> 3 (the scene placeholder), <unk> 4, <boxes> 5 (clicks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: list[str] = []
    for text in task_corpus() + ["USER: ASSISTANT:"]:
        for w, _ in pre.pre_tokenize_str(text):
            if w not in words:
                words.append(w)
    vocab = {t: i for i, t in enumerate(TOKENIZER_SPECIALS)}
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    hf.add_special_tokens({"additional_special_tokens": ["<image>", "<boxes>"]})
    return hf


def scene_prompt(processor, question: str) -> str:
    """The chat prompt of one question about a scene (the scene placeholder first)."""
    content = [{"type": "scene"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


def scene_inputs(processor, samples: Sequence[SceneSample], device=None, dtype=None) -> dict:
    """`Llava3DProcessor` inputs (left-padded) for rendered samples, floats cast to `dtype` on `device`."""
    if any(s.views is None for s in samples):
        raise DataError("scene3d samples must be rendered (make_samples(..., render=True)) to build model inputs")
    views = [s.views for s in samples]
    inputs = processor(
        [scene_prompt(processor, s.question) for s in samples],
        rgb=[v.rgb for v in views],
        depth=[v.depth for v in views],
        intrinsics=[v.intrinsics for v in views],
        poses=[v.poses for v in views],
        axis_align=[v.axis_align for v in views],
    )
    out = {}
    for key, value in inputs.items():
        if device is not None:
            value = value.to(device)
        if dtype is not None and value.is_floating_point() and key == "pixel_values":
            value = value.to(dtype)
        out[key] = value
    return out


def generate_answers(model, processor, samples: Sequence[SceneSample], max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (decoded text after the prompt) of a batch of samples."""
    import torch

    parameter = next(model.parameters())
    inputs = scene_inputs(processor, samples, parameter.device, parameter.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def demo_scene_folder():
    """Folder of the embedded `llava3d_scene` model: a saved LLaVA-3D in the layout the converter writes
    (`python -m vlm_prune.models.llava3d.convert`), so it stands in for a converted checkpoint."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "demo_models" / DEMO_MODEL


def load_scene_model(spec: str = DEMO_MODEL, dtype=None, device: str = "cpu"):
    """(model, processor, info) of the embedded demo model (spec "llava3d_scene") or a saved LLaVA-3D folder."""
    from pathlib import Path

    import torch

    import vlm_prune.models.llava3d  # noqa: F401  (registers the architecture)
    from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration
    from vlm_prune.models.llava3d.processing import Llava3DProcessor

    folder = demo_scene_folder() if spec == DEMO_MODEL else Path(spec)
    if not (folder / "config.json").is_file():
        raise DataError(
            f"no LLaVA-3D model at {folder}: train the demo with benchmarks/train_scene3d_model.py, or pass a folder "
            "written by model.save_pretrained + Llava3DProcessor.save_pretrained"
        )
    model = Llava3DForConditionalGeneration.from_pretrained(folder, dtype=dtype or torch.float32).to(device).eval()
    processor = Llava3DProcessor.from_pretrained(folder)
    source = "embedded" if spec == DEMO_MODEL else "local"
    return model, processor, {"spec": str(spec), "source": source}
