"""MuJoCo locomotion task distributions of MAML (Finn et al. 2017, section 5.3), on gymnasium.

Four distributions, each over a robot from gymnasium's MuJoCo suite, with a horizon of 200 steps:

- ``halfcheetah_vel``: HalfCheetah-v5, task ``{"velocity": v}`` with v ~ U[0, 2]: run at speed v.
- ``halfcheetah_dir``: HalfCheetah-v5, task ``{"direction": d}`` with d = +1 or -1 (p = 0.5 each): run
  forward or backward.
- ``ant_vel``: Ant-v5, task ``{"velocity": v}`` with v ~ U[0, 3].
- ``ant_dir``: Ant-v5, task ``{"direction": d}`` with d = +1 or -1 (p = 0.5 each).

The rewards reproduce the paper's code (cbfinn/maml_rl, ``rllab/envs/mujoco/half_cheetah_env_rand.py``,
``half_cheetah_env_rand_direc.py``, ``ant_env_rand.py``, ``ant_env_rand_direc.py``); each reward function
below gives its formula. The environment's own reward terms (gymnasium's forward reward, healthy reward,
...) are not used: ``step`` returns the task's reward only.

What differs from the paper, and why:

- The robots are gymnasium's MuJoCo models on current MuJoCo, not rllab's models on MuJoCo 1.31, so masses,
  joint ranges and gears differ: returns are on a similar but not identical scale to the paper's plots.
- Observations are gymnasium's: HalfCheetah 17 numbers (``qpos[1:]``, ``qvel``; rllab added the torso's
  centre of mass, 20 numbers). Ant 105 numbers (``qpos[2:]``, ``qvel`` and the external contact forces
  ``cfrc_ext`` of the 13 robot bodies clipped to [-1, 1]); rllab's 125 also had the contact forces (which
  matter: they tell the policy which feet touch the ground) plus ``qpos[:2]``, the torso's rotation matrix
  and centre of mass. Pass ``env_kwargs={"include_cfrc_ext_in_observation": False}`` for 27 numbers.
  They equal gymnasium's env's at every step (``tests/test_locomotion.py`` steps both from the same
  states), the Ant's contact forces included: those are taken as gymnasium's step leaves them, before
  the reward's forward pass at the new state.
- Initial states use gymnasium's reset noise (positions + U[-0.1, 0.1], velocities + 0.1 N(0, 1)); rllab
  used positions + 0.01 N(0, 1), velocities + 0.1 N(0, 1).

Episodes: the cheetah never terminates (rllab's ``done = False``); the Ant terminates, as in rllab's
``ant_env_rand*.py``, when its state is not finite or its torso height leaves [0.2, 1.0] (gymnasium's
``is_healthy`` with the same range); the step that terminates still earns its reward. Episodes are cut at
``horizon`` steps. On gymnasium's Ant, random actions bounce the torso above 1.0 within about 50 steps
in most episodes (measured: 15 of 20 uniform-random episodes ended before 200 steps), so early training
sees short Ant episodes; ``env_kwargs={"terminate_when_unhealthy": False}`` turns termination off.

Sampling: ``LocomotionTasks.rollout`` steps ``tasks * trajectories`` environments together, in this process
(``num_workers=1``) or split into ``num_workers`` groups, one per ``gymnasium.vector.AsyncVectorEnv``
worker process; the environments are made once and reused between calls. Envs whose episode has ended
are not simulated further. The ``sampler`` argument of :class:`LocomotionTasks` picks how a process steps
its envs (MuJoCo's rollout for the cheetah by default); docs/speed.md measures each. Example::

    tasks = LocomotionTasks("halfcheetah_vel", horizon=200)
    batch = tasks.sample_tasks(40, torch.Generator().manual_seed(0))
    data = tasks.rollout(lambda obs: torch.zeros(*obs.shape[:2], tasks.act_dim), batch, 20, seed=0)
    data.rewards.shape  # torch.Size([40, 20, 200])
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from metarun.types import Rollouts
from metarun.utils.errors import DivergedError, MetarunError

SAMPLERS = ("batched", "threads", "gymnasium")
INSTALL_HINT = "install them with `pip install 'gymnasium[mujoco]'` (or `make install`)"

# Coefficients of the paper's code (cbfinn/maml_rl, rllab/envs/mujoco/*_rand*.py).
CHEETAH_CTRL_COST = 0.5 * 1e-1  # `ctrl_cost = 1e-1 * 0.5 * np.sum(np.square(action))`
ANT_CTRL_COST = 0.5 * 1e-2  # `ctrl_cost = 0.5 * 1e-2 * np.sum(np.square(action / scaling))`
ANT_CONTACT_COST = 0.5 * 1e-3  # `contact_cost = 0.5 * 1e-3 * np.sum(np.square(np.clip(cfrc_ext, -1, 1)))`
ANT_SURVIVE_REWARD = 0.05  # `survive_reward = 0.05`, also on the step that terminates
# ant_env_rand.py: `forward_reward = -np.abs(comvel[0] - self._goal_vel) + 1.0  # make it happy, not suicidal`
ANT_VEL_OFFSET = 1.0


def halfcheetah_vel_reward(velocity, action: np.ndarray, goal_velocity):
    """Reward of ``halfcheetah_vel`` (maml_rl ``rllab/envs/mujoco/half_cheetah_env_rand.py``).

    ``r = -|v - v_goal| - 0.05 * sum(a ** 2)``; of one env (numbers, an action vector) or of many
    (arrays of velocities and goals, actions ``[envs, act_dim]``).

    Args:
        velocity: forward (x) velocity ``v`` of the robot's centre of mass after the step.
        action: the action ``a`` applied, clipped to the action space [-1, 1].
        goal_velocity: the task's ``v_goal``.
    """
    return -np.abs(velocity - goal_velocity) - CHEETAH_CTRL_COST * np.sum(np.square(action), axis=-1)


def halfcheetah_dir_reward(velocity, action: np.ndarray, direction):
    """Reward of ``halfcheetah_dir`` (maml_rl ``rllab/envs/mujoco/half_cheetah_env_rand_direc.py``).

    ``r = d * v - 0.05 * sum(a ** 2)``; of one env or of many, as :func:`halfcheetah_vel_reward`.

    Args:
        velocity: forward (x) velocity ``v`` of the robot's centre of mass after the step.
        action: the action ``a`` applied, clipped to the action space [-1, 1].
        direction: the task's ``d``, +1 (forward) or -1 (backward).
    """
    return direction * velocity - CHEETAH_CTRL_COST * np.sum(np.square(action), axis=-1)


def ant_vel_reward(
    velocity: float, action: np.ndarray, contact_forces: np.ndarray, goal_velocity: float
) -> float:
    """Reward of ``ant_vel`` (maml_rl ``rllab/envs/mujoco/ant_env_rand.py``).

    ``r = -|v - v_goal| + 1 - 0.005 * sum(a ** 2) - 0.0005 * sum(clip(f, -1, 1) ** 2) + 0.05``

    Args:
        velocity: forward (x) velocity ``v`` of the robot's centre of mass after the step.
        action: the action ``a`` applied, clipped and divided by half the action range
            (rllab's ``action / scaling``; the range is [-1, 1] in gymnasium's Ant, so a divisor of 1).
        contact_forces: the external forces ``f`` on every body (``data.cfrc_ext``, any shape), after the step.
        goal_velocity: the task's ``v_goal``.
    """
    forward = -abs(velocity - goal_velocity) + ANT_VEL_OFFSET
    return forward - _ant_costs(action, contact_forces) + ANT_SURVIVE_REWARD


def ant_dir_reward(
    velocity: float, action: np.ndarray, contact_forces: np.ndarray, direction: float
) -> float:
    """Reward of ``ant_dir`` (maml_rl ``rllab/envs/mujoco/ant_env_rand_direc.py``).

    ``r = d * v - 0.005 * sum(a ** 2) - 0.0005 * sum(clip(f, -1, 1) ** 2) + 0.05``

    Args:
        velocity: forward (x) velocity ``v`` of the robot's centre of mass after the step.
        action: the action ``a`` applied, clipped and divided by half the action range (see ``ant_vel_reward``).
        contact_forces: the external forces ``f`` on every body (``data.cfrc_ext``), after the step.
        direction: the task's ``d``, +1 (forward) or -1 (backward).
    """
    return direction * velocity - _ant_costs(action, contact_forces) + ANT_SURVIVE_REWARD


def _ant_costs(action: np.ndarray, contact_forces: np.ndarray) -> float:
    """The Ant's control cost plus contact cost (the terms both Ant rewards subtract)."""
    ctrl = ANT_CTRL_COST * float(action @ action)
    contact = ANT_CONTACT_COST * float(np.sum(np.square(np.clip(contact_forces, -1.0, 1.0))))
    return ctrl + contact


