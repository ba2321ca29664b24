"""Follow-up calls on a pruned cache: a second turn that `generate()` slices by the physical cache length.

`generate()` sends a follow-up prompt on an existing cache from position `cache.get_seq_length()` on. After a
pruned prefill the cache is shorter than the sequence it stands for, so the call starts
`overlap = virtual_past - past` tokens early: it re-sends tokens the cache already holds (pruned or not).
These functions find that overlap and cut it off the call, leaving what the unpruned model would receive.
"""

from __future__ import annotations

import torch

from vlm_prune.errors import InputError

PER_TOKEN_KWARGS = ("input_ids", "position_ids", "token_type_ids", "mm_token_type_ids")


def resent_overlap(
    input_ids: torch.Tensor,
    recorded: torch.Tensor,
    past: int,
    virtual_past: int,
    attention_mask: torch.Tensor | None,
) -> int:
    """How many leading tokens of this call the pruned cache already holds (0 = a normal continuation).

    input_ids: (B, S) sent tokens; recorded: (B, virtual_past) the original tokens the cache stands for;
    past: cached length; virtual_past: the unpruned length so far; attention_mask: (B, M) 2-D or None.
    With a mask, generate()'s full-length convention decides (M == past + S means the call re-sends
    virtual_past - past tokens) and the re-sent head must equal the recorded tokens; without one, the head
    equalling the recorded tokens decides.
    """
    overlap, sent = virtual_past - past, input_ids.shape[1]
    if overlap <= 0 or sent <= overlap or recorded.shape[1] != virtual_past:
        return 0
    head_matches = torch.equal(input_ids[:, :overlap], recorded[:, past:virtual_past].to(input_ids.device))
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if attention_mask.shape[1] != past + sent:
            return 0
        if not head_matches:
            raise InputError(
                f"the attention mask says the first {overlap} tokens of this call are already cached, but they "
                "differ from the tokens the pruned cache holds; pass the conversation so far unchanged"
            )
        return overlap
    return overlap if head_matches else 0


def cut_leading(kwargs: dict, overlap: int, sent: int) -> None:
    """Drop the first `overlap` of the `sent` positions from every per-token kwarg, in place.

    Position ids are cut like the tokens: generate() derives them from the full-length mask, so the tail
    that stays is already right.
    """
    for key in PER_TOKEN_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.shape[-1] == sent:
            kwargs[key] = value[..., overlap:]
