"""lm-eval-harness against the server: `local-completions` scores a multiple-choice task as its `hf` backend does.

A small local JSON task (lm-eval's `multiple_choice` output type: one loglikelihood request per choice) runs twice
on the default model in float32: through the shared server with lm-eval's default tokenizer setting (it finds
`/tokenizer_info` and tokenizes through the server; the served name "smol" is no hub id, so nothing can come from the
hub), and in-process through lm-eval's `hf` backend. Every choice's loglikelihood and each document's accuracy must
agree. Needs lm-eval (the opt-in `clients` nox session installs it).
"""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

TASK = "lm_deploy_local_mc"
DOCS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["Six", "Eight", "Ten", "Four"], 1),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What do bees make?", ["Milk", "Silk", "Wax paper", "Honey"], 3),
    ("What is the boiling point of water at sea level in Celsius?", ["50", "100", "150", "200"], 1),
    ("Which animal is the largest mammal?", ["Blue whale", "Elephant", "Giraffe", "Shark"], 0),
    ("What colour is the sky on a clear day?", ["Green", "Red", "Blue", "Yellow"], 2),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"], 1),
]
# Summed float32 log-probabilities of a few tokens, from two implementations of the same model.
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-eval-task")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        "\n".join(
            [
                f"task: {TASK}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "Question: {{question}}\\nAnswer:"',
                'doc_to_choice: "{{choices}}"',
                "doc_to_target: answer",
                "metric_list:",
                "  - metric: acc",
                "  - metric: acc_norm",
                "",
            ]
        )
    )
    return folder


def _evaluate(lm, task_dir) -> tuple[dict, list[list[float]]]:
    """(metrics, per document the loglikelihood of each choice)."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    scores = [[resp[0][0] for resp in sample["resps"]] for sample in samples]
    return out["results"][TASK], scores


@pytest.mark.slow
def test_local_completions_scores_like_the_hf_backend(api_server, api_key, default_model_dir, task_dir, monkeypatch):
    from lm_eval.api.registry import get_model

    monkeypatch.setenv("OPENAI_API_KEY", api_key)  # local-completions sends it as the bearer key
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    served = get_model("local-completions")(
        model="smol",
        base_url=f"{api_server.url}/v1/completions",
        auth_token=api_key,
        max_length=512,
        num_concurrent=8,
    )
    assert served.tokenizer_backend == "remote"  # found /tokenizer_info: no tokenizer from the hub
    served_metrics, served_scores = _evaluate(served, task_dir)

    reference = get_model("hf")(pretrained=str(default_model_dir), dtype="float32", device="cpu", batch_size=1)
    hf_metrics, hf_scores = _evaluate(reference, task_dir)

    worst = max(abs(a - b) for s, h in zip(served_scores, hf_scores, strict=True) for a, b in zip(s, h, strict=True))
    print(f"lm-eval {lm_eval.__version__}: local-completions {served_metrics}, hf {hf_metrics}")
    print(f"loglikelihoods, local-completions: {served_scores}\nhf: {hf_scores}\nlargest difference {worst:.2e}")
    assert len(served_scores) == len(DOCS)
    for served_doc, hf_doc in zip(served_scores, hf_scores, strict=True):
        assert served_doc == pytest.approx(hf_doc, abs=TOLERANCE)
    for metric in ("acc,none", "acc_norm,none"):
        assert served_metrics[metric] == hf_metrics[metric]
