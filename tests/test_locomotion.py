"""Unit tests of the MuJoCo locomotion tasks: rewards against hand computation, task sampling, rollouts."""

import copy
import math
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")

import mujoco  # noqa: E402

from metarun.envs import locomotion  # noqa: E402
from metarun.envs.locomotion import ENVIRONMENTS, LocomotionTasks, make_env  # noqa: E402
from metarun.utils.errors import DivergedError, MetarunError  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

pytestmark = pytest.mark.unit

NAMES = list(ENVIRONMENTS)
TASKS = {
    "halfcheetah_vel": {"velocity": 1.3},
    "halfcheetah_dir": {"direction": -1},
    "ant_vel": {"velocity": 2.2},
    "ant_dir": {"direction": 1},
}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def samplers():
    """One small LocomotionTasks per environment (horizon 5), shared by the rollout tests."""
    made = {name: LocomotionTasks(name, horizon=5) for name in NAMES}
    yield made
    for tasks in made.values():
        tasks.close()


class Replay:
    """An ``act`` that ignores observations and plays a fixed sequence of actions (one per step)."""

    def __init__(self, shape: tuple[int, ...], horizon: int, seed: int = 0, scale: float = 1.5):
        generator = torch.Generator().manual_seed(seed)
        self.actions = scale * torch.randn(horizon, *shape, generator=generator)
        self.step = 0
        self.seen: list[torch.Tensor] = []

    def __call__(self, observations: torch.Tensor) -> torch.Tensor:
        self.seen.append(observations.clone())
        action = self.actions[self.step]
        self.step += 1
        return action


# --- rewards, against the paper's formulas computed by hand ---------------------------------------------


def com_velocity_rllab(model, data) -> float:
    """rllab's ``get_body_comvel("torso")[0]``, computed as rllab's ``MjModel._compute_subtree`` did.

    Each body's linear velocity at its centre of mass (``mj_objectVelocity``, world frame) weighted by its
    mass, summed over the torso's subtree (every body but the world), divided by the subtree's mass.
    """
    torso = model.body("torso").id
    assert all(model.body_rootid[1:] == torso)  # the torso's subtree is the whole robot
    momentum, mass = np.zeros(3), 0.0
    for body in range(1, model.nbody):
        velocity = np.zeros(6)
        mujoco.mj_objectVelocity(model, data, mujoco.mjtObj.mjOBJ_BODY, body, velocity, 0)
        momentum += model.body_mass[body] * velocity[3:]
        mass += model.body_mass[body]
    return momentum[0] / mass


def known_state(env, name):
    """Put ``env`` in a fixed state: settled on the ground (Ant: feet in contact), moving forward."""
    env.reset(seed=0)
    if name.startswith("ant"):
        for _ in range(25):  # let the Ant land, so that the contact cost is not zero
            env.step(np.zeros(env.action_space.shape))
    qpos, qvel = env.unwrapped.data.qpos.copy(), env.unwrapped.data.qvel.copy()
    qvel[0] += 1.0  # forward velocity of the root
    qvel[-1] -= 0.5
    env.unwrapped.set_state(qpos, qvel)
    return env


