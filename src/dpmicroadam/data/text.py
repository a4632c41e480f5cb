"""Text-classification tables: CSV / JSON-lines loading, column checks, label mapping, encoding.

A table is read into a :class:`TextTable` (texts, optional text pairs, int64 labels and the
label names). Tokenization is not done here: :func:`encode_texts` takes any tokenizer callable
(a Hugging Face tokenizer fits) and packs its output into one int64 tensor
``(N, 2 or 3, L)`` = input_ids, attention_mask[, token_type_ids], whose first dimension indexes
examples, so the Poisson sampler and the per-example engines treat it like any other input.

Privacy note: the set of label values is treated as public (like the number of classes of an
image dataset). Pass ``labels=`` to fix it without reading it off the private data.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TextTable",
    "build_label_mapping",
    "encode_texts",
    "load_text_table",
    "read_records",
]

CSV_SUFFIXES = (".csv", ".tsv")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass
class TextTable:
    """Texts with their labels, read from one file.

    Attributes:
        texts: The text of each row.
        pairs: The second text of each row (sentence-pair tasks), or ``None``.
        labels: int64 tensor (N,) of class indices.
        label_names: ``label_names[i]`` is the original value (as a string) of class i.
        columns: The columns the file has.
        path: Where the table came from.
    """

    texts: list[str]
    pairs: list[str] | None
    labels: torch.Tensor
    label_names: list[str]
    columns: list[str]
    path: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def label_mapping(self) -> dict[str, int]:
        """Original label value -> class index."""
        return {name: i for i, name in enumerate(self.label_names)}


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Read a CSV/TSV file (header row) or a JSON-lines file (one object per line).

    A ``.json`` file may also hold one JSON array of objects.

    Args:
        path: The file; its suffix picks the format (.csv, .tsv, .jsonl, .ndjson, .json).

    Returns:
        ``(records, columns)``: one dict per row and the column names (first-seen order).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: For an unknown suffix, a malformed line, or an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            records = [dict(r) for r in reader]
            columns = list(reader.fieldnames or [])
    elif suffix in JSON_SUFFIXES:
        records = _read_json_records(path)
        columns = []
        for r in records:
            columns.extend(k for k in r if k not in columns)
    else:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}; use one of "
            f"{', '.join(CSV_SUFFIXES + JSON_SUFFIXES)}"
        )
    if not records:
        raise ValueError(f"{str(path)!r} holds no rows")
    return records, columns


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{str(path)!r} line {lineno} is not valid JSON ({err.msg}); "
                    "expected one JSON object per line"
                ) from err
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise ValueError(
            f"{str(path)!r}: row {bad[0] + 1} is a {type(rows[bad[0]]).__name__}, not a JSON "
            "object; expected one object (column -> value) per row"
        )
    return rows


def build_label_mapping(values: Sequence[Any]) -> list[str]:
    """The sorted distinct label values, as strings: class i is ``names[i]``.

    Integer-like values sort numerically (so "2" < "10"), others as strings.
    """
    names = sorted({_label_str(v) for v in values})
    try:
        return sorted(names, key=lambda s: (0, int(s), s))
    except ValueError:
        return names


def _label_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def load_text_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    labels: Sequence[Any] | None = None,
) -> TextTable:
    """Load a text-classification table and map its labels to 0..C-1.

    Args:
        path: CSV/TSV (with a header row) or JSON-lines file.
        text_column: Column with the text.
        label_column: Column with the label (any values; mapped to class indices).
        text_pair_column: Optional column with a second text (sentence-pair tasks).
        labels: The label values in class order. Default: the sorted distinct values found in
            this file. Give the training table's ``label_names`` when loading a test table, so
            both use one mapping.

    Returns:
        A :class:`TextTable`.

    Raises:
        ValueError: If a column is missing (naming the columns the file has), a cell is empty,
            or a label is not in ``labels``.
    """
    records, columns = read_records(path)
    wanted = [("text_column", text_column), ("label_column", label_column)]
    if text_pair_column is not None:
        wanted.append(("text_pair_column", text_pair_column))
    for arg, name in wanted:
        if name not in columns:
            raise ValueError(
                f"{arg}={name!r} is not a column of {str(path)!r}; its columns are "
                f"{columns}. Pass --{arg.replace('_', '-')} with one of them"
            )
    texts = _column(records, text_column, path)
    pairs = _column(records, text_pair_column, path) if text_pair_column else None
    raw = [r.get(label_column) for r in records]
    missing = [i for i, v in enumerate(raw) if v is None or _label_str(v) == ""]
    if missing:
        raise ValueError(
            f"{str(path)!r}: {len(missing)} row(s) have no value in label_column="
            f"{label_column!r} (first: row {missing[0] + 1}); fill or drop them"
        )
    names = build_label_mapping(raw) if labels is None else [_label_str(v) for v in labels]
    if labels is not None and len(set(names)) != len(names):
        raise ValueError(f"labels={list(labels)!r} has duplicates; give each label once")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({_label_str(v) for v in raw} - set(index))
    if unknown:
        raise ValueError(
            f"{str(path)!r} has label values {unknown} that are not in the label mapping "
            f"{names}; the test file must use the training file's labels (or pass labels=)"
        )
    if len(names) < 2:
        raise ValueError(
            f"{str(path)!r}: label_column={label_column!r} has {len(names)} distinct value(s) "
            f"{names}; classification needs at least 2"
        )
    y = torch.tensor([index[_label_str(v)] for v in raw], dtype=torch.int64)
    return TextTable(texts, pairs, y, names, columns, str(path))


def _column(records: list[dict[str, Any]], name: str, path: str | Path) -> list[str]:
    values = [r.get(name) for r in records]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(
            f"{str(path)!r}: {len(missing)} row(s) have no {name!r} value (first: row "
            f"{missing[0] + 1}); fill or drop them"
        )
    return [str(v) for v in values]


def encode_texts(
    tokenizer: Callable[..., Any],
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int = 128,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Tokenize texts into one int64 tensor (N, 2 or 3, L) with L = ``max_length``.

    Channel 0 holds input_ids, 1 attention_mask, 2 token_type_ids (when the tokenizer returns
    them). Every row is padded or truncated to ``max_length`` (a fixed, public length: a length
    read off the private texts would be a data-dependent choice outside the accounting).

    Args:
        tokenizer: Called as ``tokenizer(texts, pairs, padding="max_length", truncation=True,
            max_length=L, return_tensors="pt")`` (a Hugging Face tokenizer), returning a mapping
            with ``input_ids`` and ``attention_mask``.
        texts: First texts.
        pairs: Second texts, or ``None``.
        max_length: L >= 2.
        batch_size: Texts per tokenizer call (memory only).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs; pass one pair per text")
    chunks = []
    for start in range(0, len(texts), batch_size):
        first = list(texts[start : start + batch_size])
        second = list(pairs[start : start + batch_size]) if pairs is not None else None
        enc = tokenizer(
            first,
            second,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        keys = ["input_ids", "attention_mask"]
        if enc.get("token_type_ids") is not None:
            keys.append("token_type_ids")
        chunks.append(torch.stack([torch.as_tensor(enc[k]).long() for k in keys], dim=1))
    if not chunks:
        raise ValueError("no texts to encode")
    out = torch.cat(chunks)
    if out.shape[-1] != max_length:
        raise ValueError(
            f"the tokenizer returned length {out.shape[-1]}, not max_length={max_length}; "
            "it must pad to max_length"
        )
    return out
