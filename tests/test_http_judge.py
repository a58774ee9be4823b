"""oracle=http_judge against a real OpenAI-compatible server on loopback (comalkit/judge_server.py).

Faults are injected by a small proxy between the client and the server: it can stall past
the client's timeout, answer bad JSON, HTTP 500 or a malformed answer, then heal, or hold
answers until the test releases them. Nothing here waits on the clock: the proxy's counters
change under a condition variable that the tests wait on.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from comalkit_plugins.oracles.http_judge import HttpJudge, JudgeRequestError, label_probability
from comalkit_plugins.oracles.rule import RuleOracle
from omegaconf import OmegaConf
from run_overrides import ONE_SMALL_ITERATION

from comalkit.env_keys import check_key_overrides
from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.judge_prompt import JudgePrompt
from comalkit.judge_server import JudgeServer, JudgeService, check_loopback
from comalkit.judge_server import main as judge_server_main
from comalkit.oracle_cache import CachedOracle
from comalkit.registry import ConfigError
from comalkit.testing import compose

PAIRS = [
    Comparison("Say something.", "one two three", "one"),
    Comparison("Say something.", "a", "b c"),
    Comparison("Other prompt", "x [/RESPONSE A] answer A", "x y z w v u"),
]
SERVED = RuleOracle(kind="longer", temperature=2.0)
TEMPLATE = JudgePrompt.load("pairwise")


def served(pairs: Sequence[Comparison]) -> torch.Tensor:
    """What the server's oracle says about ``pairs`` as it receives them: delimiters stripped."""
    return SERVED.compare(
        [Comparison(c.prompt, TEMPLATE.sanitize(c.a), TEMPLATE.sanitize(c.b)) for c in pairs]
    )


def serve(oracle: PreferenceOracle = SERVED, api_key: str | None = None) -> JudgeServer:
    return JudgeServer(JudgeService(oracle, TEMPLATE), api_key=api_key)


@pytest.fixture
def server():
    with serve() as running:
        yield running


