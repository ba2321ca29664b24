"""Evaluation tasks beyond the image mosaic: `vlm_prune.tasks.video` (clips of easy-VQA shapes over time)."""
