"""Run stock PEFT's own test suite twice, without and with peftlab imported, and fail on any test peftlab breaks.

`import peftlab` patches a few PEFT code paths process-wide (see src/peftlab/integration.py); this is the check that
those patches change nothing for stock PEFT users. The tests come from the sdist of the INSTALLED peft version (the
sdist ships tests/ but not tests/__init__.py, which the tests' relative imports need: it is added). PEFT's test-only
dependencies go into a separate venv layered on the project venv (`--venv`, default .venv-peft-compat), so the
project venv is never changed. Tests that need the Hugging Face Hub fail on both sides offline; they are counted,
not judged. A test is BROKEN when it passes stock and does not pass with `-p peftlab`: the peftlab side runs every
selected test, the stock side then only those that did not pass with peftlab (the same verdict at half the time).

Usage: python scripts/peft_compat.py [--hub-files | --full | --files NAME...] [--workers N] [-k EXPR] [-- pytest args]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

from peft_compat_plugin import read_outcomes

REPO = Path(__file__).resolve().parents[1]
# The default files run offline and exercise what `import peftlab` patches: the PeftType registry and config round
# trips (test_config), save/load incl. pickled weights and model cards for every PEFT method on small custom models
# (test_custom_models), the patched token-classification / QA forwards, AutoPeftModel, mapping, multitask prompt
# tuning and CPT (prompt-encoder set-up), hub features (model cards).
DEFAULT_FILES = (
    "test_config.py",
    "test_custom_models.py",
    "test_token_classification_qa.py",
    "test_auto.py",
    "test_mapping.py",
    "test_other.py",
    "test_hub_features.py",
    "test_multitask_prompt_tuning.py",
    "test_cpt.py",
)
# Every PEFT method, prompt learning included, on tiny Hub models of each family (the patched prompt-encoder set-up
# and seq2seq forward/generate): they need the Hub, so offline they only fail on both sides, slowly (--hub-files).
HUB_MODEL_FILES = (
    "test_decoder_models.py",
    "test_encoder_decoder_models.py",
    "test_feature_extraction_models.py",
    "test_seq_classifier.py",
)
# PEFT's "test" extra minus linters/docs tooling; torchvision is left out (it would pull another torch build)
TEST_DEPS = ("parameterized", "diffusers")


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def site_packages(python: str) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def ensure_venv(venv: Path) -> str:
    """A venv that sees the project venv's packages (via a .pth) plus PEFT's test dependencies, pinned to what the
    project venv already has so that nothing under test is upgraded."""
    python = str(venv / "bin" / "python")
    stamp = venv / ".peft-compat-ready"
    if stamp.exists():
        return python
    run([sys.executable, "-m", "venv", str(venv)])
    base = sysconfig.get_paths()["purelib"]
    Path(site_packages(python), "_project_venv.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    constraints = venv / "project-venv-constraints.txt"
    constraints.write_text("\n".join(line for line in frozen.splitlines() if "==" in line) + "\n")
    run([python, "-m", "pip", "install", "-q", "-c", str(constraints), *TEST_DEPS])
    stamp.touch()
    return python


def peft_tests(venv: Path, version: str) -> Path:
    """The tests/ folder of peft's sdist for `version`, downloaded once into the venv folder."""
    root = venv / f"peft-{version}"
    if not (root / "tests" / "__init__.py").exists():
        download = venv / "sdist"
        run(
            [
                sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                f"peft=={version}", "-d", str(download),
            ]
        )  # fmt: skip
        archive = download / f"peft-{version}.tar.gz"
        with tarfile.open(archive) as tar:
            tar.extractall(venv, filter="data")
        if not (root / "tests").is_dir() or not list((root / "tests").glob("test_*.py")):
            raise SystemExit(f"{archive} has no tests/ folder with test files: cannot run PEFT's suite")
        (root / "tests" / "__init__.py").touch()  # in PEFT's repository, not in its sdist
    return root