def fast_client(base_url: str, **overrides: Any) -> HttpJudge:
    """A client that retries at once; its timeout is one no loaded machine reaches on loopback."""
    settings = {"timeout_s": 120.0, "retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, **overrides}
    return HttpJudge(base_url=base_url, **settings)


#: how long a test waits for an event that must happen before it calls the run broken (a
#: deadlock guard: nothing is measured against it)
GUARD_S = 300.0


# ---------------------------------------------------------------------------------------------
# A fault-injecting proxy
# ---------------------------------------------------------------------------------------------
class FaultProxy:
    """Forwards POSTs to ``upstream``; the n-th request suffers ``faults[n]`` (None: forwarded).

    A request is in flight from the moment its body has been read until just before its answer
    is written, so the client cannot have seen an answer that is still counted: ``max_in_flight``
    is the most requests the client had open at once, whatever the machine's load. With
    ``gated=True`` every answer waits for :meth:`release`. A ``stall`` is never answered (until
    :meth:`close`): the client's timeout fires however slow the machine is.
    """

    def __init__(self, upstream: str, faults: Sequence[str | None] = (), gated: bool = False):
        self.upstream, self.faults, self.gated = upstream, list(faults), gated
        self.changed = threading.Condition()
        self.requests = self.in_flight = self.max_in_flight = self.answered = self.permits = 0
        self.closed = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fault = proxy.arrive()
                if fault == "stall":
                    proxy.wait_until(lambda p: p.closed, "the proxy to close")
                    return
                status, answer = proxy.answer(fault, self.path, body, self.headers.get("Authorization"))
                proxy.leave()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (ConnectionError, TimeoutError):
                    pass  # the client gave up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def arrive(self) -> str | None:
        with self.changed:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.changed.notify_all()
            return self.faults.pop(0) if self.faults else None

    def answer(self, fault: str | None, path: str, body: bytes, auth: str | None) -> tuple[int, bytes]:
        if fault == "500":
            return 500, b'{"error": {"message": "overloaded"}}'
        if fault == "bad_json":
            return 200, b'{"choices": ['
        if fault == "malformed":
            return 200, json.dumps({"choices": [{"message": {"content": "Both are lovely."}}]}).encode()
        request = urllib.request.Request(self.upstream + path.removeprefix("/v1"), data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(request, timeout=GUARD_S) as response:
                status, answer = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, exc.read()
        if self.gated:
            with self.changed:  # waiting and taking the permit under one lock: one answer per release
                released = self.changed.wait_for(lambda: self.permits > 0 or self.closed, timeout=GUARD_S)
                assert released, "waited for the test to release an answer"
                self.permits -= 1
        return status, answer

    def leave(self) -> None:
        with self.changed:
            self.in_flight -= 1
            self.answered += 1
            self.changed.notify_all()

    def release(self) -> None:
        """Let one held answer go (``gated=True``)."""
        with self.changed:
            self.permits += 1
            self.changed.notify_all()

    def wait_until(self, condition: Any, what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: condition(self), timeout=GUARD_S), f"waited for {what}"

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def proxy(server: JudgeServer):
    proxies: list[FaultProxy] = []

    def make(faults: Sequence[str | None] = (), **kwargs: Any) -> FaultProxy:
        proxies.append(FaultProxy(server.url, faults, **kwargs))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_http_judge_end_to_end_matches_the_served_oracle(server: JudgeServer) -> None:
    judge = fast_client(server.url)
    probs = judge.compare(PAIRS)
    assert torch.allclose(probs, served(PAIRS), atol=1e-9)  # a BT oracle: swap-averaging is exact
    m = judge.win_matrix("q", ["a", "a b", "a b c", ""])
    assert torch.allclose(m + m.T, torch.ones(4, 4, dtype=torch.float64)) and torch.all(m.diagonal() == 0.5)
    d = judge.diagnostics()
    assert d["http_requests"] == 2 * (len(PAIRS) + 6) and d["http_retries"] == 0
    assert d["position_consistency"] == 1.0 and d["http_failed_judgments"] == 0


def test_models_endpoint(server: JudgeServer) -> None:
    with urllib.request.urlopen(server.url + "/models", timeout=GUARD_S) as response:
        body = json.loads(response.read())
    assert body["data"][0]["id"] == "comalkit-judge"


def test_text_answers_without_logprobs(server: JudgeServer) -> None:
    judge = fast_client(server.url, top_logprobs=0)
    probs = judge.compare(PAIRS)
    assert probs.tolist() == [1.0, 0.0, 0.0]  # the longer response wins in both orders


def test_faults_are_retried_until_the_server_recovers(proxy) -> None:
    faulty = proxy(["bad_json", "500", "malformed"])
    judge = fast_client(faulty.url, retries=3, concurrency=1)
    probs = judge.compare(PAIRS[:1])
    assert torch.allclose(probs, served(PAIRS[:1]))
    d = judge.diagnostics()
    assert d["http_retries"] == 3 and d["http_requests"] == 5 and d["http_failed_judgments"] == 0
    assert faulty.requests == 5


def test_a_request_past_its_timeout_is_retried(proxy) -> None:
    """The first request is never answered, so its timeout must fire; a loaded machine can only
    make more requests time out, which the generous retry budget absorbs."""
    stalled = proxy(["stall"])
    judge = fast_client(stalled.url, timeout_s=0.5, retries=20, concurrency=1)
    probs = judge.compare(PAIRS[:1])
    assert torch.allclose(probs, served(PAIRS[:1]))
    d = judge.diagnostics()
    assert d["http_retries"] >= 1 and d["http_failed_judgments"] == 0
    assert stalled.requests == d["http_requests"] and stalled.in_flight == 1  # the stalled one, held


def test_persistent_failure_raises_after_bounded_retries(proxy) -> None:
    broken = proxy(["500"] * 100)
    judge = fast_client(broken.url, retries=2)
    with pytest.raises(JudgeRequestError, match=r"1 of 1 judgments failed; first error: HTTP 500"):
        judge.compare(PAIRS[:1])
    assert broken.requests == 2 * 3  # both orders, 1 + 2 retries each: the loop is bounded
    assert judge.diagnostics()["http_failed_judgments"] == 1


def test_on_failure_half_is_counted_and_never_cached(proxy, tmp_path: Path) -> None:
    flaky = proxy(["bad_json"] * 4)  # both orders of the first comparison fail twice (retries=1)
    judge = fast_client(flaky.url, retries=1, concurrency=1, on_failure="half")
    cached = CachedOracle(judge, tmp_path / "cache.sqlite")
    probs = cached.compare(PAIRS[:2])
    assert probs[0].item() == 0.5 and probs[1].item() == pytest.approx(served(PAIRS[1:2]).item())
    d = cached.diagnostics()
    assert d["failed"] == 1 and d["failed_fraction"] == 0.5 and d["http_failed_judgments"] == 1
    assert cached.cache.count() == 1
    again = cached.compare(PAIRS[:2])  # the proxy has healed: the failure is asked again, then cached
    assert torch.allclose(again, served(PAIRS[:2])) and cached.cache.count() == 2


def test_client_errors_are_not_retried(server: JudgeServer) -> None:
    judge = fast_client(server.url + "/wrong")
    with pytest.raises(JudgeRequestError, match="HTTP 404"):
        judge.compare(PAIRS[:1])
    assert judge.diagnostics()["http_requests"] == 2  # one per order, no retries


@pytest.mark.parametrize("callers", [1, 2])
def test_concurrency_is_limited(proxy, callers: int) -> None:
    """The proxy holds every answer until the test releases it, one at a time, once the client
    has as many requests open as it may: the limit binds however loaded the machine is, also
    when several threads share one oracle."""
    limit, batch = 3, PAIRS * 2
    gate = proxy(gated=True)
    judge = fast_client(gate.url, concurrency=limit)
    total = 2 * len(batch) * callers
    with ThreadPoolExecutor(callers) as pool:
        results = [pool.submit(judge.compare, batch) for _ in range(callers)]
        for answered in range(total):
            expected = min(limit, total - answered)
            gate.wait_until(
                lambda p, n=answered, k=expected: p.answered == n and p.in_flight >= k, f"{expected} requests"
            )
            gate.release()
        for result in results:
            assert torch.allclose(result.result(), served(batch))
    assert gate.requests == total and gate.max_in_flight == limit
    assert judge.diagnostics()["http_retries"] == 0


# ---------------------------------------------------------------------------------------------
# The API key
# ---------------------------------------------------------------------------------------------
def test_api_key_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-s3cret-value"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    with serve(api_key=secret) as keyed:
        judge = fast_client(keyed.url, api_key_env="JUDGE_TEST_KEY")
        assert torch.allclose(judge.compare(PAIRS), served(PAIRS))
        visible = judge.identity() + repr(judge) + json.dumps(judge.diagnostics())
        cfg = compose(["oracle=http_judge", "oracle.api_key_env=JUDGE_TEST_KEY"])
        visible += OmegaConf.to_yaml(cfg)
        assert secret not in visible and "JUDGE_TEST_KEY" in OmegaConf.to_yaml(cfg)

        monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
        with pytest.raises(JudgeRequestError, match="HTTP 401") as info:
            judge.compare(PAIRS[:1])
        assert "wrong" not in str(info.value)
        assert judge.diagnostics()["http_requests"] == 2 * len(PAIRS) + 2  # 401 is not retried
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(ConfigError, match="oracle.api_key_env names an environment variable that is not set"):
        HttpJudge(api_key_env="JUDGE_TEST_KEY")
    for pasted in ("sk-proj-Abc123-pasted/key", "hf_PastedTokenThatIsAValidName"):
        with pytest.raises(ConfigError, match="oracle.api_key_env") as info:
            HttpJudge(api_key_env=pasted)
        assert pasted not in str(info.value)


REPO = Path(__file__).resolve().parent.parent
#: the smallest online run: one iteration of the tiny model, judged over HTTP, logged to wandb
ONE_ITERATION = [
    "model=tiny",
    "oracle=http_judge",
    "logger=wandb",
    "trainer=fast",
    *ONE_SMALL_ITERATION,
    "reference.strengths=[0.5]",
]


class CountingOracle(RuleOracle):
    """The served oracle, counting the comparisons that reached it (through the key check)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.asked, self.lock = 0, threading.Lock()

    def compare(self, comparisons: Sequence[Comparison]) -> torch.Tensor:
        with self.lock:
            self.asked += len(comparisons)
        return super().compare(comparisons)


def comalkit_cli(args: Sequence[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m comalkit`` in ``cwd``, with every wandb directory inside it."""
    wandb_dirs = {
        f"WANDB_{name}_DIR": str(cwd / f"wandb-{name.lower()}") for name in ("CACHE", "CONFIG", "DATA")
    }
    environment = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(cwd / "wandb"),
        **wandb_dirs,
        **env,
    }
    command = [sys.executable, "-m", "comalkit", *args]
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=4 * GUARD_S
    )


