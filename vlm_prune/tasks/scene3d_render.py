"""Exact ray casting of the scene3d task's rooms: RGB, z-depth and object labels from posed pinhole cameras.

Geometry (metres, z up, the room's floor is z = 0)
    Every surface is analytic, so depth is exact (no rasterisation error): the floor (the square
    |x|, |y| <= half), four walls (x = +-half, y = +-half, 0 <= z <= wall height), and objects standing on the
    floor: boxes (a yaw-rotated cuboid), spheres and vertical cylinders (side and caps). Nothing closes the
    room from above: a ray that leaves it hits nothing and gets depth 0 (= invalid), as a depth sensor would.

Cameras (OpenCV convention, as ScanNet and LLaVA-3D)
    Camera axes: x right, y down, z forward. `intrinsics` is 4 x 4 with fx, fy, cx, cy in [0, 0], [1, 1],
    [0, 2], [1, 2]; `pose` is camera-to-world 4 x 4. Pixel (u, v) (column, row, integers from 0) is the point
    (u, v) of the image plane, as LLaVA-3D's `unproject` takes `arange(W)`, `arange(H)`: its ray is
    pose . ((u - cx) / fx, (v - cy) / fy, 1). Along that (unnormalised) direction the ray parameter t of a
    hit IS its z-depth in the camera frame, so depth is t itself; a world point p back-projects from
    (u, v, depth) exactly.

Shading
    colour = texture . (0.45 + 0.55 . max(0, n . l)) for one fixed light direction l, n the outward normal.
    Textures: an object's 64 x 64 texture (see `scene3d.object_texture`) is wrapped by (u, v) coordinates per
    primitive (box: per face; sphere: longitude / latitude; cylinder: angle / height, caps planar); the floor
    is a two-tone checker of 0.5 m tiles, the walls plain, the door a magenta rectangle on its wall.

Labels
    Every pixel carries the id of what it shows: `LABEL_NONE` (-1, no hit), `LABEL_FLOOR`, `LABEL_WALL`,
    `LABEL_DOOR`, or the object's index (0, 1, ...) in the scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LABEL_NONE = -1
LABEL_FLOOR = -2
LABEL_WALL = -3
LABEL_DOOR = -4

FLOOR_COLORS = (np.array([196, 176, 140], np.float32), np.array([170, 150, 116], np.float32))
WALL_COLOR = np.array([226, 222, 212], np.float32)
DOOR_COLOR = np.array([176, 40, 168], np.float32)  # magenta: no object colour is near it
LIGHT = np.array([0.35, -0.55, 1.0], np.float32) / np.linalg.norm([0.35, -0.55, 1.0])
AMBIENT = 0.45
TILE = 0.5  # checker tile side, metres


@dataclass(frozen=True)
class Solid:
    """One object standing on the floor.

    kind: "box" (size = (width x, depth y, height) before the yaw), "sphere" (size[0] = radius, resting on the
    floor: centre z = radius) or "cylinder" (size = (radius, height), vertical axis).
    center: (x, y) of its footprint centre on the floor. yaw: rotation about z (boxes only), radians.
    texture: (T, T, 3) uint8 wrapped around it.
    """

    kind: str
    center: tuple[float, float]
    size: tuple[float, ...]
    texture: np.ndarray
    yaw: float = 0.0

    @property
    def height(self) -> float:
        if self.kind == "sphere":
            return 2.0 * self.size[0]
        return float(self.size[-1])

    @property
    def centroid(self) -> np.ndarray:
        """Centre of its bounding volume, (3,)."""
        return np.array([self.center[0], self.center[1], self.height / 2.0])


@dataclass(frozen=True)
class Room:
    """The room: floor half-size, wall height and the door (wall index 0..3 = -y, +x, +y, -x; offset along
    the wall from its middle; width, height)."""

    half: float = 2.0
    wall_height: float = 2.4
    door_wall: int = 0
    door_offset: float = 0.0
    door_width: float = 1.0
    door_height: float = 2.0


def wall_frame(room: Room, wall: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point on the wall at floor level in its middle, inward normal, the wall's along-axis), each (3,).

    Walls 0..3 are y = -half, x = +half, y = +half, x = -half. The along-axis is the inward normal rotated
    +90 degrees about z (so it points to the left of someone standing at the wall looking in)."""
    h = room.half
    points = [(0.0, -h), (h, 0.0), (0.0, h), (-h, 0.0)]
    normals = [(0.0, 1.0), (-1.0, 0.0), (0.0, -1.0), (1.0, 0.0)]
    px, py = points[wall]
    nx, ny = normals[wall]
    return np.array([px, py, 0.0]), np.array([nx, ny, 0.0]), np.array([-ny, nx, 0.0])


