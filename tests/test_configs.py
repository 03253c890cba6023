"""Every config file composes against its schema; bad values fail with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metarun.algorithms import ALGORITHMS
from metarun.cli import CONFIG_DIR
from metarun.config import check_added_keys, validate
from metarun.models import BatchStatNorm
from metarun.utils.errors import ConfigError
from tests.conftest import compose_config

pytestmark = pytest.mark.configs

GROUPS = ["task", "model", "algorithm", "trainer", "setting", "experiment", "sweep", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


# pieces that only make sense with an RL task are composed with one
RL_PIECES = {("model", "gaussian_policy"), ("algorithm", "maml_trpo"), ("trainer", "rl")}
RL_SETTINGS = {"navigation2d", "halfcheetah_dir", "halfcheetah_vel", "ant_dir", "ant_vel"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_file_composes_and_validates(group, option):
    companion = ["task=navigation2d"] if (group, option) in RL_PIECES else []
    if group == "setting":  # a setting is composed with a task of its family (and so its algorithm)
        companion = [f"task={option if option in RL_SETTINGS else option.split('_')[0]}"]
    if (group, option) == ("model", "custom"):  # a class of the user's own, named on the command line
        with pytest.raises(ConfigError, match=r"names no class to build \(model\._target_\)"):
            validate(compose_config("model=custom"))
        companion = ["model._target_=my_nets.Net"]
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
    # a setting of one family has no paper values for the other family's algorithms, which then
    # compose with their own files' values and are refused by the range checks, naming the setting
    with pytest.raises(ConfigError, match="algorithm must be one of .* for a supervised task, got 'maml_trpo'"):
        validate(compose_config("task=sinusoid", "algorithm=maml_trpo"))
    for algorithm in ("maml", "reptile"):
        with pytest.raises(ConfigError, match=f"algorithm must be maml_trpo for an RL task, got '{algorithm}'"):
            validate(compose_config("task=halfcheetah_dir", f"algorithm={algorithm}"))
    # a setting of the other family, chosen by hand, fails at composition: its protocol keys are not the trainer's
    with pytest.raises(ConfigCompositionException, match="report_steps"):
        compose_config("task=halfcheetah_dir", "algorithm=maml", "setting=sinusoid")


def test_every_algorithm_has_paper_values_for_every_setting_of_its_family():
    """An algorithm runs anywhere with its own file's values, but every one shipped has its sources'
    values for every setting of its family (configs/paper/<setting>/<algorithm>.yaml)."""
    rl = RL_SETTINGS
    for setting in options("setting"):
        for algorithm in (["maml_trpo"] if setting in rl else sorted(ALGORITHMS)):
            assert (Path(CONFIG_DIR) / "paper" / setting / f"{algorithm}.yaml").is_file(), (setting, algorithm)


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
    # nothing near to suggest: the keys beside it (it said only "not a key of the config")
    with pytest.raises(ConfigError, match=r"model\.widht is not a key of the config \(model has _target_, in_features, "
                                          r"out_features, hidden_sizes, activation, batch_norm\)"):
        check_added_keys(compose_config("+model.widht=8"), ["+model.widht=8"], Path(CONFIG_DIR))


def setting_of(experiment: str) -> str:
    """The setting an experiment preset picks (following the presets it builds on)."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml")
    for entry in node.get("defaults", []):
        if isinstance(entry, str):
            return setting_of(entry)
        for key, value in entry.items():
            if key == "override /setting":
                return value
    raise AssertionError(f"experiment {experiment} picks no setting")


def leaves(node, prefix: str = "") -> dict:
    """Every value of a config under its dotted key (``algorithm.outer_optimizer.lr``)."""
    out = {}
    for key, value in (OmegaConf.to_container(node) if not isinstance(node, dict) else node).items():
        if key == "defaults":
            continue
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def paper_values(setting: str, algorithm: str) -> dict:
    """What configs/paper/<setting>/<algorithm>.yaml sets, its own defaults (other paper files) first."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "paper" / setting / f"{algorithm}.yaml")
    merged = OmegaConf.create()
    for entry in node.get("defaults", []):
        merged = OmegaConf.merge(merged, paper_values(*entry.strip("/").split("/")[1:]))
    return OmegaConf.merge(merged, {k: v for k, v in node.items() if k != "defaults"})


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_on_every_experiment_gets_its_own_sources_values(experiment, algorithm):
    """Precedence that cannot lie: `experiment=E algorithm=A` runs A with A's values for E's setting
    (configs/paper/<setting>/<A>.yaml), except where the preset itself deviates on purpose."""
    cfg = compose_config(f"experiment={experiment}", f"algorithm={algorithm}")
    preset = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml")
    expected = paper_values(setting_of(experiment), algorithm)
    assert cfg.algorithm.name == algorithm
    for key, value in leaves(expected).items():
        want = leaves(preset).get(key, value)  # a deviation of the preset wins
        assert OmegaConf.select(cfg, key) == want, key
    # and an algorithm's own file is not silently overridden by another's values
    assert OmegaConf.to_container(cfg.algorithm) != OmegaConf.to_container(
        compose_config(f"experiment={experiment}", "algorithm=maml").algorithm) or algorithm == "maml"


def test_an_algorithm_without_values_for_a_setting_runs_with_its_own_and_says_so(cli, tmp_path):
    """What adding an algorithm needs is its module, a registry line and its own YAML file: on a
    setting without paper values (here a user's own setting, from their config folder) it runs with
    its file's values, and its log says so."""
    from tests.test_cli import assert_one_line_error, only_run_dir

    (tmp_path / "mine" / "setting").mkdir(parents=True)
    (tmp_path / "mine" / "setting" / "custom.yaml").write_text("# @package _global_\n")
    proc = cli("debug=smoke", "trainer.test_tasks=4", "setting=custom", f"hydra.searchpath=[file://{tmp_path / 'mine'}]")
    assert proc.returncode == 0, proc.stderr
    log = (only_run_dir(cli.cwd) / "metarun.log").read_text()
    assert "configs/paper/custom/maml.yaml does not exist: algorithm=maml runs with configs/algorithm/maml.yaml's" in log
    assert json.loads((only_run_dir(cli.cwd) / "results.json").read_text())["inner_lr"] == 0.01  # maml.yaml's alpha
    # and a family mismatch is one line
    assert_one_line_error(cli("task=navigation2d", "algorithm=maml"), "algorithm must be maml_trpo for an RL task")
