#!/usr/bin/env bash
# Creates .venv with a CPU build of torch (installed first, so nothing pulls a CUDA build),
# the package and its test dependencies. Installs the Fashion-MNIST Debian package when possible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
python -c "import torch, dpmicroadam; print('torch', torch.__version__, '| dpmicroadam ready')"
# Real data from Debian's packages: Fashion-MNIST (IDX files) and WordNet 3.0 (glosses for
# `finetune --dataset wordnet-nouns`). Installed when we may; the tests that need them skip otherwise.
want=()
[ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || want+=(wordnet-base)
if [ ${#want[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq "${want[@]}") >/dev/null 2>&1 \
    || echo "note: could not install ${want[*]}; the tests that need them will be skipped"
fi
