"""Child process of `tiny.outputs_in_fresh_process`: loads a saved adapter the way a user would and writes outputs."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def load(job: dict):
    import peft
    from tiny import load_base

    task_type = job["task_type"]
    if job["loader"] == "peft":
        return peft.PeftModel.from_pretrained(load_base(Path(job["base"]), task_type), job["adapter"])
    if job["loader"] == "auto":
        auto_cls = {
            "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
            "TOKEN_CLS": peft.AutoPeftModelForTokenClassification,
            "QUESTION_ANS": peft.AutoPeftModelForQuestionAnswering,
            "FEATURE_EXTRACTION": peft.AutoPeftModelForFeatureExtraction,
            "CAUSAL_LM": peft.AutoPeftModelForCausalLM,
            "SEQ_2_SEQ_LM": peft.AutoPeftModelForSeq2SeqLM,
        }[task_type]
        return auto_cls.from_pretrained(job["adapter"])
    return load_base(Path(job["adapter"]), task_type)


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["import_peftlab"]:
        import peftlab  # noqa: F401
    from tiny import outputs_of

    results = []
    for job in args["jobs"]:
        model = load(job)
        if not args["import_peftlab"]:
            assert "peftlab" not in sys.modules, "peftlab was imported although the check must run without it"
        results.append(outputs_of(model, job["task_type"], torch.load(job["batch"])))
    torch.save(results, args["out"])


if __name__ == "__main__":
    main()
