"""MAML for reinforcement learning with a TRPO outer step (MAML paper, section 5.3).

Each iteration, in the paper's order:

1. draw ``meta_batch_size`` tasks; sample ``trajectories`` episodes per task with the meta-policy;
2. adapt a copy of the policy to each task with ``inner_steps`` REINFORCE steps (linear baseline,
   alpha): the one inner step of :mod:`metarun.meta.inner`;
3. sample the same number of episodes with each adapted policy;
4. one TRPO step on the meta-parameters, whose surrogate and KL are taken on the post-update
   episodes through the inner step (second order unless ``algorithm.first_order``).

At evaluation each step is one REINFORCE step of rate ``test_inner_lrs[i]`` on the episodes of the
policy before it.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from metarun.meta import policy_gradient as pg
from metarun.meta.trpo import trpo_step
from metarun.types import Params, Rollouts
from metarun.utils.errors import MetarunError


class MAMLTRPO(nn.Module):
    """The meta-RL algorithm; it owns no meta-parameters beyond the policy's.

    Args:
        cfg: the ``algorithm`` config group (``algorithm/maml_trpo.yaml``).
        policy: the Gaussian policy (called through ``functional_call``, not owned).
    """

    def __init__(self, cfg: DictConfig, policy: nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.__dict__["policy"] = policy
        self.cfg = cfg
        self.fisher = cfg.get("fisher", "factored")  # (checkpoints of older configs have no key)
        if self.fisher not in FISHER_PRODUCTS:
            raise MetarunError(f"algorithm.fisher={self.fisher}: must be one of {', '.join(FISHER_PRODUCTS)}")
        # where the TRPO step runs: the episodes are sampled on the CPU and moved there once per iteration
        self.device = torch.device(device)

    def meta_iteration(self, envs, generators: dict[str, torch.Generator], seed: int, num_tasks: int | None = None,
                       reduce=None) -> dict[str, Tensor]:
        """One MAML-TRPO iteration (steps 1-4 above) on ``envs``; updates the policy in place and
        returns the iteration's statistics. ``seed`` fixes the environments' resets. Under torchrun
        each process samples ``num_tasks`` of the meta-batch, and ``reduce`` averages over the
        processes (:func:`metarun.distributed.average`) what the TRPO step and the statistics need."""
        batch, returns = self.collect(envs, generators, seed, num_tasks or self.cfg.meta_batch_size)
        params = {k: p.detach() for k, p in self.policy.named_parameters()}
        new_params, stats = self.outer_step(params, batch, reduce)
        if not all(torch.isfinite(p).all() for p in new_params.values()):
            raise MetarunError("non-finite policy parameters after the TRPO step")
        with torch.no_grad():
            for k, p in self.policy.named_parameters():
                p.copy_(new_params[k])
        returns = (reduce or (lambda tensors: tensors))(returns)
        numbers = {"return_pre_update": returns[0], "return_post_update": returns[1],
                   "surrogate_before": stats.loss_before, "surrogate_after": stats.loss_after, "kl": stats.kl,
                   "step_fraction": stats.step_fraction}
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in numbers.items()}

    def collect(self, envs, generators: dict[str, torch.Generator], seed: int,
                num_tasks: int) -> tuple[pg.MetaBatch, list[Tensor]]:
        """Steps 1-3: ``num_tasks`` tasks, their episodes before and after the inner step; and the
        mean return of each."""
        alg, policy = self.cfg, self.policy
        params = {k: p.detach() for k, p in policy.named_parameters()}
        tasks = envs.sample_tasks(num_tasks, generators["tasks"])
        pre = envs.rollout(pg.make_act(policy, params, generators["actions"], False), tasks, alg.trajectories, seed)
        check_finite(pre, "pre-update")
        pre_adv = pg.advantages(pre, alg.discount, alg.gae_lambda)
        fast = pg.adapt_tasks(policy, params, pre, pre_adv, alg.inner_lr, alg.inner_steps, first_order=True)
        fast = {k: v.detach() for k, v in fast.items()}
        post = envs.rollout(pg.make_act(policy, fast, generators["actions"], True), tasks, alg.trajectories, seed + 1)
        check_finite(post, "post-update")
        post_adv = pg.advantages(post, alg.discount, alg.gae_lambda)
        batch = pg.MetaBatch(pre, pre_adv, post, post_adv, *pg.old_policy_stats(policy, fast, post))
        return batch, [pg.episode_returns(pre).mean(), pg.episode_returns(post).mean()]

    def outer_step(self, params: Params, batch: pg.MetaBatch, reduce=None):
        """Step 4: the TRPO step from ``params`` on ``batch``, on ``self.device``; returns the new
        parameters (where ``params`` were) and its statistics (``reduce``: see :meth:`meta_iteration`)."""
        alg, policy, home = self.cfg, self.policy, next(iter(params.values())).device
        if self.device != home:
            batch = pg.MetaBatch(*(to_device(part, self.device) for part in batch))
            params = to_device(params, self.device)
            if "_device_policy" not in self.__dict__:
                self.__dict__["_device_policy"] = _on_device(policy, self.device)
            policy = self.__dict__["_device_policy"]

        def objective(p):
            return pg.meta_objective(policy, p, batch, alg.inner_lr, alg.inner_steps, alg.first_order)

        fisher = gradient = None
        if self.fisher != "autograd" and alg.inner_steps == 1:
            fisher, gradient = pg.meta_curvature(policy, params, batch, alg.inner_lr, alg.first_order,
                                                 closed_form=self.fisher == "factored")
        new, stats = trpo_step(params, objective, alg.max_kl, alg.cg_iterations, alg.cg_damping,
                               alg.backtrack_ratio, alg.line_search_steps, reduce, fisher, gradient)
        return to_device(new, home), stats

    def adapt_step(self, params: Params, rollouts: Rollouts, lr: float) -> Params:
        """One evaluation step for every task at once: REINFORCE of rate ``lr`` on each task's own
        episodes, from each task's own parameters (a leading task axis)."""
        adv = pg.advantages(rollouts, self.cfg.discount, self.cfg.gae_lambda)
        fast = pg.adapt_tasks(self.policy, params, rollouts, adv, lr, 1, first_order=True, per_task=True)
        return {k: v.detach() for k, v in fast.items()}


FISHER_PRODUCTS = ("factored", "factored_autograd", "autograd")


def to_device(tree, device: torch.device):
    """Tensors of a dict, tuple or NamedTuple (nested), moved to ``device``."""
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, tuple):
        moved = [to_device(v, device) for v in tree]
        return type(tree)(*moved) if hasattr(tree, "_fields") else tuple(moved)
    return tree


def _on_device(policy: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``policy`` on ``device`` for ``functional_call`` (its own parameters are replaced by the
    ones passed; the copy only carries its structure and any buffers)."""
    import copy

    return copy.deepcopy(policy).to(device)


def check_finite(rollouts: Rollouts, what: str) -> None:
    for name, value in zip(rollouts._fields, rollouts):
        if not torch.isfinite(value).all():
            raise MetarunError(f"non-finite {name} in the {what} episodes")
