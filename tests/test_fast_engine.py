"""FastEngine against a loop over batches of one, layer type by layer type (float64)."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpmicroadam.privacy.fast import FastEngine, capture, supports
from dpmicroadam.privacy.fast import engine as engine_module


def ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def seq_ce(outputs, targets):
    return F.cross_entropy(outputs.mean(1), targets, reduction="none")


def reference(model, loss_fn, inputs, targets, clip_norm, augmult, params):
    """Per-example gradients one example at a time, then flat clipping and the sum."""
    sums = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(targets.shape[0]):
        x = inputs[i] if augmult > 1 else inputs[i : i + 1]
        t = targets[i : i + 1].repeat_interleave(augmult, 0)
        loss = loss_fn(model(x), t).sum() / augmult
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = 1.0 if math.isinf(clip_norm) else min(1.0, clip_norm / norm.item())
        for s, g in zip(sums, grads):
            s += factor * g
        norms.append(norm)
    return sums, torch.stack(norms)


def check(model, inputs, targets, loss_fn=ce, augmult=1, clip_norms=(1e-3, 0.5, math.inf)):
    torch.manual_seed(0)
    model = model.double()
    if inputs.is_floating_point():
        inputs = inputs.double()
    engine = FastEngine(model, loss_fn)
    assert engine.params == [p for p in model.parameters() if p.requires_grad]
    # Every layer rule twice: with small conv layers kept (the default), and with the plain
    # memory rule (no small-layer budget), under which the ghost norms of these tiny test
    # layers run.
    for clip_norm, budget in itertools.product(clip_norms, (FastEngine.keep_small_elements, 0)):
        engine.keep_small_elements = budget
        sums, norms = engine.clipped_sum(inputs, targets, clip_norm, augmult=augmult)
        ref_sums, ref_norms = reference(
            model, loss_fn, inputs, targets, clip_norm, augmult, engine.params
        )
        torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
        assert len(sums) == len(engine.params)
        for s, r, p in zip(sums, ref_sums, engine.params):
            assert s.shape == p.shape
            torch.testing.assert_close(s, r, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    engine.keep_small_elements = FastEngine.keep_small_elements
    return engine


def labels(b, classes=3):
    return torch.arange(b) % classes


class Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class WSConv2d(nn.Conv2d):
    """Scaled weight standardization, written independently of dpmicroadam.models."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1) * 1.3)

    def forward(self, x):
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean((1, 2, 3), keepdim=True)
        var = w.var((1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * self.gain / torch.sqrt(torch.clamp(fan_in * var, min=1e-4))
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Scale(nn.Module):
    """A module with its own parameter and no fast rule: goes to the torch.func fallback."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return torch.tanh(x) * self.gain


def test_linear_2d_and_inplace_activation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))
    check(model, torch.randn(5, 6), labels(5))


def test_linear_one_position_with_a_frozen_weight_or_bias():
    """The rank-one path (2-D inputs): weight alone, bias alone, both, no bias, tiny layers."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2, bias=False),
        nn.Tanh(), nn.Linear(2, 3),
    )  # fmt: skip
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    engine = check(model, torch.randn(6, 6), labels(6))
    assert len(engine.params) == 5


def test_linear_3d_ghost_and_instantiated():
    torch.manual_seed(2)
    # (T=2, 8→16) picks the ghost norm; (T=12, 3→4) instantiates.
    check(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)),
        torch.randn(4, 2, 8),
        labels(4),
        loss_fn=seq_ce,
    )
    check(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)),
        torch.randn(4, 12, 3),
        labels(4),
        loss_fn=seq_ce,
    )


def conv1d_net():
    """Two Conv1d layers (stride and padding; groups, dilation and "same"), then a head."""
    model = nn.Sequential(
        nn.Conv1d(4, 6, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(6, 6, 3, groups=2, dilation=2, padding="same"),
        Flatten(),
        nn.LazyLinear(3),
    )
    model(torch.randn(1, 4, 11))
    return model


def test_conv1d():
    torch.manual_seed(3)
    check(conv1d_net(), torch.randn(4, 4, 11), labels(4))


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, padding=1, groups=2, bias=False),
        dict(kernel_size=(3, 2), dilation=2, padding="same", padding_mode="reflect"),
        dict(kernel_size=1),
    ],
)
def test_conv2d(conv):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(4, 6, **conv), nn.Tanh(), Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 7, 6))
    check(model, torch.randn(4, 4, 7, 6), labels(4))


