"""pytest-benchmark micro-benchmarks of the hot pure parts; kept out of `pytest tests`.

pytest benchmarks/test_micro.py --benchmark-autosave          # store a run under .benchmarks/
pytest benchmarks/test_micro.py --benchmark-compare           # compare with the last stored run
pytest benchmarks/test_micro.py --benchmark-timer time.process_time   # on a shared, loaded machine: CPU time
"""

import random
from pathlib import Path

import yaml

from harness.judge.failures import catalog, classify
from harness.matrix import cells
from harness.matrix import schema as matrix
from harness.plan import visual_tokens

REPO = Path(__file__).resolve().parents[1]


def test_expand_default_matrix(benchmark):
    m = matrix.load(REPO / "matrices" / "default.yaml")
    expanded = benchmark(cells.expand, m, "default.yaml")
    assert len(expanded) == 204


def test_expand_10k_cells(benchmark):
    from collection import generated_matrix

    m = matrix.Matrix.model_validate(yaml.safe_load(generated_matrix(10_000)))
    expanded = benchmark(cells.expand, m, "generated.yaml")
    assert len(expanded) == 9920


def test_classify_1000_log_texts(benchmark):
    rng = random.Random(0)
    texts = [rng.choice(catalog())["example"] + "\n" + "log line " * rng.randint(1, 50) for _ in range(1000)]
    texts += ["nothing known here " * 20]
    results = benchmark(lambda: [classify(t) for t in texts])
    assert results[-1].category == "other" and all(r.matched for r in results[:-1])


def _fast_enough(benchmark, seconds: float) -> None:
    """The target, on the fastest round (pytest-benchmark's min): a loaded machine only slows rounds down."""
    if benchmark.stats is not None:  # None under --benchmark-disable
        assert benchmark.stats.stats.min < seconds, f"{benchmark.stats.stats.min:.3f} s"


def test_classify_1000_corpus_texts_under_2_s(benchmark):
    """Issue 25: 1,000 real failure texts (the corpus's dev split, drawn with replacement) under 2 s,
    rules and learned fallback together."""
    entries = yaml.safe_load((REPO / "tests" / "data" / "failure-corpus" / "dev.yaml").read_text())
    rng = random.Random(0)
    texts = [rng.choice(entries)["text"] for _ in range(1000)]
    classify("warm the catalog and the model")
    results = benchmark.pedantic(lambda: [classify(t) for t in texts], rounds=5, iterations=1)
    assert len(results) == 1000 and all(0 < r.confidence <= 1 for r in results)
    _fast_enough(benchmark, 2.0)


def test_one_failed_cell_is_classified_under_20_ms(benchmark):
    """Issue 25: the verdict of one failed cell, the classification of its error and the stderr-sized
    traceback (STDERR_TAIL_CHARS of real log lines) with the remedy written for the cell, under 20 ms."""
    from harness.judge.result import STDERR_TAIL_CHARS, WorkerResult
    from harness.judge.verdict import judge

    entries = yaml.safe_load((REPO / "tests" / "data" / "failure-corpus" / "dev.yaml").read_text())
    rng = random.Random(1)
    log = ""
    while len(log) < STDERR_TAIL_CHARS:
        log += rng.choice(entries)["text"]
    kernel = next(e["example"] for e in catalog() if e["id"] == "vision-tower-too-many-resources-v100-bf16")
    m = matrix.Matrix.model_validate(
        {"models": [{"tiny": "qwen2_vl"}], "devices": ["v100"], "axes": {"dtype": ["bfloat16"]}}
    )
    cell = cells.expand(m, "m.yaml")[0]
    failed = WorkerResult(
        error_type="RuntimeError", error_message=kernel.splitlines()[-1], traceback=log[-STDERR_TAIL_CHARS:] + kernel
    )
    judge(cell, failed)  # warm: the catalog, the model, the GPU table
    verdict = benchmark(judge, cell, failed)
    assert verdict.outcome == "failed" and verdict.category == "kernel-launch"
    _fast_enough(benchmark, 0.020)


def test_visual_token_arithmetic(benchmark):
    rng = random.Random(0)
    sizes = [(rng.randint(32, 4000), rng.randint(32, 4000)) for _ in range(10_000)]
    sizes = [(h, w) for h, w in sizes if max(h, w) / min(h, w) < 200]
    total = benchmark(lambda: sum(visual_tokens.image_tokens(h, w, 28, 3136, 12845056) for h, w in sizes))
    assert total > 0
