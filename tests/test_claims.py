"""Claims: the paired statistics and verdicts on synthetic numbers, the sweep specs, and reading results back."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from scipy import stats

from peftlab import claims as C
from peftlab.claims import CONTRADICTED, HOLDS, NOT_MEASURED, NOT_SIGNIFICANT, Claim, Side, compare

A = Side("residual_prompt_tuning", {"num_virtual_tokens": 10}, (0.03, 0.3), "RPT")
B = Side("prompt_tuning", {"num_virtual_tokens": 10}, (0.03, 0.3), "PT")
D = Side("lora", {}, (5e-4,), "LoRA")


def scores(*values: float, start: int = 1) -> dict[int, float]:
    return {start + i: v for i, v in enumerate(values)}


def test_interval_is_the_paired_t_interval():
    a, b = scores(80.0, 82.5, 79.0, 85.0), scores(78.0, 80.0, 79.5, 81.0)
    c = compare(a, b)
    d = [a[s] - b[s] for s in a]
    mean, sd = sum(d) / 4, math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert c.diff == pytest.approx(mean) and (c.low, c.high) == pytest.approx((mean - half, mean + half))
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)  # an independent computation
    assert (c.low, c.high) == pytest.approx((ci.low, ci.high))
    assert (c.mean_a, c.mean_b) == pytest.approx((81.625, 79.625))
    assert c.std_a == pytest.approx(stats.tstd(list(a.values())))
    assert c.seeds == (1, 2, 3, 4)


def test_hand_computed_interval_and_verdicts():
    # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> 2 -+ 2.4841: straddles 0
    c = compare(scores(11, 12, 13), scores(10, 10, 10))
    assert (c.low, c.high) == pytest.approx((-0.4841, 4.4841), abs=1e-4)
    assert c.verdict == NOT_SIGNIFICANT
    assert compare(scores(11, 12, 13, 11, 12, 13), scores(10, 10, 10, 10, 10, 10)).verdict == HOLDS
    assert compare(scores(10, 10, 10, 10, 10, 10), scores(11, 12, 13, 11, 12, 13)).verdict == CONTRADICTED


def test_pairing_matters_a_shared_seed_effect_cancels():
    # seed effects of +-10 on both sides: unpaired, the 1-point gain would drown; paired, it is certain
    base = scores(60.0, 80.0, 70.0, 90.0, 65.0)
    gain = {s: v + 1.0 + 0.1 * (s % 2) for s, v in base.items()}
    c = compare(gain, base)
    assert c.verdict == HOLDS and c.low > 0.9
    unpaired = stats.ttest_ind(list(gain.values()), list(base.values()))
    assert unpaired.pvalue > 0.5  # what an unpaired test would have said


def test_less_than_flips_the_sign():
    small, large = scores(1.0, 1.2, 0.9, 1.1), scores(5.0, 6.0, 5.5, 4.8)
    c = compare(small, large, "<")
    assert c.diff == pytest.approx(sum(large.values()) / 4 - sum(small.values()) / 4)
    assert c.verdict == HOLDS
    assert compare(large, small, "<").verdict == CONTRADICTED


def test_factor_scales_the_other_side():
    # A = 96, B = 100: A >= 0.95 B holds (d = +1 each seed) but A >= B is contradicted (d = -4)
    a, b = scores(96.0, 96.5, 95.5), scores(100.0, 100.5, 99.5)
    c = compare(a, b, ">=", 0.95)
    assert c.diff == pytest.approx(96 - 0.95 * 100) and c.verdict == HOLDS
    assert compare(a, b, ">=").verdict == CONTRADICTED


@pytest.mark.parametrize(
    ("relation", "delta", "verdict"),
    [
        (">", 2.0, HOLDS),
        (">", 0.0, CONTRADICTED),  # A equals B on every seed: "A > B" is false, exactly
        (">=", 0.0, HOLDS),  # ... and "A >= B" true
        (">=", -1.0, CONTRADICTED),
        ("<", -2.0, HOLDS),
        ("<=", 0.0, HOLDS),
        ("<", 0.0, CONTRADICTED),
    ],
)
def test_zero_variance_gives_a_point_interval(relation, delta, verdict):
    b = scores(70.0, 75.0, 80.0)
    c = compare({s: v + delta for s, v in b.items()}, b, relation)
    assert c.low == c.high == pytest.approx(abs(delta) if verdict == HOLDS else -abs(delta))
    assert c.verdict == verdict


def test_one_seed_is_refused():
    with pytest.raises(ValueError, match=r"at least 2 paired seeds, got 1: \[7\]"):
        compare({7: 80.0}, {7: 70.0})


def test_unpaired_seeds_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"unpaired seeds.*only in A: \[3\], only in B: \[4\]"):
        compare(scores(1, 2, 3), {1: 1.0, 2: 2.0, 4: 3.0})


def test_non_finite_scores_and_bad_relations_are_refused():
    with pytest.raises(ValueError, match=r"seed\(s\) \[2\] have NaN"):
        compare(scores(1.0, float("nan")), scores(1.0, 2.0))
    with pytest.raises(ValueError, match=r"relation must be one of >, >=, <, <=, got '=>'"):
        compare(scores(1, 2), scores(1, 2), "=>")


def test_combine_needs_every_competitor():
    assert C.combine([HOLDS, HOLDS]) == HOLDS
    assert C.combine([HOLDS, NOT_SIGNIFICANT]) == NOT_SIGNIFICANT
    assert C.combine([NOT_SIGNIFICANT, CONTRADICTED, HOLDS]) == CONTRADICTED
    assert C.combine([CONTRADICTED, NOT_MEASURED]) == NOT_MEASURED


def result(lr: float, seed: int, dev: float, test: float, **extra) -> dict:
    return {"learning_rate": lr, "seed": seed, "dev": {"score": dev}, "test": {"score": test}, **extra}


def test_learning_rate_is_chosen_on_mean_dev_not_on_test():
    runs = [result(0.3, s, 50.0, 99.0) for s in (1, 2)] + [result(0.03, s, 60.0 + s, 70.0 + s) for s in (1, 2)]
    assert C.choose_learning_rate(runs) == 0.03
    assert C.side_scores(runs, "test") == {1: 71.0, 2: 72.0}
    tie = [result(0.3, 1, 60.0, 1.0), result(0.03, 1, 60.0, 2.0)]
    assert C.choose_learning_rate(tie) == 0.03  # ties: the smaller rate, as `peftlab report`


def test_learning_rate_spread_per_seed():
    runs = [result(lr, s, 0.0, t) for lr, s, t in [(0.3, 1, 60), (0.03, 1, 80), (0.3, 2, 70), (0.03, 2, 70)]]
    assert C.side_scores(runs, "lr_spread") == {1: pytest.approx(10.0), 2: pytest.approx(0.0)}
    with pytest.raises(ValueError, match="every learning rate needs the same seeds"):
        C.side_scores(runs[:3], "lr_spread")
    with pytest.raises(ValueError, match="2 or more rates"):
        C.side_scores(runs[:1], "lr_spread")
    for measure in ("test", "lr_spread"):
        with pytest.raises(ValueError, match="two results for seed 1"):
            C.side_scores([result(0.3, 1, 9, 1), result(0.3, 1, 9, 2), result(0.03, 1, 0, 2)], measure)


def claim(**kwargs) -> Claim:
    return Claim(**{"name": "c", "source": "s", "task": "trec", "model": "minilm", "a": A, "b": (B,), **kwargs})


def side_results(side: Side, tests: dict[int, float], **extra) -> list[dict]:
    return [result(side.learning_rates[0], s, 50.0, t, **extra) for s, t in tests.items()]


def test_evaluate_against_several_competitors():
    c = claim(b=(B, D), relation=">=")
    results = {
        A.key: side_results(A, scores(80.0, 81.0, 82.0, 80.5)),
        B.key: side_results(B, scores(70.0, 71.5, 71.0, 70.0)),
        D.key: side_results(D, scores(85.0, 86.0, 84.0, 85.5)),
    }
    outcome = C.evaluate(c, results)
    assert [x.verdict for x in outcome.comparisons] == [HOLDS, CONTRADICTED]
    assert outcome.verdict == CONTRADICTED
    assert outcome.learning_rates == {"RPT": 0.03, "PT": 0.03, "LoRA": 5e-4}
    text = C.markdown([outcome])
    assert "RPT >= max(PT, LoRA)" in text and "**contradicted**" in text and "dev-chosen lr: RPT 0.03" in text
    with pytest.raises(ValueError, match="no results for side.*LoRA"):
        C.evaluate(c, {A.key: results[A.key], B.key: results[B.key]})


def test_parameter_bound_is_part_of_the_claim():
    c = claim(relation=">=", max_param_ratio=0.5, param_field="active_prompt_params")
    better = scores(80.0, 81.0, 82.0)
    same = scores(70.0, 70.5, 71.0)
    small = {
        A.key: side_results(A, better, active_prompt_params=40),
        B.key: side_results(B, same, active_prompt_params=100),
    }
    assert C.evaluate(c, small).verdict == HOLDS and C.evaluate(c, small).param_ratio == pytest.approx(0.4)
    big = {
        A.key: side_results(A, better, active_prompt_params=60),
        B.key: side_results(B, same, active_prompt_params=100),
    }
    assert C.evaluate(c, big).verdict == CONTRADICTED
    unrecorded = {A.key: side_results(A, better), B.key: side_results(B, same)}
    outcome = C.evaluate(c, unrecorded)
    assert outcome.verdict == NOT_MEASURED and "active_prompt_params ratio missing" in C.markdown([outcome])
    no_prompt = {A.key: side_results(A, better, active_prompt_params=40), B.key: side_results(B, same)}
    no_prompt[B.key] = [{**r, "active_prompt_params": None} for r in no_prompt[B.key]]  # e.g. a LoRA side
    assert C.evaluate(c, no_prompt).verdict == NOT_MEASURED


def test_unpaired_sides_name_the_claim():
    results = {A.key: side_results(A, scores(1, 2, 3)), B.key: side_results(B, scores(1, 2))}
    with pytest.raises(ValueError, match=r"claim 'c', RPT vs PT: unpaired seeds.*only in A: \[3\]"):
        C.evaluate(claim(), results)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"relation": "=="}, "relation must be one of"),
        ({"measure": "dev"}, "measure must be one of test, lr_spread"),
        ({"factor": 0}, "factor must be a positive number"),
        ({"b": ()}, "at least one side"),
        ({"measure": "lr_spread", "b": (D,)}, "side 'LoRA' has \\[0.0005\\]"),
        ({"max_param_ratio": 0.5, "b": (B, D)}, "compares with one side, but b has 2 sides"),
    ],
)
def test_bad_claims_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        claim(**kwargs)


def test_budgets_scale_size_epochs_and_seeds():
    cpu, gpu, paper = (C.get_budget(n) for n in ("cpu", "gpu", "paper"))
    assert len(cpu.seeds) >= 5 and len(gpu.seeds) >= len(cpu.seeds)  # a claim needs five seeds
    assert cpu.tasks is None and gpu.tasks == paper.tasks == C.OFFLINE_TASKS
    assert cpu.max_train_samples < gpu.max_train_samples and paper.max_train_samples is None
    c = claim(paper_args={"num_train_epochs": 20})
    assert paper.run_args(c) == {"num_train_epochs": 20} and cpu.run_args(c)["num_train_epochs"] == 2
    with pytest.raises(ValueError, match="unknown budget 'tpu'; allowed: cpu, gpu, paper"):
        C.get_budget("tpu")


def test_every_claim_builds_runner_valid_sweeps(tmp_path):
    """The specs are sweep files the runner expands and whose runs parse as `peftlab train` arguments."""
    from peftlab.runner.sweep import expand

    budget = C.get_budget("cpu")
    specs = C.sweep_specs(C.CLAIMS, budget, tmp_path)
    assert len({s["output_dir"] for s in specs}) == len(specs)  # shared sides (e.g. LoRA, RPT) run once
    for spec in specs:
        runs = expand(spec)
        assert {r.seed for r in runs} == set(budget.seeds)
        runs[0].parse()
    zero_shot = next(s for s in specs if C.ZERO_SHOT.key in s["output_dir"])
    assert expand(zero_shot)[0].method == "zero_shot"


def test_claims_run_on_every_task_asked_for(tmp_path):
    """One claim per task, its sides' runs apart per task; a repeated task runs once."""
    rpt = C.select(["rpt-beats-prompt-tuning"])
    assert C.on_tasks(rpt, None) == rpt
    per_task = C.on_tasks(rpt, ["trec", "sms_spam", "trec"])
    assert [c.task for c in per_task] == ["trec", "sms_spam"] and {c.name for c in per_task} == {rpt[0].name}
    specs = C.sweep_specs(per_task, C.get_budget("cpu"), tmp_path)
    assert sorted(s["tasks"][0] for s in specs) == ["sms_spam", "sms_spam", "trec", "trec"]
    assert len({s["output_dir"] for s in specs}) == 4