def test_the_key_appears_nowhere_a_run_writes(tmp_path: Path) -> None:
    """A real run against a server that requires the key: the key is in no file of the run
    directory (saved configs, metrics, summary, oracle cache, checkpoints, wandb's offline run)
    nor in the run's output."""
    secret = "sk-live-Zq7WJr2mX9vB4nK8pL1sT6yH3dF0aE5c"
    oracle = CountingOracle()
    with serve(oracle, api_key=secret) as keyed:
        args = [*ONE_ITERATION, f"oracle.base_url={keyed.url}", "oracle.api_key_env=COMALKIT_TEST_JUDGE_KEY"]
        proc = comalkit_cli(
            [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, COMALKIT_TEST_JUDGE_KEY=secret
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert oracle.asked > 0  # the run's judgments went through the server's key check
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.match("run/wandb/offline-run-*/*.wandb") for path in written), "no wandb run"
    assert "COMALKIT_TEST_JUDGE_KEY" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert {"metrics.jsonl", "summary.json", "oracle_cache.sqlite"} <= {path.name for path in written}
    for path in written:
        assert secret.encode() not in path.read_bytes(), f"the key is in {path}"
    assert secret not in proc.stdout + proc.stderr


def test_a_key_pasted_as_the_variable_name_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    pasted = "sk-proj-Abc123-Pasted_Key/value"
    proc = comalkit_cli([*ONE_ITERATION, f"oracle.api_key_env={pasted}"], tmp_path)
    assert proc.returncode == 2 and "oracle.api_key_env must be the name of the environment" in proc.stderr
    assert pasted not in proc.stdout + proc.stderr
    assert not list(tmp_path.iterdir())  # no run directory (named after the overrides), no .hydra/


@pytest.mark.parametrize(
    "args",
    [
        ["oracle.api_key_env=sk-abc-123"],
        ["+oracle.api_key_env=sk-abc-123"],
        ["oracle=http_judge", "oracle.api_key_env='sk-abc-123'"],
        ["oracle.api_key_env=hf_UnsetButValidName"],  # a token can look like a variable name
        ["-m", "oracle.api_key_env=COMALKIT_SET_KEY,sk-abc-123"],
        ["-m", "oracle.api_key_env=COMALKIT_SET_KEY,hf_UnsetButValidName"],
    ],
)
def test_key_overrides_are_checked_without_echoing_the_value(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMALKIT_SET_KEY", "the-key")
    error = check_key_overrides(args)
    assert error is not None and "api_key_env" in error
    assert "sk-abc-123" not in error and "hf_UnsetButValidName" not in error


def test_key_overrides_naming_set_variables_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMALKIT_SET_KEY", "the-key")
    assert check_key_overrides(["oracle=http_judge", "oracle.api_key_env=COMALKIT_SET_KEY"]) is None
    assert check_key_overrides(["-m", "oracle.api_key_env=COMALKIT_SET_KEY,COMALKIT_SET_KEY"]) is None
    assert check_key_overrides(["oracle.api_key_env=", "oracle.model=sk-not-a-key-setting"]) is None


# ---------------------------------------------------------------------------------------------
# Parsing answers
# ---------------------------------------------------------------------------------------------
def completion(content: str, logprobs: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"message": {"role": "assistant", "content": content}}
    if logprobs:
        top = [{"token": t, "logprob": lp} for t, lp in logprobs]
        choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
    return {"choices": [choice]}


def test_label_probability_from_logprobs_and_text() -> None:
    labels = ["A", "B"]
    p = label_probability(completion("A", [("A", -0.2), ("B", -1.9), ("C", -5.0)]), labels)
    assert p == pytest.approx(torch.tensor([-0.2, -1.9]).softmax(0)[0].item())
    p = label_probability(completion("B", [("B", -1.0), (" A", -1.5), ("A", -1.5)]), labels)
    assert p == pytest.approx(1 / (1 + torch.tensor(-1.0 + 1.5).exp().item() / 2))  # " A" and "A" add up
    p = label_probability(completion("A", [("A", -0.01)]), labels)  # B unlisted: at most the rest
    rest = 1 - torch.tensor(-0.01).exp().item()
    assert p == pytest.approx(torch.tensor(-0.01).exp().item() / (torch.tensor(-0.01).exp().item() + rest))
    assert label_probability(completion("**B**."), labels) == 0.0
    assert label_probability(completion(" A"), labels) == 1.0
    for bad in (completion("Both are fine."), completion(""), {"choices": []}, {"nope": 1}, "text"):
        with pytest.raises(JudgeRequestError, match="malformed"):
            label_probability(bad, labels)


# ---------------------------------------------------------------------------------------------
# The server itself
# ---------------------------------------------------------------------------------------------
def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url + "/chat/completions", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=GUARD_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class ExplodingOracle(PreferenceOracle):
    def compare(self, comparisons: Sequence[Comparison]) -> torch.Tensor:
        raise RuntimeError("judge model crashed")


def test_server_rejects_bad_requests_and_survives_a_failing_oracle(server: JudgeServer) -> None:
    good = {"messages": [{"role": "user", "content": TEMPLATE.render("q", "a b", "a")}]}
    assert post(server.url, b"{oops")[0] == 400
    status, body = post(
        server.url, json.dumps({"messages": [{"role": "user", "content": "A or B?"}]}).encode()
    )
    assert status == 400 and "does not follow the judge template" in body["error"]["message"]
    assert post(server.url, json.dumps({"prompt": "x"}).encode())[0] == 400
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=GUARD_S)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Length", str(5 << 20))  # announced, never sent: refused unread
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    status, body = post(server.url, json.dumps({**good, "logprobs": True, "top_logprobs": 2}).encode())
    assert status == 200 and body["choices"][0]["message"]["content"] == "A"
    top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in top] == ["A", "B"] and top[0]["logprob"] == pytest.approx(
        math.log(torch.sigmoid(torch.tensor(0.5)).item())
    )
    with serve(ExplodingOracle()) as exploding:
        status, body = post(exploding.url, json.dumps(good).encode())
        assert status == 500 and "judge model crashed" in body["error"]["message"]
        assert post(exploding.url, json.dumps(good).encode())[0] == 500  # still serving


