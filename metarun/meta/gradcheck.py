"""Independent checks of every meta-gradient path, generic over algorithms and models (float64).

Each function returns the largest relative error of one comparison, so tests and reports can
assert on it. Relative error is ``max|a - b| / max|b|`` over all parameters, the scale-free form
used throughout. Gradients are keyed as :meth:`~metarun.algorithms.base.Algorithm.meta_parameters`
(the model's names, then ``algorithm.<name>`` for what the algorithm owns).

The references are independent of the fast path:

* the per-task loop uses ``torch.autograd.grad`` (``create_graph=True``), the fast path
  ``torch.func.grad`` under ``vmap``;
* central finite differences of the outer loss along random directions (in every meta-parameter,
  the algorithm's own included) use no autograd at all for the derivative;
* first order is checked against the gradient of the query loss at parameters adapted by a
  hand-written SGD loop with the inner graph cut (``detach``);
* zero inner steps is checked against the plain gradient of the query loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metarun.meta.batching import task_loss
from metarun.types import LossFn, Params, TaskBatch


def relative_error(a: Params, b: Params) -> float:
    """``max |a - b| / max |b|`` over all entries of two parameter dicts."""
    num = max(float((a[k] - b[k]).abs().max()) for k in b)
    den = max(float(b[k].abs().max()) for k in b)
    return num / max(den, 1e-300)


def leaves(params: Params) -> Params:
    return {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}


def outer_gradient(algorithm, params: Params, tasks: TaskBatch, batching: str) -> Params:
    """The algorithm's outer direction for every meta-parameter, at fresh leaves of ``params``, from
    the algorithm's state as it is: state an outer step carries on (Reptile's inner Adam) is put back
    afterwards, so comparisons see the same state."""
    kept = {k: b.clone() for k, b in algorithm.named_buffers()}
    try:
        return algorithm.outer_gradient(leaves(params), tasks, batching)[0]
    finally:
        with torch.no_grad():
            for k, b in algorithm.named_buffers():
                b.copy_(kept[k])


def vmap_vs_loop(algorithm, params: Params, tasks: TaskBatch) -> float:
    """Relative error of the vmap outer direction against the per-task loop reference."""
    return relative_error(outer_gradient(algorithm, params, tasks, "vmap"),
                          outer_gradient(algorithm, params, tasks, "loop"))


def loop_vs_finite_differences(algorithm, params: Params, tasks: TaskBatch, directions: int = 4,
                               eps: float = 1e-6, seed: int = 0) -> float:
    """Relative error of the loop's directional derivatives of the outer loss against central finite
    differences, along random unit directions in every meta-parameter (the algorithm's too).

    For a direction d: ``<grad, d>`` vs ``(L(w + eps d) - L(w - eps d)) / (2 eps)``; the error is
    relative to the largest ``|<grad, d>|``.
    """
    grad = outer_gradient(algorithm, params, tasks, "loop")
    own = dict(algorithm.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    analytic, numeric = [], []
    for _ in range(directions):
        d = {k: torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device) for k, g in grad.items()}
        norm = torch.sqrt(sum((v**2).sum() for v in d.values()))
        d = {k: v / norm for k, v in d.items()}

        def loss_at(sign: float, d: dict = d) -> float:
            shifted = {k: (p.detach() + sign * eps * d[k]).requires_grad_(True) for k, p in params.items()}
            with torch.no_grad():
                for name, p in own.items():
                    p.add_(sign * eps * d["algorithm." + name])
            try:
                return float(algorithm.outer_loss(shifted, tasks, "loop").loss.detach())
            finally:
                with torch.no_grad():
                    for name, p in own.items():
                        p.sub_(sign * eps * d["algorithm." + name])

        analytic.append(float(sum((grad[k] * d[k]).sum() for k in grad)))
        numeric.append((loss_at(1.0) - loss_at(-1.0)) / (2 * eps))
    a, n = torch.tensor(analytic, dtype=torch.float64), torch.tensor(numeric, dtype=torch.float64)
    return float((a - n).abs().max() / a.abs().max().clamp_min(1e-300))


def sgd_reference(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn, lr: float,
                  steps: int, first_order: bool) -> Params:
    """A hand-written inner loop (plain SGD with ``torch.autograd.grad``) for the references."""
    for _ in range(steps):
        names = list(params)
        grads = torch.autograd.grad(task_loss(model, params, x, y, loss_fn), [params[k] for k in names],
                                    create_graph=not first_order, allow_unused=True)
        params = {k: params[k] - lr * (torch.zeros_like(params[k]) if g is None else g) for k, g in zip(names, grads)}
    return params


def first_order_vs_cut_graph(algorithm, params: Params, tasks: TaskBatch, lr: float, steps: int,
                             batching: str = "vmap") -> float:
    """A first-order algorithm's direction vs the query-loss gradient at parameters adapted by
    :func:`sgd_reference` with the inner graph cut (``steps`` steps of rate ``lr``)."""
    got = outer_gradient(algorithm, params, tasks, batching)
    model, loss_fn = algorithm.model, algorithm.loss_fn
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for sx, sy, qx, qy in zip(*tasks):
        fast = sgd_reference(model, leaves(params), sx, sy, loss_fn, lr, steps, first_order=False)
        fast = {k: p.detach().requires_grad_(True) for k, p in fast.items()}  # cut the inner graph
        grads = torch.autograd.grad(task_loss(model, fast, qx, qy, loss_fn), list(fast.values()), allow_unused=True)
        for k, g in zip(fast, grads):
            if g is not None:
                total[k] += g / len(tasks.query_x)
    return relative_error({k: got[k] for k in params}, total)


def zero_steps_vs_plain_gradient(algorithm, params: Params, tasks: TaskBatch, batching: str = "vmap") -> float:
    """An algorithm with no inner step vs the plain gradient of the mean query loss."""
    got = outer_gradient(algorithm, params, tasks, batching)
    model, loss_fn = algorithm.model, algorithm.loss_fn
    fresh = leaves(params)
    plain = torch.stack([task_loss(model, fresh, qx, qy, loss_fn) for qx, qy in zip(tasks.query_x, tasks.query_y)]).mean()
    grads = torch.autograd.grad(plain, list(fresh.values()), allow_unused=True)
    ref = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(fresh.items(), grads)}
    return relative_error({k: got[k] for k in params}, ref)


def dense_hessian(f, params: Params) -> Tensor:
    """The full Hessian of scalar ``f`` over the flattened parameters (small models only)."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f_flat(x: Tensor) -> Tensor:
        return f({k: v.reshape(s) for k, v, s in zip(names, torch.split(x, sizes), shapes)})

    return torch.autograd.functional.hessian(f_flat, flat)
