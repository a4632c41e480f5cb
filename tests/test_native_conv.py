"""The C kernel for per-example conv weight gradients (dpmicroadam.privacy.fast.native)."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpmicroadam.privacy.fast import FastEngine, native
from dpmicroadam.privacy.fast.conv import ConvCall

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="needs a C compiler")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the kernel's condition


def channels_last(x):
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def per_example_loop(layer, x, e, n, k):
    """G_i by autograd, one example at a time, in float64, rows kernel-major."""
    layer = copy.deepcopy(layer).double()
    out = []
    for i in range(n):
        rows = slice(i * k, (i + 1) * k)
        y = layer(x[rows].double())
        (g,) = torch.autograd.grad((y * e[rows].double()).sum(), layer.weight)
        out.append(g.movedim(1, -1).reshape(g.shape[0], -1))  # (P, kernel..., C) flattened
    return torch.stack(out)


GEOMETRIES = [
    # the tanh CNN's convs, WRN-16-4's 3x3 convs: 8, 32 and 18 vectors of 8 patch entries a row
    (nn.Conv2d(1, 16, 8, stride=2, padding=3), (28, 28)),
    (nn.Conv2d(16, 32, 4, stride=2), (13, 13)),
    (nn.Conv2d(16, 64, 3, padding=1), (9, 7)),
    # strides that skip trailing input rows, unequal strides and kernels, reflect padding
    (nn.Conv2d(8, 8, (3, 2), stride=(2, 3), padding=(1, 0)), (10, 11)),
    (nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect"), (8, 9)),
    (nn.Conv1d(8, 16, 5, stride=2, padding=2), (17,)),
    # rows of 1, 4 and 7 vectors (the tiles of one and of two vectors)
    (nn.Conv2d(8, 4, 1), (5, 6)),
    (nn.Conv2d(8, 8, 2), (5, 5)),
    (nn.Conv2d(56, 12, 1, stride=2), (7, 6)),
]


def test_channels_innermost_is_movedim_then_is_contiguous():
    # The check from sizes and strides alone must say what the view and torch's check say, on
    # every layout: permuted, sliced, with dimensions of size 1, empty, 3-d and 5-d.
    count = 0
    for shape in [(2, 3, 4, 5), (1, 3, 1, 5), (2, 1, 4, 4), (2, 3, 1, 1), (0, 3, 4, 4),
                  (2, 0, 3), (3, 4, 5), (1, 1, 1, 1), (2, 3, 2, 2, 3)]:  # fmt: skip
        base = torch.zeros(shape)
        for perm in itertools.permutations(range(len(shape))):
            inverse = [perm.index(d) for d in range(len(shape))]
            t = base.permute(*perm).contiguous().permute(*inverse)
            views = [t, t[..., ::2], t[:1], t[:, :1]]
            for v in views:
                assert native.channels_innermost(v) == v.movedim(1, -1).is_contiguous(), (
                    shape,
                    perm,
                    v.shape,
                    v.stride(),
                )
                count += 1
    assert count > 700
    assert not native.channels_innermost(torch.zeros(3))


@needs_compiler
@pytest.mark.parametrize("layer, size", GEOMETRIES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("e_layout", ["channels_last", "contiguous", "every_other_channel"])
def test_kernel_gives_each_examples_gradient(layer, size, k, e_layout, monkeypatch):
    """The kernel's G_i (float32) equal each example's own autograd gradient (float64), views
    summed, for every tile and geometry and output gradients in any strides, and the batched
    matmul's."""
    torch.manual_seed(1)
    n = 5
    x = channels_last(torch.randn(n * k, layer.in_channels, *size))
    e = torch.randn_like(layer(x))
    if e_layout == "contiguous":
        e = e.contiguous()
    elif e_layout == "every_other_channel":
        e = torch.randn(e.shape[0], 2 * e.shape[1], *e.shape[2:])[:, ::2]
    call = ConvCall.from_module(layer)
    got = call._native_patch_products(call.prepare(x), e, n, k)
    assert got is not None and got.dtype == torch.float32
    expected = per_example_loop(layer, x, e, n, k)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    # the rows' squared norms, summed by the kernel as it writes them
    sq = torch.zeros(n, e.shape[1])
    again = call._native_patch_products(call.prepare(x), e, n, k, sq)
    assert torch.equal(again, got)
    torch.testing.assert_close(sq.double(), expected.square().sum(-1), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(native, "ENABLED", False)
    matmul, major = call.per_example_any(call.prepare(x), e, n, k)
    assert major or layer.in_channels == 1
    torch.testing.assert_close(got, matmul, rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize(
    "layer, size",
    [
        (nn.Conv2d(1, 16, 8, stride=2, padding=3), (28, 28)),
        (nn.Conv2d(16, 64, 3, padding=1), (9, 7)),
        (nn.Conv2d(8, 8, (3, 2), stride=(2, 3), padding=(1, 0)), (10, 11)),
    ],
)
@pytest.mark.parametrize("k", [1, 3])
def test_padding_in_the_kernel_equals_a_padded_copy(layer, size, k, monkeypatch):
    """The kernel pads each example's views as it goes: rows and squared norms bit for bit those
    of the input padded beforehand, and the layer's own call pads nothing in torch."""
    torch.manual_seed(4)
    n = 4
    x = channels_last(torch.randn(n * k, layer.in_channels, *size))
    e = torch.randn_like(layer(x))
    kernel, stride = tuple(layer.kernel_size), tuple(layer.stride)
    padded = channels_last(F.pad(x, [w for p in reversed(layer.padding) for w in (p, p)]))
    sq_before, sq_in = torch.zeros(n, e.shape[1]), torch.zeros(n, e.shape[1])
    before = native.conv2d_patch_products(padded, e, n, k, kernel, stride, sq_before)
    inside = native.conv2d_patch_products(x, e, n, k, kernel, stride, sq_in, tuple(layer.padding))
    assert before is not None and torch.equal(inside, before) and torch.equal(sq_in, sq_before)
    # a padding that would let a patch run past the padded input is refused
    assert native.conv2d_patch_products(x, e, n, k, kernel, stride, None, (0, 0)) is None
    call = ConvCall.from_module(layer)
    monkeypatch.setattr(ConvCall, "zero_padded", lambda *a: pytest.fail("padded in torch"))
    assert torch.equal(call._native_patch_products(x, e, n, k), before)


@needs_compiler
@pytest.mark.parametrize("shape", [(16, 14, 14), (32, 5, 5), (12, 17)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("e_layout", ["channels_last", "contiguous", "every_other_channel"])
def test_bias_gradients_and_their_squares_added(shape, k, e_layout):
    """``native.bias_grads``: each example's bias gradient (its views' output gradients summed
    over positions) in any strides, 1-d or 2-d, and its squared norm added to what was there."""
    torch.manual_seed(6)
    n = 5
    e = torch.randn(n * k, *shape)
    if e_layout == "channels_last":
        e = e.movedim(1, -1).contiguous().movedim(-1, 1)
    elif e_layout == "every_other_channel":
        e = torch.randn(n * k, 2 * shape[0], *shape[1:])[:, ::2]
    expected = e.double().reshape(n, k, shape[0], -1).sum((1, 3))
    start = torch.randn(n)
    add = start.clone()
    got = native.bias_grads(e, n, k, add)
    assert got is not None and got.shape == (n, shape[0]) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        add.double(), start.double() + expected.square().sum(1), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(native.bias_grads(e, n, k), got)
    assert native.bias_grads(e.double(), n, k) is None  # float32 only
    with pytest.raises(ValueError, match=rf"\({n},\)"):
        native.bias_grads(e, n, k, torch.zeros(n + 1))


@needs_compiler
def test_squared_norms_come_with_the_rows_where_the_kernel_runs(monkeypatch):
    """``ConvCall.per_example_and_sq``: the kernel's rows and their squared norms; where the
    kernel does not run (two torch threads), the same rows and no norms, and the zeros passed
    for them are not written; a wrong buffer is refused, naming the shape it needs."""
    torch.manual_seed(3)
    layer = nn.Conv2d(16, 32, 4, stride=2)
    x = channels_last(torch.randn(6, 16, 13, 13))
    e = torch.randn_like(layer(x))
    call = ConvCall.from_module(layer)
    g, major, sq = call.per_example_and_sq(x, e, 6, 1)
    assert major and sq is not None and sq.shape == (6, 32)
    torch.testing.assert_close(sq, g.square().sum(-1), rtol=1e-5, atol=1e-5)
    torch.set_num_threads(2)
    g2, major2, sq2 = call.per_example_and_sq(x, e, 6, 1)
    assert sq2 is None and major2
    torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-4)
    zeros = torch.zeros(6, 32)
    assert call._native_patch_products(x, e, 6, 1, zeros) is None and not zeros.any()
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match=r"\(6, 32\)"):
        native.conv2d_patch_products(x, e, 6, 1, (4, 4), (2, 2), torch.zeros(6, 31))


@needs_compiler
def test_with_more_torch_threads_the_matmul_runs(monkeypatch):
    """The kernel runs on one thread only: with two torch threads it is not used (and the input
    is not padded for it), and the per-example gradients (the batched matmul's) equal the
    kernel's at one thread."""
    torch.manual_seed(2)
    layer = nn.Conv2d(16, 32, 3, padding=1)
    x = channels_last(torch.randn(7, 16, 12, 12))
    e = torch.randn_like(layer(x))
    call = ConvCall.from_module(layer)
    one = call._native_patch_products(x, e, 7, 1)
    torch.set_num_threads(2)
    with monkeypatch.context() as m:
        m.setattr(ConvCall, "zero_padded", lambda *a: pytest.fail("padded for nothing"))
        assert call._native_patch_products(x, e, 7, 1) is None
    two, major = call.per_example_any(x, e, 7, 1)
    assert major
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-4)


@needs_compiler
@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(3, 6, 3), channels_last(torch.randn(2, 3, 6, 6))),  # no tile divides 6, 9
        (nn.Conv2d(8, 8, 3, dilation=2), channels_last(torch.randn(2, 8, 9, 9))),
        (nn.Conv2d(8, 8, 3).double(), channels_last(torch.randn(2, 8, 6, 6).double())),
    ],
)
def test_layers_the_kernel_does_not_take_get_none(layer, x):
    call = ConvCall.from_module(layer)
    e = torch.randn_like(layer(x))
    assert call._native_patch_products(x, e, 2, 1) is None


