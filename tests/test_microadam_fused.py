"""implementation="fused": the C++ step against the eager one, its checks, and its fallback."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from dpmicroadam.cli import main
from dpmicroadam.optim import MicroAdam, fused
from dpmicroadam.optim.topk import make_layout
from dpmicroadam.train.checkpoint import load_checkpoint
from test_microadam_packed import overflow_changes_no_state, save_load_continue

# Whole blocks, blocks plus a tail, tail only, one block; odd and partial buckets (7, 129 and
# 300 entries); a 0-d tensor.
SHAPES = [(3, 256), (40, 16), (6, 32), (256,), (2, 5, 64), (7,), (129,), (10, 30), ()]
HYPER = dict(lr=0.02, window_size=3, density=0.05, topk_block_size=256, quant_bucket_size=64)


@pytest.fixture(scope="module")
def built():
    """The extension, built once (skipped only where no C++ toolchain exists at all)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: implementation='fused' falls back")
    assert fused.available(), fused.build_failure()


def _run(implementation, steps=8, value_dtype=torch.bfloat16, weight_decay=0.0, seed=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = MicroAdam(
        params,
        implementation=implementation,
        value_dtype=value_dtype,
        weight_decay=weight_decay,
        **HYPER,
    )
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen)
            if i == 2 and step == 4:  # no gradient: left out of that step
                p.grad = None
        opt.step()
    return params, opt


def _assert_same_state(p, state_a, state_b):
    """The same error feedback bit for bit, and the same window: every slot holds the same
    (position, value) pairs, in whatever order."""
    assert state_a.keys() == state_b.keys()
    offsets = make_layout(p.numel(), HYPER["density"], HYPER["topk_block_size"]).column_offsets()
    for key in state_a:
        if key in ("indices", "values"):
            orders = [(s["indices"].long() + offsets).sort(1).indices for s in (state_a, state_b)]
            for k in ("indices", "values"):
                a, b = (s[k].gather(1, o) for s, o in zip((state_a, state_b), orders))
                assert torch.equal(a, b), k
            continue
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_matches_the_eager_step(built, value_dtype, weight_decay):
    kw = dict(value_dtype=value_dtype, weight_decay=weight_decay)
    fast, opt_f = _run("fast", **kw)
    joined, opt_j = _run("fused", **kw)
    for a, b in zip(fast, joined):
        # the error feedback and the window bit for bit; the parameters to rounding (the
        # square root: torch's float32 CPU kernel can be one unit in the last place off)
        _assert_same_state(a, opt_f.state[a], opt_j.state[b])
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a.detach(), torch.zeros_like(a))


def test_every_tensor_of_the_default_config_takes_one_fused_call(built, monkeypatch):
    calls = []
    real = fused.finish
    monkeypatch.setattr(fused, "finish", lambda f: calls.append(len(f.params)) or real(f))
    _run("fused", steps=2)
    assert calls == [len(SHAPES), len(SHAPES)]


def test_the_fused_selection_is_a_top_k_under_ties(built):
    # gradients of magnitude 0, 1 or 2 only: many ties at the k-th magnitude
    gen = torch.Generator().manual_seed(1)
    p = torch.zeros(4096, requires_grad=True)
    opt = MicroAdam([p], implementation="fused", **HYPER)
    g = torch.randint(-2, 3, (4096,), generator=gen).float()
    p.grad = g.clone()
    opt.step()
    idx = opt.state[p]["indices"][0].long().view(16, -1)  # 16 blocks of 256, 13 kept each
    blocks = g.abs().view(16, 256)
    kept = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, idx, True)
    assert int(kept.sum()) == 16 * 13  # no position twice
    assert bool((blocks.masked_fill(~kept, float("inf")).amin(1)
                 >= blocks.masked_fill(kept, -1.0).amax(1)).all())  # fmt: skip
    values = opt.state[p]["values"][0].float().view(16, -1)
    assert torch.equal(values, g.view(16, 256).gather(1, idx))


