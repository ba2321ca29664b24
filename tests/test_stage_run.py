"""`engine/stage_run.run_stage` on a hand-built two-row forward (no model): the per-row contexts, the compaction
of hidden / columns / mask / rope, the shift, the samples' layouts, the stats and the merged features,
against results written out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlm_prune.adapters.base import SampleMedia
from vlm_prune.engine.batch import HostBatch
from vlm_prune.engine.context import IMAGE, Selection, VisualLayout
from vlm_prune.engine.forward_state import _Sample
from vlm_prune.engine.stage_run import run_stage
from vlm_prune.engine.stats import PruneStats
from vlm_prune.errors import PruneError
from vlm_prune.methods.base import Stage

LENGTH, DIM = 6, 2


def _layout(count: int) -> VisualLayout:
    zeros = torch.zeros(count, dtype=torch.long)
    return VisualLayout(zeros, torch.full_like(zeros, IMAGE), zeros, torch.zeros(count, 3, dtype=torch.long),
                        [(1, 1, count)])  # fmt: skip


def _forward():
    """Row 0: six valid slots, visual columns 1-3; row 1: slot 0 is the caller's padding, visual columns 2-4."""
    valid = torch.ones(2, LENGTH, dtype=torch.bool)
    valid[1, 0] = False
    media = [SampleMedia(torch.tensor([1, 2, 3]), _layout(3)), SampleMedia(torch.tensor([2, 3, 4]), _layout(3))]
    columns = torch.arange(LENGTH).expand(2, -1)
    host = HostBatch(columns, valid.numpy(), media)
    forward = SimpleNamespace(
        host=host, columns=columns, samples=[_Sample(m, host.original_counts[r], host, r) for r, m in enumerate(media)],
        reentry={}, rope=torch.arange(LENGTH).expand(1, 2, -1), mask=valid.long(), shift=[0, 0],
        index=None, stats=PruneStats(visual_tokens_in=6),
    )  # fmt: skip
    call = {"input_ids": torch.arange(100, 100 + LENGTH).expand(2, -1), "host": {}}
    call["host"]["input_ids"] = call["input_ids"]
    return forward, call


def _run(select, policy="preserve"):
    forward, call = _forward()
    hidden = torch.arange(2 * LENGTH * DIM, dtype=torch.float32).view(2, LENGTH, DIM)
    stage = Stage(layer=0, select=select, name="hand")
    out = run_stage(forward, stage, hidden, call=call, adapter=None, seed=0, position_policy=policy)
    return forward, hidden, out


KEEPS = {0: [True, False, True], 1: [False, False, True]}  # row 0 drops column 2, row 1 columns 2 and 3


def _by_row(seen):
    def select(ctx):
        row = len(seen)
        seen.append(ctx)
        return torch.tensor(KEEPS[row])

    return select


