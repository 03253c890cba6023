"""Structured-config schemas: every YAML file under ``configs/`` is checked against one of these.

A misspelt key or a value of the wrong type fails when the config is composed, naming the key.
Range checks that a type cannot express (a positive learning rate, at least one shot) live in
:func:`validate`, which the entry point runs before anything is built.

Group files inherit their schema through their defaults list, e.g. ``configs/model/mlp.yaml``
starts with ``defaults: [/schema/model/mlp@_here_]``; the root schema ``Config`` types the
top-level keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
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
class FewShotTaskConfig:
    """What every few-shot classification family takes (tasks.classification.FewShotClassification)."""

    _target_: str = MISSING
    name: str = MISSING
    ways: int = 5
    shots: int = 1
    queries: int = 1
    test_queries: int = 1
    cache_dir: str = "~/.cache/metarun"
    progress: bool = True


@dataclass
class OmniglotTaskConfig(FewShotTaskConfig):
    _target_: str = "metarun.tasks.omniglot.OmniglotTasks"
    name: str = "omniglot"
    data_dir: str = "data"
    split: str = "paper"
    split_seed: int = 1
    rotations: bool = True
    download: bool = True


@dataclass
class MiniImagenetTaskConfig(FewShotTaskConfig):
    _target_: str = "metarun.tasks.miniimagenet.MiniImagenetTasks"
    name: str = "miniimagenet"
    queries: int = 15
    test_queries: int = 15
    data_dir: str = "data"
    splits_dir: str | None = None
    images_per_class: int = 600


@dataclass
class ImageFolderTaskConfig(FewShotTaskConfig):
    """A dataset of your own in class folders (tasks.image_folder.ImageFolderTasks, docs/your_data.md)."""

    _target_: str = "metarun.tasks.image_folder.ImageFolderTasks"
    name: str = "image_folder"
    root: str | None = None  # the dataset folder: required (task.root=/data/cub); null: the task says so
    image_size: int = 84
    channels: int = 3  # 1 = grayscale, 3 = RGB
    resize: bool = True  # false: refuse images that are not image_size x image_size
    split_file: str | None = None  # CSV (class,split) or JSON, for root/<class>/ without split folders
    images_per_class: int | None = None  # None: the smallest class's count in each split
    invert: bool = False  # feed 255 - pixel (dark strokes on white -> bright on black)
    queries: int = 15
    test_queries: int = 15


@dataclass
class Conv4Config:
    _target_: str = "metarun.models.Conv4"
    hidden: int = 64
    downsample: str = "stride"
    blocks: int = 4
    activation: str = "relu"
    init: str = "torch"
    init_gain: float = 1.0


@dataclass
class ResNet12Config:
    _target_: str = "metarun.models.ResNet12"
    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    leaky_slope: float = 0.1


@dataclass
class Navigation2DTaskConfig:
    _target_: str = "metarun.envs.navigation2d.Navigation2DTasks"
    name: str = "navigation2d"
    horizon: int = 100
    goal_range: float = 0.5
    max_action: float = 0.1
    success_radius: float = 0.01


@dataclass
class LocomotionTaskConfig:
    _target_: str = "metarun.envs.locomotion.LocomotionTasks"
    name: str = "halfcheetah_vel"
    horizon: int = 200
    num_workers: int = 1
    # batched: the cheetah's envs in MuJoCo's rollout, the Ant's as threads; threads: each process's envs in
    # chunks on `threads` threads; gymnasium: one by one (envs/locomotion.py LocomotionTasks)
    sampler: str = "batched"
    threads: int = 0  # the batched sampler's threads per process; 0: as many as trainer.num_threads
    # passed to gymnasium's robot class, e.g. `+task.env_kwargs.terminate_when_unhealthy=false` (Ant)
    env_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GaussianPolicyConfig:
    _target_: str = "metarun.models.GaussianPolicy"
    hidden_sizes: list[int] = field(default_factory=lambda: [100, 100])
    activation: str = "relu"
    init_std: float = 1.0


@dataclass
class MLPConfig:
    _target_: str = "metarun.models.MLP"
    in_features: int | None = 1  # None: from the task (an image task gives its image size)
    out_features: int | None = 1  # None: from the task (a classification task gives its ways)
    hidden_sizes: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"
    batch_norm: bool = False


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float | None = None  # Adam's epsilon where a preset sets it (iMAML's authors: 1e-3); null: the optimizer's


@dataclass
class AlgorithmConfig:
    """What every supervised algorithm takes (MAML's keys); the others add their own below."""

    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    test_inner_steps: int = 10
    first_order: bool = False
    batching: str = "auto"
    meta_batch_size: int = 25
    outer_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    outer_schedule: Any = None  # a torch LR scheduler (_partial_: the trainer passes the optimizer), or null


@dataclass
class MetaSGDConfig(AlgorithmConfig):
    name: str = "metasgd"
    rate_init: str = "constant"


@dataclass
class MAMLPlusPlusConfig(AlgorithmConfig):
    name: str = "mamlpp"
    multi_step_loss: bool = True
    multi_step_loss_epochs: int = 10
    learned_rates: bool = True
    per_step_norm: bool = True
    first_order_epochs: int = 0
    iterations_per_epoch: int = 500


@dataclass
class ReptileConfig(AlgorithmConfig):
    name: str = "reptile"
    inner_optimizer: str = "adam"
    adam_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    adam_eps: float = 1e-8
    inner_loss: str = "sum"
    train_shots: int | None = None
    inner_batch: int | None = None
    eval_inner_batch: int | None = None
    carry_adam_state: bool = True


@dataclass
class IMAMLConfig(AlgorithmConfig):
    name: str = "imaml"
    lam: float = 2.0
    cg_iterations: int = 5
    inner_solver: str = "sgd_pullback"
    system: str = "damped"
    cg_damping: float = 1.0
    lam_damping: float = 10.0
    test_lam: float | None = 0.0
    backtracking: int = 0


@dataclass
class RLAlgorithmConfig:
    name: str = "maml_trpo"
    inner_lr: float = 0.1
    inner_steps: int = 1
    first_order: bool = False
    trajectories: int = 20
    meta_batch_size: int = 40
    discount: float = 0.99
    gae_lambda: float = 1.0
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    line_search_steps: int = 15
    # factored: mean_i J_i K_i J_i (one inner step), in closed form for an MLP policy; factored_autograd: the
    # same by autograd; autograd: the KL's double backward through the inner step
    fisher: str = "factored"
    test_inner_lrs: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.05])


