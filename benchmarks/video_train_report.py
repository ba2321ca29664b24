"""Report of `train_video_model.py`: the loss plot and `benchmarks/results/demo_video_model.md`."""

from __future__ import annotations

from pathlib import Path

from vlm_prune.tasks import video as V

NOTES = """## Recipe

One loss per mechanism the answer needs (the lesson of `demo_models.md`: tiny models trained on the answer
alone stay on the answer prior), all from the event record of each train clip:

* answer: cross-entropy on the answer word and the end-of-turn token, 4 clips x 6 questions per step on a
  shared prefix (the prompt up to the end of the video runs once per clip; checked equal to a plain forward);
* dense (vision tower): per-token shape-or-background and colour, per-cell shape from the mean of its shape
  tokens, on the merger output of every temporal step (the image model saw 64 px cells, the video 32 px);
* previous step: layer 0 head 1 of each visual token attends to the same place one temporal step earlier;
* events: a linear head on the output of layer 1 tells per visual token whether its cell had a shape appear,
  move in or change colour at this step, or was left by a moving shape;
* key words: layer 2 head 0 of the answer position attends to the question's key words;
* retrieval: layer 4 head 0 of the answer position attends to the tokens holding the answer (the asked cell
  at the first / last step, or the shape tokens at the step of the asked event).

The auxiliary heads are not saved; the shipped model is the plain HF model.

## For pruning benchmarks

A clip has only 4 temporal steps of 64 tokens at 8 frames. EVS keeps at least one step's worth of tokens
(`max(tokens_per_frame, int(T * tokens_per_frame * (1 - q)))`) and forces the first step in, so at 25 % of
the tokens it keeps exactly the first step and nothing of the events. With 16 frames
(`frames_per_step=4`) every state spans two temporal steps, so half the steps repeat the one before and EVS
can drop them.
"""


def markdown(r: dict) -> str:
    """benchmarks/results/demo_video_model.md from the training report."""
    e = r["eval"]
    per = " | ".join(f"{e['per_qtype'][q]['accuracy']:.3f}" for q in V.QTYPES)
    return "\n".join(
        [
            "# Embedded video demo model",
            "",
            '`vlm_prune.demo_model("qwen2_vl_video")`: a tiny `Qwen2VLForConditionalGeneration` trained by',
            "`benchmarks/train_video_model.py` on the video task (`docs/video_task.md`), shipped in fp16 under",
            "`vlm_prune/demo_models/qwen2_vl_video/`. Accuracy: greedy `generate`, exact match, unpruned, on held-out",
            f"test clips (easy-VQA test images only), `eval_samples({e['n']}, seed={e['seed']})`, after reloading the",
            "saved fp16 checkpoint in float32.",
            "",
            "| params | decoder layers | visual tokens per clip | checkpoint | steps | train time | machine |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {r['parameters'] / 1e6:.2f} M | {r['decoder_layers']} | {r['visual_tokens_per_clip']} "
            f"| {r['checkpoint_bytes'] / 2**20:.2f} MiB | {r['steps']} x {r['clips_per_step']} clips x "
            f"{r['questions_per_clip']} questions | {r['train_seconds'] / 60:.0f} min | {r['device']}, torch "
            f"{r['versions']['torch']}, transformers {r['versions']['transformers']} |",
            "",
            "| frames | n | " + " | ".join(V.QTYPES) + " | all |",
            "| --- | --- | " + " | ".join("---" for _ in V.QTYPES) + " | --- |",
            f"| 8 | {e['n']} | {per} | {e['accuracy']:.3f} |",
            *(
                f"| {x['frames']} | {x['n']} | "
                + " | ".join(f"{x['per_qtype'][q]['accuracy']:.3f}" for q in V.QTYPES)
                + f" | {x['accuracy']:.3f} |"
                for k, x in r.items()
                if k.startswith("eval_frames_per_step_")
            ),
            "",
            f"Lineage: initialised from the image demo model `vlm_prune/demo_models/qwen2_vl` of commit "
            f"{r['lineage']['init_commit']} (sha256 of its model.safetensors {r['lineage']['init_sha256'][:16]}...);",
            f"decoder layer i <- image layer {r['lineage']['layer_sources']} (None: new, starting as identity).",
            "Training phases (each a new AdamW + warmup/cosine schedule from the previous phase's weights): "
            + "; ".join(
                f"{ph['steps']} steps at peak lr {ph['lr']:g} on "
                + "/".join(str(4 * f) for f in ph.get("frames_per_step", [2]))
                + "-frame clips"
                for ph in r["phases"]
            )
            + ".",
            "Loss curve and running train accuracy: `demo_video_loss.png`; config and loss history:",
            "`demo_video_train.json`.",
            "",
            NOTES,
        ]
    )


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = [h["step"] for h in history]
    for key in ("answer", "dense", "prev", "events", "words", "retrieval"):
        axes[0].plot(steps, [max(h[key], 1e-5) for h in history], lw=1, label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("qwen2_vl_video: losses")
    for q in V.QTYPES:
        axes[1].plot(steps, [h.get(f"acc_{q}", float("nan")) for h in history], lw=1, label=q)
    axes[1].set_title("running train accuracy (answer position, argmax)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
