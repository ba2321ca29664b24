"""Segments of an interleaved prompt: which media item is a demonstration, which is the query, whose text is where.

A few-shot (in-context) prompt interleaves media and text:

    [prefix] <image 0> text 0 <image 1> text 1 ... <image n> question [assistant prompt]

Definitions (per sample, computed from the token ids and the sample's `VisualLayout.media_index`):
- media item i STARTS at its first visual token; its PAIRED TEXT is every text token after that start and before
  the start of item i + 1 (for the last item: up to the end of the sequence). Text inside an item's own span
  (Qwen3-VL's timestamp tokens between video frames) therefore belongs to that item. Tokens that only mark media
  (the placeholder ids, Qwen's vision_start / vision_end) are nobody's text. Text before the first item is the
  PREFIX (owner -1). Padding is never text.
- the QUERY is the last media item by default; a caller may name another (`Segments.with_query`, Python indexing:
  -1 = the last). Every other item is a DEMONSTRATION, numbered 0, 1, ... in prompt order.

Everything is computed on the ORIGINAL sequence and then mapped onto the current one, so the segments stay the
same at every stage: text is never pruned, and an item keeps its paired text even after all of its visual tokens
were pruned.

`interleaved_prompt` builds such a prompt from (image, text) pairs through the processor's own chat template.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from vlm_prune.errors import InputError

#: config attributes of token ids that only mark media (never a demonstration's text)
MARKER_ID_ATTRIBUTES = ("vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class Segments:
    """The segment map of ONE sample at one stage. Indices refer to the current sequence (`ctx.hidden_states`).

    Shapes (M = media items of the sample, L = current sequence length without padding):
        text_owner: (L,) long. For each position, the media item whose paired text it is; -1 for the prefix, for
            visual tokens and for media markers.
        is_text: (L,) bool. The position is text (neither a visual token nor a media marker).
        item_start: (M,) long. Original column (in the padded input ids) of each item's first visual token.
        original_counts: visual tokens of each item in the unpruned prompt (M ints).
        query_media: the media item that is the query (0 <= query_media < M).
    """

    text_owner: torch.Tensor
    is_text: torch.Tensor
    item_start: torch.Tensor
    original_counts: tuple[int, ...]
    query_media: int

    @property
    def num_media(self) -> int:
        return len(self.original_counts)

    @property
    def demonstration_media(self) -> list[int]:
        """The media items that are demonstrations, in prompt order."""
        return [item for item in range(self.num_media) if item != self.query_media]

    @property
    def num_demonstrations(self) -> int:
        return max(self.num_media - 1, 0)

    @property
    def demonstration_of_media(self) -> torch.Tensor:
        """(M,) long: the demonstration number of each media item, -1 for the query."""
        out = torch.full((self.num_media,), -1, dtype=torch.long)
        demos = self.demonstration_media
        out[demos] = torch.arange(len(demos))
        return out

    def text_index(self, item: int) -> torch.Tensor:
        """(T_i,) long positions of item `item`'s paired text in the current sequence (ascending)."""
        return (self.text_owner == int(item)).nonzero(as_tuple=True)[0]

    @property
    def query_text_index(self) -> torch.Tensor:
        """(T_q,) positions of the query's paired text (its question and what follows it)."""
        return self.text_index(self.query_media)

    @property
    def prefix_index(self) -> torch.Tensor:
        """(T_0,) positions of the text before the first media item (markers excluded)."""
        return (self.is_text & (self.text_owner < 0)).nonzero(as_tuple=True)[0]

    def with_query(self, query: int) -> Segments:
        """The same map with item `query` as the query (Python indexing: -1 = the last item)."""
        count = self.num_media
        if not -count <= int(query) < count:
            raise InputError(
                f"query media item {query} is out of range: this prompt holds {count} media item(s); name one of "
                f"0..{count - 1} (or -1 for the last)"
            )
        return replace(self, query_media=int(query) % count)


def marker_token_ids(config: Any, media_token_ids: Iterable[int]) -> frozenset[int]:
    """Ids that only mark media: the placeholders plus the config's vision_start / vision_end ids, if any."""
    ids = {int(token) for token in media_token_ids}
    for owner in (config, getattr(config, "text_config", None)):
        for attribute in MARKER_ID_ATTRIBUTES:
            value = getattr(owner, attribute, None)
            if isinstance(value, int):
                ids.add(value)
    return frozenset(ids)