@pytest.mark.parametrize("name", NAMES)
def test_reward_matches_hand_computation(name):
    task = TASKS[name]
    env = known_state(make_env(name, task), name)
    model = env.unwrapped.model
    action = np.resize([-1.3, 1.2, 0.2, -0.1], env.action_space.shape)  # -1.3 and 1.2 are clipped to [-1, 1]
    clipped = np.clip(action, -1.0, 1.0)

    # Reference: the same step on a copy of the simulation, then rllab's forward() and its quantities.
    reference = copy.copy(env.unwrapped.data)
    reference.ctrl[:] = clipped
    mujoco.mj_step(model, reference, nstep=env.unwrapped.frame_skip)
    mujoco.mj_forward(model, reference)
    mujoco.mj_rnePostConstraint(model, reference)
    v = com_velocity_rllab(model, reference)
    ctrl = np.sum(clipped**2)
    if name == "halfcheetah_vel":
        expected = -abs(v - task["velocity"]) - 0.1 * 0.5 * ctrl
    elif name == "halfcheetah_dir":
        expected = task["direction"] * v - 0.1 * 0.5 * ctrl
    else:
        contact = 0.5 * 1e-3 * np.sum(np.clip(reference.cfrc_ext, -1, 1) ** 2)
        assert contact > 1e-4  # the feet touch the ground: the term is tested
        forward = -abs(v - task["velocity"]) + 1.0 if name == "ant_vel" else task["direction"] * v
        expected = forward - 0.5 * 1e-2 * ctrl - contact + 0.05

    observation, reward, terminated, truncated, info = env.step(action)
    assert abs(v) > 0.1  # a moving robot, so the velocity term is tested
    assert reward == pytest.approx(expected, abs=1e-9)
    assert not terminated and not truncated and info == {}
    np.testing.assert_allclose(env.unwrapped.data.qpos, reference.qpos, atol=1e-12)
    skipped = 2 if name.startswith("ant") else 1  # x (and y) are not observed
    np.testing.assert_allclose(observation[: model.nq - skipped], reference.qpos[skipped:], atol=1e-12)
    env.close()


def test_reward_functions_formulas():
    a = np.array([0.5, -1.0])
    f = np.array([[2.0, -0.5], [0.0, 0.3]])  # 2.0 is clipped to 1
    assert locomotion.halfcheetah_vel_reward(1.0, a, 1.5) == pytest.approx(-0.5 - 0.05 * 1.25)
    assert locomotion.halfcheetah_dir_reward(1.0, a, -1) == pytest.approx(-1.0 - 0.05 * 1.25)
    costs = 0.005 * 1.25 + 0.0005 * (1 + 0.25 + 0.09)
    assert locomotion.ant_vel_reward(1.0, a, f, 3.0) == pytest.approx(-2.0 + 1.0 - costs + 0.05)
    assert locomotion.ant_dir_reward(-1.0, a, f, -1) == pytest.approx(1.0 - costs + 0.05)


def test_ant_terminates_when_unhealthy_and_then_stays_ended():
    env = make_env("ant_dir", {"direction": 1})
    env.reset(seed=0)
    qpos = env.init_qpos.copy()
    qpos[2] = 1.3  # torso above the healthy range [0.2, 1.0]
    env.unwrapped.set_state(qpos, env.init_qvel.copy())
    observation, reward, terminated, _, _ = env.step(np.zeros(8))
    assert terminated and reward != 0.0
    frozen = env.unwrapped.data.qpos.copy()
    observation_after, reward_after, terminated_after, _, _ = env.step(np.ones(8))
    assert terminated_after and reward_after == 0.0
    np.testing.assert_array_equal(observation_after, observation)
    np.testing.assert_array_equal(env.unwrapped.data.qpos, frozen)  # no simulation after the end
    env.reset(seed=1)
    assert not env.step(np.zeros(8))[2]
    env.close()


def test_cheetah_never_terminates():
    env = make_env("halfcheetah_vel", {"velocity": 1.0})
    env.reset(seed=0)
    qpos = env.init_qpos.copy()
    qpos[1:3] = [-0.5, 3.0]  # sunk and upside down
    env.unwrapped.set_state(qpos, env.init_qvel.copy())
    assert not any(env.step(np.ones(6))[2] for _ in range(3))
    env.close()


def test_env_needs_a_task_before_reset():
    env = make_env("halfcheetah_dir")
    with pytest.raises(ValueError, match="task"):
        env.reset(seed=0)
    with pytest.raises(ValueError, match="direction"):
        env.task = {"direction": 0.5}
    env.close()


# --- task distributions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "high"), [("halfcheetah_vel", 2.0), ("ant_vel", 3.0)])
def test_goal_velocities_are_uniform(samplers, name, high):
    tasks = samplers[name].sample_tasks(4000, torch.Generator().manual_seed(0))
    velocities = np.array([task["velocity"] for task in tasks])
    assert set(tasks[0]) == {"velocity"}
    assert velocities.min() >= 0.0 and velocities.max() <= high
    assert velocities.min() < 0.01 * high and velocities.max() > 0.99 * high
    assert velocities.mean() == pytest.approx(high / 2, rel=0.05)


