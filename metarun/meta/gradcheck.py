"""Independent checks of every meta-gradient path, generic over models (float64).

Each function returns the largest relative error of one comparison, so tests and the
``make bench`` report can assert on it. Relative error is ``max|a - b| / max|b|`` over all
parameters, the scale-free form used throughout.

The references are independent of the fast path:

* the per-task loop uses ``torch.autograd.grad`` (``create_graph=True``), the fast path
  ``torch.func.grad`` under ``vmap``;
* central finite differences of the meta-loss along random directions use no autograd at all
  for the derivative;
* first order is checked against the gradient of the query loss at the adapted parameters,
  computed with the inner graph cut by hand (``detach``);
* zero inner steps is checked against the plain gradient of the query loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.meta.maml import LossFn, Params, TaskBatch, adapt_autograd, meta_loss, task_loss


def relative_error(a: Params, b: Params) -> float:
    """``max |a - b| / max |b|`` over all entries of two parameter dicts."""
    num = max(float((a[k] - b[k]).abs().max()) for k in b)
    den = max(float(b[k].abs().max()) for k in b)
    return num / max(den, 1e-300)


def meta_gradient(model: nn.Module, params: Params, tasks: TaskBatch, loss_fn: LossFn,
                  inner_lr: float, inner_steps: int, first_order: bool, batching: str) -> Params:
    """The gradient of the MAML meta-loss with respect to ``params``."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    out = meta_loss(model, leaves, tasks, loss_fn, inner_lr, inner_steps, first_order, batching)
    grads = torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), grads)}


def vmap_vs_loop(model, params, tasks, loss_fn, inner_lr, inner_steps, first_order=False) -> float:
    """Relative error of the vmap meta-gradient against the per-task loop reference."""
    args = (model, params, tasks, loss_fn, inner_lr, inner_steps, first_order)
    return relative_error(meta_gradient(*args, "vmap"), meta_gradient(*args, "loop"))


def loop_vs_finite_differences(model, params, tasks, loss_fn, inner_lr, inner_steps,
                               directions: int = 4, eps: float = 1e-6, seed: int = 0) -> float:
    """Relative error of the loop's directional derivatives against central finite differences.

    For random unit directions d: ``<grad, d>`` vs ``(L(p + eps d) - L(p - eps d)) / (2 eps)``,
    where L is the second-order meta-loss. Error is relative to the largest |<grad, d>|.
    """
    grad = meta_gradient(model, params, tasks, loss_fn, inner_lr, inner_steps, False, "loop")
    gen = torch.Generator().manual_seed(seed)
    analytic, numeric = [], []
    for _ in range(directions):
        d = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for k, p in params.items()}
        norm = torch.sqrt(sum((v**2).sum() for v in d.values()))
        d = {k: v / norm for k, v in d.items()}

        def loss_at(sign: float, d: dict = d) -> float:
            shifted = {k: (p.detach() + sign * eps * d[k]).requires_grad_(True) for k, p in params.items()}
            return float(meta_loss(model, shifted, tasks, loss_fn, inner_lr, inner_steps, False, "loop").loss.detach())

        analytic.append(float(sum((grad[k] * d[k]).sum() for k in params)))
        numeric.append((loss_at(1.0) - loss_at(-1.0)) / (2 * eps))
    a, n = torch.tensor(analytic, dtype=torch.float64), torch.tensor(numeric, dtype=torch.float64)
    return float((a - n).abs().max() / a.abs().max().clamp_min(1e-300))


def first_order_vs_cut_graph(model, params, tasks, loss_fn, inner_lr, inner_steps, batching="vmap") -> float:
    """First-order meta-gradient vs the query-loss gradient at detached adapted parameters."""
    got = meta_gradient(model, params, tasks, loss_fn, inner_lr, inner_steps, True, batching)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for sx, sy, qx, qy in zip(*tasks):
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        fast = adapt_autograd(model, leaves, sx, sy, loss_fn, inner_lr, inner_steps, first_order=False)
        fast = {k: p.detach().requires_grad_(True) for k, p in fast.items()}  # cut the inner graph
        grads = torch.autograd.grad(task_loss(model, fast, qx, qy, loss_fn), list(fast.values()), allow_unused=True)
        for k, g in zip(fast, grads):
            if g is not None:
                total[k] += g / len(tasks.query_x)
    return relative_error(got, total)


def zero_steps_vs_plain_gradient(model, params, tasks, loss_fn, batching="vmap") -> float:
    """Meta-gradient with no inner step vs the plain gradient of the mean query loss."""
    got = meta_gradient(model, params, tasks, loss_fn, 0.1, 0, False, batching)
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    plain = torch.stack([task_loss(model, leaves, qx, qy, loss_fn) for qx, qy in zip(tasks.query_x, tasks.query_y)]).mean()
    grads = torch.autograd.grad(plain, list(leaves.values()), allow_unused=True)
    ref = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), grads)}
    return relative_error(got, ref)


def second_order_contribution(model, params, tasks, loss_fn, inner_lr, inner_steps, batching="vmap") -> float:
    """How far second order is from first order (relative); a check that it is not silently zero."""
    args = (model, params, tasks, loss_fn, inner_lr, inner_steps)
    return relative_error(meta_gradient(*args, False, batching), meta_gradient(*args, True, batching))


def dense_hessian(f, params: Params) -> Tensor:
    """The full Hessian of scalar ``f`` over the flattened parameters (small models only)."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f_flat(x: Tensor) -> Tensor:
        return f({k: v.reshape(s) for k, v, s in zip(names, torch.split(x, sizes), shapes)})

    return torch.autograd.functional.hessian(f_flat, flat)