def build_segments(
    input_ids: torch.Tensor,
    current_columns: torch.Tensor,
    visual_columns: torch.Tensor,
    media_index: torch.Tensor,
    marker_ids: frozenset[int] | Sequence[int] = (),
    query_media: int = -1,
) -> Segments:
    """The segment map of one sample.

    Args:
        input_ids: (L0,) long, the sample's ORIGINAL (padded) row of input ids.
        current_columns: (L,) long, the original column of each position of the current sequence (no padding).
        visual_columns: (N0,) long, the original columns of ALL the sample's visual tokens (unpruned), ascending.
        media_index: (N0,) long, their media item (0-based, prompt order).
        marker_ids: token ids that only mark media (see `marker_token_ids`).
        query_media: the query item, Python indexing (default -1: the last).
    """
    device = torch.device("cpu")
    current_columns = current_columns.to(device).long()
    visual_columns = visual_columns.to(device).long()
    media_index = media_index.to(device).long()
    num_media = int(media_index.max()) + 1 if media_index.numel() else 0
    counts = torch.bincount(media_index, minlength=num_media)
    starts = torch.full((num_media,), torch.iinfo(torch.long).max, dtype=torch.long)
    starts = starts.scatter_reduce(0, media_index, visual_columns, reduce="amin") if num_media else starts
    # items in prompt order have ascending starts; an item's text is what follows its start
    owner = torch.searchsorted(starts, current_columns, right=True) - 1
    ids = input_ids.to(device)[current_columns]
    is_visual = torch.isin(current_columns, visual_columns)
    is_text = ~(is_visual | torch.isin(ids, torch.tensor(sorted(marker_ids), dtype=ids.dtype)))
    owner = torch.where(is_text, owner, torch.full_like(owner, -1))
    segments = Segments(owner, is_text, starts, tuple(counts.tolist()), 0)
    return segments.with_query(query_media) if num_media else segments


def interleaved_messages(pairs: Sequence[tuple[Any, str]], question: tuple[Any, str] | None = None) -> list[dict]:
    """Chat messages of one user turn: each (image, text) pair as an image then its text, then the query pair.

    `image` may be None for a text-only part. The images themselves are not part of the messages (processors take
    them separately, in the same order).
    """
    content: list[dict] = []
    for image, text in [*pairs, *([question] if question is not None else [])]:
        if image is not None:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def interleaved_prompt(
    processor: Any, pairs: Sequence[tuple[Any, str]], question: tuple[Any, str] | None = None
) -> tuple[str, list[Any]]:
    """(prompt, images) for an interleaved few-shot prompt, through `processor`'s chat template.

    pairs: the demonstrations as (image, text) (text = the demonstration's caption or answer, placed right after
        its image, so it is that item's paired text in `Segments`); question: the query (image, question text).
    Returns the prompt string with the generation prompt appended and the images in prompt order: pass both to
    `processor(text=[prompt], images=images)`. A processor without a chat template gets "<image>\\ntext" parts.
    """
    parts = [*pairs, *([question] if question is not None else [])]
    images = [image for image, _ in parts if image is not None]
    if getattr(processor, "chat_template", None):
        messages = interleaved_messages(pairs, question)
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), images
    token = getattr(processor, "image_token", None) or "<image>"
    parts = [f"{token}\n{text}" if image is not None else text for image, text in parts]
    return "USER: " + " ".join(parts) + " ASSISTANT:", images


def segments_fn(adapter: Any, input_ids: torch.Tensor, current_columns: torch.Tensor, media: Any):
    """A closure building one sample's `Segments` on first use (the engine sets it as `ctx.segments_fn`).

    adapter: the model's adapter (media token ids, config); input_ids: (L0,) the original row; current_columns:
    (L,) original column of each current position; media: the sample's `SampleMedia` (unpruned columns and layout).
    """

    def build() -> Segments:
        markers = marker_token_ids(adapter.model.config, adapter.media_token_ids())
        return build_segments(input_ids, current_columns, media.visual_columns, media.layout.media_index, markers)

    return build