def test_conv_settings_changed_between_calls_are_followed():
    """The engine keeps each conv's geometry between calls; a padding, stride or dilation
    changed between two calls of one engine must still give each example's own gradients."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), Flatten(),
        nn.Linear(6, 3),
    ).double()  # fmt: skip
    engine = FastEngine(model, ce)
    conv = model[0]
    for change in (None, "padding and stride", "dilation"):
        if change == "padding and stride":
            conv.padding, conv.stride = (2, 0), (2, 1)
        elif change == "dilation":
            conv.dilation = (2, 1)
        x, y = torch.randn(4, 4, 7, 6, dtype=torch.float64), labels(4)
        sums, norms = engine.clipped_sum(x, y, 0.5)
        ref_sums, ref_norms = reference(model, ce, x, y, 0.5, 1, engine.params)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
        for s, r in zip(sums, ref_sums):
            torch.testing.assert_close(s, r, rtol=1e-9, atol=1e-12)


def test_weight_standardized_conv_with_augmult():
    torch.manual_seed(5)
    model = nn.Sequential(
        WSConv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.GroupNorm(2, 4),
        WSConv2d(4, 4, 3, stride=2, groups=2),
        nn.Tanh(),
        Flatten(),
        nn.LazyLinear(3),
    )
    model(torch.randn(1, 3, 8, 8))
    check(model, torch.randn(3, 2, 3, 8, 8), labels(3), augmult=2)


@pytest.mark.parametrize("chunk", [None, 1])
def test_embedding_layernorm_with_padding_idx(chunk, monkeypatch):
    from dpmicroadam.privacy.fast import small

    if chunk is not None:
        monkeypatch.setattr(small, "NORM_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(7, 5, padding_idx=0), nn.LayerNorm(5), nn.Linear(5, 3))
    tokens = torch.randint(0, 7, (6, 9))
    check(model, tokens, labels(6), loss_fn=seq_ce)


@pytest.mark.parametrize("chunk", [None, 1, 2 * 3 * 4 * 4 * 4])
def test_groupnorm_and_frozen_layers_with_augmult(chunk, monkeypatch):
    # chunk: the normalized input is formed one example (3 views) at a time, or two at a time
    # (the last chunk of 4 examples then holds two as well).
    from dpmicroadam.privacy.fast import small

    if chunk is not None:
        monkeypatch.setattr(small, "NORM_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        Flatten(),
        nn.LazyLinear(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )
    model(torch.randn(1, 2, 6, 6))
    model[0].weight.requires_grad_(False)
    model[4].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    engine = check(model, torch.randn(4, 3, 2, 6, 6), labels(4), augmult=3)
    assert len(engine.params) == 4


def test_mixed_fast_and_fallback_layers():
    torch.manual_seed(8)
    attn = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Embedding(11, 8), attn, Scale(8), nn.Linear(8, 3))
    assert supports(model)
    check(model, torch.randint(0, 11, (3, 2, 5)), labels(3), loss_fn=seq_ce, augmult=2)


def test_augmult_one_equals_no_view_axis_and_norms_scale():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    engine = FastEngine(model, ce)
    x = torch.randn(6, 4, dtype=torch.float64)
    sums1, norms1 = engine.clipped_sum(x, labels(6), 0.1)
    sums2, norms2 = engine.clipped_sum(x.unsqueeze(1).repeat(1, 2, 1), labels(6), 0.1, augmult=2)
    torch.testing.assert_close(norms1, norms2)
    for a, b in zip(sums1, sums2):
        torch.testing.assert_close(a, b)
    flat = torch.sqrt(sum(s.square().sum() for s in sums1))
    assert flat <= 6 * 0.1 + 1e-12


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float32_matches_float64(layout):
    """In float32, with either input layout (channels-last: the conv's per-example gradients by
    patch products), norms and sums match float64."""
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        Flatten(),
        nn.Linear(8 * 36, 10),
    )
    x, y = torch.randn(8, 3, 6, 6), labels(8, 10)
    x = channels_last(x) if layout == "channels_last" else x
    sums32, norms32 = FastEngine(model, ce).clipped_sum(x, y, 1.0)
    model = model.double()
    sums64, norms64 = FastEngine(model, ce).clipped_sum(x.double(), y, 1.0)
    torch.testing.assert_close(norms32.double(), norms64, rtol=1e-5, atol=1e-6)
    for a, b in zip(sums32, sums64):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_tied_weights_are_refused():
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    assert not supports(model)
    with pytest.raises(ValueError, match="tied"):
        FastEngine(model, seq_ce)


def test_functional_use_of_a_parameter_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(self.a(x) + F.linear(x, self.a.weight))

    engine = FastEngine(Sneaky(), ce)
    with pytest.raises(ValueError, match="a.weight"):
        engine.clipped_sum(torch.randn(3, 4), labels(3), 1.0)


def test_bad_arguments():
    engine = FastEngine(nn.Linear(4, 3), ce)
    x, y = torch.randn(3, 4), labels(3)
    # clip_norm and augmult values are DPConfig's to check (tests/test_mechanism.py).
    with pytest.raises(ValueError, match=r"\(b, 2, \.\.\.\)"):
        engine.clipped_sum(x, y, 1.0, augmult=2)
    with pytest.raises(ValueError, match="per-row"):
        FastEngine(nn.Linear(4, 3), lambda o, t: F.cross_entropy(o, t)).clipped_sum(x, y, 1.0)
    with pytest.raises(ValueError, match="params"):
        FastEngine(nn.Linear(4, 3), ce, params=[nn.Parameter(torch.zeros(2))])


def test_supports_prefers_fast_layers():
    assert supports(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)))
    assert not supports(nn.Sequential(Scale(300), nn.Linear(100, 1)))


class CenteredConv2d(nn.Conv2d):
    """A reparametrization the closed form does not know: the generic Jacobian path."""

    def forward(self, x):
        w = self.weight - self.weight.mean((2, 3), keepdim=True)
        return F.conv2d(x, w * 2.0, self.bias, self.stride, self.padding)


class TwoConv2d(nn.Conv2d):
    """Not a single convolution of its input: goes to torch.func for this module."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1) + 0.5 * F.conv2d(
            x, self.weight, None, padding=1
        )


