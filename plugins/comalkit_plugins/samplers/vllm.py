"""``sampler=vllm``: responses from a vLLM engine started once and reused across iterations.

The engine loads the policy's base model directory (for the bundled SmolLM2, the safetensors
copy comalkit converts the GGUF into) and is started lazily on the first call. What reaches it
is what :meth:`comalkit.lm.policy.LMPolicy.sample` would use: the policy's own prompt token ids
(chat template and truncation), its end-of-turn token as the only stop token, the same
temperature / top-p / response length, and the generated ids are decoded by the policy's
tokenizer without special tokens. docs/sampling.md has the details and the measurements.

* **LoRA.** The current adapter (or ``snapshot``) is saved into the sampler's work directory
  and sampled through a ``LoRARequest`` with a new integer id; an adapter whose weights were
  already saved is reused by content, and an all-zero adapter (a fresh LoRA) samples the
  base model directly, which is the same distribution.
* **Full fine-tune.** The engine runs on a saved copy of the current weights and restarts on
  a new copy when they change (vLLM's CPU build repacks linear weights at load time, so they
  cannot be pushed into a running engine).
* **Seeds.** Each prompt's request carries its own seed, derived from the call's ``seed`` and
  the prompt's index, so its draws come from its own generator and do not depend on which
  requests share a batch or what ran before. vLLM's CPU worker fails on a seeded request whose
  prefill is split across steps ("CPU Generator does not use offset"), so the engine runs with
  chunked prefill off: every prompt is prefilled in one step.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comalkit.interfaces import Sampler, Snapshot
from comalkit.registry import ConfigError, param, plugin
from comalkit.vllm_engine import Engine, require_vllm

#: LoRA ranks a vLLM engine accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: ``LLM`` arguments the sampler sets itself (``engine_args`` may not override them).
MANAGED_ARGS = (
    "model",
    "dtype",
    "seed",
    "max_model_len",
    "gpu_memory_utilization",
    "enforce_eager",
    "enable_lora",
    "max_lora_rank",
    "generation_config",
    "enable_sleep_mode",
)
#: Adapters kept saved (and registered) at once; the loop needs two (sampling, evaluation).
KEEP_ADAPTERS = 4


@plugin("sampler", "vllm")
@dataclass
class VLLMSampler(Sampler):
    """Samples through a vLLM engine started once per run: the policy's prompt ids, stop token and
    tokenizer, its current LoRA adapter as a ``LoRARequest`` (docs/sampling.md)."""

    model: str = param("", help="local HF model directory for the engine; '': the policy's base model's")
    dtype: str = param(
        "bfloat16", choices=("auto", "float32", "bfloat16", "float16"), help="engine weight dtype"
    )
    gpu_memory_utilization: float = param(
        0.2, gt=0.0, le=1.0, help="share of device memory (on a CPU: of host RAM) for weights + KV cache"
    )
    max_model_len: int | None = param(None, ge=2, help="engine context in tokens; null: model.max_length")
    max_num_seqs: int | None = param(None, ge=1, help="sequences per engine step; null: vLLM's default")
    enforce_eager: bool = param(False, help="skip graph compilation (faster start-up, slower steps)")
    engine_seed: int = param(
        0, ge=0, help="LLM(seed=...) at start-up (each request also carries its own seed)"
    )
    reserved_cpus: int | None = param(
        None, ge=0, help="CPU build: cores the engine leaves to this process; null: vLLM's default (1)"
    )
    sleep_mode: bool = param(False, help="GPU: enable_sleep_mode, so sleep()/wake_up() free it for training")
    log_level: str = param(
        "WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="vLLM's log level (set before import)"
    )
    engine_args: dict[str, Any] = param(default_factory=dict, help="further vllm.LLM keyword arguments")

    def __post_init__(self) -> None:
        if self.model and not (Path(self.model).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"sampler.model={self.model!r}: expected a local Hugging Face model directory with config.json"
            )
        clash = sorted(set(self.engine_args) & set(MANAGED_ARGS))
        if clash:
            raise ConfigError(
                f"sampler.engine_args sets {clash}, which the vllm sampler manages; use sampler.<field> instead"
            )
        require_vllm("sampler=vllm", "choose sampler=hf")
        self._llm: Any = None
        self._engine_key: tuple[Any, ...] | None = None
        self._workdir: Path | None = None
        self._adapters: OrderedDict[str, Any] = OrderedDict()  # weight fingerprint -> LoRARequest
        self._next_id = 1
        self._full_weights: str | None = None  # fingerprint of the weights a full-model engine holds
        self._engine: Engine | None = None
        #: seconds the last engine start took (benchmarks report it apart from sampling)
        self.startup_s = 0.0

    # -- the contract ---------------------------------------------------------------------------
    def sample(
        self,
        policy: Any,
        prompts: Sequence[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        snapshot: Snapshot | None = None,
        progress: str | None = None,
    ) -> list[list[str]]:
        ids = self.generate_ids(
            policy,
            prompts,
            n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            snapshot=snapshot,
            progress=progress,
        )
        flat = policy.tokenizer.batch_decode([r for rows in ids for r in rows], skip_special_tokens=True)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def generate_ids(
        self,
        policy: Any,
        prompts: Sequence[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        snapshot: Snapshot | None = None,
        progress: str | None = None,
    ) -> list[list[list[int]]]:
        """The generated token ids (end-of-turn token included when generation stopped on it)."""
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n={n}, max_new_tokens={max_new_tokens}: each must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        if not prompts:
            return []
        rows = [policy.prompt_ids(p, i) for i, p in enumerate(prompts)]
        lora_request = self._prepare(policy, snapshot)  # imports vLLM with the configured log level
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature == 0
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,
                # the whole response must fit model.max_length, as with sampler=hf
                max_tokens=min(max_new_tokens, policy.max_length - len(row)),
                stop_token_ids=[policy.end_of_turn_id],
                ignore_eos=True,  # the end-of-turn token above is the only stop, as in LMPolicy.sample
                detokenize=False,  # the policy's tokenizer decodes, exactly as sampler=hf does
                seed=request_seed(seed, i),
            )
            for i, row in enumerate(rows)
        ]
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=row) for row in rows],
            params,
            # a disabled tqdm (no terminal) has no elapsed time, and vLLM divides by it
            use_tqdm=_progress_bar(progress) if progress and sys.stderr.isatty() else False,
            lora_request=lora_request,
        )
        return [[list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def close(self) -> None:
        """Stop the engine (its processes exit) and delete the saved adapters and weights."""
        self._shutdown_engine()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # -- GPU memory around training -------------------------------------------------------------
    def sleep(self) -> None:
        """With ``sleep_mode``: move the weights off the device and drop the KV cache (level 1)."""
        if self._llm is not None and self.sleep_mode:
            self._llm.sleep(level=1)

    def wake_up(self) -> None:
        """Undo :meth:`sleep` before the next call (``sample`` also does it)."""
        if self._llm is not None and self.sleep_mode:
            self._llm.wake_up()

    # -- engine and weights ---------------------------------------------------------------------
    def _prepare(self, policy: Any, snapshot: Snapshot | None) -> Any:
        """Start the engine on the right weights; the ``LoRARequest`` to sample with, or None."""
        weights = snapshot if snapshot is not None else policy.snapshot()
        if policy.lora:
            self._start(policy, self._base_dir(policy), lora_rank=_lora_rank(policy))
            self.wake_up()
            if _is_zero_adapter(weights):
                return None  # B = 0: the adapter is the identity, the base model is the same policy
            return self._adapter(policy, snapshot, weights)
        fingerprint = _fingerprint(weights)
        if self._engine_key is None or self._engine_key[1] is not None or fingerprint != self._full_weights:
            # the CPU build repacks linear weights at load time, so they cannot be pushed in place:
            # the engine restarts on a saved copy of the new weights
            old = (
                self._engine_key[0] if self._engine_key is not None and self._engine_key[1] is None else None
            )
            path = self._work() / f"full_model_{self._next_id:04d}"
            self._next_id += 1
            with policy.using(snapshot):
                policy.save_checkpoint(path)
            self._start(policy, path, lora_rank=None)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.wake_up()
        self._full_weights = fingerprint
        return None

    def _adapter(self, policy: Any, snapshot: Snapshot | None, weights: Snapshot) -> Any:
        from vllm.lora.request import LoRARequest

        fingerprint = _fingerprint(weights)
        request = self._adapters.get(fingerprint)
        if request is not None:
            self._adapters.move_to_end(fingerprint)
            return request
        lora_id = self._next_id
        self._next_id += 1
        path = self._work() / f"adapter_{lora_id:04d}"
        with policy.using(snapshot):
            policy.save_checkpoint(path)
        request = LoRARequest(f"comalkit-{lora_id}", lora_id, str(path))
        self._adapters[fingerprint] = request
        while len(self._adapters) > KEEP_ADAPTERS:
            _, old = self._adapters.popitem(last=False)
            self._llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        return request

    def _base_dir(self, policy: Any) -> Path:
        if self.model:
            return Path(self.model).expanduser()
        model = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
        name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        path = Path(name).expanduser() if name else None
        if path is None or not (path / "config.json").is_file():
            raise ValueError(
                f"sampler=vllm: the policy's base model has no local model directory ({name!r}); "
                "set sampler.model=<local Hugging Face directory of the same base model>"
            )
        return path

    def _start(self, policy: Any, model_dir: Path, lora_rank: int | None) -> None:
        max_model_len = self.max_model_len or policy.max_length
        if max_model_len < policy.max_length:
            raise ValueError(
                f"sampler.max_model_len={max_model_len} is below model.max_length={policy.max_length}"
            )
        key = (str(model_dir), lora_rank, max_model_len)
        if self._llm is not None and self._engine_key == key:
            return
        self._shutdown_engine()
        args: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": self.dtype,
            "seed": self.engine_seed,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "generation_config": "vllm",  # no sampling defaults from generation_config.json
            # a seeded request must not be prefilled in chunks on the CPU build (module docstring)
            "enable_chunked_prefill": False,
            "enable_sleep_mode": self.sleep_mode,
        }
        if lora_rank is not None:
            args.update(enable_lora=True, max_lora_rank=lora_rank)
        if self.max_num_seqs is not None:
            args["max_num_seqs"] = self.max_num_seqs
        args.update(self.engine_args)
        env = {"VLLM_LOGGING_LEVEL": self.log_level}
        if self.reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.reserved_cpus)
        self._engine = Engine(args, env, name="vllm sampler")
        self._llm = self._engine.llm
        self.startup_s = self._engine.startup_s
        self._engine_key = key

    def _shutdown_engine(self) -> None:
        engine, self._engine, self._llm, self._engine_key = self._engine, None, None, None
        self._adapters.clear()
        self._full_weights = None
        if engine is not None:
            engine.stop()

    def _work(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="comalkit-vllm-"))
        return self._workdir


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def request_seed(seed: int, index: int) -> int:
    """Prompt ``index``'s own seed, a 63-bit hash of ``(seed, index)``: vLLM gives the prompt's
    ``n`` responses that seed plus ``j``, so no two prompts' ranges overlap whatever ``n`` is."""
    digest = hashlib.sha256(f"{int(seed)}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _fingerprint(weights: Mapping[str, Any]) -> str:
    """A content hash of a snapshot: the same weights map to the same adapter or engine state."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        tensor = weights[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _is_zero_adapter(weights: Mapping[str, Any]) -> bool:
    """True when every LoRA B matrix is zero, i.e. the adapter adds nothing to the base model."""
    b = [t for name, t in weights.items() if "lora_B" in name]
    return bool(b) and all(int(t.count_nonzero()) == 0 for t in b)


def _lora_rank(policy: Any) -> int:
    """The smallest rank vLLM accepts that holds the policy's adapter."""
    config = getattr(policy.model, "peft_config", {}).get("default")
    rank = int(getattr(config, "r", 16))
    fitting = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fitting:
        raise ValueError(
            f"model.lora.r={rank} exceeds the largest LoRA rank vLLM serves ({VLLM_LORA_RANKS[-1]})"
        )
    return fitting[0]


def _progress_bar(name: str) -> Any:
    from tqdm.auto import tqdm

    def bar(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(desc=name, leave=False, disable=None)  # terminal only, like sampler=hf
        return tqdm(*args, **kwargs)

    return bar
