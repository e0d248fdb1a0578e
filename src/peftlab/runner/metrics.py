"""The standard GLUE/SuperGLUE metrics, computed with scikit-learn and scipy (`evaluate` would fetch scripts online).

Every classification metric starts from per-class scores (logits of a classification head, or verbalizer
log-likelihoods of a language model), so all model families share one implementation.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman", "exact_match", "f1_a", "token_f1")


def _normalise_answer(text: str) -> str:
    """SQuAD/ReCoRD answer normalisation: lower case, no punctuation, articles or extra white space."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, answer: str) -> float:
    pred, gold = _normalise_answer(prediction).split(), _normalise_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _grouped(groups: Sequence[int]) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows[int(g)].append(i)
    return rows


def compute(
    names: Sequence[str],
    predictions: np.ndarray,
    labels: np.ndarray,
    *,
    regression: bool = False,
    groups: Sequence[int] | None = None,
    candidates: Sequence[str] | None = None,
    answers: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Metrics `names` plus `score` (their mean, the paper-table number), all in [0, 100] except correlations x 100.

    predictions: (N, C) class scores, or (N,) / (N, 1) values for regression.
    groups: question id per row (MultiRC exact match, ReCoRD); candidates/answers: ReCoRD entity per row and gold
    answers, the prediction of a query being its highest-scoring candidate.
    """
    predictions = np.asarray(predictions, dtype=np.float64)
    labels = np.asarray(labels)
    out: dict[str, float] = {}
    if regression:
        values = predictions.reshape(len(labels), -1)[:, 0]
        for name in names:
            fn = {"pearson": pearsonr, "spearman": spearmanr}[name]
            out[name] = 100.0 * float(fn(values, labels.astype(np.float64))[0])
    else:
        pred = predictions.argmax(-1)
        labels = labels.astype(np.int64)
        for name in names:
            if name == "accuracy":
                out[name] = 100.0 * accuracy_score(labels, pred)
            elif name in ("f1", "f1_a"):
                out[name] = 100.0 * f1_score(labels, pred, zero_division=0)
            elif name == "macro_f1":
                out[name] = 100.0 * f1_score(labels, pred, average="macro", zero_division=0)
            elif name == "matthews":
                out[name] = 100.0 * matthews_corrcoef(labels, pred)
            elif name == "exact_match" and candidates is None:  # MultiRC: every answer option of a question right
                by_group = _grouped(groups)
                out[name] = 100.0 * float(np.mean([np.all(pred[r] == labels[r]) for r in by_group.values()]))
            elif name in (
                "exact_match",
                "token_f1",
            ):  # ReCoRD: best candidate entity against the gold answers
                margin = predictions[:, 1] - predictions[:, 0]
                scores = []
                for rows in _grouped(groups).values():
                    best = rows[int(np.argmax(margin[rows]))]
                    gold = answers[best] or [""]
                    if name == "exact_match":
                        scores.append(
                            max(float(_normalise_answer(candidates[best]) == _normalise_answer(a)) for a in gold)
                        )
                    else:
                        scores.append(max(_token_f1(candidates[best], a) for a in gold))
                out[name] = 100.0 * float(np.mean(scores))
            else:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    out = {k: float(np.nan_to_num(v)) for k, v in out.items()}
    out["score"] = float(np.mean([out[n] for n in names]))
    return out