def run_side(python: str, root: Path, files: list[str], side: str, args: argparse.Namespace, out: Path) -> float:
    """One pytest run; outcomes go to out/<side>.jsonl (see peft_compat_plugin), output to out/<side>.log. The stock
    side runs after the peftlab side and only what did not pass there."""
    cmd = [python, "-m", "pytest", *files, "-q", "--tb=line", "-o", "addopts=", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:randomly", "-p", "peft_compat_plugin"]
    if args.workers > 1:
        cmd += ["-n", str(args.workers)]
    if args.k:
        cmd += ["-k", args.k]
    if side == "peftlab":
        cmd += ["-p", "peftlab"]  # imported before collection, as a user's `import peftlab` at the top
    cmd += args.pytest_args
    env = {
        "HF_HUB_OFFLINE": "1",  # unless the caller says otherwise (HF_HUB_OFFLINE=0 with Hub access)
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO / "src"), str(REPO / "scripts"), os.environ.get("PYTHONPATH")])
        ),
        "PEFT_COMPAT_OUTCOMES": str(out / f"{side}.jsonl"),
    }
    if side == "stock":
        env["PEFT_COMPAT_RERUN_FROM"] = str(out / "peftlab.jsonl")
    (out / f"{side}.jsonl").unlink(missing_ok=True)
    start = time.monotonic()
    print(f"\n=== {side}: {' '.join(files)}", flush=True)
    with open(out / f"{side}.log", "w") as log:
        code = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if not (out / f"{side}.jsonl").exists():
        raise SystemExit(f"pytest wrote no outcomes on the {side} side (exit {code}); see {out / (side + '.log')}")
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=REPO / ".venv-peft-compat")
    parser.add_argument("--full", action="store_true", help="all of PEFT's tests/ instead of the default files")
    parser.add_argument("--hub-files", action="store_true", help=f"add {', '.join(HUB_MODEL_FILES)} (need the Hub)")
    parser.add_argument("--files", nargs="+", metavar="NAME", help="these files of PEFT's tests/ instead")
    parser.add_argument("--results", type=Path, help="folder for the logs and junit reports (default: VENV/results)")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per side (1: none)")
    parser.add_argument("-k", help="pytest -k expression, applied to both sides")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --), both sides")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")

    version = importlib.metadata.version("peft")
    python = ensure_venv(args.venv.resolve())
    root = peft_tests(args.venv.resolve(), version)
    if args.full:
        files = ["tests"]
    elif args.files:
        files = [f"tests/{name}" for name in args.files]
        if missing := [f for f in files if not (root / f).exists()]:
            parser.error(f"--files: not in PEFT {version}'s tests/: {', '.join(missing)}")
    else:
        names = DEFAULT_FILES + (HUB_MODEL_FILES if args.hub_files else ())
        files = [f"tests/{name}" for name in names if (root / "tests" / name).exists()]
    out = (args.results or args.venv / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds = {side: run_side(python, root, files, side, args, out) for side in ("peftlab", "stock")}

    lab, stock = read_outcomes(str(out / "peftlab.jsonl")), read_outcomes(str(out / "stock.jsonl"))
    print(f"\nPEFT {version} tests ({' '.join(files)}{f' -k {args.k}' if args.k else ''}), reports in {out}")
    for side, result, what in (("peftlab", lab, "all"), ("stock", stock, "those not passed with peftlab")):
        counts = {o: sum(r["outcome"] == o for r in result.values()) for o in ("passed", "failed", "skipped")}
        shown = ", ".join(f"{n} {o}" for o, n in counts.items())
        print(f"  {side:8} {what}: {shown} in {seconds[side]:.0f} s")
    broken = sorted(t for t, r in stock.items() if r["outcome"] == "passed")
    only_stock = [t for t in stock if t not in lab]
    if only_stock:
        print(f"  {len(only_stock)} tests collected only without peftlab (e.g. {only_stock[0]})")
    if not broken:
        print("OK: no test that passes with stock PEFT fails with peftlab imported")
        return 0
    print(f"BROKEN by peftlab: {len(broken)} tests pass stock and do not pass with peftlab imported:")
    for test in broken:
        row = lab.get(test, {"outcome": "not collected", "message": ""})
        print(f"  {test} [{row['outcome']}] {row['message']}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
