#!/usr/bin/env bash
# A separate environment for the lmms-eval plugin tests (tests/test_lmms_eval.py), next to .venv.
#
# Installing lmms-eval 0.7.3 with its dependencies replaces torch with a CUDA build and adds torchvision, which
# breaks the CPU torch and every transformers image processor here. So .venv-lmms reuses .venv (torch,
# transformers, vlm_prune) through a .pth file and adds, without dependency resolution, only what lmms-eval's
# evaluator imports. Then run: .venv-lmms/bin/python -m pytest tests/test_lmms_eval.py
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh dev
python3 -m venv .venv-lmms
site=$(.venv-lmms/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n%s\n' "$main_site" "$PWD" > "$site/zz_vlm_prune_main_venv.pth"
.venv-lmms/bin/pip install -q --no-deps "lmms-eval==0.7.3" "filelock<4.3" \
  accelerate aiohappyeyeballs aiohttp aiosignal certifi colorama datasets dill evaluate frozenlist loguru lxml \
  multidict multiprocess pandas portalocker propcache pyarrow pytz requests sacrebleu tabulate tenacity urllib3 \
  xxhash yarl pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet
.venv-lmms/bin/python -c "import lmms_eval.evaluator, torch; assert not __import__('importlib').util.find_spec('torchvision'); print('lmms-eval env ok, torch', torch.__version__)"
