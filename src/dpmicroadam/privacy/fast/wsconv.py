"""Conv subclasses with a reparametrized weight, e.g. scaled weight standardization.

Handled when the subclass's forward is exactly one ``conv1d``/``conv2d`` call on the module's
input whose result is the module's output (checked on every call with a torch-function mode):
the weight ŵ and bias that call used are captured, and the conv rule gives per-example
gradients G_i with respect to ŵ. Since ŵ = f(θ) does not depend on the data, the per-example
gradient of the module's own parameters θ is Jᵀ G_i with the same Jacobian J for every example.

* Scaled weight standardization, ŵ_o = γ_o (w_o − mean w_o) / s_o with
  s_o = sqrt(max(D·var w_o, 1e-4)) per output channel o (Qiao et al. arXiv 1903.10520;
  Brock et al. arXiv 2101.08692), is recognised by recomputing ŵ and one Jacobian-vector
  product from the module's ``weight`` and ``gain``. Then, with u_o = w_o − mean w_o and
  z_o = (u_o/s_o)·G_o (the gain's gradient):
  ‖∂/∂w_o‖² = (γ_o/s_o)² (‖G_o‖² − (Σ G_o)²/D − z_o²)  (drop z_o² where the clamp is active),
  so only per-channel statistics of G are needed and the ghost norm still applies; z_o comes
  from the layer's own output, z_{t,o} = (y_{t,o} − b_o)/γ_o.
* Any other reparametrization: Jᵀ G_i by autograd with ``is_grads_batched`` (instantiates G).
* A forward that is not a single such convolution: ``torch.func`` for that module.

The clipped sum is Jᵀ(Σ_i c_i G_i): one ordinary vector-Jacobian product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .capture import make_record
from .conv import (
    ConvCall,
    ConvOwner,
    channel_stats,
    keep_grads,
    norm_method,
    scaled_weight_grad,
)
from .fallback import FallbackOwner
from .owner import chunks, weighted_sum

_CONV_FUNCS = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}


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


def standardization(module, captured: torch.Tensor, probe_checked: bool):
    """``(u/s, γ/s, clamped)`` if ``captured`` is the scaled WS of module.weight, else None.

    The value of ŵ is compared on every call; the derivative, once (``probe_checked`` False).
    """
    weight, gain = module.weight, getattr(module, "gain", None)
    out = weight.shape[0]
    if not isinstance(gain, torch.Tensor) or gain.numel() != out or captured.shape != weight.shape:
        return None
    with torch.no_grad():
        w = weight.reshape(out, -1)
        u = w - w.mean(1, keepdim=True)
        fan = w.shape[1]
        raw = fan * u.square().mean(1)
        s = torch.sqrt(torch.clamp(raw, min=1e-4))
        g = gain.reshape(out)
        w_hat = u * (g / s).unsqueeze(1)
        scale = captured.detach().abs().max().clamp_min(1e-12)
        if not torch.allclose(
            captured.detach().reshape(out, -1), w_hat, rtol=1e-4, atol=1e-5 * scale
        ):
            return None
        clamped = raw <= 1e-4
    if probe_checked:
        return u / s.unsqueeze(1), g / s, clamped
    # One Jacobian-vector product with a fixed probe confirms the derivative as well.
    probe = torch.randn(captured.shape, generator=torch.Generator().manual_seed(0)).to(captured)
    params = [p for p in (weight, gain) if p.requires_grad]
    if not params or not captured.requires_grad:
        return None
    got = torch.autograd.grad(captured, params, probe, retain_graph=True, allow_unused=True)
    want = _ws_vjp(probe.reshape(out, -1), u / s.unsqueeze(1), g / s, clamped)
    for p, value in zip(params, got):
        expected = want[0] if p is weight else want[1]
        value = torch.zeros_like(p) if value is None else value
        if not torch.allclose(value.reshape(expected.shape), expected, rtol=1e-3, atol=1e-5):
            return None
    return u / s.unsqueeze(1), g / s, clamped


def _ws_vjp(grad_hat, direction, ratio, clamped):
    """Jᵀ of scaled WS applied to one (P, D) gradient: (weight grad (P, D), gain grad (P,))."""
    z = (grad_hat * direction).sum(1)
    centered = grad_hat - grad_hat.mean(1, keepdim=True)
    radial = torch.where(clamped.unsqueeze(1), torch.zeros_like(direction), direction * z[:, None])
    return ratio.unsqueeze(1) * (centered - radial), z


class ReparamConvOwner(ConvOwner):
    """A Conv1d/Conv2d subclass whose forward computes its own weight (e.g. ``WSConv2d``)."""

    _probe_checked = False

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
                if out is output and x is (args[0] if args else kwargs.get("input")):
                    # The output is only needed by the (pixel) ghost norm; holding it otherwise
                    # would keep alive a tensor autograd itself does not save.
                    # An unbatched call (no batch dimension) has no pixel grid per example;
                    # sq_norms sends such a module to the fallback.
                    batched = x.dim() == call.dims + 2
                    pixels = call.pixels(x.shape[2:], prepared=False) if batched else None
                    method = norm_method(
                        call, self.views * out[0, 0].numel(),
                        None if pixels is None else self.views * pixels,
                        out.shape[1] // call.groups,
                    )  # fmt: skip
                    held = None if method == "instantiate" else out
                    captured = (call, held, out._version)  # noqa: SLF001
            self.records.append(make_record(args, kwargs, output, extra=captured))

        return [
            self.module.register_forward_pre_hook(pre, with_kwargs=True),
            self.module.register_forward_hook(post, with_kwargs=True, always_call=True),
        ]

    def sq_norms(self, b: int, k: int) -> torch.Tensor:
        self._fallback = self._ws = None
        if len(self.records) != 1 or self.records[0].extra is None:
            self._fallback = FallbackOwner(self.name, self.module, self.params)
            self._fallback.records = self.records
            return self._fallback.sq_norms(b, k)
        record, n = self.records[0], b * k
        call, output, version = record.extra
        x = self.records[0].args[0] if record.args else record.kwargs["input"]
        xs, es = [call.prepare(self.rows(x, n))], [self.rows(record.grads[0], n)]
        self._data = (call, xs, es, k)
        self._outputs = [t for t in (call.weight, call.bias) if t is not None and t.requires_grad]
        self._kept = self._grad_b = None
        self._kernel_major = False
        names = {id(p) for _, p in self.params}
        simple_bias = call.bias is None or call.bias is self.module.bias
        ws = None
        if call.weight.requires_grad:
            ws = standardization(self.module, call.weight, self._probe_checked)
            self._probe_checked = ws is not None
        if (
            ws is not None
            and simple_bias
            and names <= {id(p) for p in self.module.parameters(recurse=False)}
        ):
            self._ws = ws
            return self._ws_sq_norms(b, k, call, xs, es, output, version)
        return self._generic_sq_norms(b, k, call, xs, es)

    def _ws_sq_norms(self, b, k, call, xs, es, output, version):
        direction, ratio, clamped = self._ws
        module, e = self.module, es[0]
        keep = keep_grads(call, xs, es, k, self.keep_budget)
        stats = channel_stats(call, xs, es, b, k, keep, direction=direction, totals=True)
        self._kept = stats.get("kept")
        self._kernel_major = stats.get("kernel_major", False)
        if "dot" in stats:
            z = stats["dot"]
        else:
            z = self._gain_grads(call, xs[0], e, output, version, direction, b, k)
        sq = e.new_zeros(b)
        if self.trainable(module.weight):
            radial = torch.where(clamped, torch.zeros_like(z), z.square())
            inner = stats["sq"] - stats["total"].square() / call.fan_in - radial
            sq = sq + (ratio.square() * inner.clamp_min(0)).sum(1)
        if self.trainable(module.gain):
            sq = sq + z.square().sum(1)
        self._grad_b = None
        if self.trainable(module.bias):
            self._grad_b = e.reshape(b, k, e.shape[1], -1).sum((1, 3))
            sq = sq + self._grad_b.square().sum(1)
        if self._kept is not None:
            self._data = (call, None, None, k)  # the stored tensors are no longer needed
            self.records = []
        return sq

    def _gain_grads(self, call, x, e, output, version, direction, b, k):
        """z_{i,o} = Σ_t e_{i,t,o} (u_o/s_o)·a_{i,t}, from the layer's output when possible."""
        gain = self.module.gain.detach().reshape(-1)
        shape = (1, -1) + (1,) * call.dims
        usable = output is not None and output._version == version  # noqa: SLF001
        if usable and bool((gain.abs() > 1e-3 * gain.abs().max()).all()):
            y = output.detach()
            if call.bias is not None:
                y = y - call.bias.detach().reshape(shape)
            y = y / gain.reshape(shape)
        else:
            kernel = direction.reshape(call.weight.shape).to(x.dtype)
            y = torch.ops.aten.convolution(
                x, kernel, None, list(call.stride), list(call.padding), list(call.dilation),
                False, [0] * call.dims, call.groups,
            )  # fmt: skip
        return (y * e).reshape(b, k, e.shape[1], -1).sum((1, 3))

    def _generic_sq_norms(self, b, k, call, xs, es):
        e = es[0]
        targets = [p for _, p in self.params]
        sq = e.new_zeros(b)
        per = 2 * (call.weight.numel() + sum(p.numel() for p in targets))
        for sl in chunks(b, per):
            n, rows = sl.stop - sl.start, slice(sl.start * k, sl.stop * k)
            grads = []
            if call.weight.requires_grad:
                grads.append(
                    call.per_example(xs[0][rows], e[rows], n, k).reshape(n, *call.weight.shape)
                )
            if call.bias is not None and call.bias.requires_grad:
                grads.append(e[rows].reshape(n, k, e.shape[1], -1).sum((1, 3)))
            mapped = torch.autograd.grad(
                self._outputs, targets, grads, retain_graph=True, allow_unused=True,
                is_grads_batched=True,
            )  # fmt: skip
            sq[sl] = sum(m.square().flatten(1).sum(1) for m in mapped if m is not None)
        return sq

    def sums(self, factors: torch.Tensor) -> list[torch.Tensor]:
        if self._fallback is not None:
            return self._fallback.sums(factors)
        call, xs, es, k = self._data
        grads = []
        if call.weight.requires_grad:
            if self._kept is not None:
                grads.append(self._kept_sum(call, factors).reshape(call.weight.shape))
            else:
                grads.append(scaled_weight_grad(call, xs, es, factors, k))
        if self._grad_b is not None:
            grads.append(weighted_sum(factors, self._grad_b))
        elif call.bias is not None and call.bias.requires_grad:
            e = es[0]
            rows = factors.to(e.dtype).repeat_interleave(k)
            grads.append((e * rows.view(-1, *([1] * (e.dim() - 1)))).sum([0, *range(2, e.dim())]))
        targets = [p for _, p in self.params]
        mapped = torch.autograd.grad(
            self._outputs, targets, grads, retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if m is None else m for m, p in zip(mapped, targets)]

    def reset(self) -> None:
        super().reset()
        self._fallback = self._ws = self._outputs = None
