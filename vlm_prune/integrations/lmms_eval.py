"""lmms-eval plugin: `--model vlm_prune` evaluates any supported model pruned (or not) with no fork of lmms-eval.

    lmms-eval --model vlm_prune \\
        --model_args base=qwen2_vl,pretrained=/path/to/model,method=evs,keep=0.25,num_frames=16 \\
        --tasks vlm_prune_video --include_path vlm_prune/integrations/lmms_tasks

Registration is the entry point group `lmms_eval.models` (pyproject: `vlm_prune = "vlm_prune.integrations.
lmms_eval:manifest"`), which returns a `ModelManifest` with both faces: `VlmPruneChat` (the chat_class_path,
`is_simple = False`, what lmms-eval picks by default) and `VlmPrune` (the simple_class_path, `is_simple = True`,
picked with `--force_simple`). lmms-eval swallows entry-point load errors, so `manifest()` imports nothing heavy
and the classes are imported only when the model is requested.

model_args (lmms-eval casts them to bool / int / float / str; `batch_size` arrives as a string):
    pretrained   a saved model folder, or "demo:<name>" for an embedded demo model (e.g. demo:qwen2_vl)
    base         the family the checkpoint must be (e.g. qwen2_vl); a mismatch is an error, not a silent run
    method       a vlm_prune method or composition; "none" answers unpruned through the same wrapper, so
                 prompts are identical
    keep         the budget (fraction or int count); num_frames, sampler: VideoQA's
    max_new_tokens (default 16, overridden by the task's generation_kwargs), device, dtype

Requests (`generate_until`). Simple: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`; chat:
`(context, doc_to_messages, gen_kwargs, doc_id, task, split)`, whose one user turn gives the visuals and the text.
A visual that is a video path, a `vlm_prune.pipelines.Frames` or (frames, indices, fps) goes through `VideoQA`;
PIL images through the same prompt / inputs as `vlm-prune bench` (`vlm_prune.demo.prepare_inputs`), greedy;
both faces answer the same visuals and text identically. Several images are an interleaved prompt (the
ICL task's `episode_inputs`): simple requests mark each image's place in the context with `<image>`, each
followed by its text; chat requests give the images and texts in order. `generation_kwargs` with
`vlm_prune_output: mask` ask a saved Segmenter (pretrained=<its folder>) for its teacher-forced mask, answered as
run-length text (`mask_to_text`). Local tasks (lmms_tasks/): vlm_prune_mosaic, vlm_prune_video, vlm_prune_icl,
vlm_prune_segmentation, each scored as `vlm-prune bench` scores the same samples. The evaluator calls `clean()` at
the end, which deletes every nn.Module attribute: this class keeps the model only in `self._model`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PruneError

MODEL_ID = "vlm_prune"
IMAGE_MARK = "<image>"  # in a simple request's context: where each of several images goes (interleaved prompts)
OUTPUT_KEY = "vlm_prune_output"  # generation_kwargs key: "mask" asks a Segmenter for its mask, as run-length text


class LmmsEvalError(PruneError, ValueError):
    """model_args or requests the plugin cannot serve."""


def manifest():
    """The `lmms_eval.models` entry point: vlm_prune's ModelManifest (chat class by default, simple with
    --force_simple)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID, simple_class_path=f"{__name__}.VlmPrune", chat_class_path=f"{__name__}.VlmPruneChat"
    )


def _load(pretrained: str, dtype: torch.dtype, device: str):
    """(model, processor): an embedded demo model ("demo:<name>"), a saved Segmenter (its VLM; the mask head
    stays attached, `Segmenter.of`) or a saved model folder."""
    from pathlib import Path

    from .. import demo
    from ..tasks.segmentation import load_bench_segmenter

    name = pretrained[len("demo:") :] if pretrained.startswith("demo:") else None
    embedded = demo.demo_model_path(name) if name else Path(pretrained)
    if (Path(embedded) / "segmenter_config.json").exists():
        model, processor, _ = load_bench_segmenter(str(embedded), dtype=dtype, device=device)
        return model, processor
    if name:
        return demo.demo_model(name, dtype=dtype, device=device)
    return demo.load_model(pretrained, dtype=dtype, device=device)


def mask_to_text(mask: torch.Tensor) -> str:
    """(H, W) bool -> "H W r0 r1 ...": run lengths of the row-major mask, starting with a run of False."""
    flat = mask.to(torch.bool).flatten().tolist()
    runs, value, count = [], False, 0
    for bit in flat:
        if bit == value:
            count += 1
        else:
            runs.append(count)
            value, count = bit, 1
    runs.append(count)
    return " ".join(map(str, [*mask.shape, *runs]))


