"""Oracle ``http_judge``: a judge behind an OpenAI-compatible chat-completions endpoint.

Each comparison is sent twice, with the responses in both slots of the judge template, and
P(a ≻ b) = ½ [p_A(a, b) + p_B(b, a)] (position bias cancels; the result is antisymmetric).
One request's probability comes from the label tokens' log-probabilities when the server
returns them (``top_logprobs``), else from the answer text ("A" → 1, "B" → 0).

Robustness: at most ``concurrency`` requests are open at once, however many threads call
the oracle (one semaphore per oracle; a retry waits for its backoff without holding a slot);
each has a timeout, and one abandoned on timeout may still be running on the server. Timeouts, connection errors, HTTP 408/429/5xx, bad JSON and malformed answers are retried
with exponential backoff; other HTTP errors (401, 404 ...) are not. A comparison whose
requests still fail is a failed judgment: ``on_failure=error`` raises
:class:`JudgeRequestError` after the batch, ``half`` returns 0.5 for it. Either way it is
counted (:meth:`HttpJudge.diagnostics`) and never cached (:meth:`compare_with_failures`).

The API key is read from the environment variable named by ``api_key_env`` when a request
is made; it is never a config value, never part of the identity, and never logged. A value of
``api_key_env`` that is not the name of a set variable is refused without being repeated (it may
be a pasted key: :mod:`comalkit.env_keys`).
Only the standard library is used (``urllib``).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from comalkit.env_keys import env_name_error
from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.judge_prompt import JudgePrompt
from comalkit.registry import ConfigError, param, plugin
from comalkit_plugins.oracles.base import settings_identity

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeRequestError(RuntimeError):
    """A judgment that could not be obtained (after retries, where retrying made sense)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def label_probability(body: Any, labels: Sequence[str]) -> float:
    """P(first label) from one chat-completion response; JudgeRequestError when it has no usable answer.

    With log-probabilities, the first generated token's candidates are matched to the labels
    (ignoring surrounding spaces; " A" and "A" add up). A label missing from the candidates
    gets an upper bound on its probability (the smallest listed one, and the mass left
    unlisted), so the estimate errs toward ½.
    """
    try:
        choice = body["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        tokens = ((choice.get("logprobs") or {}).get("content")) or []
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeRequestError(
            f"malformed chat completion (no choices[0].message): {str(body)[:200]}"
        ) from None
    if not isinstance(content, str):
        raise JudgeRequestError(f"malformed chat completion: message content is {type(content).__name__}")
    if tokens:
        try:
            first = tokens[0]
            listed = {
                first["token"]: float(first["logprob"])
            }  # keyed by raw token: the first one repeats below
            listed.update({t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or []})
        except (KeyError, TypeError, ValueError, AttributeError):
            raise JudgeRequestError(
                f"malformed logprobs in chat completion: {str(tokens[0])[:200]}"
            ) from None
        found = [[lp for tok, lp in listed.items() if str(tok).strip() == label] for label in labels]
        if any(found):
            # an unlisted label has at most the smallest listed probability and at most the unlisted mass
            unlisted = 1.0 - sum(math.exp(lp) for lp in listed.values())
            bound = min(min(listed.values()), math.log(max(unlisted, 1e-12)))
            mass = [torch.tensor(f or [bound], dtype=torch.float64).logsumexp(0) for f in found]
            return float(torch.stack(mass).softmax(0)[0])
    match = re.match(r"[\W_]*(\w+)", content)
    word = match.group(1) if match else ""
    if word in labels:
        return 1.0 if word == labels[0] else 0.0
    raise JudgeRequestError(
        f"malformed answer: expected {labels[0]!r} or {labels[1]!r}, got {content[:80]!r}"
    )


@plugin("oracle", "http_judge")
@dataclass
class HttpJudge(PreferenceOracle):
    """A prompted judge served over HTTP (see the module docstring)."""

    base_url: str = param(
        "http://127.0.0.1:8000/v1", help="the API root; requests go to <base_url>/chat/completions"
    )
    model: str = param("comalkit-judge", help="model name sent with every request")
    api_key_env: str = param("", help="name of the environment variable holding the API key ('' : no key)")
    template: str = param("pairwise", help="template name or file with {prompt}, {a}, {b}")
    labels: list[str] = param(default_factory=lambda: ["A", "B"], help="the two answer labels")
    system_prompt: str | None = param(None, help="optional system message")
    top_logprobs: int = param(5, ge=0, le=20, help="label candidates to request (0: answer text only)")
    max_tokens: int = param(1, ge=1, help="answer length limit")
    timeout_s: float = param(60.0, gt=0.0, help="per-request timeout")
    retries: int = param(3, ge=0, help="retries per request after the first attempt")
    backoff_s: float = param(0.5, ge=0.0, help="wait before the first retry; doubles each retry")
    max_backoff_s: float = param(8.0, ge=0.0, help="longest wait between retries")
    concurrency: int = param(4, ge=1, help="most requests open at once (all callers together)")
    on_failure: str = param(
        "error", choices=("error", "half"), help="a failed judgment raises, or counts as 0.5"
    )

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.base_url):
            raise ConfigError(f"oracle.base_url={self.base_url!r}: expected an http:// or https:// URL")
        if len(self.labels) != 2 or self.labels[0] == self.labels[1]:
            raise ConfigError(f"oracle.labels={self.labels}: expected two different labels, e.g. [A, B]")
        error = env_name_error("oracle.api_key_env", self.api_key_env)
        if error:
            raise ConfigError(error)
        self.prompt_template = JudgePrompt.load(self.template)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.concurrency)  # requests open, across callers
        self._stats = {
            "requests": 0,
            "retries": 0,
            "failed_requests": 0,
            "failed": 0,
            "orders": 0,
            "consistent": 0,
        }

    def identity(self) -> str:
        ignore = (
            "api_key_env",
            "timeout_s",
            "retries",
            "backoff_s",
            "max_backoff_s",
            "concurrency",
            "on_failure",
        )
        return settings_identity("http_judge", self, exclude=ignore, template=self.prompt_template.digest)

    # -- one request ----------------------------------------------------------------------------
    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self._stats[key] += value

    def _post(self, payload: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - http(s) checked
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise JudgeRequestError(
                f"HTTP {exc.code} from {url}", retryable=exc.code in RETRYABLE_STATUS
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise JudgeRequestError(f"request to {url} failed: {reason}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JudgeRequestError(f"bad JSON from {url}: {raw[:80]!r}") from None

    def ask(self, text: str) -> float:
        """P(first label) for one filled template, retrying with exponential backoff."""
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        if self.top_logprobs:
            payload.update(logprobs=True, top_logprobs=self.top_logprobs)
        for attempt in range(self.retries + 1):
            self._count(requests=1, retries=int(attempt > 0))
            try:
                with self._slots:
                    body = self._post(payload)
                return label_probability(body, self.labels)
            except JudgeRequestError as exc:
                if not exc.retryable or attempt == self.retries:
                    self._count(failed_requests=1)
                    raise
                log.debug("http_judge: %s; retrying (attempt %d of %d)", exc, attempt + 1, self.retries)
                time.sleep(min(self.backoff_s * 2**attempt, self.max_backoff_s))
        raise AssertionError("unreachable")

    def _ask_safely(self, text: str) -> float | JudgeRequestError:
        try:
            return self.ask(text)
        except JudgeRequestError as exc:
            return exc

    # -- batches --------------------------------------------------------------------------------
    def compare_with_failures(self, comparisons: Sequence[Comparison]) -> tuple[Tensor, Tensor]:
        """P(a ≻ b) per comparison and which ones failed (0.5 there, or JudgeRequestError: see ``on_failure``)."""
        texts = [
            self.prompt_template.render(c.prompt, x, y)
            for c in comparisons
            for x, y in ((c.a, c.b), (c.b, c.a))
        ]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self._ask_safely, texts))
        probs = torch.full((len(comparisons),), 0.5, dtype=torch.float64)
        failed = torch.zeros(len(comparisons), dtype=torch.bool)
        errors: list[str] = []
        consistent = 0
        for n in range(len(comparisons)):
            first, second = answers[2 * n], answers[2 * n + 1]
            if isinstance(first, Exception) or isinstance(second, Exception):
                failed[n] = True
                errors += [str(e) for e in (first, second) if isinstance(e, Exception)]
                continue
            p_first, p_second = first, 1.0 - second
            probs[n] = (p_first + p_second) / 2
            consistent += (p_first > 0.5) == (p_second > 0.5)
        n_failed = int(failed.sum())
        self._count(failed=n_failed, orders=len(comparisons) - n_failed, consistent=consistent)
        if n_failed:
            message = (
                f"http_judge: {n_failed} of {len(comparisons)} judgments failed; first error: {errors[0]}"
            )
            if self.on_failure == "error":
                raise JudgeRequestError(message, retryable=False)
            log.warning("%s (counted as 0.5, on_failure=half)", message)
        return probs, failed

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        return self.compare_with_failures(comparisons)[0]

    def diagnostics(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._stats)
        judged = s["orders"] + s["failed"]
        return {
            "http_requests": s["requests"],
            "http_retries": s["retries"],
            "http_failed_requests": s["failed_requests"],
            "http_failed_judgments": s["failed"],
            "http_failed_fraction": s["failed"] / judged if judged else 0.0,
            "position_consistency": s["consistent"] / s["orders"] if s["orders"] else None,
        }
