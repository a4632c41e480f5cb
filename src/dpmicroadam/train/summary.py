"""The two-line human summary of a finished run (train and finetune print the same way)."""

from __future__ import annotations

import json
from typing import Any


def summary_lines(s: dict[str, Any]) -> list[str]:
    """Test accuracy, ε spent with how it was accounted, optimizer memory, time and output folder."""
    acc = s.get("test_accuracy")
    line = f"test accuracy {acc:.4f}" if acc is not None else "test accuracy n/a"
    if s.get("private"):
        target = f"target {s['target_epsilon']}, " if s.get("target_epsilon") is not None else ""
        line += (
            f" | ε = {s['epsilon']:.3f} ({target}δ = {s['delta']:g}, {s['accountant'].upper()}, "
            f"σ = {s['noise_multiplier']:.4f}, q = {s['sample_rate']:.4g}, T = {s['steps']})"
        )
    else:
        line += " | not private"
    model = f"{s['model']} ({s['trainable']})" if s.get("trainable") else f"{s['model']}"
    trains = (
        f"trains {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters · "
        if "trainable_parameters" in s
        else ""
    )
    return [
        f"{s['optimizer']} · {model} · {s['dataset']}: {line}",
        f"{trains}optimizer state {s['optimizer_state_bytes_per_param']:.3f} bytes/param · "
        f"{s['wall_seconds']:.1f} s · results in {s['out']}",
    ]


def print_summary(s: dict[str, Any], as_json: bool) -> None:
    """Print a run's summary: one JSON object (``--json``), or the readable lines."""
    if as_json:
        print(json.dumps(s))
    else:
        print("\n".join(summary_lines(s)))