@pytest.mark.parametrize("name", ["halfcheetah_dir", "ant_dir"])
def test_directions_are_plus_or_minus_one(samplers, name):
    directions = [
        task["direction"] for task in samplers[name].sample_tasks(2000, torch.Generator().manual_seed(0))
    ]
    assert set(directions) == {-1, 1}
    assert np.mean(np.array(directions) == 1) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_task_sampling_is_seeded(samplers, name):
    sample = samplers[name].sample_tasks
    assert sample(20, torch.Generator().manual_seed(3)) == sample(20, torch.Generator().manual_seed(3))
    assert sample(20, torch.Generator().manual_seed(3)) != sample(20, torch.Generator().manual_seed(4))


# --- rollouts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "obs_dim", "act_dim"),
    [("halfcheetah_vel", 17, 6), ("halfcheetah_dir", 17, 6), ("ant_vel", 105, 8), ("ant_dir", 105, 8)],
)
def test_rollout_shapes(samplers, name, obs_dim, act_dim):
    sampler = samplers[name]
    assert (sampler.obs_dim, sampler.act_dim, sampler.horizon) == (obs_dim, act_dim, 5)
    assert sampler.action_low.tolist() == [-1.0] * act_dim and sampler.action_high.tolist() == [1.0] * act_dim
    tasks = sampler.sample_tasks(2, torch.Generator().manual_seed(0))
    act = Replay((2, 3, act_dim), 5)
    data = sampler.rollout(act, tasks, trajectories=3, seed=0)
    assert data.observations.shape == (2, 3, 5, obs_dim)
    assert data.actions.shape == (2, 3, 5, act_dim)
    assert data.rewards.shape == data.mask.shape == (2, 3, 5)
    for tensor in (data.observations, data.actions, data.rewards, data.mask):
        assert tensor.dtype == torch.float32
    assert torch.equal(data.mask, torch.ones(2, 3, 5))
    assert torch.equal(data.actions, act.actions.permute(1, 2, 0, 3))  # stored as sampled, not clipped
    assert data.actions.abs().max() > 1.0
    assert all(torch.equal(seen, data.observations[:, :, t]) for t, seen in enumerate(act.seen))
    assert len(torch.unique(data.observations[:, :, 0, 0])) == 6  # each env reset with its own seed


