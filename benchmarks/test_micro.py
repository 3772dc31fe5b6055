"""pytest-benchmark micro-benchmarks of the hot pure parts; kept out of `pytest tests`.

pytest benchmarks/test_micro.py --benchmark-autosave          # store a run under .benchmarks/
pytest benchmarks/test_micro.py --benchmark-compare           # compare with the last stored run
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


def test_visual_token_arithmetic(benchmark):
    rng = random.Random(0)
    sizes = [(rng.randint(32, 4000), rng.randint(32, 4000)) for _ in range(10_000)]
    sizes = [(h, w) for h, w in sizes if max(h, w) / min(h, w) < 200]
    total = benchmark(lambda: sum(visual_tokens.image_tokens(h, w, 28, 3136, 12845056) for h, w in sizes))
    assert total > 0