@needs_compiler
def test_the_switch_turns_the_kernel_off(monkeypatch):
    """DPMICROADAM_NATIVE=0 at import (ENABLED after it) turns the kernel off."""
    for value, on in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(native.ENV_SWITCH, value)
        assert native._switch() is on
    layer = nn.Conv2d(8, 8, 3)
    x = channels_last(torch.randn(2, 8, 6, 6))
    e = torch.randn_like(layer(x))
    call = ConvCall.from_module(layer)
    assert call._native_patch_products(x, e, 2, 1) is not None
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.status() == "off"
    assert call._native_patch_products(x, e, 2, 1) is None


def tanh_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 10),
    )  # fmt: skip


def reference(model, x, y, clip_norm):
    """Per-example gradients one example at a time (float64), flat clipping, the sum."""
    model = model.double()
    params = list(model.parameters())
    sums, norms = [torch.zeros_like(p) for p in params], []
    for i in range(y.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        norms.append(norm)
        for s, g in zip(sums, grads):
            s += min(1.0, clip_norm / norm) * g
    return sums, torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("native_on", [pytest.param(True, marks=needs_compiler), False])
def test_engine_on_the_tanh_cnn_clips_each_example_with_and_without_the_kernel(
    native_on, monkeypatch
):
    """The fast engine on the tanh CNN (float32, channels-last, both convs taken by the kernel
    when it is on): each example's norm and the clipped sum equal the per-example reference, and
    every example's clipped contribution has norm at most C (its own factor times its norm)."""
    monkeypatch.setattr(native, "ENABLED", native_on)
    calls = []
    real = native.conv2d_patch_products
    monkeypatch.setattr(
        native, "conv2d_patch_products", lambda *a: calls.append(a[0].shape) or real(*a)
    )
    biases, real_bias = [], native.bias_grads
    monkeypatch.setattr(native, "bias_grads", lambda *a: biases.append(real_bias(*a)) or biases[-1])
    torch.manual_seed(3)
    model = tanh_cnn()
    x = channels_last(torch.randn(6, 1, 28, 28))
    y = torch.arange(6) % 10
    engine = FastEngine(model, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    sums, norms = engine.clipped_sum(x, y, 0.5)
    assert len(calls) == (2 if native_on else 0)
    # the convs' bias gradients and their squares from the kernel where it runs
    # (the first call's check of the batch-first layout runs the engine again)
    assert len(biases) in (2, 4) and all((b is not None) == native_on for b in biases)
    ref_sums, ref_norms = reference(copy.deepcopy(model), x, y, 0.5)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-4, atol=1e-6)
    for s, r in zip(sums, ref_sums):
        torch.testing.assert_close(s.double(), r, rtol=1e-4, atol=1e-5)
    factors = torch.clamp(0.5 / ref_norms, max=1.0)
    assert bool((factors * ref_norms <= 0.5 * (1 + 1e-12)).all())


def test_a_failed_build_falls_back_to_the_matmul(monkeypatch, tmp_path):
    """No working compiler: the kernel says why, returns None, and the engine still gives the
    per-example reference (by the batched matmul)."""
    monkeypatch.setenv("DPMICROADAM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_FAILURE", [])
    native._library.cache_clear()
    try:
        layer = nn.Conv2d(8, 8, 3)
        x = channels_last(torch.randn(2, 8, 6, 6))
        e = torch.randn_like(layer(x))
        assert ConvCall.from_module(layer)._native_patch_products(x, e, 2, 1) is None
        assert native.status().startswith("failed: ")
        assert not list(tmp_path.glob("*.so"))
        torch.manual_seed(4)
        model = tanh_cnn()
        xs, ys = channels_last(torch.randn(3, 1, 28, 28)), torch.arange(3)
        engine = FastEngine(model, lambda o, t: F.cross_entropy(o, t, reduction="none"))
        _, norms = engine.clipped_sum(xs, ys, math.inf)
        ref_norms = reference(copy.deepcopy(model), xs, ys, 1.0)[1]
        torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-4, atol=1e-6)
    finally:
        native._library.cache_clear()  # the next use loads the real build again