@pytest.mark.parametrize("policy", ["preserve", "compact"])
def test_run_stage_compacts_every_tensor_as_written_out_by_hand(policy):
    seen = []
    forward, hidden, out = _run(_by_row(seen), policy)
    # the contexts: each row's visual features, its valid slots' hidden states and ids, its visual index
    assert [ctx.num_visual for ctx in seen] == [3, 3]
    assert torch.equal(seen[0].visual_features, hidden[0, 1:4]) and torch.equal(seen[1].visual_features, hidden[1, 2:5])
    assert torch.equal(seen[1].hidden_states, hidden[1, 1:])  # the pad slot is not part of the sample
    assert seen[1].visual_index.tolist() == [1, 2, 3]  # places among the valid slots
    assert seen[1].input_ids.tolist() == [101, 102, 103, 104, 105]
    # row 0 keeps slots 0, 1, 3, 4, 5; row 1 keeps 0 (pad), 1, 4, 5 and is left-padded to 5 slots
    row1 = torch.cat([torch.zeros(1, DIM), hidden[1, [0, 1, 4, 5]]])
    expected_hidden = torch.stack([hidden[0, [0, 1, 3, 4, 5]], row1])
    assert torch.equal(out, expected_hidden)
    assert forward.columns.tolist() == [[0, 1, 3, 4, 5], [-1, 0, 1, 4, 5]]
    assert forward.mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert forward.index.tolist() == [[0, 1, 3, 4, 5], [-1, 0, 1, 4, 5]]
    assert forward.shift == [1, 2]
    if policy == "preserve":  # the kept tokens keep their true positions
        assert forward.rope.tolist() == [[[0, 1, 3, 4, 5], [0, 0, 1, 4, 5]]]
    else:  # renumbered: every removed slot before a token moves it back by one
        assert forward.rope.tolist() == [[[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]]
    # the samples' layouts follow their rows' keep masks; the stats record the counts
    assert [len(sample.layout) for sample in forward.samples] == [2, 1]
    assert forward.samples[1].visual_columns.tolist() == [4]
    (stats,) = forward.stats.stages
    assert (stats.name, stats.tokens_in, stats.tokens_out) == ("hand", [[3], [3]], [[2], [1]])


def test_run_stage_writes_a_merging_methods_features_into_the_kept_slots():
    def select(ctx):
        keep = torch.tensor([True, False, True])
        return Selection(keep, features=torch.full((2, DIM), -1.0 - ctx.visual_index[0].item()))

    forward, hidden, out = _run(select)
    assert out[0, [1, 2]].tolist() == [[-2.0, -2.0], [-2.0, -2.0]]  # row 0's kept visual slots (columns 1 and 3)
    # row 1 keeps slots 0 (pad), 1, 2, 4, 5: its kept visual columns 2 and 4 sit in slots 2 and 3
    assert out[1, [2, 3]].tolist() == [[-2.0, -2.0], [-2.0, -2.0]]
    assert torch.equal(out[0, [0, 3]], hidden[0, [0, 4]])  # text slots untouched
    assert hidden.view(-1).tolist() == list(range(2 * LENGTH * DIM))  # the caller's tensor is never written


def test_run_stage_writes_the_features_of_the_merging_rows_only():
    calls = []

    def select(ctx):  # row 0 merges (its kept tokens get features), row 1 returns a plain mask
        calls.append(ctx)
        keep = torch.tensor([True, False, True])
        return Selection(keep, features=torch.full((2, DIM), -7.0)) if len(calls) == 1 else keep

    forward, hidden, out = _run(select)
    assert len(calls) == 2
    assert out[0, [1, 2]].tolist() == [[-7.0, -7.0], [-7.0, -7.0]]  # row 0's kept visual slots take its features
    # row 1 keeps slots 0 (the caller's pad), 1, 2, 4, 5: its kept visual columns 2 and 4 keep their states
    assert torch.equal(out[1], hidden[1, [0, 1, 2, 4, 5]])
    assert torch.equal(out[0, [0, 3, 4]], hidden[0, [0, 4, 5]])


def test_run_stage_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(PruneError, match=r"must return a bool mask of shape \(3,\)"):
        _run(lambda ctx: torch.ones(2, dtype=torch.bool))


def test_row_views_are_made_only_for_a_method_that_reads_them():
    """A context's `hidden_states`, `input_ids` and `visual_index` are made on first read: a method that reads the
    visual features only leaves them unmade; one that reads them gets the hand-built rows (row 0 contiguous, also
    after a first stage removed tokens, where the ids are gathered at the current columns)."""
    seen = []
    _run(_by_row(seen))
    assert all(name not in ctx.__dict__ for ctx in seen for name in ("hidden_states", "input_ids", "visual_index"))
    forward, call = _forward()
    hidden = torch.arange(2 * LENGTH * DIM, dtype=torch.float32).view(2, LENGTH, DIM)
    out = run_stage(forward, Stage(layer=0, select=_by_row([]), name="first"), hidden, call=call, adapter=None,
                    seed=0, position_policy="preserve")  # fmt: skip
    later = []

    def keep_all(ctx):
        later.append(ctx)
        return torch.ones(ctx.num_visual, dtype=torch.bool)

    run_stage(forward, Stage(layer=2, select=keep_all, name="second"), out, call=call, adapter=None, seed=0,
              position_policy="preserve")  # fmt: skip
    row0, row1 = later
    assert row0.input_ids.tolist() == [100, 101, 103, 104, 105]  # the ids of the kept columns 0, 1, 3, 4, 5
    assert torch.equal(row0.hidden_states, out[0]) and row0.visual_index.tolist() == [1, 2]
    assert row1.input_ids.tolist() == [101, 104, 105] and row1.visual_index.tolist() == [1]
    assert torch.equal(row1.hidden_states, out[1, 2:])  # after the re-padded slot and the caller's pad
    with pytest.raises(AttributeError):
        row0.not_a_field  # noqa: B018
