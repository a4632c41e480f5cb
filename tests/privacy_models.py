"""Tiny models for the privacy tests (float64 so equalities can be tight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def per_row_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


class MLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class GroupNormCNN(nn.Module):
    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


class PlainCNN(nn.Module):
    """No normalisation, no saturation: the gradient grows with the input scale."""

    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class WSConv2d(nn.Conv2d):
    """Scaled weight standardization: ŵ = (w − mean)·gain / sqrt(max(fan_in·var, 1e-4))."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w_hat = (w - mean) * self.gain / torch.sqrt(torch.clamp(fan_in * var, min=1e-4))
        return F.conv2d(x, w_hat, self.bias, self.stride, self.padding)


class WSCNN(nn.Module):
    def __init__(self, channels: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv = WSConv2d(channels, 4, 3, padding=1)
        self.gn = nn.GroupNorm(1, 4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.gn(self.conv(x))).mean(dim=(2, 3)))


class TinyAttention(nn.Module):
    """Embedding + positions (a (1, L) buffer, sliced and expanded) + LayerNorm + attention."""

    def __init__(self, vocab: int = 11, dim: int = 8, max_len: int = 6, classes: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        pos = self.position_ids[:, :length].expand(ids.shape[0], length)
        h = self.norm(self.tok(ids) + self.pos(pos))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(dim=1))


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(x).mean(dim=(2, 3)))


def make_case(name: str, b: int, augmult: int = 1, seed: int = 0):
    """Model, inputs ((b, ...) or (b, K, ...)) and targets for one test case, in float64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # model init only; the code under test never reads the global RNG
    views = (b, augmult) if augmult > 1 else (b,)
    if name == "mlp":
        model = MLP()
        x = torch.randn(*views, 6, generator=g, dtype=torch.float64)
    elif name in ("cnn", "wscnn", "plaincnn"):
        model = {"cnn": GroupNormCNN, "wscnn": WSCNN, "plaincnn": PlainCNN}[name]()
        x = torch.randn(*views, 2, 6, 6, generator=g, dtype=torch.float64)
    elif name == "attention":
        model = TinyAttention()
        x = torch.randint(0, 11, (*views, 5), generator=g)
    else:
        raise ValueError(name)
    model = model.double()
    y = torch.randint(0, 3, (b,), generator=g)
    return model, x, y


CASES = ("mlp", "cnn", "wscnn", "attention")