def test_a_nan_gradient_changes_no_state_even_at_the_first_step(built):
    params = [torch.randn(300, requires_grad=True), torch.randn(50, dtype=torch.float64)]
    params[1].requires_grad_()  # float64: not fused, stepped by the eager path
    opt = MicroAdam(params, implementation="fused", **HYPER)
    params[0].grad, params[1].grad = torch.randn(300), torch.randn(50, dtype=torch.float64)
    params[0].grad[17] = float("nan")
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*NaN or inf; no state"):
        opt.step()
    assert not opt.state  # nothing was created
    params[0].grad[17] = 0.0
    opt.step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    values = [p.detach().clone() for p in params]
    params[0].grad[3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step()
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
        for k, x in before[p].items():
            assert torch.equal(opt.state[p][k], x), k


def test_fused_overflow_names_the_member_and_changes_no_state(built):
    overflow_changes_no_state(implementation="fused")


def test_fused_save_load_continue_is_bit_identical_and_mixes_with_fast(built):
    fused_kw = dict(HYPER, implementation="fused")
    for first_impl in ("fused", "fast"):  # a "fast" state continues under "fused" too
        first_kw = dict(HYPER, implementation=first_impl)
        straight, opt, resumed, opt_b = save_load_continue(SHAPES, fused_kw, first_kw, fused_kw)
        for p, q in zip(straight, resumed):
            if first_impl == "fused":
                assert torch.equal(p, q)
                for key, value in opt.state[p].items():
                    assert torch.equal(opt_b.state[q][key], value), key
            else:
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
                _assert_same_state(p, opt.state[p], opt_b.state[q])


def test_a_failed_build_warns_once_and_steps_eagerly(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp, "load", broken)
    monkeypatch.setattr(fused, "_FAILURE", [])
    fused._extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            joined, opt_j = _run("fused", steps=4)
        fast, opt_f = _run("fast", steps=4)
        found = [w for w in caught if "building the C++ step failed" in str(w.message)]
        assert len(found) == 1 and "Ninja is required" in str(found[0].message)
        assert fused.build_failure().startswith("RuntimeError: Ninja is required")
        for a, b in zip(fast, joined):
            assert torch.equal(a, b)
    finally:
        fused._extension.cache_clear()  # the next use builds (loads) the real one again


def test_a_state_that_does_not_fit_is_refused_not_read_out_of_bounds(built):
    p = torch.randn(300, requires_grad=True)
    opt = MicroAdam([p], implementation="fused", **HYPER)
    p.grad = torch.randn(300)
    opt.step()
    opt.state[p]["ef_max"] = opt.state[p]["ef_max"][:-1].clone()  # one bucket short
    with pytest.raises(RuntimeError, match="bucket maxima of tensor 0 should be"):
        opt.step()


def _train(out, implementation, capsys):
    argv = [
        "train", "--dataset", "digits", "--model", "mlp", "--optimizer", "dp-microadam",
        "--steps", "4", "--batch-size", "64", "--noise-multiplier", "1", "--noise-seed", "5",
        "--no-progress", "--json", "--out", str(out), "--microadam-implementation", implementation,
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    return load_checkpoint(out / "checkpoint.pt")["model"]


def test_train_takes_the_fused_step_from_the_command_line(built, tmp_path, monkeypatch, capsys):
    """`dpmicroadam train --microadam-implementation fused` runs MicroAdam's C++ step (each of
    the 4 steps goes through fused.front) and records the choice in config.json; with the same
    seeds its weights agree with the default step's to float rounding (the two differ only in
    rounding and in how ties at the k-th magnitude are broken)."""
    calls = []
    front = fused.front
    monkeypatch.setattr(fused, "front", lambda *args: calls.append(1) or front(*args))
    weights = _train(tmp_path / "fused", "fused", capsys)
    assert len(calls) == 4
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["microadam_implementation"] == "fused"
    default = _train(tmp_path / "fast", "fast", capsys)
    assert len(calls) == 4  # the default step does not touch the extension
    for name, value in default.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)


def test_train_refuses_an_unknown_microadam_implementation(capsys):
    assert main(["train", "--microadam-implementation", "cuda-kernels"]) == 2
    err = capsys.readouterr().err
    assert "--microadam-implementation 'cuda-kernels' is unknown" in err and "fused" in err, err
