"""Training recipes (the optimizer, schedule, weight decay and clipping a run's Trainer really uses, per method and
family), the precedence of what the user set over them, and XPrompt's search options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from runner_tiny import save_model, sentiment_rows, write_csv

from peftlab import xprompt
from peftlab.runner import train as train_mod
from peftlab.runner.args import parse_train_args, train_arguments
from peftlab.runner.errors import InputError
from peftlab.runner.methods import METHODS, recipe_table
from peftlab.runner.sweep import expand

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "8"]
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-assets")
    files = {family: save_model(root, family) for family in ("bert", "t5")}
    files["csv"] = write_csv(root / "train.csv", sentiment_rows(40))
    return files


def flags(assets, out: Path, method: str, family: str = "bert", *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(assets[family]),
        "--train_file",
        str(assets["csv"]),
        "--text_column",
        "sentence",
        "--peft_type",
        method,
        "--output_dir",
        str(out),
        "--num_virtual_tokens" if METHODS[method].prompt_learning else "--seed",
        "4" if METHODS[method].prompt_learning else "42",
        *QUIET,
        *extra,
    ]


def trainer_for(args) -> train_mod.RunnerTrainer:
    """The run's Trainer with its optimizer and schedule made for 100 steps, as training would make them."""
    plan = train_mod.plan_run(args)
    task, splits = train_mod.load_data(plan)
    encoded = train_mod.encode_data(plan, task, splits)
    model = train_mod.build_model(plan, task, encoded.tokenizer)
    trainer = train_mod.build_trainer(plan, task, splits, encoded, model)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    return trainer


def used(trainer) -> dict:
    """What the Trainer really trains with: optimizer class, peak lr, weight decay, clipping, lr factor by step."""
    optimizer = trainer.optimizer
    factor = trainer.lr_scheduler.lr_lambdas[0]
    return {
        "optimizer": type(optimizer).__name__,
        "lr": max(g["initial_lr"] for g in optimizer.param_groups),
        "weight_decay": max(g["weight_decay"] for g in optimizer.param_groups),
        "max_grad_norm": trainer.args.max_grad_norm,
        "factor": [round(factor(step), 3) for step in (0, 3, 6, 53, 99)],
    }


# (method, family) -> what the Trainer must use: the papers' recipes
RECIPES = {
    ("residual_prompt_tuning", "t5"): ("AdamW", 0.3, 1e-5, 0.0, [1, 1, 1, 1, 1]),  # RPT official: no clipping
    ("prompt_tuning", "t5"): ("AdamW", 0.3, 1e-5, 0.0, [1, 1, 1, 1, 1]),
    # BERT prompts (the RPT authors' BERT code): constant after 1,000 warmup steps
    ("residual_prompt_tuning", "bert"): ("AdamW", 3e-5, 0.01, 1.0, [0, 0.003, 0.006, 0.053, 0.099]),
    ("xprompt", "bert"): ("Adafactor", 0.3, 1e-5, 1.0, [1, 1, 1, 1, 1]),
    ("bitfit", "bert"): ("AdamW", 1e-3, 0.0, 1.0, [1, 1, 1, 1, 1]),  # BitFit official: no scheduler
    ("unipelt", "bert"): ("AdamW", 5e-4, 0.0, 1.0, [1, 0.97, 0.94, 0.47, 0.01]),
    ("lora", "bert"): ("AdamW", 5e-4, 0.1, 1.0, [0, 0.5, 1, 0.5, 0.011]),  # 6% warmup, then linear decay
    ("full", "bert"): ("AdamW", 2e-5, 0.0, 1.0, [1, 0.97, 0.94, 0.47, 0.01]),
}


@pytest.mark.parametrize(("method", "family"), list(RECIPES), ids=[f"{m}-{f}" for m, f in RECIPES])
def test_the_trainer_uses_the_methods_recipe_for_the_family(assets, tmp_path, method, family):
    args = train_arguments({}, flags(assets, tmp_path / "out", method, family))
    optimizer, lr, decay, clip, factor = RECIPES[(method, family)]
    assert used(trainer_for(args)) == {
        "optimizer": optimizer,
        "lr": pytest.approx(lr),
        "weight_decay": pytest.approx(decay),
        "max_grad_norm": clip,
        "factor": factor,
    }