# ---------------------------------------------------------------------------------------------- rays
def camera_rays(intrinsics: np.ndarray, pose: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """World ray origins (H*W, 3) and directions (H*W, 3), row-major pixels, scaled so that t = z-depth."""
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    d_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1).reshape(-1, 3)
    dirs = d_cam @ pose[:3, :3].T
    origins = np.broadcast_to(pose[:3, 3], dirs.shape)
    return origins, dirs


def look_at(eye: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Camera-to-world pose (4, 4) of a camera at `eye` looking at `target`, image 'down' towards world -z."""
    eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("look_at: the camera cannot look straight up or down")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, eye
    return pose


def pinhole(fov_deg: float, height: int, width: int) -> np.ndarray:
    """4 x 4 intrinsics with a horizontal field of view `fov_deg`, square pixels, centre ((W-1)/2, (H-1)/2)."""
    fx = (width / 2.0) / np.tan(np.radians(fov_deg) / 2.0)
    k = np.eye(4)
    k[0, 0] = k[1, 1] = fx
    k[0, 2], k[1, 2] = (width - 1) / 2.0, (height - 1) / 2.0
    return k


# ---------------------------------------------------------------------------------------------- hits
def _solve_quadratic(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of a t^2 + b t + c = 0 (inf where none), the smaller first."""
    disc = b * b - 4 * a * c
    ok = (disc >= 0) & (np.abs(a) > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    safe_a = np.where(ok, a, 1.0)
    t0 = np.where(ok, (-b - sq) / (2 * safe_a), np.inf)
    t1 = np.where(ok, (-b + sq) / (2 * safe_a), np.inf)
    return t0, t1


def hit_sphere(o: np.ndarray, d: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Nearest positive ray parameter of a sphere hit, (N,), inf on a miss (the camera is outside)."""
    oc = o - center
    t0, _ = _solve_quadratic((d * d).sum(-1), 2 * (oc * d).sum(-1), (oc * oc).sum(-1) - radius**2)
    return np.where(t0 > 1e-9, t0, np.inf)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def hit_box(o: np.ndarray, d: np.ndarray, center: np.ndarray, half: np.ndarray, yaw: float) -> np.ndarray:
    """Slab test of a yaw-rotated box (centre (3,), half extents (3,)); nearest positive t, inf on a miss."""
    rot = _rot_z(yaw)
    lo_, ld = (o - center) @ rot, d @ rot  # into the box frame (rows times rot = rot^T applied)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / ld
        t1, t2 = (-half - lo_) * inv, (half - lo_) * inv
    tmin = np.nanmax(np.minimum(t1, t2), axis=-1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=-1)
    ok = (tmax >= tmin) & (tmin > 1e-9)
    return np.where(ok, tmin, np.inf)


def hit_cylinder(o: np.ndarray, d: np.ndarray, base: np.ndarray, radius: float, height: float) -> np.ndarray:
    """Vertical cylinder (base centre (3,) on the floor, radius, height): nearest positive t of the side or the
    top cap (the bottom cap lies on the floor), inf on a miss."""
    ox, oy = o[:, 0] - base[0], o[:, 1] - base[1]
    dx, dy = d[:, 0], d[:, 1]
    t0, _ = _solve_quadratic(dx * dx + dy * dy, 2 * (ox * dx + oy * dy), ox * ox + oy * oy - radius**2)
    z = o[:, 2] + t0 * d[:, 2]
    side = np.where((t0 > 1e-9) & (z >= base[2]) & (z <= base[2] + height), t0, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = (base[2] + height - o[:, 2]) / d[:, 2]
    cx, cy = ox + tc * dx, oy + tc * dy
    cap = np.where((tc > 1e-9) & (cx * cx + cy * cy <= radius**2), tc, np.inf)
    return np.minimum(side, cap)


def hit_room(o: np.ndarray, d: np.ndarray, room: Room) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive t on the floor or a wall (inside their extents), and which surface: 0 = floor,
    1..4 = wall 0..3 (see `wall_frame`), -1 = none."""
    best = np.full(len(o), np.inf)
    which = np.full(len(o), -1)
    h = room.half
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 2] / d[:, 2]
        p = o + t[:, None] * d
    ok = (t > 1e-9) & (np.abs(p[:, 0]) <= h) & (np.abs(p[:, 1]) <= h)
    better = ok & (t < best)
    best, which = np.where(better, t, best), np.where(better, 0, which)
    for wall in range(4):
        point, normal, _ = wall_frame(room, wall)
        axis = 1 if wall in (0, 2) else 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (point[axis] - o[:, axis]) / d[:, axis]
            p = o + t[:, None] * d
        other = 1 - axis
        with np.errstate(invalid="ignore"):
            ok = (t > 1e-9) & (np.abs(p[:, other]) <= h) & (p[:, 2] >= 0) & (p[:, 2] <= room.wall_height)
        better = ok & (t < best)
        best, which = np.where(better, t, best), np.where(better, 1 + wall, which)
    return best, which


# ---------------------------------------------------------------------------------------------- surfaces
def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest texel at (u, v) in [0, 1]^2 (u across, v down), (N, 3) float32."""
    size_v, size_u = texture.shape[:2]
    iu = np.clip((u * size_u).astype(np.int64), 0, size_u - 1)
    iv = np.clip((v * size_v).astype(np.int64), 0, size_v - 1)
    return texture[iv, iu].astype(np.float32)


def solid_normal_and_color(solid: Solid, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward normals (N, 3) and texture colours (N, 3) of hit points p (N, 3) on `solid`."""
    tex = solid.texture
    if solid.kind == "sphere":
        r = solid.size[0]
        n = (p - np.array([solid.center[0], solid.center[1], r])) / r
        u = np.arctan2(n[:, 1], n[:, 0]) / (2 * np.pi) + 0.5
        v = np.arccos(np.clip(n[:, 2], -1, 1)) / np.pi
        return n, _sample(tex, u, v)
    if solid.kind == "box":
        rot = _rot_z(solid.yaw)
        half = np.array([solid.size[0] / 2, solid.size[1] / 2, solid.size[2] / 2])
        q = (p - np.array([solid.center[0], solid.center[1], half[2]])) @ rot
        face = np.argmax(np.abs(q) / half, axis=-1)
        n_local = np.zeros_like(q)
        n_local[np.arange(len(q)), face] = np.sign(q[np.arange(len(q)), face])
        uv = (q / half + 1) / 2  # each in [0, 1]
        first = np.where(face == 0, uv[:, 1], uv[:, 0])
        second = np.where(face == 2, uv[:, 1], 1 - uv[:, 2])
        return n_local @ rot.T, _sample(tex, first, second)
    if solid.kind == "cylinder":
        r, height = solid.size
        q = p - np.array([solid.center[0], solid.center[1], 0.0])
        on_cap = q[:, 2] >= height - 1e-6
        n = np.where(on_cap[:, None], [0.0, 0.0, 1.0], np.stack([q[:, 0] / r, q[:, 1] / r, 0 * q[:, 0]], -1))
        u = np.where(on_cap, q[:, 0] / (2 * r) + 0.5, np.arctan2(q[:, 1], q[:, 0]) / (2 * np.pi) + 0.5)
        v = np.where(on_cap, q[:, 1] / (2 * r) + 0.5, 1 - q[:, 2] / height)
        return n, _sample(tex, u, v)
    raise ValueError(f"unknown solid kind {solid.kind!r}: use box, sphere or cylinder")


def hit_solid(o: np.ndarray, d: np.ndarray, solid: Solid) -> np.ndarray:
    """Nearest positive t of rays on one solid (inf on a miss)."""
    cx, cy = solid.center
    if solid.kind == "sphere":
        r = solid.size[0]
        return hit_sphere(o, d, np.array([cx, cy, r]), r)
    if solid.kind == "box":
        half = np.array([solid.size[0] / 2, solid.size[1] / 2, solid.size[2] / 2])
        return hit_box(o, d, np.array([cx, cy, half[2]]), half, solid.yaw)
    if solid.kind == "cylinder":
        return hit_cylinder(o, d, np.array([cx, cy, 0.0]), solid.size[0], solid.size[1])
    raise ValueError(f"unknown solid kind {solid.kind!r}: use box, sphere or cylinder")


def _room_color(p: np.ndarray, which: np.ndarray, room: Room) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normals, colours and labels of room hits (which: 0 floor, 1..4 walls)."""
    n = np.zeros_like(p)
    color = np.zeros_like(p, dtype=np.float32)
    label = np.full(len(p), LABEL_WALL)
    floor = which == 0
    n[floor] = (0.0, 0.0, 1.0)
    checker = (np.floor(p[:, 0] / TILE) + np.floor(p[:, 1] / TILE)).astype(np.int64) % 2
    color[floor] = np.where(checker[floor, None] == 0, FLOOR_COLORS[0], FLOOR_COLORS[1])
    label[floor] = LABEL_FLOOR
    for wall in range(4):
        on = which == 1 + wall
        _, normal, along = wall_frame(room, wall)
        n[on] = normal
        color[on] = WALL_COLOR
        if wall == room.door_wall:
            s = p[on] @ along
            door = (np.abs(s - room.door_offset) <= room.door_width / 2) & (p[on][:, 2] <= room.door_height)
            idx = np.flatnonzero(on)[door]
            color[idx] = DOOR_COLOR
            label[idx] = LABEL_DOOR
    return n, color, label


def render_view(
    room: Room, solids: Sequence[Solid], intrinsics: np.ndarray, pose: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view: RGB (H, W, 3) uint8, z-depth (H, W) float32 metres (0 = no hit) and labels (H, W) int64."""
    o, d = camera_rays(np.asarray(intrinsics, np.float64), np.asarray(pose, np.float64), height, width)
    t_room, which = hit_room(o, d, room)
    best, owner = t_room, np.where(which >= 0, -1, -2)  # -1: room, -2: nothing, k >= 0: solid k
    for k, solid in enumerate(solids):
        t = hit_solid(o, d, solid)
        closer = t < best
        best, owner = np.where(closer, t, best), np.where(closer, k, owner)
    hit = np.isfinite(best)
    p = o + np.where(hit, best, 0.0)[:, None] * d
    normals = np.zeros_like(p)
    colors = np.zeros_like(p, dtype=np.float32)
    labels = np.full(len(p), LABEL_NONE)
    room_hit = owner == -1
    if room_hit.any():
        n, c, lab = _room_color(p[room_hit], which[room_hit], room)
        normals[room_hit], colors[room_hit], labels[room_hit] = n, c, lab
    for k, solid in enumerate(solids):
        on = owner == k
        if on.any():
            n, c = solid_normal_and_color(solid, p[on])
            normals[on], colors[on], labels[on] = n, c, k
    shade = AMBIENT + (1 - AMBIENT) * np.clip(normals @ LIGHT, 0.0, None)
    rgb = np.where(hit[:, None], np.clip(colors * shade[:, None], 0, 255), 0).astype(np.uint8)
    depth = np.where(hit, best, 0.0).astype(np.float32)
    return rgb.reshape(height, width, 3), depth.reshape(height, width), labels.reshape(height, width)


def backproject(depth: np.ndarray, intrinsics: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points (H, W, 3) of every pixel from z-depth (H, W), the inverse of `render_view`'s rays."""
    o, d = camera_rays(np.asarray(intrinsics, np.float64), np.asarray(pose, np.float64), *depth.shape)
    return (o + depth.reshape(-1, 1).astype(np.float64) * d).reshape(*depth.shape, 3)
