"""The CUDA-graph meta-step. Its warm-up (needed before capture) must not train: that part runs
anywhere and is tested here on the CPU. The capture itself needs a GPU: tests marked ``cuda`` run
only with ``make test-cuda`` on a machine with one (see the README, "Checking on a GPU")."""

from __future__ import annotations

import pytest
import torch

from metarun.trainers import supervised as sup
from metarun.trainers.graphed import GraphedMetaStep, warm_up_and_undo
from tests.conftest import compose_config


def fresh_run(*overrides, device="cpu"):
    cfg = compose_config("debug=smoke", f"device={device}", "algorithm.batching=vmap", *overrides)
    return sup.setup(cfg, run_dir=None)


def batches(run, n):
    return [sup.sample_meta_batch(run) for _ in range(n)]


def snapshot(run):
    return ([p.detach().clone() for p in [*run.algorithm.meta_parameters().values(), *run.algorithm.buffers()]],
            [{k: v.clone() for k, v in s.items()} for s in run.optimizer.state.values()])


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.unit
@pytest.mark.parametrize("optimizer", ["torch.optim.Adam", "torch.optim.AdamW"])
@pytest.mark.parametrize("steps_before", [0, 2])  # a fresh optimizer, and one with state (resumed)
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "reptile"])  # Meta-SGD's own rates, Reptile's carried Adam
def test_warm_up_is_undone_in_place(optimizer, steps_before, algorithm):
    overrides = (f"algorithm={algorithm}", f"algorithm.outer_optimizer._target_={optimizer}",
                 "algorithm.outer_optimizer.weight_decay=0.1")
    if algorithm == "reptile":  # the inner Adam whose state runs on from step to step
        overrides += ("algorithm.inner_optimizer=adam", "algorithm.carry_adam_state=true")
    warmed, plain = fresh_run(*overrides), fresh_run(*overrides)
    data = batches(warmed, steps_before + 3)
    for tasks in data[:steps_before]:
        sup.meta_step(warmed, tasks)
        sup.meta_step(plain, tasks)
    addresses = [p.data_ptr() for p in warmed.algorithm.meta_parameters().values()]
    warm_up_and_undo(sup.meta_step, warmed, data[steps_before], times=3)
    # the parameters keep their storage (a captured graph points at it) ...
    assert [p.data_ptr() for p in warmed.algorithm.meta_parameters().values()] == addresses
    # ... and from here on the warmed run makes exactly the updates of one that never warmed up
    for tasks in data[steps_before:]:
        sup.meta_step(warmed, tasks)
        sup.meta_step(plain, tasks)
    assert_same(snapshot(warmed), snapshot(plain))
    # the check can fail: without the undo, the warm-up steps train
    again = fresh_run(*overrides)
    for _ in range(3):
        sup.meta_step(again, data[0])
    assert not torch.equal(next(again.model.parameters()), next(fresh_run(*overrides).model.parameters()))


@pytest.mark.configs
def test_cuda_graph_needs_a_capturable_optimizer():
    from metarun.config import validate
    from metarun.utils.errors import ConfigError

    cfg = compose_config("debug=smoke", "trainer.cuda_graph=true", "algorithm.outer_optimizer._target_=torch.optim.SGD")
    with pytest.raises(ConfigError, match=r"algorithm.outer_optimizer._target_ must be one of torch.optim.Adam, "
                                          r"torch.optim.AdamW, metarun.optim.SGD .*reads a tensor rate with .item\(\)"):
        validate(cfg)
    validate(compose_config("debug=smoke", "trainer.cuda_graph=true", "algorithm=reptile"))  # metarun.optim.SGD


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's default convolution backward sums with atomics, so two eager runs of the same steps
    differ in the last bits, which Adam's first steps magnify (seen on an H200, float64: 3e-9
    relative after 5 steps); the graph is held to the eager step with that noise switched off."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


@pytest.mark.cuda
@pytest.mark.parametrize("task", ["omniglot", "sinusoid"])
def test_graphed_step_makes_the_eager_updates(task, request, deterministic_cudnn):
    """On a GPU, in float64: five replays with new batches == five eager steps, and the graph
    really replays (the eager reference differs after a different batch)."""
    extra = ()
    if task == "omniglot":
        extra = ("task=omniglot", f"task.cache_dir={request.getfixturevalue('omniglot_cache')}", "task.progress=false")
    graphed = fresh_run(*extra, "dtype=float64", "trainer.cuda_graph=true", device="cuda")
    eager = fresh_run(*extra, "dtype=float64", "trainer.cuda_graph=true", device="cuda")
    step = GraphedMetaStep(sup.meta_step)
    for tasks in batches(eager, 5):
        loss_graphed = step(graphed, tasks)
        loss_eager = sup.meta_step(eager, tasks)
        torch.testing.assert_close(loss_graphed, loss_eager, rtol=1e-10, atol=1e-12)
    for a, b in zip(graphed.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml"])
def test_graphed_training_makes_the_eager_runs_updates_for_every_algorithm(algorithm, tmp_path, deterministic_cudnn):
    """On a GPU, in float64: a short run with trainer.cuda_graph=true ends with the parameters of the
    same run without it, for every algorithm; MAML++ switches its derivative order and its loss
    weights in the middle of the run (the step is captured again) and anneals its outer rate (a
    tensor the scheduler fills in place); Reptile anneals its SGD rate likewise and carries its inner
    Adam's state (buffers the graph updates in place) from step to step."""
    extra = {"mamlpp": ("algorithm.inner_steps=2", "algorithm.iterations_per_epoch=2", "algorithm.first_order_epochs=1",
                        "algorithm.multi_step_loss_epochs=2", "algorithm.outer_schedule.T_max=6"),
             "reptile": ("algorithm.inner_optimizer=adam", "algorithm.carry_adam_state=true", "algorithm.inner_steps=3",
                         "algorithm.test_inner_steps=10"),
             "imaml": ("algorithm.inner_steps=3", "algorithm.test_inner_steps=10")}.get(algorithm, ())
    states = []
    for graph in ("true", "false"):
        cfg = compose_config("debug=smoke", "device=cuda", "dtype=float64", "algorithm.batching=vmap",
                             f"algorithm={algorithm}", *extra, f"trainer.cuda_graph={graph}")
        sup.run_supervised(cfg, tmp_path / graph)
        states.append(torch.load(tmp_path / graph / "checkpoints" / "last.pt", weights_only=False))
    graphed, eager = states
    assert algorithm != "reptile" or any(k.startswith("inner_adam.") for k in eager["algorithm"])
    for part in ("model", "algorithm"):
        for k in eager[part]:
            torch.testing.assert_close(graphed[part][k], eager[part][k], rtol=1e-9, atol=1e-12, msg=f"{part}.{k}")