def test_reproduce_reads_the_runs_results_back(tmp_path):
    from peftlab.runner.sweep import expand

    truth = {"residual_prompt_tuning": {0.03: 80.0, 0.3: 60.0}, "prompt_tuning": {0.03: 70.0, 0.3: 72.0}}
    calls = []

    def fake_sweep(spec: dict) -> list:
        calls.append(spec)
        for run in expand(spec):
            score = truth[run.method][run.learning_rate] + run.seed * 0.5 + (run.seed % 2) * 0.3
            run.output_dir.mkdir(parents=True)
            (run.output_dir / "results.json").write_text(
                json.dumps({**result(run.learning_rate, run.seed, score, score), "method": run.method})
            )
        return []

    budget = C.Budget("test", 100, 1, None, (1, 2, 3))
    beats, robust = claim(), claim(name="r", relation="<", measure="lr_spread")
    outcomes = C.reproduce([beats, robust], budget, tmp_path, run_sweep=fake_sweep)
    assert len(calls) == 2  # both claims share their two sides
    assert outcomes[0].verdict == HOLDS and outcomes[0].learning_rates == {"RPT": 0.03, "PT": 0.3}
    assert outcomes[0].comparisons[0].diff == pytest.approx(8.0)
    assert outcomes[1].verdict == CONTRADICTED  # RPT's spread (10) exceeds prompt tuning's (1)

    def failing(spec: dict) -> list:
        return expand(spec)[:1]

    with pytest.raises(RuntimeError, match=r"2 run\(s\) failed, e.g. residual_prompt_tuning trec"):
        C.reproduce([beats], budget, tmp_path / "other", run_sweep=failing)


