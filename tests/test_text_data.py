"""Text tables: CSV / JSON-lines reading, column checks, label mapping, encoding."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from dpmicroadam.data.text import (
    build_label_mapping,
    encode_texts,
    load_text_table,
    read_records,
)


def write_csv(path, rows, header=("sentence", "sentiment", "other")):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


ROWS = [("good film", "pos", "a"), ("bad film", "neg", "b"), ("fine, ok", "pos", "c")]


def test_csv_and_jsonl_give_the_same_table(tmp_path):
    a = load_text_table(write_csv(tmp_path / "t.csv", ROWS), "sentence", "sentiment")
    jl = tmp_path / "t.jsonl"
    jl.write_text(
        "".join(json.dumps(dict(zip(("sentence", "sentiment"), r[:2]))) + "\n" for r in ROWS)
    )
    b = load_text_table(jl, "sentence", "sentiment")
    assert a.texts == b.texts == ["good film", "bad film", "fine, ok"]
    assert a.label_names == b.label_names == ["neg", "pos"]
    assert a.labels.tolist() == b.labels.tolist() == [1, 0, 1]
    assert a.labels.dtype == torch.int64
    assert a.pairs is None and a.num_classes == 2
    assert a.label_mapping == {"neg": 0, "pos": 1}


def test_tsv_and_json_array(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\nhello\t1\nbye\t0\n")
    t = load_text_table(tsv)
    assert t.texts == ["hello", "bye"] and t.labels.tolist() == [1, 0]
    arr = tmp_path / "t.json"
    arr.write_text(json.dumps([{"text": "x", "label": 3}, {"text": "y", "label": 10}]))
    t = load_text_table(arr)
    assert t.label_names == ["3", "10"]  # numeric order, not string order
    assert t.labels.tolist() == [0, 1]


def test_missing_column_names_the_columns_that_exist(tmp_path):
    path = write_csv(tmp_path / "t.csv", ROWS)
    with pytest.raises(
        ValueError, match=r"text_column='text'.*\['sentence', 'sentiment', 'other'\]"
    ):
        load_text_table(path, "text", "sentiment")
    with pytest.raises(ValueError, match=r"label_column='y'.*'sentence'"):
        load_text_table(path, "sentence", "y")
    with pytest.raises(ValueError, match=r"text_pair_column='q'"):
        load_text_table(path, "sentence", "sentiment", text_pair_column="q")


def test_text_pairs(tmp_path):
    t = load_text_table(write_csv(tmp_path / "t.csv", ROWS), "sentence", "sentiment", "other")
    assert t.pairs == ["a", "b", "c"]


def test_given_labels_fix_the_order_and_refuse_unknown_values(tmp_path):
    path = write_csv(tmp_path / "t.csv", ROWS)
    t = load_text_table(path, "sentence", "sentiment", labels=["pos", "neg"])
    assert t.labels.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"\['pos'\].*not in the label mapping \['neg'\]"):
        load_text_table(path, "sentence", "sentiment", labels=["neg"])
    with pytest.raises(ValueError, match="duplicates"):
        load_text_table(path, "sentence", "sentiment", labels=["neg", "neg", "pos"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "nope.csv")
    (tmp_path / "t.txt").write_text("a")
    with pytest.raises(ValueError, match="suffix '.txt'"):
        read_records(tmp_path / "t.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        read_records(tmp_path / "empty.csv")
    one = write_csv(tmp_path / "one.csv", [("a", "x", "")] * 2)
    with pytest.raises(ValueError, match="at least 2"):
        load_text_table(one, "sentence", "sentiment")
    (tmp_path / "gap.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="no value in label_column='label'.*row 2"):
        load_text_table(tmp_path / "gap.jsonl")


def test_build_label_mapping():
    assert build_label_mapping([2, 10, 1, 2]) == ["1", "2", "10"]
    assert build_label_mapping([1.0, 0.0]) == ["0", "1"]
    assert build_label_mapping(["b", "a", "b"]) == ["a", "b"]
    assert build_label_mapping([True, False]) == ["false", "true"]


class FakeTokenizer:
    """Whitespace tokenizer with the Hugging Face call signature."""

    def __init__(self, with_types: bool):
        self.with_types = with_types
        self.calls = 0

    def __call__(self, texts, pairs, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        self.calls += 1
        ids, mask, types = [], [], []
        for i, t in enumerate(texts):
            a = [len(w) for w in t.split()]
            b = [len(w) for w in pairs[i].split()] if pairs is not None else []
            row = ([101, *a, 102] + ([*b, 102] if pairs is not None else []))[:max_length]
            kind = ([0] * (len(a) + 2) + [1] * (len(b) + 1 if pairs is not None else 0))[
                :max_length
            ]
            pad = max_length - len(row)
            ids.append(row + [0] * pad)
            mask.append([1] * len(row) + [0] * pad)
            types.append(kind + [0] * pad)
        out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if self.with_types:
            out["token_type_ids"] = torch.tensor(types)
        return out


def test_encode_texts_packs_channels():
    tok = FakeTokenizer(with_types=True)
    x = encode_texts(tok, ["ab c", "d"], ["eee", "ff gg"], max_length=6)
    assert x.shape == (2, 3, 6) and x.dtype == torch.int64
    assert x[0, 0].tolist() == [101, 2, 1, 102, 3, 102]
    assert x[1, 1].tolist() == [1, 1, 1, 1, 1, 1]
    assert x[0, 2].tolist() == [0, 0, 0, 0, 1, 1]
    x2 = encode_texts(FakeTokenizer(with_types=False), ["ab c", "d"], max_length=5)
    assert x2.shape == (2, 2, 5)
    assert x2[1, 0].tolist() == [101, 1, 102, 0, 0]
    assert x2[1, 1].tolist() == [1, 1, 1, 0, 0]


def test_encode_texts_chunks_and_errors():
    tok = FakeTokenizer(with_types=False)
    texts = [f"w{i} x" for i in range(7)]
    whole = encode_texts(tok, texts, max_length=4)
    tok2 = FakeTokenizer(with_types=False)
    chunked = encode_texts(tok2, texts, max_length=4, batch_size=3)
    assert tok2.calls == 3 and torch.equal(whole, chunked)
    with pytest.raises(ValueError, match="max_length"):
        encode_texts(tok, texts, max_length=1)
    with pytest.raises(ValueError, match="one pair per text"):
        encode_texts(tok, texts, ["a"], max_length=4)