@pytest.mark.parametrize("name", ["halfcheetah_vel", "ant_dir"])
def test_rollout_is_deterministic_and_reuses_envs(samplers, name):
    sampler = samplers[name]
    tasks = sampler.sample_tasks(2, torch.Generator().manual_seed(1))
    weights = torch.randn(sampler.obs_dim, sampler.act_dim, generator=torch.Generator().manual_seed(0))

    def act(observations):  # a policy of the observations, so that any difference propagates
        return torch.tanh(observations @ weights)

    first = sampler.rollout(act, tasks, 3, seed=7)
    envs = sampler._samplers[6]
    second = sampler.rollout(act, tasks, 3, seed=7)
    other = sampler.rollout(act, tasks, 3, seed=8)
    assert sampler._samplers[6] is envs
    for field in ("observations", "actions", "rewards", "mask"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert not torch.equal(first.observations, other.observations)


@pytest.mark.parametrize("name", NAMES)
def test_tasks_change_rewards_not_dynamics(samplers, name):
    sampler = samplers[name]
    key = sampler.task_key
    tasks_a, tasks_b = ([{key: 0.5}], [{key: 2.0}]) if key == "velocity" else ([{key: 1}], [{key: -1}])
    data_a = sampler.rollout(Replay((1, 2, sampler.act_dim), 5), tasks_a, 2, seed=0)
    data_b = sampler.rollout(Replay((1, 2, sampler.act_dim), 5), tasks_b, 2, seed=0)
    assert torch.equal(data_a.observations, data_b.observations)
    assert (data_a.rewards - data_b.rewards).abs().min() > 1e-3
    if name == "halfcheetah_dir":  # r(+1) + r(-1) = -2 * control cost
        ctrl = 0.05 * (data_a.actions.clamp(-1, 1) ** 2).sum(-1)
        torch.testing.assert_close(data_a.rewards + data_b.rewards, -2 * ctrl)


def test_mask_after_termination_and_dead_envs_ignored():
    # Healthy only below z = 0.3: every Ant episode ends at its first step.
    with LocomotionTasks("ant_vel", horizon=4, env_kwargs={"healthy_z_range": (0.2, 0.3)}) as sampler:

        def act(observations):  # NaN for ended envs (zero observations): must be ignored, not raise
            ended = (observations == 0).all(-1, keepdim=True)
            return torch.where(ended, torch.nan, torch.zeros(*observations.shape[:2], sampler.act_dim))

        data = sampler.rollout(act, [{"velocity": 1.0}, {"velocity": 2.0}], 2, seed=0)
    assert torch.equal(data.mask, torch.tensor([1.0, 0, 0, 0]).expand(2, 2, 4))
    assert (data.rewards[:, :, 0] != 0).all() and (data.rewards[:, :, 1:] == 0).all()
    assert (data.observations[:, :, 1:] == 0).all() and (data.observations[:, :, 0] != 0).any(-1).all()
    assert torch.isfinite(data.actions).all() and (data.actions[:, :, 1:] == 0).all()


@pytest.mark.parametrize("terminate", [True, False])
def test_env_kwargs_from_the_command_line_reach_the_robot(terminate):
    """`+task.env_kwargs.*` overrides compose and change the simulated episodes (here: Ant termination)."""
    cfg = compose_config("task=ant_vel", "task.horizon=4", "+task.env_kwargs.healthy_z_range=[0.2,0.3]",
                         f"+task.env_kwargs.terminate_when_unhealthy={str(terminate).lower()}")
    with instantiate(cfg.task) as sampler:
        data = sampler.rollout(lambda obs: torch.zeros(*obs.shape[:2], sampler.act_dim), [{"velocity": 1.0}], 2, seed=0)
    expected = torch.tensor([1.0, 0, 0, 0]) if terminate else torch.ones(4)
    assert torch.equal(data.mask, expected.expand(1, 2, 4))


def test_unknown_environment_lists_known_ones():
    with pytest.raises(
        MetarunError, match="known: halfcheetah_vel, halfcheetah_dir, ant_vel, ant_dir"
    ) as error:
        LocomotionTasks("walker_vel")
    assert "\n" not in str(error.value)
    with pytest.raises(MetarunError):
        make_env("HalfCheetah-v5")


def test_missing_mujoco_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)  # `import mujoco` raises ImportError
    locomotion._backend.cache_clear()
    try:
        with pytest.raises(MetarunError, match=r"pip install 'gymnasium\[mujoco\]'.*make install") as error:
            LocomotionTasks("halfcheetah_vel")
        assert "\n" not in str(error.value)
    finally:
        locomotion._backend.cache_clear()


def test_broken_model_is_a_one_line_error(tmp_path):
    xml = tmp_path / "broken.xml"
    xml.write_text("<mujoco><bogus/></mujoco>")
    with pytest.raises(MetarunError, match="MuJoCo could not load the HalfCheetah-v5 model") as error:
        make_env("halfcheetah_vel", xml_file=str(xml))
    assert "\n" not in str(error.value)


def test_non_finite_observation_is_an_error(monkeypatch):
    robot = locomotion._backend().task_env_classes["HalfCheetah-v5"]
    monkeypatch.setattr(robot, "_get_obs", lambda self: np.full(17, np.nan))
    with LocomotionTasks("halfcheetah_dir", horizon=3) as sampler:
        with pytest.raises(MetarunError, match="halfcheetah_dir: non-finite observation at step 0"):
            sampler.rollout(Replay((1, 1, 6), 3), [{"direction": 1}], 1, seed=0)


