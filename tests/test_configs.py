"""Every config file composes against its schema; bad values fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from metarun.cli import CONFIG_DIR
from metarun.config import check_added_keys, validate
from metarun.models import BatchStatNorm
from metarun.utils.errors import ConfigError
from tests.conftest import compose_config

pytestmark = pytest.mark.configs

GROUPS = ["task", "model", "algorithm", "trainer", "experiment", "sweep", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


# pieces that only make sense with an RL task are composed with one
RL_PIECES = {("model", "gaussian_policy"), ("algorithm", "maml_trpo"), ("trainer", "rl")}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_file_composes_and_validates(group, option):
    companion = ["task=navigation2d"] if (group, option) in RL_PIECES else []
    cfg = compose_config(*companion, f"{group}={option}")
    validate(cfg)
    assert cfg.task.name and cfg.trainer.name


def test_every_group_has_files():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


def test_default_is_the_paper_sinusoid_setup():
    cfg = compose_config()
    assert cfg.task.name == "sinusoid" and cfg.task.shots == 10
    assert list(cfg.model.hidden_sizes) == [40, 40] and cfg.model.activation == "relu"
    assert cfg.algorithm.inner_lr == 0.01 and cfg.algorithm.inner_steps == 1
    assert cfg.algorithm.meta_batch_size == 25 and cfg.algorithm.outer_optimizer.lr == 0.001
    assert cfg.trainer.iterations == 70000 and cfg.trainer.test_tasks == 600


def test_fomaml_is_maml_with_first_order():
    cfg = compose_config("algorithm=fomaml")
    assert cfg.algorithm.first_order is True and cfg.algorithm.inner_lr == 0.01


@pytest.mark.parametrize("preset", [p for p in options("experiment") if p.startswith(("omniglot", "miniimagenet"))])
def test_fomaml_on_a_preset_keeps_its_hyperparameters(preset):
    """The paper's first-order rows: `experiment=<preset> algorithm=fomaml` swaps only the order,
    not the preset's alpha, steps or meta-batch for the algorithm file's sinusoid defaults."""
    second = compose_config(f"experiment={preset}")
    first = compose_config(f"experiment={preset}", "algorithm=fomaml")
    assert (first.algorithm.name, first.algorithm.first_order) == ("fomaml", True)
    assert second.algorithm.first_order is False
    for key in second.algorithm:
        if key not in ("name", "first_order"):
            assert first.algorithm[key] == second.algorithm[key], key
    for group in ("task", "model", "trainer"):
        assert first[group] == second[group], group


def test_command_line_model_wins_over_task_preset():
    cfg = compose_config("task=sinusoid", "model.hidden_sizes=[8]")
    assert list(cfg.model.hidden_sizes) == [8]


@pytest.mark.parametrize("override", ["task.shotz=3", "algorithm.inner_lrr=0.1"])
def test_misspelt_key_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].replace(".", r"\.")):
        compose_config(override)


@pytest.mark.parametrize("override", ["algorithm.inner_lr=abc", "trainer.iterations=many", "task.shots=2.5"])
def test_wrong_type_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_config(override)


def test_unknown_group_option_fails():
    with pytest.raises(ConfigCompositionException, match="task/nonexistent"):
        compose_config("task=nonexistent")


@pytest.mark.parametrize("override,key", [
    ("algorithm.inner_lr=-0.1", "algorithm.inner_lr"),
    ("algorithm.inner_lr=0", "algorithm.inner_lr"),
    ("algorithm.inner_steps=-1", "algorithm.inner_steps"),
    ("algorithm.outer_optimizer.lr=-1e-3", "algorithm.outer_optimizer.lr"),
    ("algorithm.meta_batch_size=0", "algorithm.meta_batch_size"),
    ("algorithm.batching=pmap", "algorithm.batching"),
    ("task.shots=0", "task.shots"),
    ("task.queries=0", "task.queries"),
    ("task.test_shots=[0]", "task.test_shots"),
    ("trainer.test_tasks=1", "trainer.test_tasks"),
    ("trainer.log_interval=0", "trainer.log_interval"),
    ("trainer.report_steps=[20]", "trainer.report_steps"),
    ("device=tpu", "device"),
])
def test_out_of_range_values_name_the_key(override, key):
    cfg = compose_config(override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("shots", [1, 5])
def test_noconv_presets_are_the_conv4_presets_with_the_papers_fc_network(shots):
    conv = compose_config(f"experiment=omniglot_5w{shots}s")
    fc = compose_config(f"experiment=omniglot_5w{shots}s_noconv")
    for group in ("task", "algorithm", "trainer"):
        assert fc[group] == conv[group], group
    model = instantiate(fc.model, out_features=5, in_channels=1, image_size=28)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 128), (128, 64), (64, 64), (64, 5)]
    assert sum(isinstance(m, BatchStatNorm) for m in model.modules()) == 4
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)


def test_mismatched_families_are_refused():
    with pytest.raises(ConfigError, match="algorithm must be maml or fomaml for a supervised task"):
        validate(compose_config("task=sinusoid", "algorithm=maml_trpo"))
    with pytest.raises(ConfigError, match="algorithm must be maml_trpo for an RL task"):
        validate(compose_config("task=halfcheetah_dir", "algorithm=maml"))
    # a task preset that sets RL-only algorithm keys fails already when composing, naming the key
    with pytest.raises(ConfigCompositionException, match="test_inner_lrs"):
        compose_config("task=navigation2d", "algorithm=maml")


def test_every_yaml_key_is_commented():
    """Each key line in a config file carries a comment saying why it has its value."""
    missing = []
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        block = None  # the indentation of a block scalar's key (`text: |`): its lines are text, not keys
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            indent = len(line) - len(line.lstrip())
            if block is not None and (not s or indent > block):
                continue
            block = indent if s.split("#")[0].rstrip().endswith(("|", ">")) else None
            if not s or s.startswith(("#", "-")) or ":" not in s:
                continue
            key, _, value = s.partition(":")
            if key in ("defaults", "hydra", "run", "sweep", "job", "config", "override_dirname", "sweeper", "params"):
                continue
            if value.strip() and "#" not in value and not s.startswith(("_target_", "_partial_", "name:")):
                missing.append(f"{path.relative_to(CONFIG_DIR)}:{n}: {s}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_plus_adds_keys_only_inside_free_form_mappings():
    """'+key=value' is for mappings such as task.env_kwargs; elsewhere a new key is a typo."""
    added = ["+task.env_kwargs.ctrl_cost_weight=0.2", "++trainer.iterations=3", "+hydra.job.env_set.A=1"]
    check_added_keys(compose_config("task=halfcheetah_vel", *added[:2]), added, Path(CONFIG_DIR))
    cfg = compose_config("+trainer.iteratons=10")
    with pytest.raises(ConfigError, match=r"trainer\.iteratons is not a key of the config; did you mean "
                                          r"trainer\.iterations\?"):
        check_added_keys(cfg, ["+trainer.iteratons=10"], Path(CONFIG_DIR))
    with pytest.raises(ConfigError, match="'[+]seeed=1': seeed is not a key of the config; did you mean seed"):
        check_added_keys(compose_config("+seeed=1"), ["+seeed=1"], Path(CONFIG_DIR))