@dataclass(frozen=True)
class _Spec:
    """One task distribution: which robot, which task parameter, which reward."""

    robot: str  # gymnasium id of the robot, "HalfCheetah-v5" or "Ant-v5"
    task_key: str  # "velocity" or "direction"
    max_velocity: float  # goal velocities are drawn from U[0, max_velocity]; unused for directions
    reward: Callable[..., float]

    @property
    def is_ant(self) -> bool:
        """Whether the robot is the Ant: contact cost, survive bonus and early termination."""
        return self.robot == "Ant-v5"


ENVIRONMENTS: dict[str, _Spec] = {
    "halfcheetah_vel": _Spec("HalfCheetah-v5", "velocity", 2.0, halfcheetah_vel_reward),
    "halfcheetah_dir": _Spec("HalfCheetah-v5", "direction", 0.0, halfcheetah_dir_reward),
    "ant_vel": _Spec("Ant-v5", "velocity", 3.0, ant_vel_reward),
    "ant_dir": _Spec("Ant-v5", "direction", 0.0, ant_dir_reward),
}

# Robot settings the paper's rewards rely on, pinned although they are gymnasium 1.4's defaults:
# rllab's Ant terminated outside 0.2 <= z <= 1.0 and clipped contact forces to [-1, 1].
_ROBOT_KWARGS: dict[str, dict[str, Any]] = {
    "HalfCheetah-v5": {},
    "Ant-v5": {
        "healthy_z_range": (0.2, 1.0),
        "terminate_when_unhealthy": True,
        "contact_force_range": (-1.0, 1.0),
    },
}


