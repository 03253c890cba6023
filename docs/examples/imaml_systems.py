"""Why iMAML with the paper's linear system learns little on Omniglot: a measurement.

    python docs/examples/imaml_systems.py [--solver proximal_gd] [--steps 100] [--every 50] [--tasks 16]

Trains metarun's iMAML on Omniglot 5-way 1-shot (the preset: 16 steps of 0.1, lambda 2) with the paper's
system ``(I + H / lam) v = g`` for ``--steps`` outer steps, with the paper's inner solver (gradient descent
on the proximal objective, ``--solver proximal_gd``: what the earlier runs whose query loss stayed flat
used) or the authors' (``sgd_pullback``). Every ``--every`` steps, on ``--tasks`` fresh training tasks,
at each task's adapted parameters phi it measures:

* the most negative eigenvalue of H (the support loss's Hessian at phi), by 30 Lanczos steps, and
  how many tasks have one below -lam, where ``I + H / lam`` stops being positive definite;
* the exact meta-gradient of the inner procedure as run (backpropagation through its 16 steps and the
  pull-back), and the cosine to it of the mean direction from each system, the paper's and the
  authors' damped ``(2 I + H / 12) x = g``, each with 5 CG steps; also of the first-order direction g.

Prints one line per measurement; the numbers in docs/algorithms.md came from this script.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarun.algorithms.imaml import conjugate_gradient, hessian_vector
from metarun.cli import compose
from metarun.trainers import supervised as sup


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def lanczos_min(matvec, like, iterations=30, seed=0):
    """The smallest eigenvalue of a symmetric operator (Ritz value of ``iterations`` Lanczos steps)."""
    gen = torch.Generator().manual_seed(seed)
    q = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in like.items()}
    norm = flat(q).norm()
    q = {k: v / norm for k, v in q.items()}
    prev, beta, alphas, betas = None, 0.0, [], []
    for _ in range(iterations):
        w = matvec(q)
        alpha = float(flat(w) @ flat(q))
        w = {k: w[k] - alpha * q[k] - (beta * prev[k] if prev is not None else 0) for k in w}
        beta = float(flat(w).norm())
        alphas.append(alpha)
        betas.append(beta)
        if beta < 1e-10:
            break
        prev, q = q, {k: v / beta for k, v in w.items()}
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    for i in range(len(alphas) - 1):
        t[i, i + 1] = t[i + 1, i] = betas[i]
    return float(torch.linalg.eigvalsh(t)[0])


def cosine(a, b):
    return float(flat(a) @ flat(b) / (flat(a).norm() * flat(b).norm()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--solver", default="proximal_gd", choices=["proximal_gd", "sgd_pullback"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = compose("experiment=omniglot_5w1s", "algorithm=imaml", "algorithm.system=paper", "algorithm.batching=loop",
                  f"algorithm.inner_solver={args.solver}", "trainer.progress=false", "task.progress=false",
                  "trainer.num_threads=1")
    run = sup.setup(cfg, None)
    alg, model = run.algorithm, run.model
    lam = alg.lam
    probe = torch.Generator().manual_seed(99)
    for step in range(args.steps + 1):
        if step % args.every == 0:
            tasks = alg.training_tasks(run.task, args.tasks, probe)
            theta = {k: p.detach() for k, p in model.named_parameters()}
            negative, minima, exact, paper, damped, first = 0, [], [], [], [], []
            for sx, sy, qx, qy in zip(*tasks):
                leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
                state = alg.start(leaves, alg.lam)
                for _ in range(alg.inner_steps):  # the inner procedure, differentiably (second order)
                    loss = F.cross_entropy(functional_call(model, state["params"], (sx,)), sy)
                    grads = torch.autograd.grad(loss, list(state["params"].values()), create_graph=True)
                    if not alg.pullback:  # the paper's solver: the proximal term's gradient too
                        grads = [g + lam * (p - leaves[k]) for (k, p), g in zip(state["params"].items(), grads)]
                    state = {**state, "params": {k: p - alg.alpha * g for (k, p), g in zip(state["params"].items(), grads)}}
                phi_graph = alg.weights(state, alg.inner_steps)
                query = F.cross_entropy(functional_call(model, phi_graph, (qx,)), qy)
                exact.append(dict(zip(leaves, torch.autograd.grad(query, list(leaves.values())))))
                phi = {k: v.detach() for k, v in phi_graph.items()}
                g = dict(zip(phi, torch.autograd.grad(F.cross_entropy(functional_call(model, {k: v.requires_grad_(True) for k, v in phi.items()}, (qx,)), qy),
                                                      list(phi.values()))))
                phi = {k: v.detach() for k, v in phi.items()}

                def hv(v, phi=phi, sx=sx, sy=sy):
                    def support(weights, sx=sx, sy=sy):
                        return F.cross_entropy(functional_call(model, weights, (sx,)), sy)

                    return hessian_vector(support, phi, v, "autograd")

                smallest = lanczos_min(hv, phi)
                minima.append(smallest)
                negative += smallest < -lam
                paper.append(conjugate_gradient(lambda v, hv=hv: {k: v[k] + hv(v)[k] / lam for k in v}, g, 5))
                damped.append(conjugate_gradient(lambda v, hv=hv: {k: 2 * v[k] + hv(v)[k] / (lam + 10) for k in v}, g, 5))
                first.append(g)

            def mean(ds):
                return {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]}

            reference = mean(exact)
            print(f"step {step}: lambda_min(H) median {sorted(minima)[len(minima) // 2]:.2f}, min {min(minima):.2f}; "
                  f"below -lam in {negative}/{len(minima)} tasks; cosine to the exact meta-gradient: "
                  f"paper {cosine(mean(paper), reference):.2f}, damped {cosine(mean(damped), reference):.2f}, "
                  f"first order {cosine(mean(first), reference):.2f}", flush=True)
        if step < args.steps:
            sup.meta_step(run, sup.sample_meta_batch(run))


if __name__ == "__main__":
    main()
