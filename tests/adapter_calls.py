"""What an adapter's `sample_media` receives in a real call of a tiny model, recorded for tests that then call a
fresh adapter on it directly."""

from __future__ import annotations

import torch

import vlm_prune
from vlm_prune.toy_models import make_inputs


def recorded_sample_media_args(model, batch: int, generate: bool = False) -> tuple:
    """(a fresh adapter of `model`, the (input_ids, call, inputs_embeds) of the `sample_media` call of one pruned
    forward of `model` at `batch`, or of the prefill of a one-token greedy `generate`)."""
    with vlm_prune.pruned(model, "random", keep=0.5) as handle, torch.no_grad():
        seen = {}

        def capture(input_ids, call, embeds, fast=handle.adapter.sample_media):
            seen["args"] = (input_ids, call, embeds)
            return fast(input_ids, call, embeds)

        handle.adapter.sample_media = capture
        inputs = make_inputs(model, batch=batch)
        if generate:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        else:
            model(**inputs)
        adapter_type = type(handle.adapter)
    return adapter_type(model), seen["args"]
