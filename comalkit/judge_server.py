"""Serve any comalkit preference oracle as an OpenAI-compatible judge on the loopback interface.

``python -m comalkit.judge_server [--port 8000] [oracle overrides ...]`` answers

* ``GET /v1/models``: the one model it serves;
* ``POST /v1/chat/completions``: the last user message must be a filled judge template
  (:mod:`comalkit.judge_prompt`, the one ``oracle=http_judge`` sends); the server parses it
  back into ``(prompt, a, b)``, asks the oracle for p = P(a ≻ b), answers the first label if
  p ≥ ½ and returns ``log p`` and ``log(1 − p)`` as the label tokens' log-probabilities.

The oracle is composed exactly as ``python -m comalkit`` would (``oracle=rule
oracle.kind=rps``, ``oracle=llm_judge oracle.mode=prompted``; the default is the default
judge). Built on ``http.server``; it binds only loopback addresses, bounds request bodies and
socket time, and optionally requires a bearer key read from an environment variable (the
command line names the variable; the key itself is never an argument, nor logged).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from comalkit.env_keys import env_name_error
from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.judge_prompt import JudgePrompt

log = logging.getLogger("comalkit.judge_server")
MAX_BODY_BYTES = 4 << 20


class RequestError(ValueError):
    """A client error: answered with HTTP ``status`` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JudgeService:
    """The chat-completions logic, independent of HTTP: an oracle behind a judge template."""

    def __init__(
        self,
        oracle: PreferenceOracle,
        template: JudgePrompt,
        labels: Sequence[str] = ("A", "B"),
        model_name: str = "comalkit-judge",
    ) -> None:
        self.oracle, self.template, self.labels, self.model_name = oracle, template, tuple(labels), model_name

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "comalkit"}],
        }

    def chat(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise RequestError(400, "expected a JSON object with a 'messages' list")
        text = _last_user_text(body["messages"])
        try:
            prompt, a, b = self.template.parse(text)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        p = float(self.oracle.compare([Comparison(prompt, a, b)])[0])
        logps = [math.log(max(p, 1e-300)), math.log(max(1.0 - p, 1e-300))]
        answer = 0 if p >= 0.5 else 1
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": self.labels[answer]},
            "finish_reason": "stop",
        }
        if body.get("logprobs"):
            ranked = sorted(zip(self.labels, logps), key=lambda item: -item[1])  # the answer first
            top = [{"token": label, "logprob": lp, "bytes": list(label.encode())} for label, lp in ranked]
            choice["logprobs"] = {
                "content": [{**top[0], "top_logprobs": top[: max(int(body.get("top_logprobs") or 0), 1)]}]
            }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
        }


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
                content = "".join(
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                )
            if isinstance(content, str):
                return content
    raise RequestError(400, "no user message with text content")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may take to send its request

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(
            status,
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error" if status < 500 else "server_error",
                }
            },
        )

    def _authorised(self) -> bool:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        return key is None or hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def do_GET(self) -> None:
        if not self._authorised():
            return self._error(401, "missing or wrong API key")
        if self.path.rstrip("/") == "/v1/models":
            return self._send(200, self.server.service.models())
        self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        if not self._authorised():
            return self._error(401, "missing or wrong API key")
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        try:
            self._send(200, self.server.service.chat(json.loads(raw)))
        except json.JSONDecodeError as exc:
            self._error(400, f"request body is not JSON: {exc}")
        except RequestError as exc:
            self._error(exc.status, str(exc))
        except Exception as exc:  # the oracle failed: tell the client, keep serving
            log.exception("judge failed")
            self._error(500, f"judge failed: {type(exc).__name__}: {exc}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: JudgeService, api_key: str | None) -> None:
        self.service, self.api_key = service, api_key
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (its timeout) is routine: a debug line, not a traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("client %s disconnected", client_address)
        else:
            super().handle_error(request, client_address)


def check_loopback(host: str) -> None:
    """ValueError unless ``host`` resolves to a loopback address: the server has no other protection."""
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise ValueError(f"judge server host {host!r} does not resolve: {exc}") from None
    if not address.is_loopback:
        raise ValueError(
            f"judge server host {host!r} is {address}, not a loopback address; it serves loopback only"
        )


class JudgeServer:
    """A running server in a background thread (a context manager); ``url`` is its API root."""

    def __init__(
        self, service: JudgeService, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None
    ) -> None:
        check_loopback(host)
        self.httpd = _Server((host, port), service, api_key)
        self.host, self.port = host, self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="judge-server", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    def __enter__(self) -> JudgeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_oracle(overrides: Sequence[str]) -> PreferenceOracle:
    """The oracle ``python -m comalkit <overrides>`` would use (composed and validated the same way)."""
    from comalkit.registry import instantiate, validate
    from comalkit.testing import compose

    cfg = compose(list(overrides))
    validate(cfg)
    return instantiate(cfg.oracle)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m comalkit.judge_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--template", default="pairwise", help="judge template name or file (default: pairwise)"
    )
    parser.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("FIRST", "SECOND"))
    parser.add_argument("--model-name", default="comalkit-judge", help="the model id it reports")
    parser.add_argument(
        "--api-key-env", default="", help="require 'Bearer $VAR' from clients (variable name)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. oracle=rule oracle.kind=rps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    error = env_name_error("--api-key-env", args.api_key_env)
    if error:
        parser.error(error)  # without the value: it may be a pasted key
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    oracle = build_oracle(args.overrides)
    service = JudgeService(oracle, JudgePrompt.load(args.template), args.labels, args.model_name)
    server = JudgeServer(service, args.host, args.port, api_key)
    log.info("serving %s at %s (Ctrl-C or SIGTERM stops)", oracle.identity(), server.url)
    stop = threading.Event()
    # explicit handlers: a process started in the background by a shell inherits SIGINT ignored
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.close()
        oracle.close()


if __name__ == "__main__":
    main()