@dataclass
class RLTrainerConfig:
    name: str = "rl"
    iterations: int = 500
    log_interval: int = 1
    checkpoint_interval: int = 10
    test_tasks: int = 40
    test_seed: int = 1_000_003
    num_threads: int | None = None
    progress: bool = True
    max_minutes: float | None = None


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
    report_steps: list[int] = field(default_factory=lambda: [0, 1, 5, 10])
    divergence_ratio: float = 10.0
    num_threads: int | None = None
    progress: bool = True
    max_minutes: float | None = None
    evaluate_best: bool = True
    cuda_graph: bool = False
    transductive: bool = True
    test_interval: int | None = None


@dataclass
class Config:
    task: Any = MISSING
    model: Any = MISSING
    algorithm: Any = MISSING
    trainer: Any = MISSING
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    resume: str | None = None
    evaluate: str | None = None


LOCOMOTION = ("halfcheetah_vel", "halfcheetah_dir", "ant_vel", "ant_dir")

SCHEMAS = {  # (group, key that names the choice) -> {choice: schema}
    ("task", "name"): {"sinusoid": SinusoidTaskConfig, "omniglot": OmniglotTaskConfig,
                         "miniimagenet": MiniImagenetTaskConfig, "image_folder": ImageFolderTaskConfig,
                         "navigation2d": Navigation2DTaskConfig,
                         **{name: LocomotionTaskConfig for name in LOCOMOTION}},
    ("model", "_target_"): {"metarun.models.MLP": MLPConfig, "metarun.models.Conv4": Conv4Config,
                            "metarun.models.ResNet12": ResNet12Config,
                            "metarun.models.GaussianPolicy": GaussianPolicyConfig},
    ("algorithm", "name"): {"maml": AlgorithmConfig, "fomaml": AlgorithmConfig, "anil": AlgorithmConfig,
                            "metasgd": MetaSGDConfig, "mamlpp": MAMLPlusPlusConfig, "reptile": ReptileConfig,
                            "imaml": IMAMLConfig, "maml_trpo": RLAlgorithmConfig},
    ("trainer", "name"): {"supervised": SupervisedTrainerConfig, "rl": RLTrainerConfig},
}