def text_to_mask(text: str) -> torch.Tensor:
    """The inverse of `mask_to_text`; an unparsable answer is an all-False (0 x 0) mask."""
    try:
        h, w, *runs = (int(v) for v in str(text).split())
    except ValueError:
        return torch.zeros(0, 0, dtype=torch.bool)
    bits = torch.cat([torch.full((r,), i % 2 == 1) for i, r in enumerate(runs)]) if runs else torch.zeros(0)
    if bits.numel() != h * w:
        return torch.zeros(0, 0, dtype=torch.bool)
    return bits.view(h, w).to(torch.bool)


def _pairs(images: list, context: str) -> tuple[list[tuple[Any, str]], tuple[Any, str]]:
    """Interleaved (demonstrations, query) from images and a context holding one IMAGE_MARK per image, each
    followed by that image's text."""
    parts = context.split(IMAGE_MARK)
    if len(parts) != len(images) + 1 or parts[0].strip():
        raise LmmsEvalError(f"{len(images)} images need a context of {len(images)} {IMAGE_MARK!r} marks, each "
                            f"followed by its text (an interleaved prompt); got {context!r}")  # fmt: skip
    texts = [t.strip() for t in parts[1:]]
    pairs = list(zip(images, texts))
    return pairs[:-1], pairs[-1]


def _is_video(visual: Any) -> bool:
    from ..pipelines import Frames

    if isinstance(visual, Frames) or isinstance(visual, tuple):
        return True
    return isinstance(visual, str) and visual.lower().endswith((".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"))


def _user_turn(messages: Any) -> tuple[list, str]:
    """(media, text) of a one-turn chat: lmms-eval message dicts (or its ChatMessages) with content items
    {"type": "image" | "video", "url": ...} and {"type": "text", "text": ...}."""
    if hasattr(messages, "messages"):  # lmms_eval.protocol.ChatMessages
        messages = [m.model_dump() if hasattr(m, "model_dump") else m for m in messages.messages]
    roles = [m["role"] for m in messages]
    if roles != ["user"]:
        raise LmmsEvalError(f"the vlm_prune chat model answers one user turn; got roles {roles}")
    visuals, texts, marked = [], [], []
    for item in messages[0]["content"]:
        kind = item["type"] if isinstance(item, dict) else item.type
        get = item.get if isinstance(item, dict) else lambda k, _i=item: getattr(_i, k, None)
        if kind == "text":
            texts.append(str(get("text")))
            marked.append(str(get("text")))
        elif kind in ("image", "video"):
            visuals.append(get("url") if get("url") is not None else get(kind))
            marked.append(IMAGE_MARK)
        else:
            raise LmmsEvalError(f"the vlm_prune chat model takes image, video and text content, not {kind!r}")
    # several images: an interleaved prompt, each image followed by its text, as the simple face's marked context
    return visuals, ("".join(marked) if len(visuals) > 1 else "\n".join(texts))


try:
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # the plugin class exists only where lmms-eval is installed
    _LmmsBase = None