def _spec(name: str) -> _Spec:
    """The spec of environment ``name``; a ``MetarunError`` listing the known names if there is none."""
    if name not in ENVIRONMENTS:
        raise MetarunError(f"unknown environment {name!r}; known: {', '.join(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]


def _check_task(spec: _Spec, task: dict) -> float:
    """The task's parameter (goal velocity or direction), after checking the dict fits ``spec``."""
    if not isinstance(task, dict) or spec.task_key not in task:
        raise ValueError(f"a {spec.robot} task needs a {spec.task_key!r} entry, got {task!r}")
    value = float(task[spec.task_key])
    if spec.task_key == "direction" and value not in (-1.0, 1.0):
        raise ValueError(f"a direction must be +1 or -1, got {task!r}")
    return value


class _TaskEnvMixin:
    """Turns a gymnasium MuJoCo robot into one task of a distribution (mixed into its class by ``_backend``).

    ``step`` clips the action, simulates, and returns the task's reward. Once an episode has terminated,
    further steps do nothing and return reward 0 (an env group steps all its envs at every step).
    """

    _mujoco: Any  # the mujoco module, bound by _backend()

    def __init__(self, spec: _Spec, task: dict | None = None, **env_kwargs: Any):
        self._task_spec = spec
        self._goal: float | None = None
        self._task: dict | None = None
        self._ended = False
        self._final_obs: np.ndarray | None = None
        super().__init__(**{**_ROBOT_KWARGS[spec.robot], **env_kwargs})
        self._torso = self.model.body("torso").id
        self._action_scale = (self.action_space.high - self.action_space.low) / 2.0
        if task is not None:
            self.task = task

    @property
    def task(self) -> dict | None:
        """The current task, e.g. ``{"velocity": 1.3}``; set it before ``reset``."""
        return self._task

    @task.setter
    def task(self, task: dict) -> None:
        self._goal = _check_task(self._task_spec, task)
        self._task = dict(task)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the robot (gymnasium's reset noise, seeded by ``seed``); the task is kept."""
        if self._task is None:
            raise ValueError("set the env's task before reset")
        self._ended = False
        return super().reset(seed=seed, options=options)

    def forward_velocity(self) -> float:
        """Forward (x) velocity of the robot's centre of mass, at the current state.

        rllab's reward used ``get_body_comvel("torso")[0]``: its ``MjModel._compute_subtree`` mass-weights
        the linear velocity of each body's centre of mass (``mj_objectVelocity``, world frame) over the
        subtree rooted at the torso, i.e. the whole robot. MuJoCo's ``mj_subtreeVel`` computes the same
        ``subtree_linvel``. This is the instantaneous velocity after the step, not gymnasium's
        ``(x_after - x_before) / dt`` of the torso frame.
        """
        self._mujoco.mj_subtreeVel(self.model, self.data)
        return float(self.data.subtree_linvel[self._torso, 0])

    def step(self, action: np.ndarray):
        """Apply ``action`` (clipped to the action space) for ``frame_skip`` physics steps.

        Returns:
            ``(observation, task reward, terminated, truncated=False, {})``.
        """
        if self._ended:
            return self._final_obs, 0.0, True, False, {}
        action = np.clip(action, self.action_space.low, self.action_space.high)
        self.simulate(action)
        observation, reward, terminated = self.outcome(action)
        return observation, reward, terminated, False, {}

    def simulate(self, action: np.ndarray) -> None:
        """The physics of one step: ``frame_skip`` MuJoCo steps under ``action`` (already clipped).

        ``mj_step`` releases Python's GIL, so envs stepped on several threads simulate in parallel.
        """
        self.data.ctrl[:] = action
        self._mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)

    def outcome(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Observation, task reward and termination after ``simulate(action)``."""
        mujoco, model, data, spec = self._mujoco, self.model, self.data, self._task_spec
        if spec.is_ant:  # gymnasium's observation: its contact forces as its do_simulation leaves them
            mujoco.mj_rnePostConstraint(model, data)
        observation = self._get_obs()
        # mj_step leaves positions, velocities and forces derived from the state before its last
        # integration; rllab called model.forward() after stepping, so its reward saw the new state.
        if spec.is_ant:
            mujoco.mj_forward(model, data)  # contacts and constraint forces at the new state
            mujoco.mj_rnePostConstraint(model, data)  # fills cfrc_ext (not computed by mj_forward)
        else:
            mujoco.mj_kinematics(model, data)  # the cheetah's reward needs velocities only: cheaper
            mujoco.mj_comPos(model, data)
            mujoco.mj_comVel(model, data)
        velocity = self.forward_velocity()
        if spec.is_ant:
            reward = spec.reward(velocity, action / self._action_scale, data.cfrc_ext, self._goal)
        else:
            reward = spec.reward(velocity, action, self._goal)
        terminated = spec.is_ant and self._terminate_when_unhealthy and not self.is_healthy
        if terminated:
            self._ended, self._final_obs = True, observation
        return observation, reward, terminated


class _NativeStepper:
    """The cheetah's envs of a group stepped together by MuJoCo's own batched rollout (``mujoco.rollout``).

    One call per step simulates every env on ``threads`` native threads, and the observation and the
    reward's velocity come back as arrays: no Python runs per env. The model is the envs' model plus one
    sensor, the subtree linear velocity of the torso (what :meth:`_TaskEnvMixin.forward_velocity`
    computes). A sensor is evaluated by ``mj_step`` at the state before it integrates, so each step runs
    ``frame_skip + 1`` physics steps under the action and keeps the state after ``frame_skip``: the extra
    step's sensor is the velocity at that state, as rllab's ``forward()`` after the step gave it.

    MuJoCo's rollout does not hand back the constraint solver's warm start (``qacc_warmstart``), so each
    step starts the solver cold where gymnasium's env starts it from the previous step: the state after a
    step differs from gymnasium's by float64 rounding (at most 7e-14 over 200 HalfCheetah steps, measured
    from gymnasium's own states), below the float32 of the trajectories in all but rare roundings.
    """

    def __init__(self, env, count: int, threads: int):
        mujoco = env._mujoco
        from mujoco import rollout

        spec = mujoco.MjSpec.from_file(env.fullpath)
        spec.add_sensor(type=mujoco.mjtSensor.mjSENS_SUBTREELINVEL, objtype=mujoco.mjtObj.mjOBJ_BODY,
                        objname="torso")
        with warnings.catch_warnings():  # the compiler's notice about gymnasium's XML, as _forward_mujoco_warning
            warnings.filterwarnings("ignore", message=".*settotalmass")
            self.model = spec.compile()
        self.frame_skip = env.frame_skip
        # the state is time, qpos, qvel; gymnasium's observation is qpos[1:] (or all of it) and qvel
        self._observed = slice(1 + int(env._exclude_current_positions_from_observation), 1 + self.model.nq + self.model.nv)
        self.full = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self.states = np.zeros((count, mujoco.mj_stateSize(self.model, self.full)))
        self._data = [mujoco.MjData(self.model) for _ in range(threads)]
        self._rollout = rollout.Rollout(nthread=threads if threads > 1 else 0)  # 0: on the calling thread
        self._mujoco = mujoco

    def set_state(self, i: int, env) -> None:
        """Take env ``i``'s state from its gymnasium env (after its reset)."""
        self._mujoco.mj_getState(env.model, env.data, self.states[i], self.full)

    def observations(self) -> np.ndarray:
        """gymnasium's HalfCheetah observation of every env: ``qpos[1:]`` (``qpos`` if the env's
        ``exclude_current_positions_from_observation`` is False) and ``qvel``."""
        return self.states[:, self._observed]

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Step every env under its (clipped) action; the forward velocity of each after its step."""
        controls = np.repeat(actions[:, None, :], self.frame_skip + 1, axis=1)
        state, sensors = self._rollout.rollout(self.model, self._data, self.states, controls)
        self.states = state[:, self.frame_skip - 1]
        return sensors[:, self.frame_skip, 0]

    def close(self) -> None:
        self._rollout.close()


class _EnvGroupMixin:
    """Several task envs stepped in turn: the synchronous sampler, or one ``AsyncVectorEnv`` worker's share.

    The group has ``slots`` places of which the first ``count`` hold envs; empty places return zeros and
    count as terminated. Per-env rewards and terminations travel in the info dict.
    """

    def __init__(self, name: str, start: int, count: int, slots: int, env_kwargs: dict[str, Any],
                 sampler: str = "gymnasium", threads: int = 1):
        from gymnasium.spaces import Box

        self.envs = [make_env(name, **env_kwargs) for _ in range(count)]
        self.start, self.slots = start, slots
        # `sampler` as LocomotionTasks': gymnasium's loop (each env's own step, one after another), or batched
        # stepping on `threads` threads: in MuJoCo's rollout (batched, the cheetah) or the envs split into
        # one chunk per thread, each chunk simulated on its own thread (threads, and the Ant's batched: its
        # step needs per-env calls for contact forces and termination)
        self.batched = sampler != "gymnasium"
        self.threads = max(1, min(threads, count))
        self._chunks = [list(chunk) for chunk in np.array_split(np.arange(count), self.threads)]
        single = self.envs[0]
        native = sampler == "batched" and not single._task_spec.is_ant
        self._native = _NativeStepper(single, count, self.threads) if native else None
        threaded = self.threads > 1 and self._native is None
        self._pool = ThreadPoolExecutor(self.threads, "metarun-mujoco") if threaded else None
        obs_dim = single.observation_space.shape[0]
        self.observation_space = Box(-np.inf, np.inf, (slots, obs_dim), np.float64)
        low, high = (
            np.tile(bound, (slots, 1)) for bound in (single.action_space.low, single.action_space.high)
        )
        self.action_space = Box(low, high, dtype=np.float32)
        self._obs = np.zeros((slots, obs_dim))

    @property
    def tasks(self) -> list[dict]:
        """The tasks of the group's envs, in order."""
        return [env.task for env in self.envs]

    @tasks.setter
    def tasks(self, tasks: Sequence[dict]) -> None:
        for env, task in zip(self.envs, tasks, strict=True):
            env.task = task

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset each env with its own seed, ``options["seeds"][start + i]`` (the seeds of all groups)."""
        seeds = options["seeds"][self.start : self.start + len(self.envs)]
        self._obs[:] = 0.0
        for i, (env, env_seed) in enumerate(zip(self.envs, seeds, strict=True)):
            self._obs[i] = env.reset(seed=env_seed)[0]
            if self._native is not None:
                self._native.set_state(i, env)
        if self._native is not None:
            self._goals = np.array([env._goal for env in self.envs])
        return self._obs.copy(), {}

    def step(self, actions: np.ndarray):
        """Step each env; the info holds ``rewards`` and ``terminated`` arrays over the group's slots.

        Batched (``threads`` >= 1): the cheetah's envs in one call of MuJoCo's rollout (:class:`_NativeStepper`);
        the Ant's, each thread stepping its chunk of envs: the physics (``mj_step``, which releases the GIL)
        of the chunks runs in parallel, and every env makes the MuJoCo calls its own ``step`` makes, skipping
        only the clipping the sampler has done for all envs at once.
        """
        rewards = np.zeros(self.slots)
        terminated = np.ones(self.slots, dtype=bool)
        if self._native is not None:  # the cheetah: one MuJoCo call for every env; it never terminates
            count = len(self.envs)
            velocity = self._native.step(actions[:count])
            rewards[:count] = self.envs[0]._task_spec.reward(velocity, actions[:count], self._goals)
            self._obs[:count] = self._native.observations()
            terminated[:count] = False
            return self._obs.copy(), 0.0, False, False, {"rewards": rewards, "terminated": terminated}

        def step_chunk(chunk: list[int]) -> None:
            for i in chunk:
                env = self.envs[i]
                if not self.batched or env._ended:
                    self._obs[i], rewards[i], terminated[i], _, _ = env.step(actions[i])
                else:
                    env.simulate(actions[i])
                    self._obs[i], rewards[i], terminated[i] = env.outcome(actions[i])

        if self._pool is None:
            step_chunk(range(len(self.envs)))
        else:
            for done in [self._pool.submit(step_chunk, chunk) for chunk in self._chunks]:
                done.result()  # re-raises a chunk's exception here
        return self._obs.copy(), 0.0, False, False, {"rewards": rewards, "terminated": terminated}

    def close(self) -> None:
        """Close every env of the group (and its threads)."""
        if self._pool is not None:
            self._pool.shutdown()
        if self._native is not None:
            self._native.close()
        for env in self.envs:
            env.close()


class _Backend(NamedTuple):
    """gymnasium and MuJoCo, loaded on first use, with the env classes that need them."""

    gym: Any
    mujoco: Any
    task_env_classes: dict[str, type]
    group_class: type


def _forward_mujoco_warning(message: str) -> None:
    """Show a MuJoCo warning as a Python warning, instead of MuJoCo's default.

    MuJoCo's default prints every warning and appends it to ``MUJOCO_LOG.TXT`` in the working directory,
    once per env for the compiler's deprecation notice about gymnasium's XML (``settotalmass``), which is
    harmless and dropped here. Instability warnings ("Nan, Inf or huge value in QACC ...", after which
    MuJoCo resets the simulation) stay visible.
    """
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


@functools.cache
def _backend() -> _Backend:
    """Import gymnasium and MuJoCo (a one-line ``MetarunError`` saying how to install them if that fails)."""
    try:
        import gymnasium
        import mujoco
        from gymnasium.envs.mujoco.ant_v5 import AntEnv
        from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
    except Exception as error:  # ImportError, or MuJoCo's shared library failing to load
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise MetarunError(
            f"MuJoCo environments need gymnasium and mujoco ({reason}); {INSTALL_HINT}"
        ) from error
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_forward_mujoco_warning)
    task_env_classes = {
        robot: type(f"{base.__name__}Task", (_TaskEnvMixin, base), {"_mujoco": mujoco})
        for robot, base in (("HalfCheetah-v5", HalfCheetahEnv), ("Ant-v5", AntEnv))
    }
    group_class = type("EnvGroup", (_EnvGroupMixin, gymnasium.Env), {})
    return _Backend(gymnasium, mujoco, task_env_classes, group_class)


def make_env(name: str, task: dict | None = None, **env_kwargs: Any):
    """One environment of distribution ``name`` whose ``step`` returns the task's reward.

    It is the bare gymnasium env (no ``TimeLimit`` or other wrapper): episodes end only by termination.

    Args:
        name: one of ``ENVIRONMENTS`` (``halfcheetah_vel``, ``halfcheetah_dir``, ``ant_vel``, ``ant_dir``).
        task: e.g. ``{"velocity": 1.3}`` or ``{"direction": -1}``; else set ``env.task`` before ``reset``.
        **env_kwargs: passed to gymnasium's robot class, e.g. ``include_cfrc_ext_in_observation=False``.
    """
    spec = _spec(name)
    env_class = _backend().task_env_classes[spec.robot]
    if task is not None:
        _check_task(spec, task)
    try:
        return env_class(spec, task, **env_kwargs)
    except (OSError, ValueError, _backend().mujoco.FatalError) as error:  # a missing or broken model file
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise MetarunError(
            f"MuJoCo could not load the {spec.robot} model ({reason}); {INSTALL_HINT}"
        ) from error


def _make_group(name: str, start: int, count: int, slots: int, env_kwargs: dict[str, Any],
                sampler: str = "gymnasium", threads: int = 1):
    """An env group (module-level so that worker processes can unpickle it)."""
    return _backend().group_class(name, start, count, slots, env_kwargs, sampler, threads)


class _SyncSampler:
    """``n`` task envs stepped in turn in this process: one env group, no vector env.

    Not a ``SyncVectorEnv``: that steps every env at every step, so an Ant whose episode ended would either
    trip its assertion (autoreset disabled) or be reset and simulate an episode nobody uses (autoreset on),
    3x slower than skipping it for the Ant under a random policy (10 x 20 x 200 steps, 70 % of them after
    the episode's end: 2,600 against 7,700 steps/s). The group skips them.
    """

    def __init__(self, name: str, n: int, env_kwargs: dict[str, Any], sampler: str = "gymnasium", threads: int = 1):
        self.group = _make_group(name, 0, n, n, env_kwargs, sampler, threads)

    def reset(self, tasks: list[dict], seeds: list[int]) -> np.ndarray:
        self.group.tasks = tasks
        return self.group.reset(options={"seeds": seeds})[0]

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        observations, _, _, _, info = self.group.step(actions)
        return observations, info["rewards"], info["terminated"]

    def close(self) -> None:
        self.group.close()


class _AsyncSampler:
    """``n`` task envs split into groups over at most ``workers`` processes (``AsyncVectorEnv``)."""

    def __init__(self, name: str, n: int, workers: int, env_kwargs: dict[str, Any], sampler: str = "gymnasium",
                 threads: int = 1):
        gym = _backend().gym
        self.n = n
        self.slots = math.ceil(n / workers)
        groups = math.ceil(n / self.slots)
        fns = [
            functools.partial(
                _make_group, name, g * self.slots, min(self.slots, n - g * self.slots), self.slots, env_kwargs,
                sampler, threads,
            )
            for g in range(groups)
        ]
        # fork, not spawn or forkserver: those re-import the launching module in every worker, which
        # re-runs a script without an `if __name__ == "__main__"` guard (as `python -m metarun` is).
        # The workers only run MuJoCo, never torch, so torch's threads in the parent do not matter.
        self.envs = gym.vector.AsyncVectorEnv(
            fns, context="fork", autoreset_mode=gym.vector.AutoresetMode.DISABLED
        )

    def _unpad(self, array: np.ndarray) -> np.ndarray:
        return array.reshape(-1, *array.shape[2:])[: self.n]

    def reset(self, tasks: list[dict], seeds: list[int]) -> np.ndarray:
        groups = self.envs.num_envs
        self.envs.set_attr("tasks", [tasks[g * self.slots : (g + 1) * self.slots] for g in range(groups)])
        return self._unpad(self.envs.reset(options={"seeds": seeds})[0])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        padded = np.zeros((self.envs.num_envs * self.slots, actions.shape[1]), dtype=actions.dtype)
        padded[: self.n] = actions
        observations, _, _, _, info = self.envs.step(padded.reshape(self.envs.num_envs, self.slots, -1))
        return self._unpad(observations), self._unpad(info["rewards"]), self._unpad(info["terminated"])

    def close(self) -> None:
        self.envs.close()


# A batch of episodes, ``tasks x trajectories`` of them, each ``horizon`` steps long: the same
# tensors every environment returns (see ``Rollouts``). Step ``t`` holds the observation the policy
# saw, the action it sampled (before clipping), and the reward that followed; after an episode ends
# (``mask`` 0), observations, rewards and actions are zeros.
Trajectories = Rollouts


class LocomotionTasks:
    """A distribution of locomotion tasks and a batched sampler of their episodes.

    Args:
        name: one of ``ENVIRONMENTS``: ``halfcheetah_vel``, ``halfcheetah_dir``, ``ant_vel``, ``ant_dir``.
        horizon: steps per episode (the paper: 200).
        seed: mixed with each ``rollout`` seed into the envs' reset seeds.
        num_workers: 1 steps every env in this process; more splits the envs into that many groups, each
            stepped by its own process (``AsyncVectorEnv``, forked when the first rollout of a size runs).
            Results do not depend on it.
        sampler: how a process's envs are stepped at each step. ``batched`` (default): the fastest way for
            the robot: the cheetah's envs in one call of MuJoCo's rollout on ``threads`` native threads
            (:class:`_NativeStepper`: gymnasium's physics step by step to float64 rounding, but without the
            solver's warm start between steps, so whole episodes drift apart from gymnasium's as a chaotic
            system's do), the Ant's as ``threads``. ``threads``: one chunk of envs per thread, each env
            making its own MuJoCo calls (MuJoCo releases the GIL while it steps). ``gymnasium``: one env
            after another, as gymnasium's own loop does. ``threads`` and ``gymnasium`` make the same calls
            on every env: their trajectories are identical.
        threads: the batched sampler's threads per process; 0 (default): as many as torch's threads (the
            run's ``trainer.num_threads``), divided among the ``num_workers`` processes.
        env_kwargs: passed to gymnasium's robot class, e.g. ``{"include_cfrc_ext_in_observation": False}``.

    Raises:
        MetarunError: an unknown ``name``, or gymnasium / MuJoCo missing.
    """

    def __init__(
        self,
        name: str,
        horizon: int = 200,
        seed: int = 0,
        num_workers: int = 1,
        env_kwargs: dict[str, Any] | None = None,
        sampler: str = "batched",
        threads: int = 0,
    ):
        self.spec = _spec(name)
        if horizon < 1 or num_workers < 1 or threads < 0:
            raise MetarunError(f"horizon and num_workers must be >= 1 and threads >= 0, got {horizon}, {num_workers} "
                               f"and {threads}")
        if sampler not in SAMPLERS:
            raise MetarunError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        self.name, self.horizon, self.seed, self.num_workers = name, horizon, seed, num_workers
        self.sampler = sampler
        # batched: every process's envs simulated on `threads` threads (0: as many as torch's threads, which
        # the trainer sets from trainer.num_threads, shared among the worker processes); gymnasium: one env
        # after another
        self.threads = 1 if sampler == "gymnasium" else (threads or max(1, torch.get_num_threads() // num_workers))
        self.env_kwargs = dict(env_kwargs or {})
        probe = make_env(name, **self.env_kwargs)
        self.obs_dim: int = probe.observation_space.shape[0]
        self.act_dim: int = probe.action_space.shape[0]
        self.action_low = torch.as_tensor(probe.action_space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(probe.action_space.high, dtype=torch.float32)
        probe.close()
        self._samplers: dict[int, _SyncSampler | _AsyncSampler] = {}  # by number of envs, reused

    @property
    def task_key(self) -> str:
        """The task's parameter: ``"velocity"`` or ``"direction"``."""
        return self.spec.task_key

    def sample_tasks(self, n: int, generator: torch.Generator) -> list[dict]:
        """Draw ``n`` tasks: ``{"velocity": v}`` with v ~ U[0, max] or ``{"direction": +1 or -1}``."""
        if self.spec.task_key == "velocity":
            velocities = torch.rand(n, generator=generator, dtype=torch.float64) * self.spec.max_velocity
            return [{"velocity": v} for v in velocities.tolist()]
        directions = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        return [{"direction": d} for d in directions.tolist()]

    def _sampler(self, n: int) -> _SyncSampler | _AsyncSampler:
        if n not in self._samplers:
            if self.num_workers > 1:
                self._samplers[n] = _AsyncSampler(self.name, n, self.num_workers, self.env_kwargs, self.sampler,
                                                  self.threads)
            else:
                self._samplers[n] = _SyncSampler(self.name, n, self.env_kwargs, self.sampler, self.threads)
        return self._samplers[n]

    def rollout(
        self,
        act: Callable[[torch.Tensor], torch.Tensor],
        tasks: list[dict],
        trajectories: int,
        seed: int,
    ) -> Trajectories:
        """Run ``trajectories`` episodes of each task, all envs in step.

        Args:
            act: maps observations ``[tasks, trajectories, obs_dim]`` (float32, CPU) to actions
                ``[tasks, trajectories, act_dim]`` (any device); called once per step, under
                ``torch.no_grad()``. Envs whose episode has ended get zero observations and their actions
                are ignored.
            tasks: one dict per task, e.g. from ``sample_tasks``.
            trajectories: episodes per task.
            seed: non-negative; the envs' reset seeds derive from it (and from the constructor's ``seed``),
                so the same seed and the same ``act`` give identical ``Trajectories``.

        Raises:
            MetarunError: a non-finite observation.
            DivergedError: ``act`` returned non-finite actions.
        """
        for task in tasks:
            _check_task(self.spec, task)
        n_tasks, horizon = len(tasks), self.horizon
        n = n_tasks * trajectories
        sampler = self._sampler(n)
        env_tasks = [task for task in tasks for _ in range(trajectories)]  # task-major, like the outputs
        seeds = [int(s) for s in np.random.SeedSequence([self.seed, seed]).generate_state(n)]

        observations = torch.zeros(n_tasks, trajectories, horizon, self.obs_dim)
        actions = torch.zeros(n_tasks, trajectories, horizon, self.act_dim)
        rewards = torch.zeros(n_tasks, trajectories, horizon)
        mask = torch.zeros(n_tasks, trajectories, horizon)
        alive = np.ones(n, dtype=bool)
        low, high = self.action_low.double().numpy(), self.action_high.double().numpy()

        obs = sampler.reset(env_tasks, seeds)
        for t in range(horizon):
            obs = np.where(alive[:, None], obs, 0.0)
            if not np.isfinite(obs).all():
                env = int(np.flatnonzero(~np.isfinite(obs).all(axis=1))[0])
                raise MetarunError(
                    f"{self.name}: non-finite observation at step {t} of env {env} (task {env_tasks[env]})"
                )
            obs_t = torch.from_numpy(obs.astype(np.float32)).view(n_tasks, trajectories, self.obs_dim)
            with torch.no_grad():
                action_t = act(obs_t)
            if action_t.shape != (n_tasks, trajectories, self.act_dim):
                raise ValueError(
                    f"act returned shape {tuple(action_t.shape)}, expected {(n_tasks, trajectories, self.act_dim)}"
                )
            action_t = action_t.detach().to("cpu", torch.float32)
            action = action_t.reshape(n, self.act_dim).double().numpy()
            if not np.isfinite(action[alive]).all():
                raise DivergedError(f"{self.name}: the policy returned non-finite actions at step {t}")
            action = np.where(alive[:, None], np.clip(action, low, high), 0.0)

            alive_t = torch.from_numpy(alive.reshape(n_tasks, trajectories))
            observations[:, :, t] = obs_t
            actions[:, :, t] = torch.where(alive_t.unsqueeze(-1), action_t, 0.0)  # ended envs: zeros
            mask[:, :, t] = alive_t
            obs, reward, terminated = sampler.step(action)
            rewards[:, :, t] = torch.from_numpy(np.where(alive, reward, 0.0).reshape(n_tasks, trajectories))
            alive &= ~terminated
        return Trajectories(observations, actions, rewards, mask)

    def close(self) -> None:
        """Close every vector env (and its worker processes)."""
        for sampler in self._samplers.values():
            sampler.close()
        self._samplers.clear()

    def __enter__(self) -> LocomotionTasks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
