"""Cost of LLaVA-3D's voxelisation in plain torch (issue 12), on this CPU.

Times, per scene, (a) `scene_geometry`: back-projection of the patch grid, voxelisation, the seeded cap; and
(b) the scatter-mean of the patch features into the voxels (`scatter_mean`, F-dim features), at the realistic
size (V = 16 / 20 views of 336 x 336 depth, 24 x 24 patches, F = 1024, as LLaVA-3D-7B) and the tiny test size
(V = 3, 32 x 32, 4 x 4, F = 32). Scenes are `tiny.random_scene` random posed depth fields (1-3.5 m).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llava3d_voxelisation.py [--repeats 20] [--out PATH]

Writes a markdown table (median and p90 ms, voxels before / after the 2560 cap) with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm

from vlm_prune.models.llava3d.geometry import scatter_mean, scene_geometry
from vlm_prune.models.llava3d.tiny import random_scene

CASES = [  # name, views, depth side, patch grid side, feature width
    ("tiny (tests)", 3, 32, 4, 32),
    ("realistic, 16 views", 16, 336, 24, 1024),
    ("realistic, 20 views", 20, 336, 24, 1024),
]


def time_case(views: int, size: int, grid: int, width: int, repeats: int) -> dict:
    scene = random_scene(0, views=views, size=size, holes=0.05)
    args = (scene["depth"], scene["intrinsics"], scene["poses"], scene["axis_align"], (grid, grid))
    features = torch.randn(views * grid * grid, width)
    geometry = scene_geometry(*args)
    geo_ms, mean_ms = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        geometry = scene_geometry(*args)
        middle = time.perf_counter()
        rows = geometry.patch_voxel >= 0
        scatter_mean(features[geometry.patch_index[rows]], geometry.patch_voxel[rows], len(geometry))
        end = time.perf_counter()
        geo_ms.append((middle - start) * 1e3)
        mean_ms.append((end - middle) * 1e3)
    return dict(
        patches=views * grid * grid, voxels=geometry.num_voxels, kept=len(geometry),
        geo=(statistics.median(geo_ms), sorted(geo_ms)[int(0.9 * (repeats - 1))]),
        mean=(statistics.median(mean_ms), sorted(mean_ms)[int(0.9 * (repeats - 1))]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per case (after one warm-up)")
    parser.add_argument("--out", default="benchmarks/results/llava3d_voxelisation.md", help="markdown report")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    rows = []
    for name, views, size, grid, width in tqdm(CASES, desc="cases"):
        result = time_case(views, size, grid, width, args.repeats)
        rows.append(
            f"| {name} | {views} | {size} | {grid}x{grid} | {width} | {result['patches']} | {result['voxels']} | "
            f"{result['kept']} | {result['geo'][0]:.2f} / {result['geo'][1]:.2f} | "
            f"{result['mean'][0]:.2f} / {result['mean'][1]:.2f} |"
        )
    report = "\n".join([
        "# LLaVA-3D voxelisation cost (plain torch, no torch-scatter)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread, "
        f"torch {torch.__version__}; load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(the machine is shared by 8 engineers: expect noise).",
        f"{args.repeats} timed runs per case after a warm-up; median / p90 in ms, per scene.",
        "",
        "| case | views | depth side | patch grid | F | patches | voxels | kept (cap 2560) | geometry ms | "
        "scatter-mean ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "geometry = back-projection of the patch grid (nearest depth), voxelisation at 0.2 m, lexicographic order, "
        "seeded + sorted cap (`geometry.scene_geometry`); scatter-mean = averaging the F-dim patch features into the "
        "kept voxels (`geometry.scatter_mean`). The processor runs the geometry once more to count the voxels.",
        "",
        "Reproduce: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llava3d_voxelisation.py`",
        "",
    ])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(report)
    print(report)


if __name__ == "__main__":
    main()