def test_small_spatial_convs_use_ghost_norm_plain_and_standardized():
    torch.manual_seed(11)
    ws = WSConv2d(8, 16, 3)
    with torch.no_grad():
        ws.weight[0] = 0.5  # a constant channel: the standardization's clamp is active
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.ReLU(),
        ws,
        nn.Tanh(),
        nn.Conv2d(16, 16, 2),
        Flatten(),
        nn.LazyLinear(3),
    )
    model(torch.randn(1, 2, 4, 4))
    check(model, torch.randn(4, 2, 2, 4, 4), labels(4), augmult=2)


def test_other_reparametrized_convs():
    torch.manual_seed(12)
    model = nn.Sequential(
        CenteredConv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        TwoConv2d(4, 4, 3),
        nn.Tanh(),
        Flatten(),
        nn.LazyLinear(3),
    )
    model(torch.randn(1, 3, 5, 5))
    check(model, torch.randn(3, 3, 5, 5), labels(3))


class Reuse(nn.Module):
    """One Linear called twice, a conv whose output is changed in place, an unused branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.shared = nn.Linear(18, 18)
        self.unused = nn.Linear(18, 2)
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        h = torch.relu_(self.conv(x)).flatten(1)
        self.unused(h)
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


def test_reused_module_inplace_output_and_unused_branch():
    torch.manual_seed(13)
    engine = check(Reuse(), torch.randn(4, 2, 6), labels(4))
    model = engine.model
    sums, _ = engine.clipped_sum(torch.randn(4, 2, 6, dtype=torch.float64), labels(4), 1.0)
    unused = [s for s, p in zip(sums, engine.params) if p is model.unused.weight][0]
    assert unused.abs().max() == 0


@pytest.mark.parametrize("case", ["reuse", "sequential", "positions"])
def test_graph_check_names_the_same_sources_as_their_own_walk(case, monkeypatch):
    # check_graph finds the source records in its own walk of the graph; source_records walks
    # from each record's inputs. Both must agree on a reused module, an unused branch (its
    # record is not reached from the loss), a chain, and shared position embeddings.
    torch.manual_seed(21)
    if case == "reuse":
        model, x, y, loss_fn = Reuse(), torch.randn(4, 2, 6), labels(4), ce
    elif case == "sequential":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), Flatten(), nn.Linear(16, 5),
                              nn.Tanh(), nn.Linear(5, 3))  # fmt: skip
        x, y, loss_fn = torch.randn(4, 2, 4, 4), labels(4), ce
    else:
        model, x, y, loss_fn = PositionalEncoder(), torch.randint(0, 9, (4, 6)), labels(4), seq_ce
    seen = []

    def spy(loss, pairs, params, names):
        sources = capture.check_graph(loss, pairs, params, names)
        seen.append((sources, capture.source_records(pairs)))
        return sources

    monkeypatch.setattr(engine_module, "check_graph", spy)
    FastEngine(model, loss_fn).clipped_sum(x, y, 1.0)
    (sources, walked), *_ = seen
    assert sources == walked
    assert any(sources) and not all(sources)  # a chain of recorded calls has both kinds


def test_wide_conv_instantiated_one_example_at_a_time():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(128, 2, 3, padding=1), nn.Tanh(), Flatten(), nn.Linear(18, 3))
    check(model, torch.randn(3, 2, 128, 3, 3), labels(3), augmult=2)


class PositionalEncoder(nn.Module):
    """BERT's embedding layout: position ids are a (1, L) buffer broadcast over the batch."""

    def __init__(self, vocab=9, length=6, dim=5, index_first=False, scale=False):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.register_buffer("position_ids", torch.arange(length)[None, :])
        self.index_first = index_first
        self.scale = scale

    def forward(self, ids):
        pos = self.positions(self.position_ids[:, : ids.shape[1]])
        if self.index_first:
            pos = pos[0]  # (L, dim): broadcasting still works, but rows are no longer examples
        if self.scale:
            pos = pos * 2.0  # rows stay copies: a later op could still mix them
        x = self.tokens(ids)
        x += pos
        return self.head(self.norm(x))


