"""Conv1d / Conv2d: per-example weight gradients, their norms, and clipped sums.

A convolution is a Linear layer over the unfolded input (im2col): each output position t is
W_g · patch_t for each group g, so the per-example weight gradient is G_i = Σ_t e_{i,t} a_{i,t}ᵀ
over positions t = K views × output pixels. Its squared norm is taken, per output channel,

* by the ghost norm: ‖G_{i,o}‖² = Σ_{s,t} (a_s·a_t) e_{s,o} e_{t,o} (unfolded patches),
* by the pixel ghost norm: the same sum, with the patch Gram matrix a_s·a_t = Σ_δ x_{s+δ}·x_{t+δ}
  built from the Gram matrix of the (padded) input pixels, shifted by each kernel offset δ: no
  unfold, and less work where the input has few pixels and many channels (late layers), or
* by instantiation: G_i for all i at once, then squared: for an ungrouped conv on a
  channels-last input, one batched matmul of each example's output gradients with its patches
  (copied from a strided view of the input, kernel offsets outer and channels inner); for
  others, the native weight-gradient kernel run with one group per example (no unfold),

whichever costs least for the layer's shape (:func:`norm_method`). The clipped sum
Σ_i c_i G_i is the native weight-gradient kernel on output gradients scaled by c_i, or a
weighted sum of the instantiated G_i when they are kept: when keeping them costs no more memory
than the inputs, or when they are small (the call's share of ``KEEP_SMALL_ELEMENTS``). A kept
layer is always instantiated: the weighted sum saves the second kernel the ghost norm needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .linear import use_ghost
from .owner import KEEP_RATIO, KeepBudget, Owner, add_up, cat, chunks, weighted_sum

# Fan-in (C/groups · kernel) from which per-example weight gradients are formed one example at
# a time rather than by a single grouped call (measured on CPU: 3×3 convs with 128 or more
# input channels).
GROUPED_MAX_FAN_IN = 1024

# The pixel ghost norm is chosen only when its counted cost is at most 1/PIXEL_MARGIN of the
# cheaper other method: its shifted additions are memory-bound, and on small layers its fixed
# costs dominate. An addition of the shifted Gram matrices is counted as PIXEL_ADD_COST
# multiply-adds. Measured on CPU (1 thread, 64 examples, channel_stats): 3x3 convs with 256
# channels on 8x8 pixels 33.7 -> 11.5 ms, 128 on 16x16 (counted 1.56x cheaper) 64 -> 50 ms,
# 512 on 4x4 (1.63x) 11.8 -> 4.4 ms; 32 on 8x8 (counted equal) 1.2 ms instantiated, 3.1 ms
# as pixels.
PIXEL_MARGIN = 1.5
PIXEL_ADD_COST = 4

# Patch entries per batched matmul in ConvCall._patch_products (4 MiB of float32): measured on
# CPU (1 thread, ad hoc), a 3x3 conv 128 -> 128 on 16x16 pixels (32 examples) took 32 ms in
# chunks of 2**20 and 2**18 entries against 37 ms for the grouped kernel; unchunked, the patches
# of a 32 -> 32 conv on 32x32 pixels (64 examples, 75 MB) took 63 ms against 20 ms.
PATCH_CHUNK_ELEMENTS = 2**20

# One input channel: per-example gradients from patches (a batched matmul) rather than by a
# forward convolution only for kernels of at least this many taps, where the matmul's rows are
# long enough. Measured (1 thread, 16 output channels, interleaved medians, ad hoc): 8x8 and
# 7x7 stride 2 kernels 0.82-0.92x and 0.79-0.89x the time, 6x6 0.95-1.07x, 5x5 stride 1 1.17x,
# 3x3 1.5-1.66x.
SINGLE_CHANNEL_PATCH_MIN_FAN_IN = 48

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _channels_last(x: torch.Tensor, dims: int) -> bool:
    """Whether a (N, C, *spatial) tensor holds its channels innermost, contiguously."""
    return x.dim() == dims + 2 and native.channels_innermost(x)


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


@dataclass
class ConvCall:
    """The geometry of one convolution call, padding made explicit."""

    dims: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pre_pad: list[int] | None = None
    pad_mode: str = "constant"

    @classmethod
    def from_module(cls, m: nn.Module) -> ConvCall:
        """The call a stock ``nn.Conv1d``/``nn.Conv2d`` makes."""
        dims = m.weight.dim() - 2
        call = cls(
            dims, m.weight, m.bias, _tuple(m.stride, dims), (0,) * dims,
            _tuple(m.dilation, dims), m.groups,
        )  # fmt: skip
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            call.pre_pad = _pad_widths(m, dims)
            call.pad_mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        else:
            call.padding = _tuple(m.padding, dims)
        return call

    @classmethod
    def from_args(cls, dims: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ConvCall]:
        """``(input, call)`` from the arguments of a ``conv1d``/``conv2d`` call."""
        spec = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        spec.update(zip(_CONV_ARGS, args))
        spec.update(kwargs)
        weight = spec["weight"]
        dilation = _tuple(spec["dilation"], dims)
        call = cls(
            dims, weight, spec["bias"], _tuple(spec["stride"], dims), (0,) * dims, dilation,
            int(spec["groups"]),
        )  # fmt: skip
        padding = spec["padding"]
        if padding == "same":
            pads = []
            for kernel, dil in zip(reversed(weight.shape[2:]), reversed(dilation)):
                total = dil * (kernel - 1)
                pads += [total // 2, total - total // 2]
            call.pre_pad = pads
        elif padding != "valid":
            call.padding = _tuple(padding, dims)
        return spec["input"], call

    def pixels(self, spatial, prepared: bool = True) -> int:
        """Input pixels per example and call once padded: of a prepared input (``pre_pad``
        applied) or, with ``prepared`` False, of the module's raw input."""
        extra = [2 * p for p in self.padding]
        if self.pre_pad and not prepared:
            for d in range(self.dims):  # F.pad widths: (left, right) pairs, last dimension first
                j = 2 * (self.dims - 1 - d)
                extra[d] += self.pre_pad[j] + self.pre_pad[j + 1]
        return math.prod(int(size) + e for size, e in zip(spatial, extra, strict=True))

    @property
    def fan_in(self) -> int:
        """D: inputs per output channel (C/groups · kernel)."""
        return math.prod(self.weight.shape[1:])  # from the sizes: weight[0] would be a torch op

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it (explicit padding applied)."""
        x = x.detach()
        return F.pad(x, self.pre_pad, mode=self.pad_mode) if self.pre_pad else x

    def zero_padded(self, x: torch.Tensor) -> torch.Tensor:
        """A prepared input with the conv's own zero ``padding`` applied explicitly."""
        if not any(self.padding):
            return x
        return F.pad(x, [w for p in reversed(self.padding) for w in (p, p)])

    def unfold(self, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Prepared input (n·k, C, *spatial) → patches (n, groups, k·L, D).

        Only the patches' Gram matrices and sums are taken, for which the order of a patch's D
        entries does not matter. A channels-last input's patches are copied from a strided view
        of it, padded, kernel offset by kernel offset with the channels innermost (contiguous
        runs): on the tanh CNN's second conv (16 channels, 4×4, 13×13 pixels, 256 examples,
        1 thread, ad hoc) 0.54 ms against 3.07 ms for ``F.unfold`` (im2col). Other inputs go
        through ``F.unfold``, channel-major like the weight: for WRN-16-4's stride-2 3×3 conv
        on a contiguous input, a strided view (channel-major, or after a transpose) was no
        faster or 2x slower (ad hoc).
        """
        if _channels_last(x, self.dims):
            return self._strided_patches(x, n, k)
        kernel, stride, padding, dilation = (
            tuple(self.weight.shape[2:]), self.stride, self.padding, self.dilation,
        )  # fmt: skip
        if self.dims == 1:
            x = x.unsqueeze(2)
            kernel, stride = (1, kernel[0]), (1, stride[0])
            padding, dilation = (0, padding[0]), (1, dilation[0])
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        length = cols.shape[-1]
        cols = cols.view(n, k, self.groups, self.fan_in, length).permute(0, 2, 1, 4, 3)
        return cols.reshape(n, self.groups, k * length, self.fan_in)

    def padded_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`zero_padded`, channels-last (as ``x`` was; F.pad may return another layout)."""
        x = self.zero_padded(x)
        return x if _channels_last(x, self.dims) else x.movedim(1, -1).contiguous().movedim(-1, 1)

    def _strided_patches(self, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """:meth:`unfold` of a channels-last input: (kernel offsets, channels) per patch."""
        x = self.padded_channels_last(x)
        dims, kernel, st = range(self.dims), tuple(self.weight.shape[2:]), x.stride()
        out = [
            (x.shape[2 + j] - self.dilation[j] * (kernel[j] - 1) - 1) // self.stride[j] + 1
            for j in dims
        ]
        per = x.shape[1] // self.groups
        view = x.as_strided(
            (n, self.groups, k, *out, *kernel, per),
            (k * st[0], per * st[1], st[0], *(self.stride[j] * st[2 + j] for j in dims),
             *(self.dilation[j] * st[2 + j] for j in dims), st[1]),
            x.storage_offset(),
        )  # fmt: skip
        return view.reshape(n, self.groups, k * math.prod(out), self.fan_in)

    def out_rows(self, e: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Output gradients (n·k, P, *spatial) → (n, groups, k·L, P/groups)."""
        per = e.shape[1] // self.groups
        e = e.reshape(n, k, self.groups, per, -1).permute(0, 2, 1, 4, 3)
        return e.reshape(n, self.groups, -1, per)

    def _backward(self, e, x, weight_shape, groups):
        return torch.ops.aten.convolution_backward(
            e, x, x.new_empty(weight_shape), None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0] * self.dims, groups, [False, True, False],
        )[1]  # fmt: skip

    def weight_grad(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Weight gradient summed over all rows (x prepared)."""
        return self._backward(e, x, self.weight.shape, self.groups)

    def per_example(self, x: torch.Tensor, e: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Per-example weight gradients (n, P, D), views summed over each example's k rows, each
        row's D entries in the weight's order (input channels, then kernel offsets)."""
        g, kernel_major = self.per_example_any(x, e, n, k)
        return self.reorder(g, kernel_major, False)

    def per_example_any(
        self, x: torch.Tensor, e: torch.Tensor, n: int, k: int
    ) -> tuple[torch.Tensor, bool]:
        """``(G, kernel_major)``: per-example weight gradients (n, P, D) in whichever order of
        a row's D entries is cheaper to form; ``kernel_major`` says they run kernel offset by
        kernel offset with the input channels innermost (:meth:`weight_order` converts).

        On the CPU (the only device it was measured on), an ungrouped conv on a channels-last
        input (with one input channel, any input is) takes :meth:`_patch_products`: the C kernel
        of :mod:`.native`, or one batched matmul of each example's output gradients with its
        patches, copied from a strided view of the input; unless it has one input channel and a
        kernel of fewer than SINGLE_CHANNEL_PATCH_MIN_FAN_IN taps: those take a forward
        convolution (:meth:`_single_channel`). Other convs take one grouped kernel call
        (a group per example), or one ordinary call per example for wide layers, where the
        grouped kernel runs far slower per flop on CPU.
        """
        per = self.weight.shape[1]
        if self._patch_rule(x):
            return self._patch_products(x, e, n, k), per > 1
        if self.groups == 1 and self.weight.shape[1] == 1:
            return self._single_channel(x, e, n, k), False
        if self.fan_in >= GROUPED_MAX_FAN_IN:
            out = x.new_empty((n, self.weight.shape[0], self.fan_in))
            for i in range(n):
                rows = slice(i * k, (i + 1) * k)
                out[i] = self.weight_grad(x[rows], e[rows]).reshape(out.shape[1:])
            return out, False
        if k > 1:
            x = x.reshape(n, k, *x.shape[1:]).transpose(0, 1)
            e = e.reshape(n, k, *e.shape[1:]).transpose(0, 1)
        x = x.reshape(k, n * x.shape[-self.dims - 1], *x.shape[-self.dims :])
        e = e.reshape(k, n * e.shape[-self.dims - 1], *e.shape[-self.dims :])
        shape = (n * self.weight.shape[0], *self.weight.shape[1:])
        g = self._backward(e, x, shape, n * self.groups).reshape(n, self.weight.shape[0], -1)
        return g, False

    def _patch_rule(self, x: torch.Tensor) -> bool:
        """Whether :meth:`per_example_any` takes :meth:`_patch_products` for input ``x``."""
        return (
            self.groups == 1
            and x.device.type == "cpu"
            and (self.weight.shape[1] > 1 or self.fan_in >= SINGLE_CHANNEL_PATCH_MIN_FAN_IN)
            and _channels_last(x, self.dims)
        )

    def per_example_and_sq(
        self, x: torch.Tensor, e: torch.Tensor, n: int, k: int
    ) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        """:meth:`per_example_any`, and the rows' squared norms (n, P) where the C kernel of
        :mod:`.native` forms the rows and sums their squares as it goes (else None: square
        the rows). On the tanh CNN (1 thread, 64 examples) that saves a pass over the 2 MB of
        per-example gradients of its second conv: its private step 0.7 % faster, median of 40
        interleaved pairs on a noisy machine (ad hoc)."""
        if self._patch_rule(x):
            sq = x.new_zeros((n, self.weight.shape[0]))
            g = self._native_patch_products(x, e, n, k, sq)
            if g is not None:
                return g, self.weight.shape[1] > 1, sq
        g, kernel_major = self.per_example_any(x, e, n, k)
        return g, kernel_major, None

    def _patch_products(self, x: torch.Tensor, e: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """G_i = Σ_t e_{i,t} a_{i,t}ᵀ of an ungrouped conv on a channels-last input, (n, P, D)
        kernel-major: one batched matmul (n, P, k·L) @ (n, k·L, D) per group of examples whose
        patches hold at most PATCH_CHUNK_ELEMENTS entries.

        On the tanh CNN (1 thread, 64 examples, interleaved medians, ad hoc): its second conv
        (16 -> 32, 4x4) 0.45 against 0.75 ms for the grouped weight-gradient kernel, its first
        (1 -> 16, 8x8) 0.85 against 1.08 ms for :meth:`_single_channel`; 3 -> 32 3x3 on 32x32
        pixels 5.2 against 7.8 ms. Putting the result in the weight's order would cost as much
        again (0.32 ms on the second conv), so the callers that only need norms and sums of
        the rows take it as it is.
        """
        g = self._native_patch_products(x, e, n, k)
        if g is not None:
            return g
        o = self.out_rows(e, n, k)[:, 0]  # (n, k·L, P), a view of a channels-last e
        out = x.new_empty((n, self.weight.shape[0], self.fan_in))
        step = max(1, PATCH_CHUNK_ELEMENTS // max(1, o.shape[1] * self.fan_in))
        for start in range(0, n, step):
            stop = min(n, start + step)
            patches = self._strided_patches(x[start * k : stop * k], stop - start, k)[:, 0]
            torch.bmm(o[start:stop].mT, patches, out=out[start:stop])
        return out

    def _native_patch_products(
        self, x: torch.Tensor, e: torch.Tensor, n: int, k: int, sq: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """:meth:`_patch_products` by the C kernel of :mod:`.native` (no patches copied, and the
        conv's zero padding added by the kernel as it goes), or None where it does not apply
        (dilation, sizes no tile divides, more than one torch thread, not float32 on the CPU, no
        compiler); checked before anything is copied for it.
        ``sq``: (n, P) zeros that receive the rows' squared norms (see the kernel)."""
        out_channels, per, width = self.weight.shape[0], self.weight.shape[1], self.weight.shape[-1]
        if (
            any(d != 1 for d in self.dilation)
            or not native.usable(x)
            or not native.takes(out_channels, width * per)
        ):
            return None
        padding = self.padding
        if not _channels_last(x, self.dims):
            x, padding = self.padded_channels_last(x), (0,) * self.dims
        kernel, stride = tuple(self.weight.shape[2:]), self.stride
        if self.dims == 1:  # as a 2-d conv over one row
            x, e, kernel, stride = x.unsqueeze(2), e.unsqueeze(2), (1, *kernel), (1, *stride)
            padding = (0, *padding)
        return native.conv2d_patch_products(x, e, n, k, kernel, stride, sq, padding)

    def reorder(self, t: torch.Tensor, kernel_major: bool, to_kernel_major: bool) -> torch.Tensor:
        """Rows (..., D) from one order of their entries to the other (or as they are)."""
        if kernel_major == to_kernel_major:
            return t
        return self.kernel_order(t) if to_kernel_major else self.weight_order(t)

    def weight_order(self, t: torch.Tensor) -> torch.Tensor:
        """Kernel-major rows (..., D) in the weight's order (channels, then kernel offsets)."""
        per, kernel = self.weight.shape[1], tuple(self.weight.shape[2:])
        if per == 1:
            return t
        lead = t.shape[:-1]
        return t.reshape(*lead, *kernel, per).movedim(-1, len(lead)).reshape(*lead, -1)

    def kernel_order(self, t: torch.Tensor) -> torch.Tensor:
        """Rows (..., D) in the weight's order made kernel-major (the inverse of
        :meth:`weight_order`)."""
        per, kernel = self.weight.shape[1], tuple(self.weight.shape[2:])
        if per == 1:
            return t
        lead = t.shape[:-1]
        return t.reshape(*lead, per, *kernel).movedim(len(lead), -1).reshape(*lead, -1)

    def _single_channel(self, x: torch.Tensor, e: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Per-example weight gradients of a conv with one input channel, (n, P, kernel).

        G_{i,o}[δ] = Σ_{views, t} e_{i,o}[t] · x_i[stride·t + dilation·δ] is a forward
        convolution of the padded input, an example's views as its channels, with the output
        gradients as kernels: stride and dilation swap roles, one group per example. On the tanh
        CNN's first layer (1→16, 8x8, stride 2; 64 examples) 0.93 ms against 1.29 ms for the
        grouped weight-gradient kernel (ad hoc, 1 thread).
        """
        x = self.zero_padded(x)
        out_ch, spatial = e.shape[1], e.shape[2:]
        kernels = e.reshape(n, k, out_ch, *spatial).transpose(1, 2).reshape(n * out_ch, k, *spatial)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        g = conv(
            x.reshape(1, n * k, *x.shape[2:]), kernels, stride=self.dilation,
            dilation=self.stride, groups=n,
        )  # fmt: skip
        index = (0, slice(None), *(slice(0, size) for size in self.weight.shape[2:]))
        return g[index].reshape(n, out_ch, -1)


def norm_method(call: ConvCall, positions: int, pixels: int | None, d_out: int) -> str:
    """``"ghost"``, ``"pixel"`` or ``"instantiate"``: the cheapest way to the norms of a layer.

    Args:
        call: The convolution.
        positions: T = K views × output pixels of all recorded calls, per example.
        pixels: K views × padded input pixels when there is one recorded call (the pixel ghost
            norm needs one input grid), else None.
        d_out: Output channels per group.
    """
    d_in = call.fan_in
    instantiate = positions * d_in * d_out
    ghost = positions * positions * (d_in + d_out)
    best = "ghost" if use_ghost(positions, d_in, d_out) else "instantiate"
    if pixels is not None:
        offsets = math.prod(call.weight.shape[2:])
        channels = d_in // offsets
        pixel = pixels * pixels * channels + positions * positions * (
            PIXEL_ADD_COST * offsets + d_out
        )
        if PIXEL_MARGIN * pixel <= min(instantiate, ghost):
            return "pixel"
    return best


def channel_stats(
    call: ConvCall,
    xs: list[torch.Tensor],
    es: list[torch.Tensor],
    b: int,
    k: int,
    keep: bool,
    direction: torch.Tensor | None = None,
    totals: bool = False,
) -> dict[str, Any]:
    """Per-example, per-output-channel statistics of the weight gradients G_i.

    Args:
        call: The convolution.
        xs, es: Prepared inputs and output gradients of each recorded call, (b·k, ...) each.
        b, k: Examples and views.
        keep: Instantiate G_i and keep them (else the cheapest method, :func:`norm_method`).
        direction: Optional (P, D) rows v_o; adds ``dot`` = v_o·G_{i,o} (instantiation only).
        totals: Also return ``total``.

    Returns:
        ``sq`` (b, P): ‖G_{i,o}‖²; ``total`` (b, P) if asked: Σ entries of G_{i,o}; ``dot`` (b, P) if
        asked and instantiated; ``kept`` (b, P, D) if kept, with ``kernel_major``: whether
        its rows are kernel-major (:meth:`ConvCall.weight_order` puts their sums in order).
    """
    out_ch, d_in, groups = es[0].shape[1], call.fan_in, call.groups
    d_out = out_ch // groups
    positions = k * sum(math.prod(e.shape[2:]) for e in es)
    pixels = None
    if not keep and len(xs) == 1:
        pixels = k * call.pixels(xs[0].shape[2:])
    method = "instantiate" if keep else norm_method(call, positions, pixels, d_out)
    if method == "ghost":
        per = groups * positions * (positions + 2 * d_in + 2 * d_out)
    elif method == "pixel":
        per = groups * (pixels * (pixels + 1) + positions * (positions + 2 * d_out))
    else:
        per = out_ch * d_in + k * (math.prod(xs[0].shape[1:]) + math.prod(es[0].shape[1:]))
    stats: dict[str, list] = {"sq": [], "total": []} if totals else {"sq": []}
    kept, kernel_major = None, False
    for sl in chunks(b, per):
        n, rows = sl.stop - sl.start, slice(sl.start * k, sl.stop * k)
        if method != "instantiate":
            # The ghost norm from the patches' Gram matrix and sums (groups, positions):
            # unfolded, or built from the pixels.
            if method == "pixel":
                gram, sums = _pixel_gram(call, xs[0][rows], es[0].shape[2:], n, k)
            else:
                a = cat([call.unfold(x[rows], n, k) for x in xs], 2)
                gram, sums = a @ a.mT, a.sum(-1, keepdim=True)
                del a
            o = cat([call.out_rows(e[rows], n, k) for e in es], 2)
            stats["sq"].append(((gram @ o) * o).sum(2).reshape(n, out_ch))
            if totals:
                stats["total"].append((o * sums).sum(2).reshape(n, out_ch))
            continue
        sq = None
        if len(xs) == 1:  # one call: the C kernel may sum the rows' squares as it forms them
            g, major, sq = call.per_example_and_sq(xs[0][rows], es[0][rows], n, k)
            parts = [(g, major)]
        else:
            parts = [call.per_example_any(x[rows], e[rows], n, k) for x, e in zip(xs, es)]
        if sl.start == 0:
            kernel_major = parts[0][1]
        # Every call's and every chunk's rows in the order of the first call's first chunk.
        g = add_up(call.reorder(g, major, kernel_major) for g, major in parts)
        del parts
        stats["sq"].append(sq if sq is not None else torch.linalg.vector_norm(g, dim=-1).square())
        if totals:
            stats["total"].append(g.sum(-1))
        if direction is not None:
            # v_o·G_{i,o}: a product and a sum run ~4x faster on CPU than einsum's batched matmul
            v = call.kernel_order(direction) if kernel_major else direction
            stats.setdefault("dot", []).append((g * v).sum(-1))
        if keep and n == b:
            kept = g
        elif keep:
            if kept is None:
                kept = g.new_empty((b, out_ch, d_in))
            kept[sl] = g
        del g
    result: dict[str, Any] = {name: cat(parts, 0) for name, parts in stats.items()}
    if kept is not None:
        result["kept"] = kept
        result["kernel_major"] = kernel_major
    return result


def _pixel_gram(call: ConvCall, x: torch.Tensor, out_spatial, n: int, k: int):
    """The patches' Gram matrix (n, groups, T, T) and sums (n, groups, T, 1), T = K views ×
    output pixels, from the input's pixels (one recorded call, x prepared).

    With x padded, the patch at output position t and kernel offset δ reads pixel
    stride·t + dilation·δ, so the patch Gram matrix is Σ_δ of the pixel Gram matrix sliced at
    those pixels, and a patch's sum is Σ_δ of the pixel sums. The sum over δ is the C kernel of
    :mod:`.native` where it runs (one torch thread, float32 on the CPU), else strided views
    added in two passes, kernel columns then kernel rows. WRN-16-4's 128-channel 3x3 convs on
    16x16 pixels (64 examples, 1 thread, interleaved medians, ad hoc): the pixel Gram matrix
    25 ms, then the sum over δ 25 ms as one pass per offset, 15.5 ms in two passes.
    """
    x = call.zero_padded(x)
    kernel, stride, dilation = tuple(call.weight.shape[2:]), call.stride, call.dilation
    (ho, wo) = out_spatial if call.dims == 2 else (1, *out_spatial)
    if call.dims == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    groups = call.groups
    channels, (hp, wp) = x.shape[1] // groups, x.shape[2:]
    # All views' pixels of one example and group: (n, groups, channels, k·hp·wp).
    pix = x.reshape(n, k, groups, channels, hp * wp).permute(0, 2, 3, 1, 4)
    pix = pix.reshape(n, groups, channels, k * hp * wp)
    pixel_gram = pix.mT @ pix
    positions = k * ho * wo
    grid = (n, groups, k, hp, wp)
    pixel_sums = pix.sum(2).view(grid)
    sums = None
    for i, j in product(range(kernel[0]), range(kernel[1])):
        part = pixel_sums[..., _taps(i, dilation[0], stride[0], ho),
                          _taps(j, dilation[1], stride[1], wo)]  # fmt: skip
        sums = _accumulate(sums, part)
    sums = sums.view(n, groups, positions, 1)
    side = k * hp * wp
    gram = native.shift_gram(
        pixel_gram.view(n * groups, side, side), k, (hp, wp), (ho, wo), kernel, stride, dilation
    )
    if gram is not None:
        return gram.view(n, groups, positions, positions), sums
    # Kernel columns: (n, groups, k, hp, wo, k, hp, wo); then kernel rows.
    full = pixel_gram.view(n, groups, k, hp, wp, k, hp, wp)
    cols = None
    for j in range(kernel[1]):
        c = _taps(j, dilation[1], stride[1], wo)
        cols = _accumulate(cols, full[:, :, :, :, c, :, :, c])
    gram = None
    for i in range(kernel[0]):
        r = _taps(i, dilation[0], stride[0], ho)
        gram = _accumulate(gram, cols[:, :, :, r, :, :, r, :])
    return gram.view(n, groups, positions, positions), sums


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` in place, or a contiguous copy of ``part`` when there is no total yet."""
    return part.clone(memory_format=torch.contiguous_format) if total is None else total.add_(part)


def _taps(offset: int, dilation: int, stride: int, size: int) -> slice:
    """The input pixels (one dimension) that a kernel tap at ``offset`` reads, one per output."""
    start = offset * dilation
    return slice(start, start + stride * (size - 1) + 1, stride)


class ConvOwner(Owner):
    """``nn.Conv1d`` / ``nn.Conv2d`` with the stock forward."""

    _call: ConvCall | None = None
    _call_key: tuple | None = None

    def conv_call(self) -> ConvCall:
        """The module's :class:`ConvCall`, built again only when what it is built from changed
        (a parameter replaced, a setting changed): a step calls it once per layer."""
        m = self.module
        key = (id(m.weight), id(m.bias), m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        # The cached call refers to the weight and bias, so their ids cannot be reused meanwhile.
        if key != self._call_key:
            self._call, self._call_key = ConvCall.from_module(m), key
        return self._call

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        n = b * k
        call = self.conv_call()
        xs = [call.prepare(self.rows(r.args[0] if r.args else r.kwargs["input"], n))
              for r in self.records]  # fmt: skip
        es = [self.rows(r.grads[0], n) for r in self.records]
        self._data = (call, xs, es, k)
        parts = []
        self._kept = self._grad_b = None
        self._kernel_major = False
        if self.trainable(call.weight):
            keep = keep_grads(call, xs, es, k, self.keep_budget)
            stats = channel_stats(call, xs, es, b, k, keep)
            parts.append(stats["sq"].sum(1))
            self._kept = stats.get("kept")
            self._kernel_major = stats.get("kernel_major", False)
        if self.trainable(call.bias):
            # The C kernel adds the bias gradients' squares to the weight's part in place (a
            # fresh tensor of this call), else torch forms them.
            gb = native.bias_grads(es[0], b, k, parts[0]) if len(es) == 1 and parts else None
            if gb is not None:
                self._grad_b = gb
            else:
                self._grad_b = add_up(e.reshape(b, k, e.shape[1], -1).sum((1, 3)) for e in es)
                parts.append(self._grad_b.square().sum(1))
        if self._kept is not None:
            self._data = (call, None, None, k)  # the sums need neither inputs nor output gradients
        return add_up(parts) if parts else es[0].new_zeros(b)

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        call, xs, es, k = self._data
        out = []
        for _, p in self.params:
            if p is not self.module.weight:
                out.append(weighted_sum(factors, self._grad_b))
            elif self._kept is not None:
                out.append(self._kept_sum(call, factors))
            else:
                out.append(scaled_weight_grad(call, xs, es, factors, k))
        return out

    def _kept_sum(self, call: ConvCall, factors: torch.Tensor) -> torch.Tensor:
        """Σ_i factors[i]·G_i of the kept per-example gradients, shaped like the weight."""
        # (P·D,) from the 2-d rows: weighted_sum then needs no reshape of its own
        total = weighted_sum(factors, self._kept.reshape(self._kept.shape[0], -1))
        rows = total.view(call.weight.shape[0], -1)
        return (call.weight_order(rows) if self._kernel_major else rows).view(call.weight.shape)

    def reset(self) -> None:
        super().reset()
        self._data = self._kept = self._grad_b = None


def keep_grads(call: ConvCall, xs: list, es: list, k: int, budget: KeepBudget) -> bool:
    """Whether to keep per-example weight gradients: the memory rule (KEEP_RATIO), or they are
    small enough to fit in what is left of the call's ``budget`` (which they then use up)."""
    stored = k * sum(math.prod(x.shape[1:]) + math.prod(e.shape[1:]) for x, e in zip(xs, es))
    if call.weight.numel() <= KEEP_RATIO * stored:
        return True
    return budget.take(call.weight.numel() * (xs[0].shape[0] // k))


def scaled_weight_grad(call, xs, es, factors, k) -> torch.Tensor:
    """Σ_i factors[i]·G_i by the native kernel on output gradients scaled per row."""
    rows = factors.to(es[0].dtype).repeat_interleave(k)
    total = None
    for x, e in zip(xs, es):
        part = call.weight_grad(x, e * rows.view(-1, *([1] * (e.dim() - 1))))
        total = part if total is None else total + part
    return total


def _pad_widths(m: nn.Module, dims: int) -> list[int]:
    """``F.pad`` widths (last dimension first) of a conv's padding, as the module pads itself."""
    kernel = m.weight.shape[2:]
    dilation = _tuple(m.dilation, dims)
    if m.padding == "valid":
        per_dim = [(0, 0)] * dims
    elif m.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        per_dim = [(t // 2, t - t // 2) for t in total]
    else:
        per_dim = [(p, p) for p in _tuple(m.padding, dims)]
    return [w for left, right in reversed(per_dim) for w in (left, right)]
