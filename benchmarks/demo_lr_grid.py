"""The demo's learning rates, chosen on dev: every demo method at its demo settings over a 3-rate grid.

The demo trains a 6-layer model for 50 steps, where the papers' rates (for 12-24-layer models and many epochs) do not
apply; this runs the demo's own sweep (`peftlab.runner.demo.demo_spec`: same data, subset, length, batch, epochs,
options) on seed 1 with each method's grid below, and keeps per method the rate with the best dev score (the test
split is never read for the choice). It writes benchmarks/results/demo_lr_grid.json, from which `DEMO_LEARNING_RATES`
is copied; a test checks that the two agree.

    python benchmarks/demo_lr_grid.py [--output_dir DIR]     # 21 runs, about 7 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab.claims import choose_learning_rate
from peftlab.runner.demo import DEMO_TRAIN_SAMPLES, demo_spec
from peftlab.runner.report import collect
from peftlab.runner.sweep import run_sweep

RESULTS = Path(__file__).resolve().parent / "results" / "demo_lr_grid.json"
PROMPT_GRID = [0.1, 0.3, 1.0]
GRIDS = {
    "full": [3e-5, 1e-4, 3e-4],
    "prompt_tuning": PROMPT_GRID,
    "lora": [1e-3, 3e-3, 1e-2],
    "bitfit": [1e-3, 3e-3, 1e-2],
    "residual_prompt_tuning": PROMPT_GRID,
    "unipelt": [3e-4, 1e-3, 3e-3],
    "xprompt": PROMPT_GRID,
}
GRID_SEEDS = (1,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("peftlab-demo-lr-grid"))
    args = parser.parse_args()
    spec = demo_spec(args.output_dir, train_samples=DEMO_TRAIN_SAMPLES, epochs=1.0, methods=None, seeds=GRID_SEEDS)
    for entry in spec["methods"]:
        ((method, settings),) = entry.items()
        settings["learning_rates"] = GRIDS[method]
    if failed := run_sweep(spec):
        raise SystemExit(f"{len(failed)} grid run(s) failed; see their train.log")
    runs = collect(args.output_dir)
    dev = {
        method: {str(r["learning_rate"]): r["dev"]["score"] for r in runs if r["method"] == method} for method in GRIDS
    }
    chosen = {method: choose_learning_rate([r for r in runs if r["method"] == method]) for method in GRIDS}
    RESULTS.write_text(json.dumps({"seeds": list(GRID_SEEDS), "dev": dev, "chosen": chosen}, indent=2) + "\n")
    for method in GRIDS:
        print(f"{method}: dev {dev[method]} -> {chosen[method]:g}")


if __name__ == "__main__":
    main()
