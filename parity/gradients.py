"""metarun's side of a gradient check (``parity/<reference>/gradient_check.py``): one meta-gradient of
metarun's, parameter by parameter, against the one the reference's code saved from the same weights
and episodes. Runs in metarun's venv."""

from __future__ import annotations

import torch


def metarun_named(model: dict, algorithm: dict) -> dict:
    """metarun's tensors by the names the checks use: the model's as they are, the algorithm's own (Meta-SGD's
    and MAML++'s rates, MAML++'s per-step norm weights) under ``algorithm.``. Takes the named parameters of a
    model and its algorithm, or the two state dicts of a checkpoint."""
    return {**model, **{f"algorithm.{k}": v for k, v in algorithm.items()}}


def largest_relative_error(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> float:
    """Print each (name, metarun's gradient, the reference's) relative error and return the largest.
    A gradient that is zero up to rounding (a conv bias that batch norm follows) is noise, not counted."""
    worst = 0.0
    for name, own, expected in pairs:
        error = ((own - expected).norm() / expected.norm().clamp_min(1e-300)).item()
        noise = bool(expected.norm() < 1e-12)
        worst = max(worst, 0.0 if noise else error)
        print(f"{name:40s} relative error {error:.1e}{'  (zero gradient: noise)' if noise else ''}")
    return worst