def test_a_grown_grid_reruns_only_its_new_rates_and_a_claim_reads_only_its_grid(tmp_path):
    from peftlab.runner.sweep import expand

    made = []

    def fake_sweep(spec: dict) -> list:  # as the runner: a run whose results.json exists is skipped
        for run in expand(spec):
            if not (run.output_dir / "results.json").exists():
                made.append((run.method, run.learning_rate))
                run.output_dir.mkdir(parents=True)
                score = 60.0 + 100 * run.learning_rate + run.seed * (1 if run.method == "prompt_tuning" else 1.5)
                (run.output_dir / "results.json").write_text(
                    json.dumps(result(run.learning_rate, run.seed, score, score))
                )
        return []

    budget = C.Budget("test", 100, 1, None, (1, 2, 3))
    C.reproduce([claim()], budget, tmp_path, run_sweep=fake_sweep)
    assert len(made) == 12
    grown = [dataclasses.replace(side, learning_rates=(0.03, 0.3, 0.1)) for side in (A, B)]
    made.clear()
    (outcome,) = C.reproduce([claim(a=grown[0], b=(grown[1],))], budget, tmp_path, run_sweep=fake_sweep)
    assert sorted(set(made)) == [("prompt_tuning", 0.1), ("residual_prompt_tuning", 0.1)] and len(made) == 6
    assert outcome.learning_rates == {"RPT": 0.3, "PT": 0.3}
    narrow = [dataclasses.replace(side, learning_rates=(0.03, 0.1)) for side in (A, B)]
    (outcome,) = C.reproduce([claim(a=narrow[0], b=(narrow[1],))], budget, tmp_path, run_sweep=fake_sweep)
    assert outcome.learning_rates == {"RPT": 0.1, "PT": 0.1}  # 0.3's runs are there, but not in this grid
    specs = C.sweep_specs([claim(), claim(a=narrow[0], b=(narrow[1],))], budget, tmp_path)
    grids = [next(iter(s["methods"][0].values()))["learning_rates"] for s in specs]
    assert grids == [[0.03, 0.1, 0.3]] * 2