@needs_compiler
def test_a_build_is_cached_and_reused(monkeypatch, tmp_path):
    """The first use builds one library into the cache; a later process (here: the loader's
    memo cleared) loads it without compiling."""
    monkeypatch.setenv("DPMICROADAM_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_FAILURE", [])
    native._library.cache_clear()
    try:
        assert native._library() is not None and native.status() == "built"
        assert len(list(tmp_path.glob("conv_kernel_*"))) == 1
        native._library.cache_clear()

        def no_compiling(*args, **kwargs):
            raise AssertionError("compiled again")

        monkeypatch.setattr(native.subprocess, "run", no_compiling)
        assert native._library() is not None, native._FAILURE
    finally:
        native._library.cache_clear()


@needs_compiler
def test_an_unusable_cache_builds_in_a_private_folder(monkeypatch, tmp_path):
    """A cache folder that cannot be made (here a file is in the way): the library is built in
    a fresh private folder (mkdtemp: not a shared folder where another user could plant a
    library under the expected name), which is removed once it is loaded; the kernel works."""
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    monkeypatch.setenv("DPMICROADAM_CACHE", str(blocked))
    monkeypatch.setattr(native, "_FAILURE", [])
    native._library.cache_clear()
    try:
        lib = native._library()
        assert lib is not None, native._FAILURE
        where = Path(lib._name)
        assert where.parent.name.startswith("dpmicroadam-") and tmp_path not in where.parents
        assert not where.parent.exists()  # removed once loaded: nothing left behind
        layer = nn.Conv2d(8, 8, 3)
        x = channels_last(torch.randn(2, 8, 6, 6))
        e = torch.randn_like(layer(x))
        got = ConvCall.from_module(layer)._native_patch_products(x, e, 2, 1)
        expected = per_example_loop(layer, x, e, 2, 1)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    finally:
        native._library.cache_clear()