def test_shared_position_embeddings_get_per_example_gradients():
    torch.manual_seed(12)
    model = PositionalEncoder()
    assert supports(model)
    check(model, torch.randint(0, 9, (5, 6)), labels(5), loss_fn=seq_ce)
    check(model, torch.randint(0, 9, (3, 2, 6)), labels(3), loss_fn=seq_ce, augmult=2)


@pytest.mark.parametrize("variant", [{"index_first": True}, {"scale": True}])
def test_shared_output_not_added_to_the_graph_is_refused(variant):
    torch.manual_seed(13)
    engine = FastEngine(PositionalEncoder(**variant), seq_ce)
    with pytest.raises(ValueError, match="positions.*shared by all examples"):
        engine.clipped_sum(torch.randint(0, 9, (4, 6)), labels(4), 1.0)


def test_small_conv_layers_are_kept_within_the_calls_budget(monkeypatch):
    # Conv 16->32, 4x4, stride 2 on 13x13 (the tanh CNN's second conv): its shape favours the
    # ghost norm, and its per-example gradients (8 192 entries each) outweigh its stored input
    # and output gradient (3 504), so the memory rule alone does not keep them. The small-layer
    # budget does: instantiated once, no ghost unfold, and a weighted sum instead of a second
    # kernel; a budget one entry short of the layer falls back to the ghost norm.
    from dpmicroadam.privacy.fast import conv

    calls = {"per_example_any": 0, "unfold": 0, "weight_grad": 0}
    for name in calls:
        original = getattr(conv.ConvCall, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(conv.ConvCall, name, counted)
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), Flatten(), nn.Linear(800, 3))
    b = 4
    layer = b * 32 * 16 * 4 * 4
    for budget, expected in ((layer, (1, 0, 0)), (layer - 1, (0, 1, 1)), (0, (0, 1, 1))):
        calls.update(per_example_any=0, unfold=0, weight_grad=0)
        engine = FastEngine(model.double(), ce)
        engine.keep_small_elements = budget
        engine.verify = False  # its own engine call would add to the counts
        x = torch.randn(b, 16, 13, 13, dtype=torch.float64)
        sums, norms = engine.clipped_sum(x, labels(b), 0.5)
        ref_sums, ref_norms = reference(engine.model, ce, x, labels(b), 0.5, 1, engine.params)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
        for s, r in zip(sums, ref_sums):
            torch.testing.assert_close(s, r, rtol=1e-9, atol=1e-12)
        assert (calls["per_example_any"], calls["unfold"], calls["weight_grad"]) == expected, budget


def test_input_nested_in_a_tuple_changed_in_place_is_caught():
    """A module called with a tuple of tensors: its inputs are version-checked like plain ones."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, xy):
            x, y = xy
            return x * self.w + y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.pair = Pair()

        def forward(self, x):
            z = torch.tanh(x)
            out = self.pair((z, self.lin(x)))
            z.mul_(2.0)  # the pair's stored input is no longer what it saw
            return out

    engine = FastEngine(Net(), ce)
    with pytest.raises(ValueError, match="input of module 'pair' was modified in place"):
        engine.clipped_sum(torch.randn(5, 4), torch.randint(0, 4, (5,)), 1.0)


def test_conv_called_twice_adds_up_both_calls():
    """One Conv2d applied twice per example: its per-example gradients (instantiated, kept or
    ghost) and bias gradients add up the two calls."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.head = nn.Linear(3 * 4 * 4, 3)

        def forward(self, x):
            h = torch.tanh(self.conv(x)) + self.conv(x.flip(-1))
            return self.head(h.flatten(1))

    torch.manual_seed(16)
    check(Twice(), torch.randn(4, 2, 6, 6), labels(4))


# Conv2d geometries every conv norm method is checked on: stride, groups, dilation with
# "same" reflect padding, asymmetric kernels, 1x1.
CONV_GEOMETRIES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding=1, groups=2, bias=False),
    dict(kernel_size=(3, 2), dilation=2, padding="same", padding_mode="reflect"),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0)),
    dict(kernel_size=1),
]


@pytest.fixture
def pixel_ghost(monkeypatch):
    """Forces the pixel ghost norm onto every conv not kept by the small-layer budget (that
    is, under ``check``'s zero budget); counts its calls."""
    from dpmicroadam.privacy.fast import conv

    monkeypatch.setattr(conv, "PIXEL_MARGIN", 0.0)
    monkeypatch.setattr(conv, "KEEP_RATIO", 0.0)
    calls = []
    original = conv._pixel_gram

    def counted(call, *args):
        calls.append(call.weight.shape)
        return original(call, *args)

    monkeypatch.setattr(conv, "_pixel_gram", counted)
    return calls


