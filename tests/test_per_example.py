"""Per-example gradients of the vmap engine equal a loop over batches of one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpmicroadam.privacy import ClippedSumEngine, VmapEngine, check_per_example_safe, make_engine
from privacy_models import CASES, BNNet, TinyAttention, make_case, per_row_ce

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def loop_grads(model, params, x, y, augmult):
    """Reference: one backward per example, loss = mean over its K views."""
    out = [[] for _ in params]
    for i in range(y.shape[0]):
        views = x[i] if augmult > 1 else x[i : i + 1]
        model.zero_grad()
        per_row_ce(model(views), y[i].expand(augmult)).mean().backward()
        for j, p in enumerate(params):
            out[j].append(p.grad.clone())
    return [torch.stack(g) for g in out]


@pytest.mark.parametrize("augmult", [1, 3])
@pytest.mark.parametrize("name", CASES)
def test_per_example_grads_equal_loop(name, augmult):
    model, x, y = make_case(name, b=5, augmult=augmult)
    engine = VmapEngine(model, per_row_ce)
    got = engine.per_example_grads(x, y, augmult=augmult)
    want = loop_grads(model, engine.params, x, y, augmult)
    assert len(got) == len(want) == len(list(model.parameters()))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # Examples really differ: a mix-up of examples would not pass the comparison above.
    assert not torch.allclose(got[-1][0], got[-1][1])


def test_frozen_params_are_constants_and_excluded():
    model, x, y = make_case("cnn", b=4)
    model.conv1.weight.requires_grad_(False)
    model.gn.bias.requires_grad_(False)
    engine = VmapEngine(model, per_row_ce)
    assert "conv1.weight" not in engine.names and "gn.bias" not in engine.names
    assert all(p.requires_grad for p in engine.params)
    assert len(engine.params) == len(list(model.parameters())) - 2
    got = engine.per_example_grads(x, y)
    for g, w in zip(got, loop_grads(model, engine.params, x, y, 1)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_params_subset_and_bad_params():
    model, x, y = make_case("mlp", b=3)
    engine = VmapEngine(model, per_row_ce, params=[model.fc2.weight])
    assert engine.names == ["fc2.weight"]
    (g,) = engine.per_example_grads(x, y)
    torch.testing.assert_close(g, loop_grads(model, [model.fc2.weight], x, y, 1)[0])
    with pytest.raises(ValueError, match="not parameters of the model"):
        VmapEngine(model, per_row_ce, params=[nn.Parameter(torch.zeros(2))])
    model.fc1.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="fc1.bias"):
        VmapEngine(model, per_row_ce, params=[model.fc1.bias])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        VmapEngine(model, per_row_ce)


def test_augmult_is_mean_of_view_gradients():
    model, x, y = make_case("wscnn", b=4, augmult=3)
    engine = VmapEngine(model, per_row_ce)
    with_views = engine.per_example_grads(x, y, augmult=3)
    flat = engine.per_example_grads(x.flatten(0, 1), y.repeat_interleave(3))
    for g, f in zip(with_views, flat):
        torch.testing.assert_close(g, f.reshape(4, 3, *f.shape[1:]).mean(1))


def test_augmult_one_equals_no_augmult():
    model, x, y = make_case("cnn", b=4)
    engine = VmapEngine(model, per_row_ce)
    plain = engine.clipped_sum(x, y, clip_norm=0.05)
    one = engine.clipped_sum(x, y, clip_norm=0.05, augmult=1)
    copies = engine.clipped_sum(x.unsqueeze(1).expand(4, 3, *x.shape[1:]), y, 0.05, augmult=3)
    for a, b, c in zip(plain[0], one[0], copies[0]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)
    torch.testing.assert_close(plain[1], copies[1])


def test_position_ids_buffer_and_dict_inputs():
    model, x, y = make_case("attention", b=3)
    assert model.position_ids.shape == (1, 6)  # broadcast buffer, not per-example
    engine = VmapEngine(model, per_row_ce)
    as_dict = engine.per_example_grads({"ids": x}, y)
    as_tuple = engine.per_example_grads((x,), y)
    for a, b, w in zip(as_dict, as_tuple, loop_grads(model, engine.params, x, y, 1)):
        torch.testing.assert_close(a, w)
        torch.testing.assert_close(b, w)


def test_empty_micro_batch_gives_zero_sums():
    model, x, y = make_case("mlp", b=3)
    engine = VmapEngine(model, per_row_ce)
    sums, norms = engine.clipped_sum(x[:0], y[:0], clip_norm=1.0)
    assert norms.shape == (0,)
    assert [s.shape for s in sums] == [p.shape for p in engine.params]
    assert all(torch.count_nonzero(s) == 0 for s in sums)


def test_dropout_must_be_off():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    engine = VmapEngine(model, per_row_ce)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"1 \(Dropout\)"):
        engine.per_example_grads(x, y)
    model[1].eval()
    assert engine.per_example_grads(x, y)[0].shape == (3, 4, 4)


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, training=True))


def test_functional_randomness_refused():
    engine = VmapEngine(FunctionalDropout(), per_row_ce)
    with pytest.raises(ValueError, match="draws random numbers"):
        engine.per_example_grads(torch.randn(3, 4), torch.tensor([0, 1, 0]))


def test_bad_inputs():
    model, x, y = make_case("mlp", b=3, augmult=2)
    engine = VmapEngine(model, per_row_ce)
    with pytest.raises(ValueError, match=r"augmult=3 inputs must have shape \(b, 3"):
        engine.clipped_sum(x, y, 1.0, augmult=3)
    # Bad clip_norm / augmult values are DPConfig's to refuse (tests/test_mechanism.py): the
    # engines trust the values they are given.

    def mean_loss(out, t):
        return F.cross_entropy(out, t)

    with pytest.raises(ValueError, match="reduction='none'"):
        VmapEngine(model, mean_loss).per_example_grads(x, y, augmult=2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        VmapEngine(model, "ce")


def test_batchnorm_refused_with_module_named():
    with pytest.raises(ValueError) as err:
        check_per_example_safe(BNNet())
    msg = str(err.value)
    assert "layer1.0.1 (BatchNorm2d)" in msg
    assert "GroupNorm" in msg and "dpmicroadam.models.replace_batchnorm" in msg
    with pytest.raises(ValueError, match=r"layer1.0.1 \(BatchNorm2d\)"):
        VmapEngine(BNNet(), per_row_ce)
    for kind in ("auto", "vmap", "fast"):
        with pytest.raises(ValueError, match=r"layer1.0.1 \(BatchNorm2d\)"):
            make_engine(BNNet(), per_row_ce, kind=kind)


@pytest.mark.parametrize(
    "module, bad",
    [
        (nn.BatchNorm1d(3), True),
        (nn.BatchNorm3d(3, track_running_stats=False), True),
        (nn.SyncBatchNorm(3), True),
        (nn.InstanceNorm2d(3, track_running_stats=True), True),
        (nn.InstanceNorm2d(3), False),
        (nn.GroupNorm(1, 3), False),
        (nn.LayerNorm(3), False),
    ],
)
def test_check_table(module, bad):
    model = nn.Sequential(nn.Linear(3, 3), module)
    if bad:
        with pytest.raises(ValueError, match=rf"1 \({type(module).__name__}\)"):
            check_per_example_safe(model)
    else:
        check_per_example_safe(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        check_per_example_safe("model")


def test_make_engine_kinds():
    model, x, y = make_case("cnn", b=4)
    vm = make_engine(model, per_row_ce, kind="vmap")
    assert isinstance(vm, VmapEngine) and isinstance(vm, ClippedSumEngine)
    auto = make_engine(model, per_row_ce)
    assert isinstance(auto, ClippedSumEngine)
    for a, b in zip(auto.clipped_sum(x, y, 0.1)[0], vm.clipped_sum(x, y, 0.1)[0]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="kind must be one of .* got 'jax'"):
        make_engine(model, per_row_ce, kind="jax")


def test_make_engine_fast_missing(monkeypatch):
    import dpmicroadam.privacy.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_fast_module", lambda: None)
    model = TinyAttention().double()
    with pytest.raises(ValueError, match="fast hooks engine .* not available"):
        make_engine(model, per_row_ce, kind="fast")
    assert isinstance(make_engine(model, per_row_ce, kind="auto"), VmapEngine)
