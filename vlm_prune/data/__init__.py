"""Evaluation data for vlm_prune: the embedded mosaic task (see `vlm_prune.data.mosaic`)."""

from __future__ import annotations

from .mosaic import (
    CELL_QTYPES,
    COLORS,
    QTYPES,
    SHAPES,
    Cell,
    MosaicSample,
    QuestionSpec,
    compose_mosaic,
    load_cells,
    make_mosaics,
    position_name,
    question_specs,
    task_corpus,
)

__all__ = [
    "CELL_QTYPES",
    "COLORS",
    "QTYPES",
    "SHAPES",
    "Cell",
    "MosaicSample",
    "QuestionSpec",
    "compose_mosaic",
    "load_cells",
    "make_mosaics",
    "position_name",
    "question_specs",
    "task_corpus",
]
