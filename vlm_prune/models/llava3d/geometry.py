"""LLaVA-3D scene geometry in plain torch: patch back-projection, voxelisation, scatter-mean, the voxel cap.

Follows the authors' pipeline (ZCMax/LLaVA-3D, `llava/model/multimodal_encoder/unproject.py` and
`video_encoder.py`), re-implemented here (no code copied, no torch-scatter):

1. **Pixel convention.** Pixel (row v, column u) of a view has camera coordinates
   ((u - cx) z / fx, (v - cy) z / fy, z) with u, v the integer pixel indices (no +0.5 centre offset), z its
   depth in metres; world = axis_align @ pose @ camera (the authors fold `axis_align` into every pose).
2. **Nearest interpolation to the patch grid.** The authors back-project the full-resolution depth map and
   resize the xyz map to the h x w patch grid with `F.interpolate(mode="nearest")`, which picks source pixel
   floor(i * H / h) on each axis. Back-projecting only those pixels (`patch_pixels`) gives the same xyz.
3. **Voxelisation.** Voxel coordinate = round(xyz / voxel_size) (torch.round, half to even, as the authors),
   minus the scene's minimum; voxels are the unique coordinates in lexicographic (i, j, k) order (the order
   of the authors' sorted ravel keys), and a voxel's feature is the mean of its patches (`scatter_mean`).
4. **The cap.** More than `max_voxels` (2560) voxels keep a random subset. Deviation (documented): the
   authors draw it with an unseeded `torch.randperm` and keep it in that random order; here the subset comes
   from a generator seeded with `seed` and is sorted, so the kept voxels stay in lexicographic order and the
   same scene always gives the same tokens.

Deviation: patches whose depth is 0 (invalid) or not finite are dropped before voxelisation (the authors
inpaint depth holes offline and back-project every patch, so a hole would land at the camera centre).
A voxel's xyz centre is its rounded coordinate times `voxel_size`, in the axis-aligned world frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_prune.errors import InputError


@dataclass
class SceneGeometry:
    """The voxels of one scene and how its patches map onto them.

    Shapes (V views, P = h*w patches per view, n valid patches, K kept voxels):
        patch_index: (n,) long. Flat index into the V*P patches of the valid ones (view-major, raster order).
        patch_xyz: (n, 3) float. Their back-projected world coordinates.
        patch_voxel: (n,) long. The kept voxel each valid patch falls in, or -1 when the cap dropped its voxel.
        voxel_ijk: (K, 3) long. Integer voxel coordinates (scene minimum at 0), lexicographic order.
        voxel_xyz: (K, 3) float. Voxel centres in metres (axis-aligned world frame).
        num_voxels: voxels before the cap (>= K).
    """

    patch_index: torch.Tensor
    patch_xyz: torch.Tensor
    patch_voxel: torch.Tensor
    voxel_ijk: torch.Tensor
    voxel_xyz: torch.Tensor
    num_voxels: int

    def __len__(self) -> int:
        return int(self.voxel_ijk.shape[0])


def patch_pixels(height: int, width: int, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((h,), (w,)) long: the pixel row/column nearest interpolation reads for each patch row/column."""
    rows = torch.div(torch.arange(grid_h) * height, grid_h, rounding_mode="floor")
    cols = torch.div(torch.arange(grid_w) * width, grid_w, rounding_mode="floor")
    return rows, cols


def as_matrices(value: torch.Tensor, views: int, name: str) -> torch.Tensor:
    """(V, 4, 4) float from a (4, 4) matrix shared by all views or one (V, 4, 4) stack; InputError otherwise."""
    value = torch.as_tensor(value, dtype=torch.float32)
    if value.shape == (4, 4):
        return value.expand(views, 4, 4)
    if value.ndim == 3 and value.shape[1:] == (4, 4) and value.shape[0] == views:
        return value
    raise InputError(
        f"{name} must be a 4x4 matrix or one 4x4 matrix per view ({views}, 4, 4), got shape {tuple(value.shape)}; "
        f"pad a 3x3 {name} to 4x4 (last row and column 0, 0, 0, 1)"
    )