@pytest.mark.parametrize("conv", CONV_GEOMETRIES)
def test_pixel_ghost_norm_conv2d(conv, pixel_ghost):
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(4, 6, **conv), nn.Tanh(), Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 7, 6))
    check(model, torch.randn(4, 4, 7, 6), labels(4))
    assert pixel_ghost, "the pixel ghost norm never ran"


def test_pixel_ghost_norm_conv1d_and_standardized_with_augmult(pixel_ghost):
    torch.manual_seed(18)
    ws = WSConv2d(4, 4, 3, stride=2, groups=2)
    with torch.no_grad():
        ws.weight[1] = 0.5  # a constant channel: the standardization's clamp is active
    model = nn.Sequential(
        WSConv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        ws,
        nn.Tanh(),
        Flatten(),
        nn.LazyLinear(3),
    )
    model(torch.randn(1, 3, 8, 8))
    check(model, torch.randn(3, 2, 3, 8, 8), labels(3), augmult=2)
    assert {tuple(s) for s in pixel_ghost} == {(4, 3, 3, 3), (4, 2, 3, 3)}
    pixel_ghost.clear()
    check(conv1d_net(), torch.randn(4, 2, 4, 11), labels(4), augmult=2)
    assert len(pixel_ghost) == 2 * 3  # both layers, 3 clip norms, under the zero budget


@pytest.fixture
def unfold_ghost(monkeypatch):
    """Forces the unfolded ghost norm onto every conv not kept by the small-layer budget (that
    is, under ``check``'s zero budget); counts the patches it unfolds."""
    from dpmicroadam.privacy.fast import conv

    monkeypatch.setattr(conv, "norm_method", lambda *args: "ghost")
    monkeypatch.setattr(conv, "KEEP_RATIO", 0.0)
    calls = []
    original = conv.ConvCall.unfold

    def counted(self, x, n, k):
        calls.append((tuple(self.weight.shape), x.stride()))
        return original(self, x, n, k)

    monkeypatch.setattr(conv.ConvCall, "unfold", counted)
    return calls


def channels_last(x):
    """The same values with the channels innermost in memory (the stride of dim -3 is 1)."""
    *lead, c, h, w = x.shape
    return torch.empty((*lead, h, w, c), dtype=x.dtype).movedim(-1, -3).copy_(x)


@pytest.mark.parametrize("conv", CONV_GEOMETRIES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_unfold_ghost_norm_conv2d(conv, layout, unfold_ghost):
    """The patches come from a strided view of the padded input in either layout."""
    torch.manual_seed(27)
    model = nn.Sequential(nn.Conv2d(4, 6, **conv), nn.Tanh(), Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 7, 6))
    x = torch.randn(4, 4, 7, 6)
    check(model, channels_last(x) if layout == "channels_last" else x, labels(4))
    assert unfold_ghost, "the unfolded ghost norm never ran"
    assert all((strides[1] == 1) == (layout == "channels_last") for _, strides in unfold_ghost)


def test_unfold_ghost_norm_conv1d_one_channel_and_augmult(unfold_ghost):
    torch.manual_seed(28)
    check(conv1d_net(), torch.randn(4, 2, 4, 11), labels(4), augmult=2)
    assert len(unfold_ghost) == 2 * 3  # both layers, 3 clip norms, under the zero budget
    unfold_ghost.clear()
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2), Flatten(),
        nn.LazyLinear(3),
    )  # fmt: skip
    model(torch.randn(1, 1, 9, 9))
    x = channels_last(torch.randn(3, 2, 1, 9, 9))  # one channel; views channels-last
    check(model, x, labels(3), augmult=2)
    assert {shape for shape, _ in unfold_ghost} == {(3, 1, 3, 3), (2, 3, 2, 2)}
    unfold_ghost.clear()
    conv = nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2, groups=1)
    model = nn.Sequential(conv, nn.Tanh(), Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 3, 10))
    x = torch.randn(4, 10, 3).transpose(1, 2)  # (N, C, L) with the channels innermost
    check(model, x, labels(4))
    assert unfold_ghost and all(strides[1] == 1 for _, strides in unfold_ghost)