def typed(cfg: DictConfig) -> DictConfig:
    """Check a plain config (e.g. one saved in a checkpoint) against the schemas, as composing does."""
    out = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in cfg.items() if k not in ("task", "model", "algorithm", "trainer")})
    for (group, key), table in SCHEMAS.items():
        choice = cfg[group].get(key)
        if group == "model" and choice not in table:  # a user's own model (docs/your_data.md): its keys,
            out[group] = cfg[group]  # unchecked, as when it was composed from the user's YAML (no schema)
            continue
        if choice not in table:
            raise ConfigError(f"{group}.{key}={choice!r} is not known (known: {', '.join(sorted(table))})")
        out[group] = OmegaConf.merge(OmegaConf.structured(table[choice]), cfg[group])
    return out


def flat_keys(cfg: DictConfig) -> list[str]:
    """Every key of a config as a dotted path (``trainer``, ``trainer.iterations``, ...)."""

    def walk(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            out.append(prefix + str(key))
            if isinstance(value, dict):
                out += walk(value, f"{prefix}{key}.")
        return out

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


def nearest_key(key: str, keys: list[str]) -> str | None:
    """The key of ``keys`` closest in spelling to ``key`` (a typo's intended key), if any is close."""
    matches = difflib.get_close_matches(key, [k for k in keys if k != key], n=1, cutoff=0.75)
    return matches[0] if matches else None


def unknown_key_message(key: str, keys: list[str]) -> str:
    """``key`` is not in ``keys``: the nearest one, or where there is none near, the keys beside it."""
    near = nearest_key(key, keys)
    if near:
        return f"{key} is not a key of the config; did you mean {near}?"
    parent = key.rpartition(".")[0]
    beside = [k.rpartition(".")[2] for k in keys if parent and k.rpartition(".")[0] == parent]
    return f"{key} is not a key of the config" + (f" ({parent} has {', '.join(beside)})" if 0 < len(beside) <= 16 else "")


def check_added_keys(cfg: DictConfig, overrides: list[str], config_dir: Path) -> None:
    """``+key=value`` may add a key only inside a free-form mapping (``task.env_kwargs``): anywhere
    else the schema knows every key, so a new one is a typo that would run the default. Config groups
    (``+experiment=...``) and Hydra's own keys are left to Hydra. Raises :class:`ConfigError`."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.startswith("hydra") or "/" in key:
            continue
        if (config_dir / key).is_dir():  # a config group
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if schema is dict or (dataclasses.is_dataclass(schema) and name in {f.name for f in dataclasses.fields(schema)}):
            continue  # inside a free-form mapping, or a key the schema has ('++key=value' sets it)
        keys = [k for k in flat_keys(cfg) if k != key]
        raise ConfigError(f"'{override.input_line}': {unknown_key_message(key, keys)} ('+' adds keys only "
                          f"inside a free-form mapping such as task.env_kwargs)")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (called once, before Hydra composes)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/task", name="sinusoid", node=SinusoidTaskConfig)
    cs.store(group="schema/task", name="omniglot", node=OmniglotTaskConfig)
    cs.store(group="schema/task", name="miniimagenet", node=MiniImagenetTaskConfig)
    cs.store(group="schema/task", name="image_folder", node=ImageFolderTaskConfig)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/model", name="conv4", node=Conv4Config)
    cs.store(group="schema/model", name="resnet12", node=ResNet12Config)
    cs.store(group="schema/algorithm", name="maml", node=AlgorithmConfig)
    cs.store(group="schema/algorithm", name="metasgd", node=MetaSGDConfig)
    cs.store(group="schema/algorithm", name="mamlpp", node=MAMLPlusPlusConfig)
    cs.store(group="schema/algorithm", name="reptile", node=ReptileConfig)
    cs.store(group="schema/algorithm", name="imaml", node=IMAMLConfig)
    cs.store(group="schema/trainer", name="supervised", node=SupervisedTrainerConfig)
    cs.store(group="schema/task", name="navigation2d", node=Navigation2DTaskConfig)
    cs.store(group="schema/task", name="locomotion", node=LocomotionTaskConfig)
    cs.store(group="schema/model", name="gaussian_policy", node=GaussianPolicyConfig)
    cs.store(group="schema/algorithm", name="maml_trpo", node=RLAlgorithmConfig)
    cs.store(group="schema/trainer", name="rl", node=RLTrainerConfig)


CAPTURABLE_OPTIMIZERS = ("torch.optim.Adam", "torch.optim.AdamW", "metarun.optim.SGD")
"""Outer optimizers a CUDA graph can replay (Adam and AdamW made ``capturable`` by the trainer)."""


def validate(cfg: DictConfig) -> None:
    """Range checks a type cannot express; raise :class:`ConfigError` naming the first bad key."""
    alg, task, tr = cfg.algorithm, cfg.task, cfg.trainer

    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {value!r}")

    model = cfg.get("model")
    if isinstance(model, DictConfig) and ("_target_" not in model or OmegaConf.is_missing(model, "_target_")):
        raise ConfigError("the model config names no class to build (model._target_): with model=custom give "
                          "model._target_=<module>.<Class>; in a model/<name>.yaml of your own add the line "
                          "'_target_: <module>.<Class>' (docs/your_data.md)")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda"), "device", "auto, cpu or cuda[:N]", cfg.device)
    need(cfg.dtype in ("float32", "float64"), "dtype", "float32 or float64", cfg.dtype)
    need(alg.inner_lr > 0, "algorithm.inner_lr", "> 0", alg.inner_lr)
    need(alg.inner_steps >= 0, "algorithm.inner_steps", ">= 0", alg.inner_steps)
    need(alg.meta_batch_size >= 1, "algorithm.meta_batch_size", ">= 1", alg.meta_batch_size)
    need(tr.iterations >= 0, "trainer.iterations", ">= 0", tr.iterations)
    need(tr.test_tasks >= 2, "trainer.test_tasks", ">= 2 (a confidence interval needs two)", tr.test_tasks)
    for key in ("log_interval", "checkpoint_interval"):
        need(tr[key] >= 1, f"trainer.{key}", ">= 1", tr[key])
    need(tr.num_threads is None or tr.num_threads >= 1, "trainer.num_threads", ">= 1 or null", tr.num_threads)
    need(tr.max_minutes is None or tr.max_minutes > 0, "trainer.max_minutes", "> 0 or null", tr.max_minutes)
    if tr.name == "rl":
        need(alg.name == "maml_trpo", "algorithm", "maml_trpo for an RL task", alg.name)
        need(alg.trajectories >= 2, "algorithm.trajectories", ">= 2", alg.trajectories)
        need(0 < alg.discount <= 1, "algorithm.discount", "in (0, 1]", alg.discount)
        need(0 <= alg.gae_lambda <= 1, "algorithm.gae_lambda", "in [0, 1]", alg.gae_lambda)
        need(alg.max_kl > 0, "algorithm.max_kl", "> 0", alg.max_kl)
        need(alg.cg_iterations >= 1, "algorithm.cg_iterations", ">= 1", alg.cg_iterations)
        need(0 < alg.backtrack_ratio < 1, "algorithm.backtrack_ratio", "in (0, 1)", alg.backtrack_ratio)
        need(all(lr > 0 for lr in alg.test_inner_lrs), "algorithm.test_inner_lrs", "all > 0", list(alg.test_inner_lrs))
        need(task.horizon >= 1, "task.horizon", ">= 1", task.horizon)
        return
    from metarun.algorithms import ALGORITHMS  # torch and the algorithms only once a config is checked

    need(alg.name in ALGORITHMS, "algorithm", f"one of {', '.join(sorted(ALGORITHMS))} for a supervised task", alg.name)
    ALGORITHMS[alg.name].check_config(cfg)
    need(alg.test_inner_steps >= 0, "algorithm.test_inner_steps", ">= 0", alg.test_inner_steps)
    need(alg.outer_optimizer.lr > 0, "algorithm.outer_optimizer.lr", "> 0", alg.outer_optimizer.lr)
    need(alg.batching in ("auto", "vmap", "loop"), "algorithm.batching", "auto, vmap or loop", alg.batching)
    need(task.shots >= 1, "task.shots", ">= 1", task.shots)
    need(task.queries >= 1, "task.queries", ">= 1", task.queries)
    if "ways" in task:
        need(task.ways >= 2, "task.ways", ">= 2", task.ways)
    if "test_shots" in task:
        need(len(task.test_shots) > 0 and min(task.test_shots) >= 1, "task.test_shots", "a non-empty list of values >= 1", list(task.test_shots))
    if "test_queries" in task:
        need(task.test_queries >= 1, "task.test_queries", ">= 1", task.test_queries)
    if "image_size" in task:
        need(task.image_size >= 1, "task.image_size", ">= 1", task.image_size)
        if cfg.model.get("_target_") == "metarun.models.Conv4" and cfg.model.downsample == "maxpool":
            need(task.image_size >= 2 ** cfg.model.blocks, "task.image_size",
                 f">= {2 ** cfg.model.blocks} for model.blocks={cfg.model.blocks} 2x2 max-pools (or model=conv4, "
                 "stride 2, for smaller images)", task.image_size)
    if "channels" in task:
        need(task.channels in (1, 3), "task.channels", "1 (grayscale) or 3 (RGB)", task.channels)
    if task.get("images_per_class", None) is not None:
        need(task.images_per_class >= 1, "task.images_per_class", ">= 1 or null", task.images_per_class)
    need(tr.val_interval >= 1, "trainer.val_interval", ">= 1", tr.val_interval)
    need(tr.val_tasks >= 1, "trainer.val_tasks", ">= 1", tr.val_tasks)
    need(tr.divergence_ratio > 1, "trainer.divergence_ratio", "> 1", tr.divergence_ratio)
    need(tr.test_interval is None or (tr.test_interval >= 1 and tr.test_interval % tr.val_interval == 0),
         "trainer.test_interval", f"null or a multiple of trainer.val_interval={tr.val_interval}", tr.test_interval)
    if tr.cuda_graph:  # their fresh state is all zeros, which the graph's warm-up restores; metarun's SGD has none
        need(alg.outer_optimizer._target_ in CAPTURABLE_OPTIMIZERS, "algorithm.outer_optimizer._target_",
             f"one of {', '.join(CAPTURABLE_OPTIMIZERS)} with trainer.cuda_graph=true (torch.optim.SGD reads a "
             "tensor rate with .item(), which a graph cannot capture)", alg.outer_optimizer._target_)
    bad = [s for s in tr.report_steps if not 0 <= s <= alg.test_inner_steps]
    need(not bad, "trainer.report_steps", f"between 0 and algorithm.test_inner_steps={alg.test_inner_steps}", list(tr.report_steps))