def check_scene(
    depths: torch.Tensor, intrinsics, poses, axis_align, rgb_shape: tuple | None = None, check_depth: bool = True
) -> None:
    """Raise an InputError saying what to fix when one scene's arrays disagree (see `Llava3DProcessor`).

    depths: (V, H, W) metres, 0 = invalid; rgb_shape: (V, H, W, 3) of the views' RGB, if given. check_depth:
    also refuse a depth map without any value > 0 (`scene_geometry` checks the patch pixels instead).
    """
    if depths.ndim != 3:
        raise InputError(f"depth must be (views, H, W) in metres, got shape {tuple(depths.shape)}")
    views, height, width = depths.shape
    if rgb_shape is not None and (len(rgb_shape) != 4 or tuple(rgb_shape[:3]) != (views, height, width)):
        raise InputError(
            f"the RGB views {tuple(rgb_shape)} and the depth maps {tuple(depths.shape)} disagree; pass RGB as "
            f"(views, H, W, 3) and depth as (views, H, W) with the same views and the same H, W (resize the depth "
            "map to the RGB image, nearest-neighbour)"
        )
    as_matrices(intrinsics, views, "intrinsics")
    as_matrices(poses, views, "pose")
    axis = torch.as_tensor(axis_align)
    if axis.shape != (4, 4):
        raise InputError(f"axis_align must be one 4x4 matrix per scene, got shape {tuple(axis.shape)}")
    if check_depth and not bool((depths > 0).any()):
        raise InputError(
            "the scene has no valid depth (every depth value is 0 or not finite), so it has no 3-D patch to "
            "voxelise; pass depth in metres with 0 only where it is unknown"
        )