def test_pixel_ghost_norm_chosen_for_few_pixels_and_many_channels():
    from dpmicroadam.privacy.fast.conv import ConvCall, norm_method

    def method(channels, size, views=1, stride=1):
        call = ConvCall.from_module(nn.Conv2d(channels, channels, 3, stride, padding=1))
        out = (size - 1) // stride + 1
        return norm_method(call, views * out * out, views * call.pixels((size, size)), channels)

    # Late layers of wide ResNets: pixel ghost (measured 2-3x faster, see conv.PIXEL_MARGIN).
    assert method(256, 8) == method(512, 7) == method(128, 16) == "pixel"
    # Many pixels and few channels: instantiation; small spatial stride 2: the unfold ghost.
    assert method(64, 32) == method(32, 8) == "instantiate"
    assert method(128, 16, stride=2) == "ghost"
    # Views multiply the pixels: the pixel Gram grows with their square.
    assert method(256, 8, views=16) != "pixel"
    # Several calls of one conv share no single input grid.
    call = ConvCall.from_module(nn.Conv2d(256, 256, 3, padding=1))
    assert norm_method(call, 2 * 64, None, 256) != "pixel"


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, dilation=(2, 1), padding=1),
        dict(kernel_size=(4, 3), stride=(1, 2), padding=(2, 1), padding_mode="reflect"),
        dict(kernel_size=5, stride=2, padding=3, bias=False),
    ],
)
@pytest.mark.parametrize("augmult", [1, 2])
def test_single_input_channel_conv_by_forward_convolution(conv, augmult, monkeypatch):
    """One input channel and a kernel of fewer than 48 taps: per-example gradients by a forward
    conv with the output gradients as kernels (stride and dilation swapped), views as its input
    channels."""
    from dpmicroadam.privacy.fast import conv as rules

    calls = []
    original = rules.ConvCall._single_channel

    def counted(self, *args):
        calls.append(self.weight.shape)
        return original(self, *args)

    monkeypatch.setattr(rules.ConvCall, "_single_channel", counted)
    torch.manual_seed(19)
    model = nn.Sequential(nn.Conv2d(1, 3, **conv), nn.Tanh(), Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 1, 13, 11))
    shape = (4, augmult, 1, 13, 11) if augmult > 1 else (4, 1, 13, 11)
    check(model, torch.randn(shape), labels(4), augmult=augmult)
    assert calls and all(s[1] == 1 for s in calls)
    calls.clear()
    wave = nn.Sequential(nn.Conv1d(1, 4, 5, stride=3, padding=2, dilation=2), Flatten())
    wave.append(nn.LazyLinear(3))
    wave(torch.randn(1, 1, 20))
    check(wave, torch.randn(4, 1, 20), labels(4))
    assert calls


@pytest.fixture
def patch_products(monkeypatch):
    """Counts the calls of the batched-matmul rule (ConvCall._patch_products) by weight shape."""
    from dpmicroadam.privacy.fast import conv

    calls = []
    original = conv.ConvCall._patch_products

    def counted(self, *args):
        calls.append(tuple(self.weight.shape))
        return original(self, *args)

    monkeypatch.setattr(conv.ConvCall, "_patch_products", counted)
    return calls