def test_select_claims_by_name():
    assert C.select(None) == list(C.CLAIMS)
    assert [c.name for c in C.select(["bitfit-within-5pct-of-full"])] == ["bitfit-within-5pct-of-full"]
    with pytest.raises(ValueError, match="unknown claim 'nope'; known: rpt-beats-prompt-tuning"):
        C.select(["nope"])


def test_reproduce_end_to_end_through_the_real_sweep_runner(tmp_path):
    """Tiny LLaMA, 2 seeds: the zero-shot side trains no step, and the verdict is read from real results.json."""
    from runner_tiny import save_model, sentiment_rows, write_csv

    model = save_model(tmp_path, "llama")
    data = write_csv(tmp_path / "train.csv", sentiment_rows(60))
    local = {"train_file": str(data), "text_column": ["sentence"], "verbalizer": ["negative", "positive"]}
    trained = Side("lora", {}, (1e-2,), "LoRA")
    c = Claim(
        "tiny", "test", "tiny_sentiment", str(model), trained, (C.ZERO_SHOT,), args={**local, "report_to": "none"}
    )
    budget = C.Budget("test", None, 1, None, (1, 2))
    (outcome,) = C.reproduce([c], budget, tmp_path / "runs")
    assert outcome.comparisons[0].seeds == (1, 2) and outcome.verdict in (HOLDS, NOT_SIGNIFICANT, CONTRADICTED)
    folder = C.side_dir(tmp_path / "runs", c, C.ZERO_SHOT)
    assert folder.is_relative_to(tmp_path / "runs")  # a model given as a path is one folder name
    zero = [json.loads(p.read_text()) for p in folder.rglob("results.json")]
    assert [(r["global_step"], r["trainable_params"], r["stored_params"]) for r in zero] == [(0, 0, 0), (0, 0, 0)]
    assert "| tiny: LoRA > zero-shot |" in C.markdown([outcome])