def backproject_patches(
    depths: torch.Tensor,
    intrinsics: torch.Tensor,
    poses: torch.Tensor,
    axis_align: torch.Tensor,
    grid: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """World xyz of every patch of every view, and whether its depth is valid.

    depths: (V, H, W) metres (0 = invalid); intrinsics, poses: (V, 4, 4) or (4, 4) (camera-to-world);
    axis_align: (4, 4); grid: (h, w) patch grid. Returns xyz (V, h*w, 3) float32 and valid (V, h*w) bool.
    """
    views, height, width = depths.shape
    intrinsics = as_matrices(intrinsics, views, "intrinsics").to(depths.device)
    poses = as_matrices(poses, views, "pose").to(depths.device)
    axis_align = torch.as_tensor(axis_align, dtype=torch.float32, device=depths.device)
    rows, cols = patch_pixels(height, width, *grid)
    z = depths.float()[:, rows][:, :, cols]  # (V, h, w)
    v, u = torch.meshgrid(rows.to(z), cols.to(z), indexing="ij")
    fx, fy = intrinsics[:, 0, 0].view(-1, 1, 1), intrinsics[:, 1, 1].view(-1, 1, 1)
    cx, cy = intrinsics[:, 0, 2].view(-1, 1, 1), intrinsics[:, 1, 2].view(-1, 1, 1)
    camera = torch.stack([(u - cx) * z / fx, (v - cy) * z / fy, z, torch.ones_like(z)], dim=-1)  # (V, h, w, 4)
    to_world = axis_align @ poses  # (V, 4, 4)
    world = torch.einsum("vij,vhwj->vhwi", to_world, camera)
    xyz = (world[..., :3] / world[..., 3:]).reshape(views, -1, 3)
    valid = ((z > 0) & torch.isfinite(z)).reshape(views, -1) & torch.isfinite(xyz).all(dim=-1)
    return xyz, valid


def voxelize(xyz: torch.Tensor, voxel_size: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxels of a point set, in lexicographic order of their integer coordinates.

    xyz: (n, 3) float, n >= 1. Returns inverse (n,) long (the voxel of each point), ijk (M, 3) long (voxel
    coordinates relative to the minimum) and origin (3,) long (the minimum, in voxel units).
    """
    coords = torch.round(xyz / voxel_size).long()
    origin = coords.min(dim=0).values
    ijk = coords - origin
    extent = ijk.max(dim=0).values + 1
    keys = (ijk[:, 0] * extent[1] + ijk[:, 1]) * extent[2] + ijk[:, 2]
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    k = unique % extent[2]
    j = (unique // extent[2]) % extent[1]
    i = unique // (extent[1] * extent[2])
    return inverse, torch.stack([i, j, k], dim=-1), origin


def scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """(size, F) means of the rows of `values` (n, F) grouped by `index` (n,) in [0, size); empty groups 0."""
    sums = values.new_zeros(size, values.shape[-1]).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=size).clamp(min=1).to(values.dtype)
    return sums / counts.unsqueeze(-1)


def cap_voxels(num_voxels: int, max_voxels: int, seed: int) -> torch.Tensor:
    """(K,) long ascending voxel indices kept by the cap: all if num_voxels <= max_voxels, else a seeded subset."""
    if max_voxels < 1:
        raise InputError(f"the voxel cap must be at least 1, got max_voxels={max_voxels}")
    if num_voxels <= max_voxels:
        return torch.arange(num_voxels)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_voxels, generator=generator)[:max_voxels].sort().values


def scene_geometry(
    depths: torch.Tensor,
    intrinsics: torch.Tensor,
    poses: torch.Tensor,
    axis_align: torch.Tensor,
    grid: tuple[int, int],
    voxel_size: float = 0.2,
    max_voxels: int = 2560,
    seed: int = 0,
) -> SceneGeometry:
    """The voxels of one scene from its geometry alone (no image features); see the module docstring.

    depths: (V, H, W); intrinsics, poses: (V, 4, 4) or (4, 4); axis_align: (4, 4); grid: (h, w).
    """
    check_scene(depths, intrinsics, poses, axis_align, check_depth=False)
    if max_voxels < 1:
        raise InputError(f"the voxel cap must be at least 1, got max_voxels={max_voxels}")
    xyz, valid = backproject_patches(depths, intrinsics, poses, axis_align, grid)
    flat_valid = valid.reshape(-1)
    patch_index = flat_valid.nonzero(as_tuple=True)[0]
    if len(patch_index) == 0:
        raise InputError(
            "the scene has no valid depth at any patch (the depth is 0 or not finite at every pixel the patch grid "
            "reads), so it has no 3-D patch to voxelise; pass depth in metres with 0 only where it is unknown"
        )
    patch_xyz = xyz.reshape(-1, 3)[patch_index]
    inverse, ijk, origin = voxelize(patch_xyz, voxel_size)
    kept = cap_voxels(len(ijk), max_voxels, seed).to(ijk.device)
    remap = torch.full((len(ijk),), -1, dtype=torch.long, device=ijk.device)
    remap[kept] = torch.arange(len(kept), device=ijk.device)
    voxel_ijk = ijk[kept]
    return SceneGeometry(
        patch_index=patch_index,
        patch_xyz=patch_xyz,
        patch_voxel=remap[inverse],
        voxel_ijk=voxel_ijk,
        voxel_xyz=(voxel_ijk + origin).float() * voxel_size,
        num_voxels=len(ijk),
    )


def voxel_features(features: torch.Tensor, geometry: SceneGeometry) -> torch.Tensor:
    """(K, F) voxel features: the mean of the valid patches of each kept voxel.

    features: (V*P, F) per-patch features of the scene (view-major, raster order), position MLP already added.
    """
    rows = geometry.patch_voxel >= 0
    index = geometry.patch_voxel[rows].to(features.device)
    picked = features[geometry.patch_index[rows].to(features.device)]
    return scatter_mean(picked, index, len(geometry))
