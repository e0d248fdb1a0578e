"""`peftlab train` as a real command in fresh processes: exit codes, SIGKILL + resume, torchrun data parallel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runner_tiny import save_model, sentiment_rows, write_csv
from safetensors.torch import load_file

from peftlab import cli
from peftlab.runner.train import complete_checkpoints

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runner-fault-assets")
    return {"bert": save_model(root, "bert"), "csv": write_csv(root / "train.csv", sentiment_rows(60))}


def flags(assets, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(assets["bert"]),
        "--train_file",
        str(assets["csv"]),
        "--text_column",
        "sentence",
        "--peft_type",
        "lora",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--seed",
        "5",
        *extra,
    ]


def test_console_bad_input_exit_code_2(assets, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "train", *flags(assets, tmp_path / "o"), "--r", "x"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("peftlab train: error: argument --r: invalid int value")
    assert not (tmp_path / "o").exists()


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(assets, tmp_path):
    """Kill -9 after the first checkpoint; the automatic resume must reproduce the uninterrupted run exactly
    (adapter, optimizer, scheduler, RNG and data order are all restored). BERT's dropout makes RNG state matter."""
    extra = ("--max_steps", "80", "--save_strategy", "steps", "--save_steps", "10", "--eval_strategy", "no")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab", "train", *flags(assets, killed, *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not complete_checkpoints(killed):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    assert not (killed / "results.json").exists()
    first = complete_checkpoints(killed)[-1]
    assert int(first.name.split("-")[1]) < 80

    assert cli.main(["train", *flags(assets, reference, *extra)]) == 0
    assert cli.main(["train", *flags(assets, killed, *extra)]) == 0  # no flag needed: resumes automatically
    ref = json.loads((reference / "results.json").read_text())
    res = json.loads((killed / "results.json").read_text())
    assert res["resumed_from"] is not None and Path(res["resumed_from"]).name.startswith("checkpoint-")
    assert res["global_step"] == ref["global_step"] == 80
    assert res["dev"] == ref["dev"] and res["test"] == ref["test"]
    a, b = load_file(reference / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_two_process_data_parallel_ends_with_identical_adapters(assets, tmp_path):
    out = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "peftlab",
            "train",
            *flags(
                assets,
                out,
                "--max_steps",
                "6",
                "--per_device_train_batch_size",
                "4",
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
            ),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    checksums = results["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert results["num_examples"]["train"] == 44 and results["global_step"] == 6