def test_reproduce_command_lists_claims_and_refuses_bad_names(capsys):
    from peftlab.cli import main

    assert main(["reproduce", "--list", "--claims", "rpt-beats-prompt-tuning"]) == 0
    assert capsys.readouterr().out == "rpt-beats-prompt-tuning: RPT > prompt tuning (trec, minilm)\n"
    assert main(["reproduce", "--claims", "nope"]) == 2
    assert "unknown claim 'nope'; known: rpt-beats-prompt-tuning" in capsys.readouterr().err
    assert main(["reproduce", "--budget", "tpu"]) == 2
    assert "unknown budget 'tpu'; allowed: cpu, gpu, paper" in capsys.readouterr().err
    assert main(["reproduce", "--list", "--claims", "rpt-beats-prompt-tuning", "--tasks", "sms_spam", "trec"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "rpt-beats-prompt-tuning: RPT > prompt tuning (sms_spam, minilm)"
    assert main(["reproduce", "--tasks", "imdb"]) == 2
    assert "--tasks: unknown task 'imdb'; allowed: " in capsys.readouterr().err


def test_a_recipe_warmup_longer_than_the_budget_is_cut_to_a_share_of_it(tmp_path):
    """The RPT authors' BERT recipe warms up for 1,000 steps; the CPU budget's runs are 100 steps long."""
    from peftlab.runner.sweep import expand

    (rpt,) = C.select(["rpt-beats-prompt-tuning"])
    cpu, paper = C.get_budget("cpu"), C.get_budget("paper")
    assert C.budget_warmup(rpt, rpt.a, cpu) == {"warmup_steps": C.WARMUP_SHARE}
    assert C.budget_warmup(rpt, rpt.a, paper) == {}  # the paper's run length: its recipe as it is
    (bitfit,) = C.select(["bitfit-within-5pct-of-full"])
    assert C.budget_warmup(bitfit, bitfit.a, cpu) == {}  # no warmup in that recipe
    own = C.Side("residual_prompt_tuning", {"warmup_steps": 5}, (0.3,))
    assert C.budget_warmup(rpt, own, cpu) == {}  # a side's own setting wins
    (spec, _) = C.sweep_specs([rpt], cpu, tmp_path)
    assert expand(spec)[0].parse().training.warmup_steps == C.WARMUP_SHARE


def test_the_xprompt_claims_search_stays_inside_its_parameter_bound():
    """Every ratio pair XPrompt may pick on dev keeps at most the claim's share of the prompt."""
    (c,) = C.select(["xprompt-matches-prompt-tuning-with-half-the-prompt"])
    tokens, pieces = c.a.options["xprompt_token_ratios"], c.a.options["xprompt_piece_ratios"]
    assert max((1 - t) * (1 - p) for t in tokens for p in pieces) <= c.max_param_ratio


def test_a_one_stage_side_trains_as_many_steps_as_xprompts_stages_together(tmp_path):
    """XPrompt trains stage 1 and then retrains once per (ratio pair, round) with the same schedule; prompt tuning's
    side gets that many epochs in all (equal optimizer steps), at every budget, in runs apart from 1x prompt tuning."""
    (c,) = C.select(["xprompt-matches-prompt-tuning-with-half-the-prompt"])
    pairs = len(c.a.options["xprompt_token_ratios"]) * len(c.a.options["xprompt_piece_ratios"])
    stages = 1 + pairs * c.a.options.get("xprompt_rounds", 1)
    assert c.b[0].epochs_factor == stages and c.a.epochs_factor == 1
    for name in C.BUDGETS:
        budget = C.get_budget(name)
        specs = {s["output_dir"]: s for s in C.sweep_specs([c], budget, tmp_path)}
        xprompt, pt = (specs[str(C.side_dir(tmp_path, c, side))] for side in (c.a, c.b[0]))
        epochs = budget.run_args(c)["num_train_epochs"]
        assert (
            xprompt["args"]["num_train_epochs"] == epochs and "num_train_epochs" not in xprompt["methods"][0]["xprompt"]
        )
        assert pt["methods"][0]["prompt_tuning"]["num_train_epochs"] == stages * epochs
    assert dataclasses.replace(c.b[0], epochs_factor=1).key != c.b[0].key
    with pytest.raises(ValueError, match="side 'PT': epochs_factor must be a positive number, got 0"):
        dataclasses.replace(B, epochs_factor=0)


RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "claims_cpu"


def _tables_with_records() -> list[tuple[Path, list[Claim]]]:
    """Each committed CPU claims table whose claims' run records (results.json) are committed under RECORDS."""
    out = []
    for table in sorted(RECORDS.parent.glob("claims_cpu_*.md")):
        names = re.findall(r"^\| \*\*([^*]+)\*\* \|", table.read_text(), flags=re.M)
        selected = C.select(names)
        if all(C.side_dir(RECORDS, c, s).is_dir() for c in selected for s in (c.a, *c.b)):
            out.append((table, selected))
    return out


def test_some_claims_tables_have_their_run_records_committed():
    assert _tables_with_records(), f"no claims table has its run records under {RECORDS}"


@pytest.mark.parametrize("table,selected", _tables_with_records(), ids=lambda x: getattr(x, "stem", ""))
def test_a_committed_claims_table_is_what_its_records_give_at_todays_settings(table, selected):
    """The README's tables are re-derived from the committed per-run results.json: nothing would train (every run of
    the claim is recorded, and trained with the settings the claim gives it today), and the table is the same."""
    listed: list[str] = []
    assert C.pending(selected, C.get_budget("cpu"), RECORDS, echo=listed.append) == 0
    assert listed and all(line.endswith("skipped (results.json exists)") for line in listed)
    outcomes = C.reproduce(selected, C.get_budget("cpu"), RECORDS, run_sweep=lambda spec: [])
    assert C.markdown(outcomes) in table.read_text()


def test_reproduce_dry_run_trains_nothing_and_writes_nothing(tmp_path, capsys):
    """--dry_run on committed records prints their table; on an empty folder it lists the runs that would train."""
    import shutil

    from peftlab.cli import main

    claim = C.select(["unipelt-beats-components"])[0]
    records = tmp_path / "records"
    for side in (claim.a, *claim.b):
        shutil.copytree(C.side_dir(RECORDS, claim, side), C.side_dir(records, claim, side), dirs_exist_ok=True)
    before = sorted(records.rglob("*"))
    assert main(["reproduce", "--dry_run", "--claims", claim.name, "--output_dir", str(records)]) == 0
    printed = capsys.readouterr().out
    committed = (RECORDS.parent / "claims_cpu_unipelt.md").read_text()
    table = printed[printed.index("| claim |") :].rstrip("\n")
    assert table in committed and "**not significant**" in table
    assert sorted(records.rglob("*")) == before  # no claims.md, no checkpoint
    assert main(["reproduce", "--dry_run", "--claims", claim.name, "--output_dir", str(tmp_path / "empty")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("would run in ") == 100 and "dry run: 100 run(s) would train" in printed
    assert not any((tmp_path / "empty").rglob("results.json"))
