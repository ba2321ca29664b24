"""Train the embedded LLaVA-3D demo model (`vlm_prune/demo_models/llava3d_scene`) on the scene3d task.

    python benchmarks/train_scene3d_model.py --minutes 65                    # the shipped run
    python benchmarks/train_scene3d_model.py --pilot                         # 3-minute smoke run into /tmp

Model: a tiny `Llava3DForConditionalGeneration` (`vlm_prune.models.llava3d`): CLIP 2 layers x 32 wide on 96 px
views (patch 12, 8 x 8 patches a view), the 3-D position MLP, 0.2 m voxels (about 240 voxel tokens for the 4
views of a room), a Llama decoder of 8 layers x 96 (4 heads, GQA 2), a word-level tokenizer of the task's words.

Data: train scenes of `vlm_prune.tasks.scene3d` (easy-VQA train images only; seed string "train"), rendered
once at start (`--scenes`), each step drawing `--batch-scenes` of them with one fresh question of each type
(nearest / count / left), twice. Held-out evaluation: `eval_samples` (easy-VQA test images, seed 1234), greedy
generate through `Llava3DProcessor`, exact match, per question type.

Losses (tiny models trained on the answer alone stay on the answer prior; each auxiliary loss teaches one
step the answer needs, all from the scene record). Voxel labels: each patch takes the majority label of its
pixels (object / floor / wall / door), each voxel the majority of its patches.
  * answer: cross-entropy on the answer word and </s>;
  * dense (vision tower + position MLP + projector): linear heads on the voxel tokens' embeddings predict their
    colour-or-surface (8 colours, floor, wall, door), kind (box / sphere / cylinder / none) and voxel centre;
  * objects (output of layer 1): per voxel token, whether it is the first token (in sequence order) of its
    object, and its object's centre;
  * key words (layer 0, heads 0 and 1 of the answer position): the question's first and second key word
    (nearest: the colour; count: the kind; left: the two colours);
  * retrieval (layer 2 heads 0 / 1): the tokens of the object the question names (left: both objects);
    (layer 3 head 0): the door's tokens (left); (layer 4 head 0): the tokens of the nearest object (nearest),
    or the first tokens of every object of the asked kind plus <s> (count: the share of attention left on <s>
    tells the count).
The auxiliary heads are not saved; the shipped model is the plain HF model in fp16.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm_prune.data.mosaic import COLORS  # noqa: E402
from vlm_prune.tasks import scene3d as S  # noqa: E402
from vlm_prune.tasks import scene3d_render as R  # noqa: E402

SAVE_DIR = ROOT / "vlm_prune" / "demo_models" / "llava3d_scene"
RESULTS = ROOT / "benchmarks" / "results"
IMAGE_SIZE, PATCH = 96, 12
SURFACE = {R.LABEL_FLOOR: 8, R.LABEL_WALL: 9, R.LABEL_DOOR: 10, R.LABEL_NONE: 9}
# (layer, head) of each supervised attention of the answer position
KEY1, KEY2, OBJ_A, OBJ_B, DOOR, FINAL = (0, 0), (0, 1), (2, 0), (2, 1), (3, 0), (4, 0)


# ---------------------------------------------------------------------------------------------- model
def build_tokenizer():
    return S.build_tokenizer()


def build_model(tokenizer, num_layers: int, hidden: int, seed: int):
    from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration
    from vlm_prune.models.llava3d.tiny import tiny_llava3d_config

    config = tiny_llava3d_config(
        num_layers, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=hidden, vocab_size=len(tokenizer),
        attn_implementation="eager",
    )  # fmt: skip
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    config.click_token_id = tokenizer.convert_tokens_to_ids("<boxes>")
    config.text_config.pad_token_id, config.text_config.bos_token_id, config.text_config.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = Llava3DForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.bos_token_id = 0, 1
    model.generation_config.eos_token_id = 2
    return model


# ---------------------------------------------------------------------------------------------- data
class Bank:
    """Rendered train scenes with their model inputs and per-voxel labels."""

    def __init__(self, model, processor, n: int, seed: int):
        from tqdm.auto import tqdm

        from vlm_prune.models.llava3d.geometry import patch_pixels

        rng = random.Random(f"train_scene3d/bank/seed={seed}")
        self.items = []
        grid = processor.grid
        for _ in tqdm(range(n), desc="render train scenes", mininterval=10):
            scene = S.sample_scene(rng, "train", 4)
            views = S.render_scene(scene, IMAGE_SIZE)
            prep = processor.prepare_scene(views.rgb, views.depth, views.intrinsics, views.poses, views.axis_align)
            geo = model.model.voxelizer(
                prep["depths"][None], prep["intrinsics"][None], prep["poses"][None], prep["axis_align"][None], grid
            )[0]
            labels = _voxel_labels(views.labels, geo, grid, patch_pixels)
            self.items.append(dict(scene=scene, prep=prep, labels=labels, xyz=geo.voxel_xyz.float()))


def _voxel_labels(label_maps: np.ndarray, geo, grid, patch_pixels) -> torch.Tensor:
    """(K,) label per voxel: the majority over its patches of each patch's majority pixel label."""
    views, height, width = label_maps.shape
    gh, gw = grid
    ph, pw = height // gh, width // gw
    blocks = label_maps.reshape(views, gh, ph, gw, pw).transpose(0, 1, 3, 2, 4).reshape(views * gh * gw, ph * pw)
    offset = -R.LABEL_DOOR  # labels >= -4
    patch_major = np.array([np.bincount(b + offset).argmax() - offset for b in blocks])
    rows = geo.patch_voxel >= 0
    patch_lab = patch_major[geo.patch_index[rows].numpy()]
    voxel = geo.patch_voxel[rows].numpy()
    out = np.empty(len(geo), np.int64)
    for k in range(len(geo)):
        out[k] = np.bincount(patch_lab[voxel == k] + offset).argmax() - offset
    return torch.from_numpy(out)


