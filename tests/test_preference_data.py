"""Loading preference files: TRL's formats, the shipped sample set, and errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comalkit_plugins.data.preferences import SAMPLE_HELDOUT, SAMPLE_TRAIN, PreferenceFile

from comalkit.preference_data import PreferenceDataError, load_preferences, split_records

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
    {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Go away."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_format_jsonl(tmp_path: Path) -> None:
    records = load_preferences(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert records == ROWS


def test_conversational_format_explicit_and_implicit_prompt(tmp_path: Path) -> None:
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    explicit = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    implicit = {
        "chosen": user + [{"role": "assistant", "content": "4"}],
        "rejected": user + [{"role": "assistant", "content": "5"}],
    }
    for row in (explicit, implicit):
        (record,) = load_preferences(write_jsonl(tmp_path / "c.jsonl", [row]))
        assert record == {"prompt": user, "chosen": "4", "rejected": "5"}


def test_soft_win_probabilities_and_json_array(tmp_path: Path) -> None:
    rows = [dict(r, chosen_winprob=0.75, rejected_winprob=0.25) for r in ROWS]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    records = load_preferences(path)
    assert [r["chosen_winprob"] for r in records] == [0.75] * 3
    assert [r["rejected_winprob"] for r in records] == [0.25] * 3


def test_parquet_through_datasets(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_preferences(path) == ROWS
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{"prompt": "x", "chosen": "y"}]).to_parquet(str(bad))
    with pytest.raises(PreferenceDataError, match=r"bad\.parquet: row 0: missing key\(s\) \['rejected'\]"):
        load_preferences(bad)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PreferenceDataError, match=r"preference file not found: .*nowhere\.jsonl"):
        load_preferences(tmp_path / "nowhere.jsonl")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": "y",\n' + json.dumps(ROWS[1]) + "\n"
    )
    with pytest.raises(PreferenceDataError, match=r"pairs\.jsonl:3: invalid JSON"):
        load_preferences(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "x", "chosen": "y"}, r"p\.jsonl:2: missing key\(s\) \['rejected'\]"),
        ({"chosen": "y", "rejected": "z"}, r"p\.jsonl:2: missing key\(s\) \['prompt'\]"),
        (["x", "y", "z"], r"p\.jsonl:2: expected a JSON object"),
        ({"prompt": "", "chosen": "y", "rejected": "z"}, r"p\.jsonl:2: 'prompt' is empty"),
        (
            {"prompt": "x", "chosen": "y", "rejected": "z", "chosen_winprob": 0.7},
            r"p\.jsonl:2: 'chosen_winprob' is given without",
        ),
        (
            {"prompt": "x", "chosen": "y", "rejected": "z", "chosen_winprob": 1.5, "rejected_winprob": 0.1},
            r"p\.jsonl:2: 'chosen_winprob' must be a probability",
        ),
        ({"prompt": "x", "chosen": 3, "rejected": "z"}, r"p\.jsonl:2: 'chosen' must be a string"),
    ],
)
def test_bad_row_names_file_line_and_key(tmp_path: Path, row: object, message: str) -> None:
    with pytest.raises(PreferenceDataError, match=message):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [ROWS[0], row]))


def test_mixed_formats_and_multi_message_responses(tmp_path: Path) -> None:
    conversational = {"prompt": [{"role": "user", "content": "x"}], "chosen": "y", "rejected": "z"}
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:2: the row mixes formats with .*p\.jsonl:1"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [ROWS[0], conversational]))
    two = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    row = {"prompt": [{"role": "user", "content": "x"}], "chosen": two, "rejected": two}
    with pytest.raises(
        PreferenceDataError, match=r"q\.jsonl:1: 'chosen' must hold exactly one assistant message"
    ):
        load_preferences(write_jsonl(tmp_path / "q.jsonl", [row]))


def test_empty_dataset_and_unknown_format(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(PreferenceDataError, match=r"empty\.jsonl: no preference pairs"):
        load_preferences(empty)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match=r"p\.csv: unsupported format '\.csv'"):
        load_preferences(csv)


def test_split_is_seeded_disjoint_and_complete() -> None:
    records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    train, held = split_records(records, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["prompt"] for r in train + held) == sorted(r["prompt"] for r in records)
    assert split_records(records, 0.25, seed=3) == (train, held)
    assert split_records(records, 0.25, seed=4)[1] != held
    with pytest.raises(PreferenceDataError, match="cannot split 1"):
        split_records(records[:1], 0.5)


def test_shipped_sample_pairs() -> None:
    train, held = load_preferences(SAMPLE_TRAIN), load_preferences(SAMPLE_HELDOUT)
    assert (len(train), len(held)) == (129, 40)
    assert all(r["chosen"] != r["rejected"] for r in train + held)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held out means unseen prompts


def test_data_plugin_sources(tmp_path: Path) -> None:
    sample = PreferenceFile()
    assert (len(sample.train_records), len(sample.eval_records)) == (129, 40)
    path = write_jsonl(tmp_path / "p.jsonl", ROWS * 4)
    split = PreferenceFile(path=str(path), eval_fraction=0.25)
    assert (len(split.train_records), len(split.eval_records)) == (9, 3)
    separate = PreferenceFile(path=str(path), eval_path=str(SAMPLE_HELDOUT), limit=5, eval_limit=2)
    assert (len(separate.train_records), len(separate.eval_records)) == (5, 2)
    assert PreferenceFile(path=str(path), eval_fraction=0.0).eval_records == []
    assert separate.describe()["train"] == {"pairs": 5, "with_winprobs": 0}
