"""Prompt loading, splitting and cycling, and every data error with its message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from comalkit_plugins.data.prompts import BUNDLED_DIR, BundledPrompts, FilePrompts

from comalkit.prompts import PromptDataError, make_splits, prompt_text, read_prompts
from comalkit.registry import registry


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def ten(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(10)])


# -- the bundled set -------------------------------------------------------------------------------
def test_bundled_files_are_diverse_short_and_disjoint():
    parts = sorted(BUNDLED_DIR.glob("*.jsonl"))
    assert [p.name for p in parts] == ["eval.jsonl"] + [f"train_{i}.jsonl" for i in range(6)]
    rows = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts), "a prompt appears twice"
    assert max(map(len, prompts)) < 200
    categories = {r["category"] for r in rows}
    assert {"maths", "coding", "safety", "writing", "facts", "advice"} <= categories
    assert len(categories) >= 10


def test_bundled_default_is_quick_and_covers_the_pool_in_order():
    source = BundledPrompts()
    assert registry.get("data", "bundled") is BundledPrompts
    pool = [
        json.loads(x)["prompt"]
        for i in range(6)
        for x in (BUNDLED_DIR / f"train_{i}.jsonl").read_text().splitlines()
    ]
    size = source.split_size
    assert size == 8  # the default run's 2 rounds x 2 iterations fit in about 8 minutes (docs/online.md)
    assert source.num_splits == 300 // size
    assert source.split(0) == pool[:size] and source.split(1) == pool[size : 2 * size]
    assert source.split(source.num_splits) == source.split(0)


def test_bundled_split_size_50_cycles_the_six_parts_like_comal():
    source = BundledPrompts(split_size=50)
    assert source.num_splits == 6
    parts = [
        [json.loads(x)["prompt"] for x in (BUNDLED_DIR / f"train_{i}.jsonl").read_text().splitlines()]
        for i in range(6)
    ]
    for k in range(13):
        assert source.split(k) == parts[k % 6]
    evaluation = source.eval_prompts()
    assert len(evaluation) == 50
    assert not set(evaluation) & {p for part in parts for p in part}
    assert source.describe() == {
        "num_splits": 6,
        "split_size": 50,
        "train_prompts": 300,
        "eval_prompts": 50,
        "unused_prompts": 0,
    }


def test_bundled_recut_shuffled_is_seeded_and_covers_distinct_prompts():
    a = BundledPrompts(split_size=7, num_splits=4, shuffle=True, seed=3, eval_size=5)
    b = BundledPrompts(split_size=7, num_splits=4, shuffle=True, seed=3, eval_size=5)
    c = BundledPrompts(split_size=7, num_splits=4, shuffle=True, seed=4, eval_size=5)
    assert [a.split(k) for k in range(4)] == [b.split(k) for k in range(4)]
    assert [a.split(k) for k in range(4)] != [c.split(k) for k in range(4)]
    assert a.split(4) == a.split(0)
    seen = [p for k in range(4) for p in a.split(k)]
    assert len(seen) == len(set(seen)) == 28
    assert len(a.eval_prompts()) == 5
    assert a.describe()["unused_prompts"] == 300 - 28


def test_split_index_must_be_a_natural_number():
    source = BundledPrompts()
    with pytest.raises(ValueError, match="split index"):
        source.split(-1)


# -- splitting -----------------------------------------------------------------------------------
def test_make_splits_derives_the_missing_size():
    prompts = [str(i) for i in range(10)]
    splits, unused = make_splits(prompts, split_size=3, num_splits=None, origin="x")
    assert splits == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"]] and unused == 1
    splits, unused = make_splits(prompts, split_size=None, num_splits=2, origin="x")
    assert splits == [["0", "1", "2", "3", "4"], ["5", "6", "7", "8", "9"]] and unused == 0
    splits, unused = make_splits(prompts, split_size=None, num_splits=None, origin="x")
    assert splits == [prompts] and unused == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"split_size": 11, "num_splits": None},
            "split_size=11 but only 10 prompts in data.jsonl: lower data.split_size",
        ),
        (
            {"split_size": None, "num_splits": 12},
            "num_splits=12 but only 10 prompts in data.jsonl: lower data.num_splits",
        ),
        (
            {"split_size": 4, "num_splits": 3},
            "split_size=4 x num_splits=3 needs 12 prompts but data.jsonl has 10",
        ),
        ({"split_size": 0, "num_splits": None}, "data.split_size=0: expected a value >= 1"),
    ],
)
def test_make_splits_errors(kwargs, message):
    with pytest.raises(PromptDataError, match=re.escape(message)):
        make_splits([str(i) for i in range(10)], origin="data.jsonl", **kwargs)


def test_bundled_split_larger_than_the_data_says_what_to_lower():
    with pytest.raises(
        PromptDataError, match=r"split_size=500 but only 300 prompts in the bundled .*lower data.split_size"
    ):
        BundledPrompts(split_size=500)
    with pytest.raises(
        PromptDataError, match=r"eval_size=51 but only 50 prompts in .*eval.jsonl: lower data.eval_size"
    ):
        BundledPrompts(eval_size=51)


# -- any local file ----------------------------------------------------------------------------------
def test_file_source_holds_out_eval_prompts_and_never_trains_on_them(ten: Path):
    source = FilePrompts(path=str(ten), split_size=2, eval_size=3, seed=1)
    assert source.num_splits == 3
    train = {p for k in range(source.num_splits) for p in source.split(k)}
    held = set(source.eval_prompts())
    assert len(held) == 3 and not train & held
    assert len(train | held) == 9  # 10 - 3 held out = 7 -> 3 splits of 2, one unused
    assert source.describe()["unused_prompts"] == 1


def test_file_source_unshuffled_keeps_file_order(ten: Path, tmp_path: Path):
    extra = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "held out A"}, {"prompt": "held out B"}])
    source = FilePrompts(path=str(ten), split_size=5, shuffle=False, eval_path=str(extra))
    assert source.split(0) == [f"question {i}" for i in range(5)]
    assert source.split(3) == [f"question {i}" for i in range(5, 10)]
    assert source.eval_prompts() == ["held out A", "held out B"]
    assert FilePrompts(path=str(ten), split_size=5, eval_path=str(extra), eval_size=1).eval_prompts() == [
        "held out A"
    ]


def test_file_source_without_held_out_prompts_has_an_empty_eval_set(ten: Path):
    assert FilePrompts(path=str(ten), split_size=5).eval_prompts() == []


def test_formats_strings_messages_text_parquet_and_datasets_dir(tmp_path: Path):
    rows = [
        {"instruction": "plain string"},
        {
            "instruction": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": " from messages "},
            ]
        },
        {
            "instruction": [
                {"role": "user", "content": "with its reply"},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {"instruction": "   "},
        {"instruction": None},
    ]
    expected = ["plain string", "from messages", "with its reply"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    loaded = read_prompts(jsonl, field="instruction")
    assert loaded.prompts == expected and loaded.skipped_empty == 2
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows))
    assert read_prompts(array, field="instruction").prompts == expected
    text = tmp_path / "a.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(text).prompts == ["first prompt", "second prompt"]
    bare = write_jsonl(tmp_path / "bare.jsonl", ["just a string"])
    assert read_prompts(bare).prompts == ["just a string"]

    import datasets

    data = datasets.Dataset.from_list([{"prompt": "p1", "other": 1}, {"prompt": "p2", "other": 2}])
    data.to_parquet(str(tmp_path / "a.parquet"))
    assert read_prompts(tmp_path / "a.parquet").prompts == ["p1", "p2"]
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert read_prompts(tmp_path / "dict").prompts == ["p1", "p2"]
    assert read_prompts(tmp_path / "dict", dataset_split="test").prompts == ["p1"]
    data.save_to_disk(str(tmp_path / "single"))
    assert FilePrompts(path=str(tmp_path / "single"), split_size=1, shuffle=False).split(1) == ["p2"]


# -- bad input: each error names the file (and line) and what to change -----------------------------
def bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_with_no_usable_prompts(tmp_path: Path):
    empty = bad(tmp_path, "empty.jsonl", "\n\n")
    with pytest.raises(
        PromptDataError, match=rf"no usable prompts in {re.escape(str(empty))}: the file holds no rows"
    ):
        read_prompts(empty)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": ""}, {"prompt": "  "}])
    with pytest.raises(
        PromptDataError, match=rf"no usable prompts in {re.escape(str(blank))}: all 2 rows are empty"
    ):
        FilePrompts(path=str(blank))


def test_bad_lines_name_file_and_line(tmp_path: Path):
    broken = bad(tmp_path, "broken.jsonl", '{"prompt": "ok"}\n\n{"prompt": "oops"\n')
    with pytest.raises(PromptDataError, match=rf"{re.escape(str(broken))}:3: invalid JSON"):
        read_prompts(broken)
    wrong_key = write_jsonl(tmp_path / "key.jsonl", [{"prompt": "ok"}, {"question": "q", "id": 2}])
    with pytest.raises(
        PromptDataError, match=r"key.jsonl:2: no 'prompt' key \(keys: question, id\); set data.field"
    ):
        read_prompts(wrong_key)
    wrong_type = write_jsonl(tmp_path / "type.jsonl", [{"prompt": 42}])
    with pytest.raises(
        PromptDataError, match=r"type.jsonl:1: 'prompt' must be a string or a list of chat messages"
    ):
        read_prompts(wrong_type)
    not_object = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(
        PromptDataError, match=r"list.jsonl:1: expected an object with a 'prompt' key or a string, got list"
    ):
        read_prompts(not_object)
    number_row = bad(tmp_path, "num.jsonl", "7\n")
    with pytest.raises(PromptDataError, match=r"num.jsonl:1: expected an object with a 'prompt' key"):
        read_prompts(number_row)
    array = bad(tmp_path, "arr.json", '[{"prompt": "a"},\n {"prompt": ]')
    with pytest.raises(PromptDataError, match=r"arr.json:2: invalid JSON"):
        read_prompts(array)


def test_multi_turn_conversations_are_rejected(tmp_path: Path):
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": turns}])
    with pytest.raises(
        PromptDataError, match=r"chat.jsonl:1: 'prompt' is a multi-turn conversation .* single user turn"
    ):
        read_prompts(path)
    assert prompt_text([{"role": "system", "content": "only a system message"}], "x") is None


def test_missing_unsupported_and_wrong_columns(tmp_path: Path):
    with pytest.raises(
        PromptDataError,
        match=r"prompt file not found: .*nowhere.jsonl \(the directory .* does not exist either\)",
    ):
        read_prompts(tmp_path / "missing" / "nowhere.jsonl")
    with pytest.raises(PromptDataError, match=r"unsupported format '.csv'"):
        read_prompts(bad(tmp_path, "a.csv", "prompt\nx\n"))
    with pytest.raises(PromptDataError, match=r"data=prompts needs a file: set data.path"):
        FilePrompts()

    import datasets

    data = datasets.Dataset.from_list([{"text": "p"}])
    data.to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(
        PromptDataError, match=r"t.parquet: no 'prompt' column \(columns: text\); set data.field"
    ):
        read_prompts(tmp_path / "t.parquet")
    with pytest.raises(PromptDataError, match=r"could not be read as parquet"):
        read_prompts(bad(tmp_path, "junk.parquet", "not parquet"))
    datasets.DatasetDict({"validation": data}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        PromptDataError, match=r"no split 'train' \(splits: validation\); set data.dataset_split"
    ):
        read_prompts(tmp_path / "dd")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(
        PromptDataError, match=r"plain_dir: not a directory written by datasets' save_to_disk"
    ):
        read_prompts(tmp_path / "plain_dir")


def test_file_split_and_eval_size_errors(ten: Path):
    with pytest.raises(
        PromptDataError, match=r"split_size=50 but only 10 prompts in .*p.jsonl: lower data.split_size"
    ):
        FilePrompts(path=str(ten))
    with pytest.raises(
        PromptDataError, match=r"split_size=8 but only 7 prompts in .*p.jsonl after holding out 3"
    ):
        FilePrompts(path=str(ten), split_size=8, eval_size=3)
    with pytest.raises(
        PromptDataError,
        match=r"eval_size=10 but only 10 prompts .* lower data.eval_size or give data.eval_path",
    ):
        FilePrompts(path=str(ten), split_size=1, eval_size=10)