def test_a_flag_wins_over_the_recipe_even_at_transformers_default(assets, tmp_path):
    argv = flags(assets, tmp_path / "out", "residual_prompt_tuning", "t5", "--learning_rate", "0.05")
    argv += ["--max_grad_norm", "1.0", "--lr_scheduler_type", "linear"]  # 1.0 and linear: transformers' defaults
    got = used(trainer_for(train_arguments({}, argv)))
    assert got["lr"] == pytest.approx(0.05) and got["max_grad_norm"] == 1.0 and got["factor"][-1] == 0.01
    assert got["weight_decay"] == pytest.approx(1e-5) and got["optimizer"] == "AdamW"  # the rest: the recipe


def test_a_config_file_wins_over_the_recipe_and_a_flag_over_the_file(assets, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("weight_decay: 0.0\noptim: adamw_torch\nlearning_rate: 1e-2\n")  # YAML reads 1e-2 as a string
    args = parse_train_args([str(run), *flags(assets, tmp_path / "out", "xprompt"), "--learning_rate", "0.2"])
    plan = train_mod.plan_run(args)
    training = plan.args.training
    assert training.weight_decay == 0.0 and training.optim == "adamw_torch" and training.learning_rate == 0.2
    assert training.lr_scheduler_type == "constant"  # not set by the user: XPrompt's recipe
    assert plan.args.recipe == {"lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0}


def test_sweep_values_win_over_the_recipe_and_no_grid_means_the_recipes_rate(assets, tmp_path):
    spec = {
        "output_dir": str(tmp_path / "runs"),
        "args": {"model_name_or_path": str(assets["t5"]), "weight_decay": 0, "report_to": "none"},
        "methods": ["residual_prompt_tuning", {"xprompt": {"max_grad_norm": 2.0, "num_virtual_tokens": 4}}],
        "tasks": [{"toy": {"train_file": str(assets["csv"]), "text_column": ["sentence"]}}],
    }
    rpt, xp = (train_mod.plan_run(run.parse()).args for run in expand(spec))
    assert rpt.training.learning_rate == 0.3 and xp.training.learning_rate == 0.3  # T5 recipes' rate
    assert rpt.training.weight_decay == 0 and xp.training.weight_decay == 0  # the sweep's args
    assert rpt.training.max_grad_norm == 0.0 and xp.training.max_grad_norm == 2.0  # recipe; method settings
    spec["args"]["model_name_or_path"] = str(assets["bert"])
    assert {run.learning_rate for run in expand(spec)} == {3e-5, 0.3}  # BERT prompts: the BERT recipe's rate


def test_results_record_which_recipe_values_the_run_took(assets, tmp_path):
    out = tmp_path / "out"
    args = train_arguments({}, [*flags(assets, out, "bitfit", "bert"), "--max_steps", "1", "--weight_decay", "0.0"])
    results = train_mod.run_training(args)
    assert results["recipe"]["taken"] == {
        "learning_rate": 1e-3,
        "optim": "adamw_torch",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
    }
    assert "BitFit" in results["recipe"]["source"] and results["hyperparameters"]["learning_rate"] == 1e-3
    assert json.loads((out / "results.json").read_text())["recipe"] == results["recipe"]


def test_the_readme_shows_every_methods_recipe():
    assert recipe_table() in README.read_text()


# --- XPrompt's search options -------------------------------------------------------------------------------------
BAD_SEARCH = {
    "ratio 0": (["--xprompt_token_ratios", "0"], "--xprompt_token_ratios 0.0 is not allowed; allowed: ratios in"),
    "ratio 1": (["--xprompt_piece_ratios", "0.5", "1"], "--xprompt_piece_ratios 1.0 is not allowed"),
    "negative": (["--xprompt_token_ratios", "-0.1"], "--xprompt_token_ratios -0.1 is not allowed"),
    "rounds 0": (["--xprompt_rounds", "0"], "--xprompt_rounds 0 is not allowed; allowed: a whole number >= 1"),
    "nothing survives": (
        ["--xprompt_token_ratios", "0.5", "--xprompt_rounds", "3"],  # 4 -> 2 -> 1 -> 0 tokens
        "prunes all 4 prompt tokens",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SEARCH))
def test_bad_xprompt_search_options_are_refused_at_parse_time(assets, tmp_path, case):
    extra, message = BAD_SEARCH[case]
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        train_arguments({}, [*flags(assets, tmp_path / "o", "xprompt"), *extra])


def test_xprompt_search_options_belong_to_xprompt_and_come_from_sweep_values(assets, tmp_path):
    with pytest.raises(InputError, match="--xprompt_rounds is not an option of method 'lora'"):
        train_arguments({}, [*flags(assets, tmp_path / "o", "lora"), "--xprompt_rounds", "2"])
    args = train_arguments({"xprompt_token_ratios": 0.5, "xprompt_rounds": 2}, flags(assets, tmp_path / "o", "xprompt"))
    assert args.method_options == {
        "num_virtual_tokens": 4,
        "xprompt_token_ratios": [0.5],
        "xprompt_piece_ratios": [0.25],
        "xprompt_rounds": 2,
    }


def test_xprompt_prunes_in_rounds_on_the_survivors(assets, tmp_path, monkeypatch):
    """Two ratio pairs x two rounds: stage 1, then per pair two rounds of score -> prune -> rewind -> retrain."""
    calls = []
    real_train = transformers.Trainer.train

    def counting(self, *args, **kwargs):
        calls.append(type(self.optimizer).__name__ if self.optimizer is not None else None)
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", counting)
    argv = [*flags(assets, tmp_path / "o", "xprompt"), "--max_steps", "2", "--eval_strategy", "no"]
    argv += ["--save_strategy", "no", "--xprompt_token_ratios", "0.25", "0.5", "--xprompt_piece_ratios", "0.5"]
    args = train_arguments({}, [*argv, "--xprompt_rounds", "2"])
    plan = train_mod.plan_run(args)
    task, splits = train_mod.load_data(plan)
    encoded = train_mod.encode_data(plan, task, splits)
    trainer = train_mod.build_trainer(plan, task, splits, encoded, train_mod.build_model(plan, task, encoded.tokenizer))
    train_mod.train(plan, trainer)
    assert calls == [None] * 5  # stage 1 + 2 pairs x 2 rounds, each with a fresh optimizer
    assert isinstance(trainer.optimizer.optimizer, transformers.Adafactor)  # the recipe's, in every stage
    kept = xprompt.summary(trainer.model)
    # 0.25: 4 -> 3 -> 2 tokens; 0.5: 4 -> 2 -> 1; pieces halved each round within the survivors
    assert kept.num_tokens in (2, 1) and kept.num_original_tokens == 4
    assert kept.num_pieces_kept < kept.num_tokens * trainer.model.peft_config["default"].num_pieces
    hidden = trainer.model.config.hidden_size
    piece = hidden // trainer.model.peft_config["default"].num_pieces
    assert train_mod.active_prompt_parameters(trainer.model) == kept.num_pieces_kept * piece  # what the claim bounds


def test_xprompt_reuses_the_evaluation_each_stage_ends_with(assets, tmp_path, monkeypatch):
    """The search's dev score of a stage is the Trainer's evaluation at that stage's last step, not a second pass."""
    from peftlab.runner.methods import _dev_score_after_training

    evaluated_at = []
    real_evaluate = transformers.Trainer.evaluate

    def counting(self, *args, **kwargs):
        evaluated_at.append(self.state.global_step)
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", counting)
    argv = [*flags(assets, tmp_path / "o", "xprompt"), "--max_steps", "2", "--eval_strategy", "steps"]
    argv += ["--eval_steps", "2", "--save_strategy", "no", "--xprompt_token_ratios", "0.25", "0.5"]
    plan = train_mod.plan_run(train_arguments({}, argv))
    task, splits = train_mod.load_data(plan)
    encoded = train_mod.encode_data(plan, task, splits)
    trainer = train_mod.build_trainer(plan, task, splits, encoded, train_mod.build_model(plan, task, encoded.tokenizer))
    train_mod.train(plan, trainer)
    assert evaluated_at == [2, 2, 2]  # stage 1 and one retraining per pair, each evaluated once, at its end
    trainer.optimizer, trainer.lr_scheduler = None, None
    trainer.train()
    assert _dev_score_after_training(trainer) == real_evaluate(trainer)["eval_score"]  # the number a new pass gives
    assert len(evaluated_at) == 4
    monkeypatch.setattr(trainer.args, "load_best_model_at_end", True)  # the state evaluated last may not be kept
    _dev_score_after_training(trainer)
    assert len(evaluated_at) == 5


# --- the demo ------------------------------------------------------------------------------------------------------
def test_demo_spec_runs_every_method_at_its_recipe_over_three_seeds(tmp_path):
    from peftlab.runner.args import apply_recipe
    from peftlab.runner.demo import DEMO_LEARNING_RATES, demo_methods, demo_spec

    spec = demo_spec(tmp_path, train_samples=800, epochs=1.0, methods=None)
    runs = expand(spec)
    assert len(spec["seeds"]) >= 3 and len(runs) == len(demo_methods()) * len(spec["seeds"])
    for run in runs:
        args = apply_recipe(run.parse(), "encoder")
        recipe = METHODS[run.method].recipe_for("encoder")
        training = args.training
        assert training.learning_rate == DEMO_LEARNING_RATES[run.method] and training.warmup_steps == 0
        kept = ("optim", "lr_scheduler_type", "weight_decay", "max_grad_norm")  # the rest of the recipe
        assert [getattr(training, f) for f in kept] == [getattr(recipe, f) for f in kept], run.method
    xprompt_runs = [r for r in runs if r.method == "xprompt"]
    assert all(r.values["xprompt_token_ratios"] == [0.5] for r in xprompt_runs)


def test_results_tell_the_stored_parameters_from_the_trained(assets, tmp_path):
    """Residual Prompt Tuning trains a prompt MLP but stores only the reparameterised prompt (and the head)."""
    argv = [*flags(assets, tmp_path / "rpt", "residual_prompt_tuning"), "--max_steps", "1", "--save_strategy", "no"]
    rpt = train_mod.run_training(train_arguments({}, argv))
    argv = [*flags(assets, tmp_path / "pt", "prompt_tuning"), "--max_steps", "1", "--save_strategy", "no"]
    pt = train_mod.run_training(train_arguments({}, argv))
    assert rpt["stored_params"] == pt["stored_params"] == pt["trainable_params"]  # 4 prompt rows + the head
    assert rpt["trainable_params"] > rpt["stored_params"]
    assert rpt["stored_percent"] == pytest.approx(100 * rpt["stored_params"] / rpt["total_params"])
    hidden = transformers.AutoConfig.from_pretrained(assets["bert"]).hidden_size
    assert rpt["active_prompt_params"] == pt["active_prompt_params"] == 4 * hidden  # the prompt as prepended


def test_runs_in_one_process_share_their_encoded_splits(assets, tmp_path, monkeypatch):
    """An in-process sweep tokenizes a task once per (rows, tokenizer, max length), not once per run."""
    from peftlab.runner import data as data_mod

    calls = []
    real_encode = data_mod.encode
    monkeypatch.setattr(data_mod, "encode", lambda ds, **kw: calls.append(len(ds)) or real_encode(ds, **kw))
    monkeypatch.setattr(train_mod, "_ENCODED", type(train_mod._ENCODED)())
    encoded = []
    for method, length in (("lora", "128"), ("bitfit", "128"), ("bitfit", "64")):
        argv = [*flags(assets, tmp_path / method, method), "--max_seq_length", length]
        plan = train_mod.plan_run(train_arguments({}, argv))
        encoded.append(train_mod.encode_data(plan, *train_mod.load_data(plan)))
    assert len(calls) == 6  # three splits at length 128 (shared by lora and bitfit), three at 64
    assert encoded[0].train is encoded[1].train and encoded[2].train is not encoded[0].train
    assert encoded[2].train["input_ids"] == encoded[0].train["input_ids"]  # short rows: the same tokens


def test_unipelt_stores_its_inference_form(assets, tmp_path):
    """UniPELT's saved adapter keeps the prefix MLP to resume training; what ships is the folded prefix, as an
    inference load (which never builds the MLP) holds it."""
    from peft import AutoPeftModelForSequenceClassification
    from peft.utils import get_peft_model_state_dict

    argv = [*flags(assets, tmp_path / "u", "unipelt"), "--max_steps", "1", "--save_strategy", "no"]
    results = train_mod.run_training(train_arguments({}, argv))
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "u", num_labels=2)
    shipped = sum(t.numel() for t in get_peft_model_state_dict(loaded).values())
    assert results["stored_params"] == shipped < results["trainable_params"]  # the MLP outweighs the folded prefix


def test_the_demo_rates_are_the_ones_chosen_on_dev():
    """DEMO_LEARNING_RATES is copied from benchmarks/demo_lr_grid.py's result: each method's best dev score."""
    from peftlab.runner.demo import DEMO_LEARNING_RATES, demo_methods

    grid = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "demo_lr_grid.json").read_text())
    assert DEMO_LEARNING_RATES == grid["chosen"] and set(DEMO_LEARNING_RATES) == set(demo_methods())
    for method, dev in grid["dev"].items():
        assert len(dev) >= 3 and dev[str(DEMO_LEARNING_RATES[method])] == max(dev.values()), method