HEAD = 3  # "<s> USER :" before the scene's placeholders


def build_rows(bank: Bank, tokenizer, picks: list[int], rng: random.Random, per_type: int = 2):
    """`per_type` questions of each type per picked scene: suffix ids (question, answer, </s>) and attention targets as
    ("prefix", i) (i indexes "<s> USER : <image>*N") or ("suffix", i)."""
    tok = tokenizer
    rows = []
    for si in picks:
        item = bank.items[si]
        scene, labels = item["scene"], item["labels"]
        n = len(labels)
        by_label: dict[int, list[tuple[str, int]]] = {}
        for j, k in enumerate(labels.tolist()):
            by_label.setdefault(int(k), []).append(("prefix", HEAD + j))
        for qtype in S.QTYPES * per_type:
            spec = S.sample_question(rng, scene, qtype)
            if spec is None:
                continue
            q_ids = tok(spec.text(scene) + " ASSISTANT:", add_special_tokens=False)["input_ids"]
            a_ids = tok(spec.answer(scene), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

            def qpos(word: str, q_ids=q_ids) -> list[tuple[str, int]]:
                wid = tok.convert_tokens_to_ids(word)
                return [("suffix", i) for i, t in enumerate(q_ids) if t == wid]

            objs = scene.objects
            att: dict[tuple[int, int], list[tuple[str, int]]] = {}
            if qtype == "nearest":
                ref = objs[spec.target]
                att[KEY1], att[KEY2] = qpos(ref.color), qpos(ref.kind)
                att[OBJ_A] = by_label.get(spec.target, [])
                att[FINAL] = by_label.get(S.nearest_object(scene, spec.target)[0], [])
            elif qtype == "count":
                att[KEY1] = att[KEY2] = qpos(S.PLURAL[spec.kind])
                att[FINAL] = [("prefix", 0)] + [
                    by_label[k][0] for k, o in enumerate(objs) if o.kind == spec.kind and by_label.get(k)
                ]
            else:
                a, b = objs[spec.target], objs[spec.other]
                att[KEY1], att[KEY2] = qpos(a.color)[:1], qpos(b.color)[-1:]
                att[OBJ_A], att[OBJ_B] = by_label.get(spec.target, []), by_label.get(spec.other, [])
                att[DOOR] = by_label.get(R.LABEL_DOOR, [])
            rows.append(dict(scene=si, n=n, suffix=q_ids + a_ids, answer_pos=len(q_ids) - 1, n_answer=len(a_ids),
                             att=att, qtype=qtype))  # fmt: skip
    return rows


def voxel_targets(item) -> dict[str, torch.Tensor]:
    scene, labels = item["scene"], item["labels"]
    color = torch.tensor([COLORS.index(scene.objects[k].color) if k >= 0 else SURFACE[int(k)] for k in labels])
    kind = torch.tensor([S.KINDS.index(scene.objects[k].kind) if k >= 0 else 3 for k in labels])
    first = torch.zeros(len(labels), dtype=torch.long)
    centre = torch.zeros(len(labels), 3)
    seen = set()
    for j, k in enumerate(labels.tolist()):
        if k >= 0:
            if k not in seen:
                first[j] = 1
                seen.add(k)
            centre[j] = torch.tensor(scene.objects[k].centroid, dtype=torch.float32)
    return dict(color=color, kind=kind, first=first, centre=centre / 2.0, xyz=item["xyz"] / 2.0, obj=labels >= 0)


# ---------------------------------------------------------------------------------------------- training
def make_heads(hidden: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict(
        dict(
            color=torch.nn.Linear(hidden, 11), kind=torch.nn.Linear(hidden, 4), xyz=torch.nn.Linear(hidden, 3),
            first=torch.nn.Linear(hidden, 2), centre=torch.nn.Linear(hidden, 3),
        )
    )  # fmt: skip


def _batch_media(bank, scenes):
    prep = [bank.items[s]["prep"] for s in scenes]
    return [torch.stack([p[k] for p in prep]) for k in ("pixel_values", "depths", "intrinsics", "poses", "axis_align")]


def shared_prefix_forward(model, bank, tokenizer, rows, scenes):
    """Prefix "<s> USER : <image>*N" once per scene (left-padded), its cache repeated per question, then the
    question + answer suffixes (right-padded). Returns (features per scene, prefix output, suffix output, P, pads)."""
    from vlm_prune.models.llava3d.modeling import Llava3DSceneOutput

    enc = model.model.get_image_features(*_batch_media(bank, scenes))
    feats = dict(zip(scenes, enc.pooler_output))
    img = model.config.image_token_id
    head = tokenizer("USER:", add_special_tokens=True)["input_ids"]
    lens = [HEAD + len(bank.items[s]["labels"]) for s in scenes]
    width = max(lens)
    pre_ids = torch.zeros(len(scenes), width, dtype=torch.long)
    pre_mask = torch.zeros(len(scenes), width, dtype=torch.long)
    pads = {}
    for i, (s, n) in enumerate(zip(scenes, lens)):
        pads[s] = width - n
        pre_ids[i, width - n :] = torch.tensor(head + [img] * (n - HEAD))
        pre_mask[i, width - n :] = 1
    pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
    pre = model(
        input_ids=pre_ids, attention_mask=pre_mask, position_ids=pos,
        mm_encoder_outputs={"image": Llava3DSceneOutput(pooler_output=[feats[s] for s in scenes])},
        use_cache=True, output_hidden_states=True,
    )  # fmt: skip
    cache = pre.cache
    order = [scenes.index(r["scene"]) for r in rows]
    cache.batch_select_indices(torch.tensor(order))
    t = max(len(r["suffix"]) for r in rows)
    suf_ids = torch.zeros(len(rows), t, dtype=torch.long)
    suf_mask = torch.zeros(len(rows), t, dtype=torch.long)
    for b, r in enumerate(rows):
        suf_ids[b, : len(r["suffix"])] = torch.tensor(r["suffix"])
        suf_mask[b, : len(r["suffix"])] = 1
    mask = torch.cat([pre_mask[order], suf_mask], dim=1)
    suf_pos = torch.tensor([lens[i] for i in order])[:, None] + torch.arange(t)[None]
    out = model(
        input_ids=suf_ids, attention_mask=mask, position_ids=suf_pos, cache=cache, use_cache=True,
        output_attentions=True,
    )  # fmt: skip
    return feats, pre, out, width, pads


def train_step(model, heads, bank, tokenizer, picks, rng, weights) -> dict[str, float]:
    rows = build_rows(bank, tokenizer, picks, rng)
    scenes = sorted({r["scene"] for r in rows})
    feats, pre, out, width, pads = shared_prefix_forward(model, bank, tokenizer, rows, scenes)
    logp = F.log_softmax(out.logits.float(), -1)
    answer = []
    for b, r in enumerate(rows):
        for i in range(r["n_answer"]):
            answer.append(-logp[b, r["answer_pos"] + i, r["suffix"][r["answer_pos"] + i + 1]])
    losses = {"answer": torch.stack(answer).mean()}
    dense, objl = [], []
    for i, s in enumerate(scenes):
        t = voxel_targets(bank.items[s])
        emb = feats[s].float()
        dense.append(
            F.cross_entropy(heads["color"](emb), t["color"]) + F.cross_entropy(heads["kind"](emb), t["kind"])
            + 4 * F.mse_loss(heads["xyz"](emb), t["xyz"])
        )  # fmt: skip
        start = pads[s] + HEAD
        h1 = pre.hidden_states[2][i, start : start + len(t["color"])].float()
        loss = F.cross_entropy(heads["first"](h1), t["first"], weight=torch.tensor([1.0, 4.0]))
        if t["obj"].any():
            loss = loss + 4 * F.mse_loss(heads["centre"](h1[t["obj"]]), t["centre"][t["obj"]])
        objl.append(loss)
    losses["dense"] = torch.stack(dense).mean()
    losses["objects"] = torch.stack(objl).mean()
    att = []
    for b, r in enumerate(rows):
        for (layer, head), where in r["att"].items():
            if not where:
                continue
            cols = [pads[r["scene"]] + i if part == "prefix" else width + i for part, i in where]
            row = out.attentions[layer][b, head, r["answer_pos"]].float()
            att.append(-torch.log(row[torch.tensor(cols)] + 1e-6).mean())
    losses["attention"] = torch.stack(att).mean() if att else torch.zeros(())
    total = sum(weights[k] * v for k, v in losses.items())
    total.backward()
    acc = {}
    with torch.no_grad():
        for b, r in enumerate(rows):
            pred = int(out.logits[b, r["answer_pos"]].argmax())
            acc.setdefault(r["qtype"], []).append(pred == r["suffix"][r["answer_pos"] + 1])
    result = {k: float(v.detach()) for k, v in losses.items()}
    result.update({f"acc_{q}": sum(v) / len(v) for q, v in acc.items()})
    return result


@torch.no_grad()
def check_shared_prefix(model, bank, tokenizer, rng) -> float:
    """Max |logit difference| of the shared-prefix forward against plain forwards of the whole rows."""
    rows = build_rows(bank, tokenizer, [0, 1], rng)
    scenes = sorted({r["scene"] for r in rows})
    _, _, out, _, _ = shared_prefix_forward(model, bank, tokenizer, rows, scenes)
    worst = 0.0
    head = tokenizer("USER:", add_special_tokens=True)["input_ids"]
    for b, r in enumerate(rows):
        s = r["scene"]
        ids = torch.tensor([head + [model.config.image_token_id] * r["n"] + r["suffix"]])
        media = _batch_media(bank, [s])
        full = model(input_ids=ids, pixel_values=media[0], depths=media[1], intrinsics=media[2], poses=media[3],
                     axis_align=media[4]).logits[0, -len(r["suffix"]) :]  # fmt: skip
        worst = max(worst, float((full - out.logits[b, : len(r["suffix"])]).abs().max()))
    return worst


@torch.no_grad()
def evaluate(model, processor, samples, batch: int = 8) -> dict[str, float]:
    from vlm_prune.demo import normalize_answer

    model.eval()
    preds = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        inputs = scene_inputs(processor, chunk)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        preds.extend(normalize_answer(t) for t in texts)
    model.train()
    return S.score(samples, preds)


def scene_inputs(processor, samples) -> dict:
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "scene"}, {"type": "text", "text": s.question}]}]
        )
        for s in samples
    ]
    v = [s.views for s in samples]
    return processor(
        prompts, rgb=[x.rgb for x in v], depth=[x.depth for x in v], intrinsics=[x.intrinsics for x in v],
        poses=[x.poses for x in v], axis_align=[x.axis_align for x in v],
    )  # fmt: skip