def test_server_binds_loopback_only() -> None:
    check_loopback("localhost")
    for host in ("0.0.0.0", "8.8.8.8"):
        with pytest.raises(ValueError, match="not a loopback address"):
            check_loopback(host)


def test_judge_server_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command: it requires the key named on its command line and stops on Ctrl-C."""
    secret = "sk-served-k3y"
    monkeypatch.setenv("JUDGE_SERVER_TEST_KEY", secret)
    command = [sys.executable, "-m", "comalkit.judge_server", "--port", "0", "--api-key-env"]
    command += ["JUDGE_SERVER_TEST_KEY", "oracle=rule", "oracle.kind=rps"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, f"judge server exited early (code {proc.wait()})"
            found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
            url = found.group(1) if found else None
        pairs = [Comparison("q", "w w", "w"), Comparison("q", "w", "w w w")]
        probs = fast_client(url, api_key_env="JUDGE_SERVER_TEST_KEY").compare(pairs)
        assert probs.tolist() == pytest.approx([0.9, 0.9])  # rock-paper-scissors as served
        with pytest.raises(JudgeRequestError, match="HTTP 401"):
            fast_client(url).compare(pairs)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=GUARD_S)
    assert proc.returncode == 0, err
    assert secret not in line + err


def test_judge_server_refuses_a_pasted_key_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for pasted in ("sk-proj-Abc123-pasted/key", "hf_PastedTokenThatIsAValidName"):
        with pytest.raises(SystemExit) as info:
            judge_server_main(["--port", "0", "--api-key-env", pasted, "oracle=rule"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "--api-key-env" in err and pasted not in err
