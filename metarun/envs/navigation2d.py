"""2D navigation (MAML paper, section 5.3): a point moves in the plane toward a goal.

Each task is a goal drawn from U[-0.5, 0.5]^2. The point starts at the origin; the velocity is
clipped to [-0.1, 0.1] per axis; the reward is minus the distance to the goal after the move; an
episode ends once the point is within 0.01 of the goal, or at the horizon (100).

As in the paper's code (rllab's ``normalize`` wrapper around ``PointEnvRandGoal``), the policy acts
in normalized units: its action is clipped to [-1, 1] and scaled to the velocity bounds, so a unit
action is a velocity of 0.1. Vectorised in torch: every task and trajectory steps at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metarun.types import Rollouts
from metarun.utils.errors import MetarunError


class Navigation2DTasks:
    """The 2D-navigation task distribution.

    Args:
        horizon: steps per episode; paper: 100.
        goal_range: goals ~ U[-goal_range, goal_range]^2; paper: 0.5.
        max_action: per-axis bound of the velocity; paper: 0.1. Actions in [-1, 1] map onto it.
        success_radius: an episode ends within this distance of the goal; paper: 0.01.
        name: the family's name (from the config).
    """

    obs_dim = 2
    act_dim = 2

    @classmethod
    def model_sizes(cls, task) -> dict:
        """The policy's sizes (the trainer passes them), without building the task."""
        return {"obs_dim": cls.obs_dim, "act_dim": cls.act_dim}

    def __init__(self, horizon: int = 100, goal_range: float = 0.5, max_action: float = 0.1,
                 success_radius: float = 0.01, name: str = "navigation2d") -> None:
        self.horizon, self.goal_range, self.max_action = horizon, goal_range, max_action
        self.success_radius, self.name = success_radius, name

    def sample_tasks(self, n: int, generator: torch.Generator) -> list[dict]:
        goals = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * self.goal_range
        return [{"goal": g.tolist()} for g in goals]

    def rollout(self, act: Callable[[Tensor], Tensor], tasks: list[dict], trajectories: int, seed: int = 0) -> Rollouts:
        """Run every task's policy for ``trajectories`` episodes at once. ``seed`` is unused: the
        start is the origin and the dynamics are deterministic; the noise is the policy's (``act``)."""
        goals = torch.tensor([t["goal"] for t in tasks], dtype=torch.float32)[:, None, :]  # [T, 1, 2]
        position = torch.zeros(len(tasks), trajectories, 2)
        alive = torch.ones(len(tasks), trajectories)
        obs, actions, rewards, mask = [], [], [], []
        for _ in range(self.horizon):
            action = act(position)
            if not torch.isfinite(action).all():
                raise MetarunError("non-finite action from the policy in navigation2d")
            obs.append(position)
            actions.append(action)
            mask.append(alive)
            velocity = action.clamp(-1.0, 1.0) * self.max_action
            position = position + velocity * alive[..., None]
            distance = torch.linalg.vector_norm(position - goals, dim=-1)
            rewards.append(-distance * alive)
            alive = alive * (distance >= self.success_radius).float()
        return Rollouts(*(torch.stack(xs, dim=2) for xs in (obs, actions, rewards, mask)))

    def close(self) -> None:
        pass