def check_prompt(processor, tokenizer, sample) -> None:
    """The training rows are built by hand; they must equal what the processor gives at inference."""
    inputs = scene_inputs(processor, [sample])
    ids = inputs["input_ids"][0].tolist()
    n = ids.count(processor.image_token_id)
    head = tokenizer("USER:", add_special_tokens=True)["input_ids"]
    q = tokenizer(sample.question + " ASSISTANT:", add_special_tokens=False)["input_ids"]
    mine = head + [processor.image_token_id] * n + q
    if ids != mine:
        raise SystemExit(f"training prompt differs from the processor's:\n{ids}\n{mine}")


def plot(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history]
    for key in ("answer", "dense", "objects", "attention"):
        axes[0].plot(steps, [max(h[key], 1e-4) for h in history], lw=1, label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("losses (running mean)")
    for q in S.QTYPES:
        axes[1].plot(steps, [h.get(f"acc_{q}", float("nan")) for h in history], lw=1, label=q)
    axes[1].set_title("train answer accuracy (running)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, save: Path, results: Path) -> Path:
    """The demo model's card (`README.md` in its folder) plus copies of the JSON report and loss plot there."""
    import shutil

    acc = report["held_out"]["accuracy"]
    bar = all(acc.get(q, 0.0) >= 0.85 for q in S.QTYPES)
    lines = [
        "# Embedded LLaVA-3D demo model (`llava3d_scene`)",
        "",
        "A tiny `Llava3DForConditionalGeneration` trained by `benchmarks/train_scene3d_model.py` on the scene3d task",
        "(`vlm_prune.tasks.scene3d`), fp16. Load it with `vlm_prune.tasks.scene3d.load_scene_model()`; bench it with",
        "`vlm-prune bench --task scene3d`.",
        "",
        "| params | decoder layers | voxel tokens per room | checkpoint | steps | train time | seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {report['parameters'] / 1e6:.2f} M | {report['config']['layers']} x {report['config']['hidden']} | "
        f"{report['voxels_per_scene']['min']}-{report['voxels_per_scene']['max']} | "
        f"{report['checkpoint_bytes'] / 2**20:.2f} MiB | {report['steps']} | {report['train_seconds'] / 60:.0f} min | "
        f"{report['seed']} |",
        "",
        f"Held-out accuracy (greedy generate, exact match, unpruned, {report['held_out']['n']} test rooms, "
        f"`eval_samples(seed={report['held_out']['seed']})`, reloaded fp16 checkpoint in float32):",
        "",
        "| " + " | ".join(S.QTYPES) + " | all |",
        "| " + " | ".join("---" for _ in range(len(S.QTYPES) + 1)) + " |",
        "| " + " | ".join(f"{acc.get(q, 0.0):.3f}" for q in (*S.QTYPES, "all")) + " |",
        "",
        "Chance: nearest 1/7 over the other colours at most, count about 0.4 (the prior), left 0.5.",
        f"Bar (>= 0.85 per question type): {'met' if bar else 'NOT met'}.",
        "",
        f"Machine: {report['machine']['platform']}, torch {report['machine']['torch']}, 1 thread, a CPU shared by "
        "several training jobs (load average 9-12 on 2 cores during the run).",
        "Config, loss weights and loss history: `demo_scene3d_train.json`; curves: `demo_scene3d_loss.png`.",
    ]
    path = save / "README.md"
    path.write_text("\n".join(lines) + "\n")
    for name in ("demo_scene3d_train.json", "demo_scene3d_loss.png"):
        if (results / name).is_file() and results.resolve() != save.resolve():
            shutil.copy(results / name, save / name)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=65.0, help="training wall-clock budget (rendering excluded)")
    p.add_argument("--scenes", type=int, default=1500, help="train scenes rendered at start")
    p.add_argument("--batch-scenes", type=int, default=6, help="scenes per step (3 questions each)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=300, help="held-out test samples for the final report")
    p.add_argument("--save-dir", default=str(SAVE_DIR))
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--stop-file", default="/tmp/scene3d/stop", help="end training early when this file appears")
    p.add_argument("--pilot", action="store_true", help="3 minutes, 150 scenes, into /tmp/scene3d_pilot")
    args = p.parse_args(argv)
    if args.pilot:
        args.minutes, args.scenes, args.eval_n = 3.0, 150, 30
        args.save_dir = args.results_dir = "/tmp/scene3d_pilot"
    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    from vlm_prune.models.llava3d.processing import Llava3DProcessor

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.layers, args.hidden, args.seed)
    processor = Llava3DProcessor.for_model(model.config, tokenizer)
    eval_set = S.eval_samples(args.eval_n, seed=1234, image_size=IMAGE_SIZE)
    check_prompt(processor, tokenizer, eval_set[0])
    t0 = time.time()
    bank = Bank(model, processor, args.scenes, args.seed)
    render_s = time.time() - t0
    voxels = [len(it["labels"]) for it in bank.items]
    print(f"rendered {len(bank.items)} scenes in {render_s:.0f} s; voxels {min(voxels)}-{max(voxels)}", flush=True)
    diff = check_shared_prefix(model, bank, tokenizer, random.Random(0))
    print(f"shared prefix vs plain forward: max |logit diff| {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise SystemExit("the shared-prefix forward does not match the plain forward")
    heads = make_heads(args.hidden)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    weights = {"answer": 1.0, "dense": 0.5, "objects": 0.5, "attention": 0.3}
    rng = random.Random(f"train_scene3d/stream/seed={args.seed}")
    history, running = [], {}
    budget = args.minutes * 60
    start = time.time()
    step = 0
    model.train()
    est_total = None
    while True:
        elapsed = time.time() - start
        if elapsed >= budget or Path(args.stop_file).exists():
            break
        if step == 20:
            est_total = int(budget / (elapsed / 20))
        total = est_total or 10_000
        warm = 50
        lr = (
            args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        picks = rng.sample(range(len(bank.items)), args.batch_scenes)
        opt.zero_grad(set_to_none=True)
        stats = train_step(model, heads, bank, tokenizer, picks, rng, weights)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for k, v in stats.items():
            running[k] = v if k not in running else 0.95 * running[k] + 0.05 * v
        if step % 25 == 0:
            history.append({"step": step, "seconds": round(time.time() - start, 1), "lr": lr, **running})
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in history[-1].items()}), flush=True
            )
        if step % 200 == 0:
            torch.save(model.state_dict(), Path(args.stop_file).parent / "checkpoint.pt")
    train_s = time.time() - start
    model.eval()
    t1 = time.time()
    save = Path(args.save_dir)
    save.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "sdpa"
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = "sdpa"
    model.half().save_pretrained(save)
    processor.save_pretrained(save)
    from vlm_prune.models.llava3d.modeling import Llava3DForConditionalGeneration

    reloaded = Llava3DForConditionalGeneration.from_pretrained(save, dtype=torch.float32).eval()
    acc = evaluate(reloaded, processor, eval_set)
    eval_s = time.time() - t1
    print("held-out accuracy", acc, flush=True)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    report = {
        "model": "llava3d_scene",
        "seed": args.seed,
        "args": vars(args),
        "config": {
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "views": 4,
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": len(tokenizer),
            "voxel_size": model.config.voxel_size,
        },  # fmt: skip
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "checkpoint_bytes": sum(f.stat().st_size for f in save.glob("*.safetensors")),
        "voxels_per_scene": {"min": min(voxels), "max": max(voxels), "mean": sum(voxels) / len(voxels)},
        "steps": step,
        "render_seconds": render_s,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "loss_weights": weights,
        "held_out": {"n": len(eval_set), "seed": 1234, "accuracy": acc},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "history": history,
    }
    (results / "demo_scene3d_train.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(history, results / "demo_scene3d_loss.png")
    write_report(report, save, results)
    print(f"saved {save}; {step} steps in {train_s / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