if _LmmsBase is not None:

    class VlmPrune(_LmmsBase):
        """A vlm_prune-wrapped model as an lmms-eval simple model (see the module docstring for model_args)."""

        is_simple = True

        def __init__(
            self,
            pretrained: str,
            base: str | None = None,
            method: str = "none",
            keep: float | int = 0.25,
            num_frames: int = 16,
            sampler: str = "uniform",
            max_new_tokens: int = 16,
            batch_size: int | str = 1,
            device: str = "cpu",
            dtype: str = "float32",
            **kwargs: Any,
        ) -> None:
            super().__init__()
            if kwargs:
                raise LmmsEvalError(f"unknown model_args {sorted(kwargs)}; see vlm_prune.integrations.lmms_eval")
            if int(batch_size) != 1:
                raise LmmsEvalError(f"batch_size={batch_size}: the vlm_prune plugin runs one request at a time")
            torch_dtype = getattr(torch, str(dtype), None)
            if not isinstance(torch_dtype, torch.dtype):
                raise LmmsEvalError(f"dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
            self._model, self._processor = _load(str(pretrained), torch_dtype, str(device))
            family = str(getattr(self._model.config, "model_type", ""))
            if base is not None and str(base) != family:
                raise LmmsEvalError(f"base={base!r} but {pretrained!r} is a {family!r} model")
            self.method = None if str(method) == "none" else str(method)
            self.keep, self.num_frames, self.sampler = keep, int(num_frames), str(sampler)
            self.max_new_tokens = int(max_new_tokens)
            self.batch_size_per_gpu = 1

        # ---------------------------------------------------------------- one request

        def _answer_video(self, visual: Any, context: str, max_new_tokens: int) -> str:
            from ..pipelines import VideoQA

            qa = VideoQA(self._model, self._processor, method=self.method, keep=self.keep,
                         num_frames=self.num_frames, sampler=self.sampler, max_new_tokens=max_new_tokens)  # fmt: skip
            return qa.answer(visual, context).text

        @torch.no_grad()
        def _answer_images(self, images: list, context: str, max_new_tokens: int) -> str:

            from ..demo import prepare_inputs

            if len(images) > 1:
                return self._answer_interleaved(images, context, max_new_tokens)
            if len(images) != 1:
                raise LmmsEvalError("the vlm_prune plugin needs a video or images per request, got none")
            inputs = prepare_inputs(self._model, self._processor, images, [context])
            return self._generate(inputs, max_new_tokens)

        @torch.no_grad()
        def _answer_interleaved(self, images: list, context: str, max_new_tokens: int) -> str:
            """An interleaved few-shot prompt, built as the ICL task builds it (`tasks.icl.episode_inputs`)."""
            from types import SimpleNamespace

            from ..tasks.icl import episode_inputs

            demos, query = _pairs(images, context)
            p = next(self._model.parameters())
            episode = SimpleNamespace(pairs=lambda: (demos, query))
            return self._generate(episode_inputs(self._processor, [episode], device=p.device, dtype=p.dtype),
                                  max_new_tokens)  # fmt: skip

        @torch.no_grad()
        def _segment(self, images: list, context: str) -> str:
            """The Segmenter's teacher-forced mask for one image and prompt (the bench's `score_samples` path),
            as `mask_to_text`."""
            from types import SimpleNamespace

            import vlm_prune

            from ..methods.lvlm_csp import LVLMCSP
            from ..models.segmenter import Segmenter
            from ..tasks.segmentation import sam_pixel_values, teacher_forced_inputs

            if len(images) != 1:
                raise LmmsEvalError(f"segmentation takes one image per request, got {len(images)}")
            segmenter, image = Segmenter.of(self._model), images[0]
            sample = SimpleNamespace(image=image, prompt=context)
            inputs = dict(teacher_forced_inputs(self._model, self._processor, [sample]))
            ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
            sam = sam_pixel_values([image], segmenter.sam.config.vision_config.image_size).to(ids.device)
            size = (image.size[1], image.size[0])
            if self.method is None:
                masks = segmenter.predict_masks(ids, sam, attention_mask=mask, output_size=size, **inputs)
            else:
                with vlm_prune.pruned(self._model, self.method, keep=self.keep) as handle:
                    for m in handle.methods:  # LVLM_CSP's prune query is [SEG], as in the bench
                        if isinstance(m, LVLMCSP) and m.query_token_id is None:
                            m.query_token_id = segmenter.config.seg_token_id
                    masks = segmenter.predict_masks(ids, sam, attention_mask=mask, output_size=size, **inputs)
            return mask_to_text(masks[0][0].cpu())

        @torch.no_grad()
        def _generate(self, inputs: dict, max_new_tokens: int) -> str:
            import vlm_prune

            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
            if self.method is None:
                out = self._model.generate(**inputs, **kwargs)
            else:
                with vlm_prune.pruned(self._model, self.method, keep=self.keep):
                    out = self._model.generate(**inputs, **kwargs)
            tok = getattr(self._processor, "tokenizer", self._processor)
            return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

        def _respond(self, visuals: list, text: str, gen_kwargs: dict | None) -> str:
            """One answer: a single video through VideoQA, images through the bench's inputs (several: an
            interleaved prompt), a mask when gen_kwargs ask for one; `until` applied to text answers."""
            max_new = int((gen_kwargs or {}).get("max_new_tokens", self.max_new_tokens))
            if (gen_kwargs or {}).get(OUTPUT_KEY) == "mask":
                return self._segment(visuals, text)
            if len(visuals) == 1 and _is_video(visuals[0]):
                answer = self._answer_video(visuals[0], text, max_new)
            else:
                answer = self._answer_images(visuals, text, max_new)
            for stop in (gen_kwargs or {}).get("until", []) or []:
                if stop and stop in answer:
                    answer = answer.split(stop)[0]
            return answer

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                visuals = visuals if isinstance(visuals, list) else [visuals]
                text = self._respond(visuals, context, gen_kwargs)
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

        def loglikelihood(self, requests):
            raise LmmsEvalError("the vlm_prune plugin serves generate_until tasks only (no loglikelihood)")

        def generate_until_multi_round(self, requests):
            raise LmmsEvalError("the vlm_prune plugin serves single-round generate_until tasks only")

    class VlmPruneChat(VlmPrune):
        """The chat-model face of the plugin (`is_simple = False`, the manifest's chat_class_path): requests carry
        `(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)`; the messages' one user turn (its media: one
        video, or images; its text parts joined by newlines) is answered exactly as the simple class answers
        the same visuals and text. Multi-turn chats (assistant turns) are refused; system text is not supported
        by the bench prompt either, so it is refused too rather than dropped."""

        is_simple = False

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
                messages = doc_to_messages(self.task_dict[task][split][doc_id])
                visuals, text = _user_turn(messages)
                answer = self._respond(visuals, text, gen_kwargs)
                out.append(answer)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            return out