@pytest.mark.parametrize(
    "channels, conv",
    [
        (1, dict(kernel_size=8, stride=2, padding=3, bias=False)),  # the tanh CNN's first conv
        (4, dict(kernel_size=3, stride=2, dilation=(2, 1), padding=1)),
        (3, dict(kernel_size=(4, 3), stride=(1, 2), padding=(2, 1), padding_mode="reflect")),
    ],
)
@pytest.mark.parametrize("augmult", [1, 2])
def test_ungrouped_conv_on_channels_last_input_by_patch_products(
    channels, conv, augmult, patch_products
):
    """Per-example gradients by one batched matmul of the output gradients with the copied
    patches, kernel-major: their norms, and the kept layer's clipped sums (put back in the
    weight's order), equal the loop's; so do a 1-d conv's."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Conv2d(channels, 5, **conv), nn.Tanh(), Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, channels, 13, 11))
    shape = (4, augmult, channels, 13, 11) if augmult > 1 else (4, channels, 13, 11)
    check(model, channels_last(torch.randn(shape)), labels(4), augmult=augmult)
    assert patch_products and all(s[1] == channels for s in patch_products)
    patch_products.clear()
    wave = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2), nn.Tanh(), Flatten())
    wave.append(nn.LazyLinear(3))
    wave(torch.randn(1, 3, 10))
    check(wave, torch.randn(4, 10, 3).transpose(1, 2), labels(4))  # (N, C, L), channels inner
    assert patch_products and set(patch_products) == {(4, 3, 3)}


def test_patch_products_in_chunks_and_orders(patch_products, monkeypatch):
    """Chunked matmuls give the grouped kernel's per-example gradients; weight_order and
    kernel_order are inverse; grouped convs and NCHW inputs keep the weight's order."""
    from dpmicroadam.privacy.fast import conv as rules

    torch.manual_seed(32)
    layer = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1).double()
    call = rules.ConvCall.from_module(layer)
    x = torch.randn(10, 3, 7, 6, dtype=torch.float64)
    e = torch.randn_like(layer(x))
    expected, major = call.per_example_any(x, e, 10, 1)  # NCHW: grouped kernel
    assert not major and not patch_products
    monkeypatch.setattr(rules, "PATCH_CHUNK_ELEMENTS", 3 * 4 * call.fan_in)  # 3 examples each
    g, major = call.per_example_any(channels_last(x), e, 10, 1)
    assert major and patch_products
    torch.testing.assert_close(call.weight_order(g), expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(g, expected)  # kernel-major rows are another order
    torch.testing.assert_close(call.kernel_order(call.weight_order(g)), g, rtol=0, atol=0)
    torch.testing.assert_close(call.per_example(channels_last(x), e, 10, 1), expected)
    grouped = rules.ConvCall.from_module(nn.Conv2d(4, 4, 3, groups=2).double())
    xg = channels_last(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert not grouped.per_example_any(xg, torch.randn(2, 4, 3, 3, dtype=torch.float64), 2, 1)[1]


def test_chunks_in_different_orders_are_kept_in_the_first_chunks_order(monkeypatch):
    """Chunks of one example each, every other one formed in the weight's order: the kept rows
    all follow the first chunk's order, so norms and clipped sums (plain and standardized) stay
    exact."""
    from dpmicroadam.privacy.fast import conv as rules
    from dpmicroadam.privacy.fast import owner

    original = rules.ConvCall.per_example_any
    calls = []

    def alternating(self, x, e, n, k):
        g, major = original(self, x, e, n, k)
        calls.append(major)
        if major and len(calls) % 2 == 0:
            return self.weight_order(g), False
        return g, major

    monkeypatch.setattr(rules.ConvCall, "per_example_any", alternating)
    monkeypatch.setattr(owner, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(34)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), WSConv2d(4, 4, 3, stride=2), nn.Tanh(),
        Flatten(), nn.LazyLinear(3),
    )  # fmt: skip
    model(torch.randn(1, 3, 8, 8))
    check(model, channels_last(torch.randn(4, 3, 8, 8)), labels(4))
    assert calls.count(True) >= 8  # kernel-major chunks, half of them turned around


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_called_in_both_layouts_and_standardized_channels_last(layout, patch_products):
    """One conv called on a channels-last and on an NCHW input: the rows of the second are put
    in the first one's (kernel-major) order before the two calls are added. Weight-standardized
    convs on channels-last inputs take their direction in the rows' order."""

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.head = nn.Linear(3 * 4 * 4, 3)

        def forward(self, x):
            other = x.contiguous() if layout == "nchw" else x
            return self.head((torch.tanh(self.conv(x)) + self.conv(other.flip(-1))).flatten(1))

    torch.manual_seed(33)
    check(Both(), channels_last(torch.randn(4, 2, 6, 6)), labels(4))
    assert patch_products
    patch_products.clear()
    model = nn.Sequential(
        WSConv2d(3, 4, 3, padding=1), nn.ReLU(), WSConv2d(4, 4, 3, stride=2), nn.Tanh(),
        Flatten(), nn.LazyLinear(3),
    )  # fmt: skip
    model(torch.randn(1, 3, 8, 8))
    check(model, channels_last(torch.randn(3, 2, 3, 8, 8)), labels(3), augmult=2)
    assert patch_products


def test_pixel_ghost_norm_picked_by_cost_float32_matches_float64(monkeypatch):
    """A 64-channel 3x3 conv on 8x8 pixels, not kept: the cost rule itself takes the pixel
    ghost norm (no forcing), and in float32 its norms and sums match float64 (plain and
    weight-standardized)."""
    from dpmicroadam.privacy.fast import conv

    calls = []
    original = conv._pixel_gram
    monkeypatch.setattr(conv, "_pixel_gram", lambda c, *a: calls.append(1) or original(c, *a))
    torch.manual_seed(20)
    for first in (nn.Conv2d(64, 64, 3, padding=1), WSConv2d(64, 64, 3, padding=1)):
        model = nn.Sequential(first, nn.Tanh(), Flatten(), nn.Linear(64 * 64, 10))
        x, y = torch.randn(8, 64, 8, 8), labels(8, 10)
        results = []
        for dtype in (torch.float32, torch.float64):
            engine = FastEngine(model.to(dtype), ce)
            engine.keep_small_elements = 0
            engine.verify = False  # its own engine call would add to the count
            calls.clear()
            results.append(engine.clipped_sum(x.to(dtype), y, 1.0))
            assert calls == [1]
        (sums32, norms32), (sums64, norms64) = results
        torch.testing.assert_close(norms32.double(), norms64, rtol=1e-5, atol=1e-6)
        for a, b in zip(sums32, sums64):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


class PerExampleCalls(nn.Module):
    """Calls its first layer once per example, on that example's unbatched tensor."""

    def __init__(self, first, width):
        super().__init__()
        self.first = first
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.stack([self.first(xi) for xi in x]).flatten(1))


