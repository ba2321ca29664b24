"""Training-only circuit losses for the demo segmenter (`train_segmenter.py --circuit`), with the instruction first.

Why. In LLaVA's image-first order the prompt-to-cell binding must happen in the attention of the text positions,
supervised by one 4-way label per sample; three runs (segmentation_notes.md) plateaued at "position prompts only".
With the prompt BEFORE the image (the segmenter processor's chat template emits the text items first), every visual
token can read the prompt and decide locally whether its cell is the target, which can be supervised densely (64
labels per sample), and the reading position then only has to look at the flagged tokens. Each step of that circuit
gets its own loss from step 0 (the recipe of `train_icl_model.py`):

    perception  each projected visual token predicts its cell's shape, colour and place (linear probes, CE), helped
                by `cell_attention`: in the vision tower's first layer, every patch attends to its own cell's patches
                (-log attention mass, all heads), so that each token carries its cell's shape and not only its
                patch's pixels;
    read        layer `READ_LAYER` head 0: every visual token attends to the prompt's words (-log attention mass);
    flags       linear probes on the output of layer `FLAG_LAYER`: each visual token says "my cell is the target"
                (BCE, 64 labels per sample; referring and odd_one_out prompts, which a token can decide locally) and,
                on same_color prompts, "my cell has the named shape" (the anchor);
    anchor      layer `ANCHOR_LAYER` head 1, same_color prompts only: the reading and `[SEG]` positions attend to the
                anchor's tokens, and a probe on their state after that layer names the anchor's colour. (A visual
                token cannot find its colour mate itself: causal attention hides the cells after it.);
    readout     layer `READOUT_LAYER` head 0: the reading and `[SEG]` positions attend to the target cell's tokens
                (for same_color: the tokens of the anchor's colour that are not the anchor).

The layers are early on purpose: LVLM_CSP prunes at s2 = 3 of 8 by the `[SEG]` query's attention, so the target
should be visible to it by then. Attention weights come from eager attention (`output_attentions=True`) while
training; the shipped model is the plain HF model (SDPA) and none of these probes is saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

READ_LAYER, FLAG_LAYER, ANCHOR_LAYER, READOUT_LAYER = 0, 1, 2, 3

# The segmenter's chat template: the text items of a user turn, then its images (instruction before the image).
INSTRUCTION_FIRST_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_circuit_heads(hidden: int, n_shapes: int, n_colors: int) -> nn.ModuleDict:
    """The probes: per-token shape / colour / place (perception) and the per-token target flag."""
    return nn.ModuleDict({"tok_shape": nn.Linear(hidden, n_shapes), "tok_color": nn.Linear(hidden, n_colors),
                          "tok_place": nn.Linear(hidden, 4), "target": nn.Linear(hidden, 1),
                          "is_anchor": nn.Linear(hidden, 1), "anchor_color": nn.Linear(hidden, n_colors)})  # fmt: skip


def cell_of_tokens(n_visual: int) -> torch.Tensor:
    """(n_visual,) the 2x2 cell index of each visual token of a square raster grid."""
    side = int(math.isqrt(n_visual))
    r, c = torch.div(torch.arange(side * side), side, rounding_mode="floor"), torch.arange(side * side) % side
    return (r // (side // 2)) * 2 + c // (side // 2)


def prompt_word_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token: int) -> torch.Tensor:
    """(B, L) bool: the prompt's words -- the real tokens before the first visual token, past "<s> USER :"."""
    visual = input_ids == image_token
    first_visual = visual.int().argmax(1)  # (B,)
    first_real = attention_mask.int().argmax(1)  # left padding
    pos = torch.arange(input_ids.shape[1])[None]
    return (pos >= first_real[:, None] + 3) & (pos < first_visual[:, None]) & attention_mask.bool()


