"""Structured-config schemas: every YAML file under ``configs/`` is checked against one of these.

A misspelt key or a value of the wrong type fails when the config is composed, naming the key.
Range checks that a type cannot express (a positive learning rate, at least one shot) live in
:func:`validate`, which the entry point runs before anything is built.

Group files inherit their schema through their defaults list, e.g. ``configs/model/mlp.yaml``
starts with ``defaults: [/schema/model/mlp@_here_]``; the root schema ``Config`` types the
top-level keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from metarun.utils.errors import ConfigError


@dataclass
class SinusoidTaskConfig:
    _target_: str = "metarun.tasks.sinusoid.SinusoidTasks"
    name: str = "sinusoid"
    shots: int = 10
    queries: int = 10
    test_shots: list[int] = field(default_factory=lambda: [5, 10])
    test_queries: int = 100
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])


@dataclass
class OmniglotTaskConfig:
    _target_: str = "metarun.tasks.omniglot.OmniglotTasks"
    name: str = "omniglot"
    ways: int = 5
    shots: int = 1
    queries: int = 1
    test_queries: int = 1
    split: str = "paper"
    split_seed: int = 1
    rotations: bool = True
    data_dir: str = "data"
    cache_dir: str = "~/.cache/metarun"
    download: bool = True
    progress: bool = True


@dataclass
class Conv4Config:
    _target_: str = "metarun.models.Conv4"
    hidden: int = 64
    downsample: str = "stride"
    blocks: int = 4


@dataclass
class MLPConfig:
    _target_: str = "metarun.models.MLP"
    in_features: int = 1
    out_features: int = 1
    hidden_sizes: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class AlgorithmConfig:
    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    test_inner_steps: int = 10
    first_order: bool = False
    batching: str = "auto"
    meta_batch_size: int = 25
    outer_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class SupervisedTrainerConfig:
    name: str = "supervised"
    iterations: int = 70_000
    log_interval: int = 100
    val_interval: int = 5_000
    checkpoint_interval: int = 5_000
    val_tasks: int = 100
    test_tasks: int = 600
    test_seed: int = 1_000_003
    val_seed: int = 1_000_033
    report_steps: list[int] = field(default_factory=lambda: [1, 5, 10])
    num_threads: int = 1
    progress: bool = True
    evaluate_best: bool = True


@dataclass
class Config:
    task: Any = MISSING
    model: Any = MISSING
    algorithm: AlgorithmConfig = MISSING
    trainer: Any = MISSING
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    resume: str | None = None
    evaluate: str | None = None


SCHEMAS = {  # (group, key that names the choice) -> {choice: schema}
    ("task", "name"): {"sinusoid": SinusoidTaskConfig, "omniglot": OmniglotTaskConfig},
    ("model", "_target_"): {"metarun.models.MLP": MLPConfig, "metarun.models.Conv4": Conv4Config},
    ("trainer", "name"): {"supervised": SupervisedTrainerConfig},
}


def typed(cfg: DictConfig) -> DictConfig:
    """Check a plain config (e.g. one saved in a checkpoint) against the schemas, as composing does."""
    out = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in cfg.items() if k not in ("task", "model", "trainer")})
    for (group, key), table in SCHEMAS.items():
        choice = cfg[group].get(key)
        if choice not in table:
            raise ConfigError(f"{group}.{key}={choice!r} is not known (known: {', '.join(sorted(table))})")
        out[group] = OmegaConf.merge(OmegaConf.structured(table[choice]), cfg[group])
    return out


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (called once, before Hydra composes)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/task", name="sinusoid", node=SinusoidTaskConfig)
    cs.store(group="schema/task", name="omniglot", node=OmniglotTaskConfig)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/model", name="conv4", node=Conv4Config)
    cs.store(group="schema/algorithm", name="maml", node=AlgorithmConfig)
    cs.store(group="schema/trainer", name="supervised", node=SupervisedTrainerConfig)


def validate(cfg: DictConfig) -> None:
    """Range checks a type cannot express; raise :class:`ConfigError` naming the first bad key."""
    alg = cfg.algorithm

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {value!r}")

    need(alg.inner_lr > 0, "algorithm.inner_lr", "> 0", alg.inner_lr)
    need(alg.inner_steps >= 0, "algorithm.inner_steps", ">= 0", alg.inner_steps)
    need(alg.test_inner_steps >= 0, "algorithm.test_inner_steps", ">= 0", alg.test_inner_steps)
    need(alg.meta_batch_size >= 1, "algorithm.meta_batch_size", ">= 1", alg.meta_batch_size)
    need(alg.outer_optimizer.lr > 0, "algorithm.outer_optimizer.lr", "> 0", alg.outer_optimizer.lr)
    need(alg.batching in ("auto", "vmap", "loop"), "algorithm.batching", "auto, vmap or loop", alg.batching)
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda"), "device", "auto, cpu or cuda[:N]", cfg.device)
    need(cfg.dtype in ("float32", "float64"), "dtype", "float32 or float64", cfg.dtype)

    task = cfg.task
    need(task.shots >= 1, "task.shots", ">= 1", task.shots)
    need(task.queries >= 1, "task.queries", ">= 1", task.queries)
    if "test_shots" in task:
        need(len(task.test_shots) > 0 and min(task.test_shots) >= 1, "task.test_shots", "a non-empty list of values >= 1", list(task.test_shots))
    if "ways" in task:
        need(task.ways >= 2, "task.ways", ">= 2", task.ways)
    if "test_queries" in task:
        need(task.test_queries >= 1, "task.test_queries", ">= 1", task.test_queries)

    tr = cfg.trainer
    need(tr.iterations >= 0, "trainer.iterations", ">= 0", tr.iterations)
    for key in ("log_interval", "val_interval", "checkpoint_interval", "num_threads"):
        need(tr[key] >= 1, f"trainer.{key}", ">= 1", tr[key])
    need(tr.test_tasks >= 2, "trainer.test_tasks", ">= 2 (a confidence interval needs two)", tr.test_tasks)
    need(tr.val_tasks >= 1, "trainer.val_tasks", ">= 1", tr.val_tasks)
    bad = [s for s in tr.report_steps if not 0 <= s <= alg.test_inner_steps]
    need(not bad, "trainer.report_steps", f"between 0 and algorithm.test_inner_steps={alg.test_inner_steps}", list(tr.report_steps))