def test_non_finite_actions_are_an_error(samplers):
    sampler = samplers["halfcheetah_vel"]
    with pytest.raises(DivergedError, match="non-finite actions"):
        sampler.rollout(lambda obs: torch.full((1, 2, 6), math.nan), [{"velocity": 1.0}], 2, seed=0)


def test_worker_processes_give_the_same_trajectories(samplers):
    tasks = [{"velocity": 0.3}, {"velocity": 1.7}, {"velocity": 1.1}]
    reference = samplers["halfcheetah_vel"].rollout(Replay((3, 1, 6), 5), tasks, 1, seed=2)
    with LocomotionTasks("halfcheetah_vel", horizon=5, num_workers=2) as sampler:  # groups of 2 and 1 envs
        data = sampler.rollout(Replay((3, 1, 6), 5), tasks, 1, seed=2)
    for field in ("observations", "actions", "rewards", "mask"):
        assert torch.equal(getattr(data, field), getattr(reference, field))


# --- the batched sampler -----------------------------------------------------------------------------------


def policy_of_observations(sampler, seed=0):
    """An ``act`` whose actions depend on the observations (any difference between two samplers propagates),
    large enough that the Ant's episodes end early."""
    weights = torch.randn(sampler.obs_dim, sampler.act_dim, generator=torch.Generator().manual_seed(seed))
    return lambda observations: 2.0 * torch.tanh(observations @ weights)


@pytest.mark.parametrize("sampler", ["threads", "batched"])
@pytest.mark.parametrize("name", NAMES)
def test_batched_samplers_give_the_trajectories_of_the_gymnasium_loop(name, sampler):
    """The batched samplers against the same envs stepped one after another: envs on threads, in chunks of
    unequal size (``threads``, and ``batched`` for the Ant), give the very same trajectories; the cheetah's
    in MuJoCo's rollout (``batched``), the same up to the constraint solver's cold start at each step
    (float32 rounding over these 40 steps)."""
    horizon = 40
    native = sampler == "batched" and name.startswith("halfcheetah")
    with (LocomotionTasks(name, horizon=horizon, sampler="gymnasium") as gymnasium_loop,
          LocomotionTasks(name, horizon=horizon, sampler=sampler, threads=3) as batched):
        assert (gymnasium_loop.threads, batched.threads) == (1, 3)
        tasks = batched.sample_tasks(3, torch.Generator().manual_seed(5))
        reference = gymnasium_loop.rollout(policy_of_observations(batched), tasks, 4, seed=11)  # 12 envs
        data = batched.rollout(policy_of_observations(batched), tasks, 4, seed=11)
        group = batched._samplers[12].group
        assert group.threads == 3 and (group._native is not None) == native and (group._pool is None) == native
    for field in ("observations", "actions", "rewards", "mask"):
        if not native:
            assert torch.equal(getattr(data, field), getattr(reference, field)), field
        else:
            torch.testing.assert_close(getattr(data, field), getattr(reference, field), rtol=1e-5, atol=1e-5)
    if name.startswith("ant"):  # episodes that end inside the horizon are covered
        assert 0 < (data.mask[:, :, -1] == 0).sum() < 12


@pytest.mark.parametrize(("threads", "env_kwargs"), [
    (1, {}), (2, {}), (1, {"exclude_current_positions_from_observation": False, "reset_noise_scale": 0.3})])