def cell_attention_loss(attn: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass of every patch on its own 2x2 cell's patches. attn: (B, H, 1 + V, 1 + V), the
    vision tower's attention weights with the CLS token first."""
    n_visual = attn.shape[-1] - 1
    cell_of = cell_of_tokens(n_visual)
    same = torch.cat([torch.zeros(n_visual, 1, dtype=torch.bool), cell_of[:, None] == cell_of[None]], dim=1)
    rows = attn[:, :, 1:]  # (B, H, V, 1 + V)
    return -torch.log((rows * same).sum(-1) + 1e-6).mean()


def _mass(attn_rows: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """-log of the attention mass of (N, L) rows on (N, L) bool targets, mean over rows."""
    return -torch.log((attn_rows * on).sum(-1) + 1e-6).mean()


def circuit_losses(out, projected: torch.Tensor, heads: nn.ModuleDict, batch: dict, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, columns: torch.Tensor, image_token: int) -> dict[str, torch.Tensor]:
    """The circuit losses of one batch (see the module docstring).

    out: the VLM output with hidden_states and attentions (per layer (B, H, L, L)); projected: (B, V, D) the
    projector's output; batch: TrainStream's batch (target (B,), shape / color (B, 4), anchor (B,) with -1 where the
    prompt has none); columns: (B,) the reading positions ([SEG] is the next one)."""
    n = input_ids.shape[0]
    visual = input_ids == image_token  # (B, L)
    n_visual = projected.shape[1]
    cell_of = cell_of_tokens(n_visual)  # (V,)
    rows = torch.arange(n)
    parts = {}
    shape_tok = batch["shape"][:, cell_of]  # (B, V)
    color_tok = batch["color"][:, cell_of]
    parts["perception"] = (F.cross_entropy(heads["tok_shape"](projected).flatten(0, 1), shape_tok.flatten())
                           + F.cross_entropy(heads["tok_color"](projected).flatten(0, 1), color_tok.flatten())
                           + F.cross_entropy(heads["tok_place"](projected).flatten(0, 1),
                                             cell_of.expand(n, -1).flatten()))  # fmt: skip
    # read: every visual token attends to the prompt's words (layer READ_LAYER, head 0)
    words = prompt_word_mask(input_ids, attention_mask, image_token)  # (B, L)
    a = out.attentions[READ_LAYER][:, 0]  # (B, L, L)
    vis_rows = a[visual].view(n, n_visual, -1)  # (B, V, L)
    parts["read"] = _mass(vis_rows.flatten(0, 1), words[:, None].expand(-1, n_visual, -1).flatten(0, 1))
    # flags at the output of layer FLAG_LAYER: target (locally decidable kinds) and anchor (same_color)
    h = out.hidden_states[FLAG_LAYER + 1][visual].view(n, n_visual, -1)  # (B, V, D)
    is_target = (cell_of[None] == batch["target"][:, None]).float()  # (B, V)
    has = batch["anchor"] >= 0  # same_color rows
    flags = F.binary_cross_entropy_with_logits(heads["target"](h)[..., 0], is_target, reduction="none")[~has].mean()
    if bool(has.any()):
        is_anchor = (cell_of[None] == batch["anchor"][:, None]).float()
        anchor_bce = F.binary_cross_entropy_with_logits(heads["is_anchor"](h)[..., 0], is_anchor, reduction="none")
        flags = flags + anchor_bce[has].mean()
        on_anchor = torch.zeros_like(visual)
        on_anchor[visual] = is_anchor.bool().flatten()
        a = out.attentions[ANCHOR_LAYER][:, 1]  # (B, L, L)
        pick = torch.cat([columns, columns + 1])
        both = torch.cat([rows, rows])
        reading = a[both, pick][torch.cat([has, has])]
        parts["anchor"] = _mass(reading, torch.cat([on_anchor, on_anchor])[torch.cat([has, has])])
        state = out.hidden_states[ANCHOR_LAYER + 1][both, pick][torch.cat([has, has])]
        colour = batch["color"][rows, batch["anchor"].clamp_min(0)]
        parts["anchor"] = parts["anchor"] + F.cross_entropy(heads["anchor_color"](state), torch.cat([colour, colour])[
            torch.cat([has, has])])
    else:
        parts["anchor"] = torch.zeros(())
    parts["flags"] = flags
    # readout: the reading and [SEG] positions attend to the target cell's tokens
    on_target = torch.zeros_like(visual)
    on_target[visual] = is_target.bool().flatten()
    a = out.attentions[READOUT_LAYER][:, 0]
    reading = torch.cat([a[rows, columns], a[rows, columns + 1]])  # (2B, L)
    parts["readout"] = _mass(reading, torch.cat([on_target, on_target]))
    if "vision_attention" in batch:
        parts["cell_attention"] = cell_attention_loss(batch["vision_attention"])
    return parts


def anchor_cells(
    kinds: list[str], prompts: list[str], shapes: torch.Tensor, shape_names: tuple[str, ...]
) -> torch.Tensor:
    """(B,) the anchor cell of each same_color prompt (the one cell with the named shape), -1 for other kinds."""
    out = []
    for kind, prompt, row in zip(kinds, prompts, shapes):
        if kind != "same_color":
            out.append(-1)
            continue
        named = shape_names.index(prompt.split()[-1])
        (cells,) = torch.nonzero(row == named, as_tuple=True)
        out.append(int(cells[0]))
    return torch.tensor(out)