def unfolded_patches(call, x, n, k):
    """Each example's patches (n, groups, T, D) by ``F.unfold`` of the zero-padded input, in
    float64, positions view by view (T = k views × output pixels)."""
    x = F.pad(x.double(), [p for size in reversed(call.padding) for p in (size, size)])
    kernel, stride, dilation = tuple(call.weight.shape[2:]), call.stride, call.dilation
    if call.dims == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (n·k, C·taps, L)
    g, length = call.groups, cols.shape[-1]
    return cols.view(n, k, g, -1, length).permute(0, 2, 1, 4, 3).reshape(n, g, k * length, -1)


PIXEL_GEOMETRIES = [
    # WRN-16-4's stride-1 3x3 conv, stride and kernel unequal, dilation with groups, 1x1, 1-d
    (dict(kernel_size=3, padding=1), (7, 6), 1, 1),
    (dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0)), (10, 11), 3, 1),
    (dict(kernel_size=3, stride=2, dilation=2, padding=2), (9, 9), 2, 2),
    (dict(kernel_size=1), (5, 5), 1, 1),
    (dict(kernel_size=5, stride=2, padding=2), (17,), 2, 1),
]


@pytest.mark.parametrize("native_on", [pytest.param(True, marks=needs_compiler), False])
@pytest.mark.parametrize("conv, size, k, groups", PIXEL_GEOMETRIES)
def test_pixel_gram_matches_the_patches_gram(conv, size, k, groups, native_on, monkeypatch):
    """The pixel ghost norm's patch Gram matrix (the C kernel's sum over kernel offsets, or the
    two passes of strided views) equals that of the unfolded patches, and the kernel ran
    exactly when it was on."""
    from dpmicroadam.privacy.fast import conv as conv_module

    torch.manual_seed(3)
    layer = (nn.Conv1d if len(size) == 1 else nn.Conv2d)(4, 6, groups=groups, **conv)
    call = ConvCall.from_module(layer)
    n = 3
    x = torch.randn(n * k, 4, *size)
    out = layer(x).shape[2:]
    monkeypatch.setattr(native, "ENABLED", native_on)
    ran = []  # per call: whether the kernel computed the Gram matrix
    shift = native.shift_gram

    def recorded(*args):
        gram = shift(*args)
        ran.append(gram is not None)
        return gram

    monkeypatch.setattr(native, "shift_gram", recorded)
    gram, sums = conv_module._pixel_gram(call, call.prepare(x), out, n, k)
    patches = unfolded_patches(call, x, n, k)
    torch.testing.assert_close(gram.double(), patches @ patches.mT, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums.double(), patches.sum(-1, keepdim=True), rtol=1e-5, atol=1e-4)
    assert ran == [native_on]


@needs_compiler
def test_pixel_gram_kernel_declines_what_it_cannot_do(one_thread):
    """float64, a non-contiguous Gram matrix, a patch reading past the pixels, or more than one
    torch thread: None (nothing computed), so the strided views run."""
    square = torch.randn(2, 9, 9)
    args = (1, (3, 3), (1, 1), (3, 3), (1, 1), (1, 1))
    assert native.shift_gram(square, *args) is not None
    assert native.shift_gram(square.double(), *args) is None
    assert native.shift_gram(square.mT, *args) is None
    assert native.shift_gram(square, 1, (3, 3), (2, 1), (3, 3), (1, 1), (1, 1)) is None
    torch.set_num_threads(2)
    assert native.shift_gram(square, *args) is None
