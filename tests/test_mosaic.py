"""The mosaic task: deterministic, leak-free, and its answers follow the dataset's labels."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("easy_vqa")

from vlm_prune.data import mosaic as M  # noqa: E402
from vlm_prune.errors import PruneError  # noqa: E402

PALETTE = {  # easy-VQA draws each colour with one exact RGB value
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0),
}  # fmt: skip


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _key(s: M.MosaicSample):
    return (s.question, s.answer, s.qtype, tuple((c.split, c.image_id) for c in s.cells), s.image.tobytes())


def test_splits_are_labelled():
    train, test = M.load_cells("train"), M.load_cells("test")
    assert len(train) == 3578 and len(test) == 888
    assert {c.split for c in train} == {"train"} and {c.split for c in test} == {"test"}
    assert {c.shape for c in test} == set(M.SHAPES)
    assert {c.color for c in test} == set(M.COLORS)


def test_labels_match_the_pixels():
    """The labels read from easy-VQA's answers agree with the colour actually drawn."""
    for cell in M.load_cells("test")[:150]:
        px = M._pixels(cell.path).reshape(-1, 3)
        values, counts = np.unique(px, axis=0, return_counts=True)
        bg = tuple(px[0])
        ranked = [tuple(int(x) for x in v) for v in values[np.argsort(-counts)] if tuple(v) != bg]
        assert ranked[0] == PALETTE[cell.color], cell


def test_generation_is_deterministic():
    a = M.make_mosaics("test", 12, seed=3)
    b = M.make_mosaics("test", 12, seed=3)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert [_key(s) for s in M.make_mosaics("test", 5, seed=3)] == [_key(s) for s in a[:5]]
    assert [_key(s) for s in M.make_mosaics("test", 12, seed=4)] != [_key(s) for s in a]
    assert [_key(s) for s in M.make_mosaics("train", 12, seed=3)] != [_key(s) for s in a]


def test_no_test_image_in_train_mosaics():
    test_digests = {_digest(M._pixels(c.path)) for c in M.load_cells("test")}
    train_digests = {_digest(M._pixels(c.path)) for c in M.load_cells("train")}
    assert not test_digests & train_digests  # the dataset itself has no duplicate across splits
    g, px = 3, M.CELL_PX
    for s in M.make_mosaics("train", 120, seed=0, grid=g):
        assert all(c.split == "train" for c in s.cells)
        img = np.asarray(s.image)
        for r in range(g):
            for col in range(g):
                tile = img[r * px : (r + 1) * px, col * px : (col + 1) * px]
                d = _digest(tile)
                assert d in train_digests and d not in test_digests
    for s in M.make_mosaics("test", 40, seed=0):
        assert all(c.split == "test" for c in s.cells)


def test_samples_are_consistent():
    samples = M.make_mosaics("test", 200, seed=0)
    assert [s.qtype for s in samples[:8]] == list(M.QTYPES) * 2
    assert Counter(s.qtype for s in samples) == dict.fromkeys(M.QTYPES, 50)
    for s in samples:
        assert s.image.size == (192, 192) and s.image.mode == "RGB"
        assert len(s.cells) == 9 and len({c.image_id for c in s.cells}) == 9
        assert s.answer == s.spec.answer(s.cells) and s.question == s.spec.text(3)
        assert s.is_cell_question == (s.qtype in M.CELL_QTYPES)
        if s.qtype == "color":
            assert s.answer == s.cells[s.spec.cell].color
            assert s.question.startswith("what color is the shape in the ")
        elif s.qtype == "shape":
            assert s.answer == s.cells[s.spec.cell].shape
        elif s.qtype == "yesno":
            assert s.answer in ("yes", "no")
        else:
            assert int(s.answer) == sum(getattr(c, s.spec.kind) == s.spec.value for c in s.cells)
    yes = sum(s.answer == "yes" for s in samples if s.qtype == "yesno")
    assert 15 <= yes <= 35  # balanced yes/no


def test_cells_are_pasted_row_major():
    s = M.make_mosaics("test", 1, seed=7, grid=2)[0]
    assert s.image.size == (128, 128)
    img = np.asarray(s.image)
    assert np.array_equal(img[:64, 64:], M._pixels(s.cells[1].path))
    assert np.array_equal(img[64:, :64], M._pixels(s.cells[2].path))


def test_positions_and_questions():
    assert M.position_name(0) == "top left" and M.position_name(4) == "middle"
    assert M.position_name(8) == "bottom right" and M.position_name(3, grid=2) == "bottom right"
    assert M.position_name(5, grid=4) == "row 2 column 2"
    specs = M.question_specs(3)
    assert len(specs) == len({s.text(3) for s in specs}) == 9 * (2 + 3 + 8) + 3 + 8
    assert M.QuestionSpec("yesno", cell=8, kind="shape", value="triangle").text() == (
        "is there a triangle in the bottom right?"
    )
    assert M.QuestionSpec("count", kind="shape", value="circle").text() == "how many circles are there?"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(PruneError, match="unknown split"):
        M.make_mosaics("val", 2)
    with pytest.raises(PruneError, match="question types"):
        M.make_mosaics("test", 2, qtypes=["colour"])
    with pytest.raises(PruneError, match="outside"):
        M.position_name(9, grid=3)