@pytest.mark.parametrize("first", ["ws", "scale"])
def test_fallback_refuses_calls_without_a_batched_input(first):
    """Unbatched calls (one per example) of a module the fallback handles: its output's first
    size (here 4 channels) equals the batch of 4, so splitting it as rows gave wrong norms
    silently (54 % off for the standardized conv); now a clear error."""
    torch.manual_seed(21)
    if first == "ws":
        layer, x = WSConv2d(3, 4, 3, padding=1), torch.randn(4, 3, 5, 5)
    else:
        layer, x = Scale(3), torch.randn(4, 3)
    model = PerExampleCalls(layer, layer(x[0]).numel()).double()
    engine = FastEngine(model, ce)
    with pytest.raises(ValueError, match="'first' was called without a tensor input whose first"):
        engine.clipped_sum(x.double(), labels(4), 1.0)


@pytest.mark.parametrize("examples", [3, 4])
@pytest.mark.parametrize("first", ["embedding", "scale"])
def test_first_call_catches_layers_that_are_not_batch_first(first, examples):
    """Per-example calls whose unbatched size equals the batch pass every shape check (an
    Embedding on 4 tokens, a fallback module on 4 features, batch 4), and the engine's norms
    were wrong without a word; the first call's check now raises. On 3 examples the shapes no
    longer line up and the engine's own checks fail; on 4 they do, and the norms against each
    example's own backward pass differ."""
    torch.manual_seed(22)
    if first == "embedding":
        layer, x = nn.Embedding(10, 4), torch.randint(0, 10, (4, 4))
    else:
        layer, x = Scale(4), torch.randn(4, 4).double()
    model = PerExampleCalls(layer, layer(x[0]).numel()).double()
    engine = FastEngine(model, ce)
    engine.verify = False
    _, norms = engine.clipped_sum(x, labels(4), 1.0)
    _, ref_norms = reference(model, ce, x, labels(4), 1.0, 1, engine.params)
    assert not torch.allclose(norms, ref_norms, rtol=1e-4)  # what went through unchecked
    engine = FastEngine(model, ce)
    engine.verify_examples = examples
    match = "whose first dimension" if examples == 3 else "differs from its own backward pass"
    with pytest.raises(ValueError, match=f"{match}.*some layer does not see batch-first") as err:
        engine.clipped_sum(x, labels(4), 1.0)
    assert not engine._verified
    # The message names no norm (a statistic of a private example): no number with a decimal.
    assert not re.search(r"\d\.\d", str(err.value))


def test_first_call_check_passes_once_restores_modes_and_leaves_rng_and_grads():
    torch.manual_seed(23)
    model = nn.Sequential(
        WSConv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Dropout(0.5), nn.ReLU(),
        Flatten(), nn.Linear(4 * 36, 3),
    )  # fmt: skip
    model[1].eval()  # a mixed mode, restored as it was
    engine = FastEngine(model, ce)
    calls = []
    original = engine.verify_batch_first
    engine.verify_batch_first = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    x, y = torch.randn(5, 2, 3, 6, 6), labels(5)
    engine.clipped_sum(x, y, 1.0, augmult=2)
    assert calls == [3] and engine._verified
    assert model.training and model[2].training and not model[1].training
    state = torch.get_rng_state()
    original(x[:3], y[:3], 2)  # in eval mode: dropout draws nothing
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    engine.clipped_sum(x, y, 1.0, augmult=2)
    assert calls == [3]  # once per engine


def test_first_call_check_with_per_position_targets_and_views():
    """Targets of shape (b, L) (one label per position) with K views: the check's own backward
    pass repeats each example's target rows as the engine does, and passes."""
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def per_position_ce(outputs, targets):  # outputs (N, L, 3), targets (N, L)
        return F.cross_entropy(outputs.mT, targets, reduction="none").mean(1)

    engine = FastEngine(model.double(), per_position_ce)
    x, y = torch.randn(4, 2, 6, 5, dtype=torch.float64), torch.randint(0, 3, (4, 6))
    sums, norms = engine.clipped_sum(x, y, 0.5, augmult=2)
    assert engine._verified
    _, ref_norms = reference(model, per_position_ce, x, y, 0.5, 2, engine.params)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)


def test_first_call_check_does_not_refuse_a_wrn_for_float32_rounding():
    """WRN-16-4 at one initialisation (of 40 tried) where the engine's batched norms and each
    example's own backward pass were 1.3e-4 apart in float32 (GroupNorm before the global
    average pool cancels badly in its backward pass); the check's former 1e-4 refused it at
    the first step of a run."""
    from dpmicroadam.models.factory import build_model
    from dpmicroadam.train.task import image_layout

    torch.manual_seed(3)
    model = build_model("wrn16-4", (3, 32, 32), 10)
    x = image_layout(torch.rand(3, 3, 32, 32) * 2 - 1)
    y = torch.randint(0, 10, (3,))
    engine = FastEngine(model, ce)
    _, norms = engine.clipped_sum(x, y, 1.0)
    assert engine._verified
    direct = torch.stack([engine._direct_norm(x[i], y[i], 1) for i in range(3)])
    gap = ((norms - direct).abs() / (direct + direct.max())).max()
    assert 0 < gap < 1e-3  # rounding apart, not a layout error
