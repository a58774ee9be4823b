"""Input probes: data files, model directories, LoRA checkpoints and game matrices.

Each bad input raises a :class:`~comalkit.registry.ConfigError` whose one-line message names
the file (and line) and what was expected, and holds no part of a huge input. The last
probes run whole jobs: an offline run on a bad file fails before it writes anything.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
from comalkit_plugins.models.tiny import tiny_causal_lm
from probe import TINY_OFFLINE, assert_no_results, assert_one_line, failure

from comalkit.__main__ import load_plugins
from comalkit.lm.checkpoints import check_adapter_base
from comalkit.lm.files import ModelError
from comalkit.lm.loading import load_causal_lm
from comalkit.lm.lora import LoraSettings
from comalkit.lm.policy import LMPolicy
from comalkit.preference_data import load_preferences
from comalkit.prompts import read_prompts
from comalkit.registry import ConfigError, instantiate

PAIR = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}


def rows(*items: object) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def message(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 600, text
    return text


# ---------------------------------------------------------------------------------------------
# preference files
# ---------------------------------------------------------------------------------------------
PREFERENCE_FAULTS = {
    "missing file": (None, "preference file not found"),
    "empty file": ("", "no preference pairs"),
    "invalid JSON on line 2": (rows(PAIR) + '{"prompt": "x",\n', "pairs.jsonl:2: invalid JSON"),
    "non-UTF-8 byte": (rows(PAIR).encode() + b'{"prompt": "\xff\xfe"}\n', "pairs.jsonl:2: not UTF-8"),
    "missing key": (rows(PAIR, {"prompt": "x", "chosen": "y"}), "pairs.jsonl:2: missing key(s) ['rejected']"),
    "wrong role in chosen": (
        rows(
            {
                "prompt": "x",
                "chosen": [{"role": "bot", "content": "y"}],
                "rejected": [{"role": "bot", "content": "z"}],
            }
        ),
        "role 'bot'",
    ),
    "prompt ends with the assistant": (
        rows({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "y", "rejected": "z"}),
        "'prompt' ends with a assistant message",
    ),
    "two assistant turns": (
        rows(
            {
                "prompt": "x",
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "assistant", "content": "c"}],
            }
        ),
        "exactly one assistant message",
    ),
    "every pair tied": (
        rows({**PAIR, "rejected": PAIR["chosen"]}),
        "every pair has chosen identical to rejected",
    ),
    "win probability out of range": (
        rows({**PAIR, "chosen_winprob": 1.5, "rejected_winprob": 0.2}),
        "must be a probability in [0, 1]",
    ),
    "win probability nan": (
        rows(PAIR).replace("}", ', "chosen_winprob": NaN, "rejected_winprob": 0.2}'),
        "probability",
    ),
    "a row that is a list": (rows([1, 2]), "expected a JSON object"),
    "mixed formats": (
        rows(PAIR, {"prompt": [{"role": "user", "content": "x"}], "chosen": "y", "rejected": "z"}),
        "mixes formats",
    ),
}


@pytest.mark.parametrize("fault", list(PREFERENCE_FAULTS))
def test_bad_preference_file_is_named(fault, tmp_path):
    content, needle = PREFERENCE_FAULTS[fault]
    path = tmp_path / "pairs.jsonl"
    if content is not None:
        write(path, content)
    with pytest.raises(ConfigError) as info:
        load_preferences(path)
    assert needle in message(info) and str(path) in message(info)


def test_preference_directory_and_unknown_suffix(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_preferences(tmp_path)
    assert "is a directory" in message(info)
    with pytest.raises(ConfigError) as info:
        load_preferences(write(tmp_path / "p.csv", "a,b\n"))
    assert "unsupported format '.csv'" in message(info)


def test_huge_line_is_refused_without_echoing_it(tmp_path):
    path = write(tmp_path / "pairs.jsonl", rows(PAIR) + '{"prompt": "' + "x" * (17 * 2**20) + '"}\n')
    with pytest.raises(ConfigError) as info:
        load_preferences(path)
    assert "pairs.jsonl:2: the line is longer than 16 MiB" in message(info)


def test_non_utf8_names_the_byte_offset_not_the_content(tmp_path):
    body = rows(*[PAIR] * 2000)
    path = write(tmp_path / "pairs.jsonl", body.encode() + b"\x80oops\n")
    with pytest.raises(ConfigError) as info:
        load_preferences(path)
    assert f"pairs.jsonl:2001: not UTF-8 (byte 0x80 at column 1, byte offset {len(body.encode())}" in message(
        info
    )


def test_ties_are_skipped_and_repeats_warned(tmp_path, caplog):
    path = write(
        tmp_path / "pairs.jsonl", rows(PAIR, {**PAIR, "rejected": "Hi!"}, PAIR, {**PAIR, "prompt": "Other."})
    )
    with caplog.at_level(logging.WARNING, logger="comalkit"):
        records = load_preferences(path)
    assert len(records) == 3
    assert "skipping 1 pair(s) whose chosen is identical to rejected (first: " in caplog.text
    assert "pairs.jsonl:2" in caplog.text and "1 repeated pair(s)" in caplog.text


# ---------------------------------------------------------------------------------------------
# prompt files
# ---------------------------------------------------------------------------------------------
PROMPT_FAULTS = {
    "missing": (None, "p.jsonl", "prompt file not found"),
    "empty": ("", "p.jsonl", "no usable prompts"),
    "invalid JSON on line 3": (
        '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n',
        "p.jsonl",
        "p.jsonl:3: invalid JSON",
    ),
    "non-UTF-8 text file": (b"first\nsecond \xc3\x28\n", "p.txt", "p.txt:2: not UTF-8"),
    "non-UTF-8 JSON array": (b'[\n"a",\n"\xff"\n]', "p.json", "p.json:3: not UTF-8"),
    "wrong role": (rows({"prompt": [{"role": "human", "content": "x"}]}), "p.jsonl", "role 'human'"),
    "multi-turn": (
        rows(
            {
                "prompt": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        ),
        "p.jsonl",
        "multi-turn conversation",
    ),
    "no prompt key": (rows({"question": "x"}), "p.jsonl", "no 'prompt' key"),
    "huge line": ("x" * (17 * 2**20) + "\n", "p.txt", "p.txt:1: the line is longer than 16 MiB"),
}


@pytest.mark.parametrize("fault", list(PROMPT_FAULTS))
def test_bad_prompt_file_is_named(fault, tmp_path):
    content, name, needle = PROMPT_FAULTS[fault]
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(ConfigError) as info:
        read_prompts(path)
    assert needle in message(info)


def test_prompt_directory_that_is_no_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError) as info:
        read_prompts(tmp_path / "d")
    assert "not a directory written by datasets' save_to_disk" in message(info)


def test_duplicate_prompts_are_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="comalkit"):
        loaded = read_prompts(write(tmp_path / "p.txt", "a\nb\na\n"))
    assert loaded.prompts == ["a", "b", "a"] and "1 duplicate prompt(s)" in caplog.text


# ---------------------------------------------------------------------------------------------
# model directories and checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_causal_lm(seed=1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def break_config(d: Path) -> None:
    write(d / "config.json", '{"model_type": "llama",\n "hidden_size": 32,,\n}')


def no_model_type(d: Path) -> None:
    write(d / "config.json", '{"hidden_size": 32}')


def truncate_weights(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def garbage_weights(d: Path) -> None:
    write(d / "model.safetensors", b"\x00garbage" * 64)


def huge_header(d: Path) -> None:
    write(d / "model.safetensors", struct.pack("<Q", 10**12) + b"{}")


def no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def no_tokenizer(d: Path) -> None:
    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "special_tokens_map.json").unlink(missing_ok=True)


MODEL_FAULTS = {
    "corrupt config.json": (break_config, "config.json:2: not valid JSON"),
    "config without model_type": (no_model_type, "no 'model_type'"),
    "truncated safetensors": (truncate_weights, "model.safetensors: truncated"),
    "garbage safetensors": (garbage_weights, "model.safetensors: not a safetensors file"),
    "header larger than the file": (huge_header, "model.safetensors: not a safetensors file"),
    "no weights": (no_weights, "has no weights"),
    "no tokenizer": (no_tokenizer, "its tokenizer could not be loaded"),
}


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
def test_broken_model_directory_is_one_clear_error(fault, saved_tiny, tmp_path):
    breaker, needle = MODEL_FAULTS[fault]
    directory = copy_model(saved_tiny, tmp_path / "m")
    breaker(directory)
    with pytest.raises(ModelError) as info:
        load_causal_lm(directory)
    assert needle in message(info)


def test_missing_and_empty_model_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json \\(the directory is empty\\)"):
        load_causal_lm(tmp_path / "empty")


def test_hf_plugin_needs_a_chat_template(saved_tiny, tmp_path):
    directory = copy_model(saved_tiny, tmp_path / "m")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    write(directory / "tokenizer_config.json", json.dumps(config))
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    load_plugins()
    from comalkit_plugins.models.hf import HFModel

    with pytest.raises(ModelError) as info:
        HFModel(path=str(directory)).load()
    assert "has no chat template" in message(info) and str(directory) in message(info)


def test_model_hf_fault_through_a_job_is_one_line_exit_2(tmp_path):
    code, stderr = failure([*TINY_OFFLINE, "model=hf", f"model.path={tmp_path / 'gone'}"], tmp_path / "run")
    assert code == 2
    assert_one_line(stderr, "gone' does not exist")
    assert_no_results(tmp_path / "run")


def test_lora_checkpoint_refuses_another_base(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    path = LMPolicy(model, tokenizer, lora=LoraSettings(r=2)).save_checkpoint(tmp_path / "ckpt")
    other, _ = tiny_causal_lm(seed=5)  # same architecture, different weights
    with pytest.raises(ModelError, match="was trained on base"):
        LMPolicy.from_checkpoint(path, base=(other, tokenizer))
    wider, _ = tiny_causal_lm(hidden_size=48)
    with pytest.raises(ModelError, match="hidden_size 32 vs 48"):
        LMPolicy.from_checkpoint(path, base=(wider, tokenizer))
    same, _ = tiny_causal_lm(seed=0)
    assert LMPolicy.from_checkpoint(path, base=(same, tokenizer)).lora


def test_lora_checkpoint_without_a_base_record_is_shape_checked(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    path = LMPolicy(model, tokenizer, lora=LoraSettings(r=2)).save_checkpoint(tmp_path / "ckpt")
    (path / "comalkit_base.json").unlink()  # e.g. an adapter trained elsewhere
    wider, _ = tiny_causal_lm(hidden_size=48)
    with pytest.raises(ModelError, match="does not fit this base model"):
        check_adapter_base(path, wider)
    check_adapter_base(path, tiny_causal_lm(seed=3)[0])  # shapes fit: accepted


# ---------------------------------------------------------------------------------------------
# game matrices
# ---------------------------------------------------------------------------------------------
MATRIX_FAULTS = {
    "non-square": ("[[0.5,0.3,0.2],[0.7,0.5,0.1]]", "square"),
    "values outside [0, 1]": ("[[0.5,1.3],[-0.3,0.5]]", "[0, 1]"),
    "P + P^T != 1": ("[[0.5,0.9],[0.9,0.5]]", "1"),
    "not a matrix": ("[0.5,0.5]", "game.matrix"),
    "nan entry": ("[[0.5,NaN],[0.5,0.5]]", "game.matrix"),
}


@pytest.mark.parametrize("fault", list(MATRIX_FAULTS))
def test_bad_game_matrix_is_named(fault):
    spec, needle = MATRIX_FAULTS[fault]
    load_plugins()
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "comalkit_plugins.games.matrix.UserMatrixGame", "matrix": spec})
    with pytest.raises(ConfigError) as info:
        instantiate(node).build()
    assert needle in str(info.value)


def test_missing_matrix_file(tmp_path):
    load_plugins()
    from omegaconf import OmegaConf

    node = OmegaConf.create(
        {"_target_": "comalkit_plugins.games.matrix.UserMatrixGame", "matrix": str(tmp_path / "m.npy")}
    )
    with pytest.raises(ConfigError, match="does not exist"):
        instantiate(node).build()


# ---------------------------------------------------------------------------------------------
# a whole offline job on a bad file
# ---------------------------------------------------------------------------------------------
def test_offline_job_on_a_bad_line_fails_before_writing(tmp_path):
    data = write(tmp_path / "pairs.jsonl", rows(PAIR, PAIR) + "not json\n")
    code, stderr = failure([*TINY_OFFLINE, f"data.path={data}"], tmp_path / "run")
    assert code == 2
    assert_one_line(stderr, f"{data}:3: invalid JSON")
    assert_no_results(tmp_path / "run")
