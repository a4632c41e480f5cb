"""Conv1d / Conv2d, plain or with a reparametrized weight (weight standardization).

A convolution is a Linear layer over the unfolded input (im2col): each output position is
W_g · patch for each group g. The per-example weight gradient is therefore the matmul rule of
:mod:`.linear` with positions = K views × output positions, per group. Clipped sums use the
native convolution weight-gradient kernel on output gradients scaled by the clip factors.

A conv subclass with its own ``forward`` (for example scaled weight standardization,
ŵ = gain·(w − mean)/std) is handled when its forward is exactly one ``conv1d``/``conv2d`` call
on the module's input whose result is the module's output: the weight ŵ and bias the call used
are captured, per-example gradients with respect to ŵ are formed by the conv rule, and mapped to
the module's own parameters through ŵ's autograd graph. That map is a fixed linear function of
the gradient (the same for every example), applied batched with ``is_grads_batched``. Anything
else in such a subclass falls back to ``torch.func`` for that module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .capture import make_record
from .fallback import FallbackOwner
from .linear import matmul_sq_norms
from .owner import Owner, chunks, weighted_sum

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_FUNCS = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}


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
        dims = m.weight.dim() - 2
        call = cls(
            dims,
            m.weight,
            m.bias,
            _tuple(m.stride, dims),
            (0,) * dims,
            _tuple(m.dilation, dims),
            m.groups,
        )
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            call.pre_pad = list(m._reversed_padding_repeated_twice)
            call.pad_mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        else:
            call.padding = _tuple(m.padding, dims)
        return call

    @classmethod
    def from_args(cls, dims: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ConvCall]:
        spec = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        spec.update(zip(_CONV_ARGS, args))
        spec.update(kwargs)
        weight = spec["weight"]
        dilation = _tuple(spec["dilation"], dims)
        call = cls(
            dims,
            weight,
            spec["bias"],
            _tuple(spec["stride"], dims),
            (0,) * dims,
            dilation,
            int(spec["groups"]),
        )
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

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the convolution sees it (explicit padding applied)."""
        x = x.detach()
        return F.pad(x, self.pre_pad, mode=self.pad_mode) if self.pre_pad else x

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared input (n, C, *spatial) → patches (n, groups, L, C/groups·kernel)."""
        kernel, stride, padding, dilation = (
            self.weight.shape[2:],
            self.stride,
            self.padding,
            self.dilation,
        )
        if self.dims == 1:
            x = x.unsqueeze(2)
            kernel, stride = (1, kernel[0]), (1, stride[0])
            padding, dilation = (0, padding[0]), (1, dilation[0])
        cols = F.unfold(x, tuple(kernel), dilation=dilation, padding=padding, stride=stride)
        n, width, length = cols.shape
        return cols.view(n, self.groups, width // self.groups, length).transpose(2, 3)

    def weight_grad(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Σ over rows of the weight gradient, by the native kernel (x prepared)."""
        return torch.ops.aten.convolution_backward(
            e,
            x,
            self.weight.detach(),
            None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * self.dims,
            self.groups,
            [False, True, False],
        )[1]


class ConvOwner(Owner):
    """``nn.Conv1d`` / ``nn.Conv2d`` with the stock forward."""

    def calls(self) -> list[tuple[torch.Tensor, ConvCall]]:
        """(input, geometry) of each recorded call."""
        call = ConvCall.from_module(self.module)
        return [(r.args[0] if r.args else r.kwargs["input"], call) for r in self.records]

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        n = b * k
        calls = self.calls()
        xs = [c.prepare(self.rows(x, n)) for x, c in calls]
        es = [self.rows(r.grads[0], n) for r in self.records]
        self._data = (calls, xs, es)
        weight, bias = calls[0][1].weight, calls[0][1].bias
        sq = es[0].new_zeros(b)
        self._grad_w = None
        if weight.requires_grad:
            sq_w, self._grad_w = self._weight_sq_norms(b, k, calls, xs, es)
            sq = sq + sq_w
        self._grad_b = None
        if bias is not None and bias.requires_grad:
            self._grad_b = sum(e.reshape(b, k, e.shape[1], -1).sum((1, 3)) for e in es)
            sq = sq + self._grad_b.square().sum(1)
        return sq

    def _weight_sq_norms(self, b, k, calls, xs, es, keep_allowed=True):
        groups = calls[0][1].groups
        out_ch = es[0].shape[1]
        d_out = out_ch // groups
        d_in = calls[0][1].weight[0].numel()
        lengths = [e[0, 0].numel() for e in es]
        positions = k * sum(lengths)
        # Keeping per-example gradients must not cost more than the activations it frees.
        raw = sum(x[0].numel() + e[0].numel() for x, e in zip(xs, es)) * k
        keep = keep_allowed and d_out * d_in * groups <= raw

        def get(sl):
            rows = slice(sl.start * k, sl.stop * k)
            acts, outs = [], []
            for (_, call), x, e, length in zip(calls, xs, es, lengths):
                nb = sl.stop - sl.start
                a = call.unfold(x[rows]).reshape(nb, k, groups, length, d_in)
                o = e[rows].reshape(nb * k, groups, d_out, length).transpose(2, 3)
                o = o.reshape(nb, k, groups, length, d_out)
                acts.append(a.transpose(1, 2).reshape(nb, groups, k * length, d_in))
                outs.append(o.transpose(1, 2).reshape(nb, groups, k * length, d_out))
            if len(acts) == 1:
                return acts[0], outs[0]
            return torch.cat(acts, 2), torch.cat(outs, 2)

        return matmul_sq_norms(get, b, groups, positions, d_in, d_out, keep)

    def _sum_weight(self, factors: torch.Tensor, k: int) -> torch.Tensor:
        calls, xs, es = self._data
        weight = calls[0][1].weight
        if self._grad_w is not None:
            return weighted_sum(factors, self._grad_w).reshape(weight.shape)
        rows = factors.to(es[0].dtype).repeat_interleave(k)
        total = None
        for (_, call), x, e in zip(calls, xs, es):
            scaled = e * rows.view(-1, *([1] * (e.dim() - 1)))
            part = call.weight_grad(x, scaled)
            total = part if total is None else total + part
        return total

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        k = self._data[1][0].shape[0] // factors.shape[0]
        out = []
        for _, p in self.params:
            if p is self.module.weight:
                out.append(self._sum_weight(factors, k))
            else:
                out.append(weighted_sum(factors, self._grad_b))
        return out

    def reset(self) -> None:
        super().reset()
        self._data = self._grad_w = self._grad_b = None