def test_the_cheetahs_batched_step_is_gymnasiums_physics(threads, env_kwargs):
    """One step of MuJoCo's rollout (the cheetah's batched sampler) from gymnasium's own states under the same
    actions: the state gymnasium's env reaches to float64 rounding (only the solver's warm start differs),
    its observation (with the env's options), and the reward from rllab's velocity at that state."""
    import gymnasium

    env = gymnasium.make("HalfCheetah-v5", **env_kwargs).unwrapped
    group = locomotion._make_group("halfcheetah_dir", 0, 3, 3, env_kwargs, "batched", threads)
    group.tasks = [{"direction": 1}, {"direction": -1}, {"direction": 1}]
    group.reset(options={"seeds": [0, 1, 2]})
    rng = np.random.default_rng(0)
    full = mujoco.mjtState.mjSTATE_FULLPHYSICS
    for _ in range(50):
        env.reset(seed=int(rng.integers(1000)))
        for _ in range(int(rng.integers(20))):  # somewhere along an episode, warm start and all
            env.step(rng.uniform(-1, 1, 6))
        for i in range(3):  # every env of the group starts from gymnasium's state
            group._native.states[i] = 0.0
            mujoco.mj_getState(env.model, env.data, group._native.states[i], full)
        actions = np.tile(rng.uniform(-1, 1, 6), (3, 1))  # the same step in each env, which differ in task
        observations, _, _, _, info = group.step(actions)
        expected, _, _, _, _ = env.step(actions[0])
        after = np.zeros_like(group._native.states[0])
        mujoco.mj_getState(env.model, env.data, after, full)
        for i in range(3):
            np.testing.assert_allclose(group._native.states[i], after, rtol=0, atol=1e-11)
            np.testing.assert_allclose(observations[i], expected, rtol=0, atol=1e-11)
        reference = copy.copy(env.data)
        mujoco.mj_forward(env.model, reference)
        v = com_velocity_rllab(env.model, reference)
        signs = np.array([1.0, -1.0, 1.0])
        np.testing.assert_allclose(info["rewards"], signs * v - 0.05 * np.sum(actions**2, axis=1), atol=1e-11)
        assert not info["terminated"].any()
    group.close()
    env.close()


@pytest.mark.parametrize(("name", "sampler"), [("halfcheetah_dir", "batched"), ("halfcheetah_dir", "threads"),
                                               ("ant_vel", "batched")])
def test_batched_sampler_follows_gymnasiums_own_env(name, sampler):
    """Each env of a batched rollout against gymnasium's own v5 env (``gymnasium.make``), reset with the
    same seed and given the same (clipped) actions: the same observations and terminations at every step,
    and the task's reward computed from gymnasium's state after each step as rllab did."""
    import gymnasium

    horizon, trajectories = 30, 3
    task = TASKS[name]
    with LocomotionTasks(name, horizon=horizon, sampler=sampler, threads=2) as batched:
        data = batched.rollout(policy_of_observations(batched, seed=1), [task], trajectories, seed=4)
        seeds = np.random.SeedSequence([batched.seed, 4]).generate_state(trajectories)
    spec = ENVIRONMENTS[name]
    for j in range(trajectories):
        env = gymnasium.make(spec.robot, **locomotion._ROBOT_KWARGS[spec.robot]).unwrapped
        observation = env.reset(seed=int(seeds[j]))[0]
        model, state = env.model, env.data
        for t in range(horizon):
            if data.mask[0, j, t] == 0:
                break
            # the cheetah's step is MuJoCo's rollout (cold solver start): equal to float32 rounding
            torch.testing.assert_close(data.observations[0, j, t], torch.from_numpy(observation.astype(np.float32)),
                                       rtol=1e-6, atol=1e-6)
            action = np.clip(data.actions[0, j, t].double().numpy(), -1.0, 1.0)
            observation, _, terminated, _, _ = env.step(action)
            reference = copy.copy(state)  # rllab's forward() after the step, on a copy
            mujoco.mj_forward(model, reference)
            mujoco.mj_rnePostConstraint(model, reference)
            v = com_velocity_rllab(model, reference)
            if name == "halfcheetah_dir":
                expected = task["direction"] * v - 0.05 * np.sum(action**2)
            else:
                contact = 0.5 * 1e-3 * np.sum(np.clip(reference.cfrc_ext, -1, 1) ** 2)
                expected = -abs(v - task["velocity"]) + 1.0 - 0.005 * np.sum(action**2) - contact + 0.05
            assert data.rewards[0, j, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
            ended = t + 1 < horizon and data.mask[0, j, t + 1] == 0
            assert terminated == ended
        env.close()


def test_unknown_sampler_is_a_one_line_error():
    with pytest.raises(MetarunError, match="unknown sampler 'fast'; known: batched, threads, gymnasium"):
        LocomotionTasks("halfcheetah_dir", sampler="fast")
