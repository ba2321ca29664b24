"""The scene3d task: exact depth against analytic distances, hand-built scenes with hand-worked answers,
determinism and the train / test split."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from vlm_prune.tasks import scene3d as S
from vlm_prune.tasks import scene3d_render as R


def _down_pose(height: float) -> np.ndarray:
    """A camera at (0, 0, height) looking straight down; image x = world +x, image y = world -y."""
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = (1, 0, 0), (0, -1, 0), (0, 0, -1)
    pose[:3, 3] = (0, 0, height)
    return pose


def _scene(objects, door_wall=0, **kw) -> S.Scene:
    return S.Scene(tuple(objects), R.Room(door_wall=door_wall), np.eye(4), np.zeros((0, 4, 4)), "test", **kw)


def test_depth_is_exact_on_the_floor_and_a_sphere():
    k = R.pinhole(60.0, 33, 33)  # centre pixel (16, 16)
    sphere = S.SceneObject("sphere", "red", (0.0, 0.0))
    rgb, depth, labels = R.render_view(R.Room(), [sphere.solid()], k, _down_pose(1.5), 33, 33)
    r = S.SIZES["sphere"][0]
    assert depth[16, 16] == pytest.approx(1.5 - 2 * r, abs=1e-6)  # the sphere's top, straight below
    assert labels[16, 16] == 0 and labels[0, 0] == R.LABEL_FLOOR
    assert depth[0, 0] == pytest.approx(1.5, abs=1e-6)  # z-depth of the floor is the height everywhere
    # a sphere pixel off the axis: the ray meets the sphere where the analytic quadratic says
    fx, cx = k[0, 0], k[0, 2]
    d = np.array([(20 - cx) / fx, -(16 - cx) / fx, -1.0])  # pixel (u=20, v=16) in world axes
    o, c = np.array([0, 0, 1.5]), np.array([0, 0, r])
    b, cc = 2 * d @ (o - c), (o - c) @ (o - c) - r * r
    t = (-b - math.sqrt(b * b - 4 * (d @ d) * cc)) / (2 * d @ d)
    assert depth[16, 20] == pytest.approx(t, abs=1e-6)
    assert rgb[16, 16, 0] > rgb[16, 16, 1]  # red


def test_backprojected_points_lie_on_the_surfaces():
    sample = S.make_samples("test", 1, seed=3, image_size=48)[0]
    views, scene = sample.views, sample.scene
    for v in range(len(views.depth)):
        aligned_pose = views.axis_align @ views.poses[v]  # what a 3-D LMM computes from the raw pose
        np.testing.assert_allclose(aligned_pose, scene.poses_aligned[v], atol=1e-9)
        pts = R.backproject(views.depth[v], views.intrinsics[v], aligned_pose).reshape(-1, 3)
        lab = views.labels[v].reshape(-1)
        for i, obj in enumerate(scene.objects):
            if (lab == i).any():
                assert S.surface_distance(obj, pts[lab == i]).max() < 1e-6
        floor = pts[lab == R.LABEL_FLOOR]
        assert np.abs(floor[:, 2]).max() < 1e-6
        walls = pts[(lab == R.LABEL_WALL) | (lab == R.LABEL_DOOR)]
        assert np.abs(np.abs(walls[:, :2]).max(-1) - scene.room.half).max() < 1e-6
        assert (views.depth[v][views.labels[v] == R.LABEL_NONE] == 0).all()


def test_hand_built_scene_answers():
    red_box = S.SceneObject("box", "red", (0.0, 0.0))
    blue_sphere = S.SceneObject("sphere", "blue", (1.0, 0.0))
    green_cyl = S.SceneObject("cylinder", "green", (-1.2, 0.0))
    yellow_sphere = S.SceneObject("sphere", "yellow", (0.0, 1.3))
    scene = _scene([red_box, blue_sphere, green_cyl, yellow_sphere], door_wall=0)
    # centroid distances from the red box (0, 0, 0.4): blue (1, 0, 0.28) 1.007, green (-1.2, 0, 0.15) 1.226,
    # yellow (0, 1.3, 0.28) 1.306
    assert S.QuestionSpec("nearest", target=0).answer(scene) == "blue"
    assert S.nearest_object(scene, 0)[1] == pytest.approx(math.hypot(1.2, 0.25) - math.hypot(1.0, 0.12))
    assert S.QuestionSpec("nearest", target=1).answer(scene) == "red"  # blue: red 1.007, yellow 1.64
    assert S.QuestionSpec("count", kind="sphere").answer(scene) == "2"
    assert S.QuestionSpec("count", kind="box").answer(scene) == "1"
    assert S.QuestionSpec("count", kind="cylinder").answer(scene) == "1"
    left = S.QuestionSpec("left", target=2, other=1)  # green (x = -1.2) vs blue (x = +1)
    assert left.text(scene) == "is the green object left of the blue one, seen from the door?"
    assert left.answer(scene) == "yes"  # door on the -y wall, looking to +y: left is -x
    assert left.answer(_scene(scene.objects, door_wall=2)) == "no"  # from the +y wall left is +x
    assert left.answer(_scene(scene.objects, door_wall=1)) == "no"  # +x wall looking to -x: left is -y; equal y
    up = S.QuestionSpec("left", target=3, other=0)  # yellow (y = 1.3) vs red (y = 0)
    assert up.answer(_scene(scene.objects, door_wall=1)) == "no"
    assert up.answer(_scene(scene.objects, door_wall=3)) == "yes"  # -x wall looking to +x: left is +y


def test_point_labels_of_a_hand_built_scene():
    scene = _scene([S.SceneObject("sphere", "blue", (1.0, 0.0)), S.SceneObject("box", "red", (-1.0, 0.5))])
    pts = np.array(
        [
            [1.0, 0.0, 0.56],  # top of the sphere
            [-1.0, 0.5, 0.8],  # top of the box
            [0.0, -1.0, 0.0],  # floor
            [2.0, 0.0, 1.0],  # the +x wall
            [0.0, -2.0, 1.0],  # the door (wall 0, centred, 1 m wide, 2 m high)
            [1.5, -2.0, 1.0],  # wall 0 beside the door
        ]
    )
    assert S.point_labels(scene, pts).tolist() == [0, 1, R.LABEL_FLOOR, R.LABEL_WALL, R.LABEL_DOOR, R.LABEL_WALL]


def test_samples_are_deterministic_balanced_and_split():
    a = S.make_samples("test", 6, seed=5, render=False)
    b = S.make_samples("test", 3, seed=5, render=False)
    assert [s.question for s in a[:3]] == [s.question for s in b]
    assert [s.qtype for s in a] == list(S.QTYPES) * 2
    train = S.make_samples("train", 6, seed=5, render=False)
    assert {o.image.split for s in train for o in s.scene.objects} == {"train"}
    assert {o.image.split for s in a for o in s.scene.objects} == {"test"}
    assert [s.scene.objects[0].center for s in train] != [s.scene.objects[0].center for s in a]
    for s in a + train:
        assert s.answer == s.spec.answer(s.scene)
        colors = [o.color for o in s.scene.objects]
        assert len(set(colors)) == len(colors)
        if s.qtype == "nearest":
            assert S.nearest_object(s.scene, s.spec.target)[1] >= S.NEAREST_MARGIN
        for i, o in enumerate(s.scene.objects):
            for p in s.scene.objects[i + 1 :]:
                assert math.dist(o.center, p.center) >= S.MIN_SEPARATION


def test_score_per_question_type():
    samples = S.make_samples("test", 6, seed=0, render=False)
    preds = [s.answer for s in samples]
    preds[1] = "nonsense"  # a count question
    out = S.score(samples, preds)
    assert out["nearest"] == 1.0 and out["left"] == 1.0 and out["count"] == 0.5
    assert out["all"] == pytest.approx(5 / 6)


def test_rigid_and_camera_poses():
    m = S.rigid(math.pi / 2, (1.0, 2.0, 0.0))
    np.testing.assert_allclose(m @ [1, 0, 0, 1], [1, 3, 0, 1], atol=1e-12)
    poses = S.default_cameras(random.Random(0), 4)
    for pose in poses:  # every camera looks towards the middle of the room, from inside it
        assert np.abs(pose[:2, 3]).max() < R.Room().half
        to_middle = -pose[:3, 3] / np.linalg.norm(pose[:3, 3])
        assert pose[:3, 2] @ to_middle > 0.8
        np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)


def test_bad_arguments():
    with pytest.raises(S.DataError):
        S.make_samples("val", 1)
    with pytest.raises(S.DataError):
        S.make_samples("test", 1, qtypes=("colour",))