class _ConvCapture(TorchFunctionMode):
    """Records the conv1d/conv2d calls made inside one module forward."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        dims = _CONV_FUNCS.get(func)
        if dims is not None:
            self.calls.append((dims, args, kwargs, out))
        return out


class ReparamConvOwner(ConvOwner):
    """A Conv1d/Conv2d subclass whose forward computes its own weight (e.g. ``WSConv2d``)."""

    def install(self) -> list:
        modes = []

        def pre(module, args, kwargs):
            if torch.is_grad_enabled():
                mode = _ConvCapture()
                mode.__enter__()
                modes.append(mode)

        def post(module, args, kwargs, output):
            if not modes:
                return
            mode = modes.pop()
            mode.__exit__(None, None, None)
            captured = None
            if len(mode.calls) == 1:
                dims, c_args, c_kwargs, out = mode.calls[0]
                x, call = ConvCall.from_args(dims, c_args, c_kwargs)
                module_input = args[0] if args else kwargs.get("input")
                if out is output and x is module_input:
                    captured = call
            self.records.append(make_record(args, kwargs, output, extra=captured))

        return [
            self.module.register_forward_pre_hook(pre, with_kwargs=True),
            self.module.register_forward_hook(post, with_kwargs=True, always_call=True),
        ]

    def calls(self):
        return [(r.args[0] if r.args else r.kwargs["input"], r.extra) for r in self.records]

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        self._fallback = None
        if any(r.extra is None for r in self.records) or len(self.records) != 1:
            self._fallback = FallbackOwner(self.name, self.module, self.params)
            self._fallback.records = self.records
            return self._fallback.sq_norms(b, k)
        n = b * k
        ((x, call),) = self.calls()
        record = self.records[0]
        xs, es = [call.prepare(self.rows(x, n))], [self.rows(record.grads[0], n)]
        self._data = ([(x, call)], xs, es)
        self._grad_w = self._grad_b = None
        # (tensor the conv used, per-example gradient builder) for the weight and the bias.
        outputs = [t for t in (call.weight, call.bias) if t is not None and t.requires_grad]
        self._outputs = outputs
        targets = [p for _, p in self.params]
        e = es[0]
        sq = e.new_zeros(b)
        per = (call.weight.numel() + sum(p.numel() for p in targets)) * 2
        for sl in chunks(b, per):
            rows = slice(sl.start * k, sl.stop * k)
            grads = []
            if call.weight.requires_grad:
                nb = sl.stop - sl.start
                sub_x, sub_e = xs[0][rows], e[rows]
                g = self._per_example_weight(nb, k, call, sub_x, sub_e)
                grads.append(g)
            if call.bias is not None and call.bias.requires_grad:
                grads.append(e[rows].reshape(sl.stop - sl.start, k, e.shape[1], -1).sum((1, 3)))
            mapped = torch.autograd.grad(
                outputs, targets, grads, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            sq[sl] = sum(m.square().flatten(1).sum(1) for m in mapped if m is not None)
        return sq

    def _per_example_weight(self, nb, k, call, x, e):
        groups = call.groups
        d_out = e.shape[1] // groups
        d_in = call.weight[0].numel()
        length = e[0, 0].numel()
        a = call.unfold(x).reshape(nb, k, groups, length, d_in)
        a = a.transpose(1, 2).reshape(nb, groups, k * length, d_in)
        o = e.reshape(nb * k, groups, d_out, length).transpose(2, 3)
        o = o.reshape(nb, k, groups, length, d_out).transpose(1, 2).reshape(nb, groups, -1, d_out)
        return (o.mT @ a).reshape(nb, *call.weight.shape)

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        if self._fallback is not None:
            return self._fallback.sums(factors)
        ((_, call),) = self._data[0]
        e = self._data[2][0]
        k = e.shape[0] // factors.shape[0]
        grads = []
        if call.weight.requires_grad:
            grads.append(self._sum_weight(factors, k))
        if call.bias is not None and call.bias.requires_grad:
            rows = factors.to(e.dtype).repeat_interleave(k)
            grads.append((e * rows.view(-1, *([1] * (e.dim() - 1)))).sum([0, *range(2, e.dim())]))
        targets = [p for _, p in self.params]
        mapped = torch.autograd.grad(
            self._outputs, targets, grads, retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if m is None else m for m, p in zip(mapped, targets)]

    def reset(self) -> None:
        super().reset()
        self._fallback = None
        self._outputs = None
