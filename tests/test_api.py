"""metarun.load: a trained model from Python, checked against the runner's own evaluation.

The model side uses only the public API (``metarun.load``, ``preprocess``, ``adapt``, ``predict``) on
raw PNG bytes read from the official Omniglot zips; the reference side is the trainer's own set-up,
episode sampler (test seed) and evaluation (``supervised.fixed_curve`` / ``Algorithm.curve``)."""

from __future__ import annotations

import io
import itertools
import logging
import runpy
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.func import vmap

import metarun
from metarun.data.omniglot import load_omniglot, omniglot_splits
from metarun.tasks.omniglot import OmniglotTasks
from metarun.trainers import rl
from metarun.trainers import supervised as sup
from metarun.types import TaskBatch
from metarun.utils import checkpoint
from metarun.utils.errors import CheckpointError, MetarunError
from tests.conftest import DATA_DIR, ROOT, compose_config, require_data

pytestmark = pytest.mark.smoke

TINY = ("debug=smoke", "device=cpu", "algorithm.batching=vmap", "trainer.iterations=2", "trainer.val_interval=2",
        "trainer.checkpoint_interval=2")


def omniglot_cfg(omniglot_cache, *overrides):
    return compose_config("experiment=omniglot_5w1s", *TINY, f"task.data_dir={DATA_DIR}",
                          f"task.cache_dir={omniglot_cache}", "task.progress=false", "trainer.test_tasks=4", *overrides)


def runner(cfg, run_dir, path):
    """The trainer's own run, restored from the checkpoint ``path`` (as ``metarun evaluate=`` does)."""
    run = sup.setup(cfg, run_dir, batching="vmap")
    sup.restore(run, checkpoint.load(path))
    return run


def evaluated_episodes(run):
    """The episodes the trainer's test stage evaluates for the trained K: its sampler, its seed."""
    tr = run.cfg.trainer
    return run.task.sample(tr.test_tasks, run.task.shots, run.task.test_queries, sup.fixed_generator(run, tr.test_seed),
                           split="test")


def one(tasks: TaskBatch, i: int) -> TaskBatch:
    return TaskBatch(*(t[i:i + 1] for t in tasks))


def runner_outputs(run, tasks: TaskBatch, steps: int, shape: torch.Size) -> torch.Tensor:
    """The query outputs (of ``shape``) of the runner's evaluation (``Algorithm.curve``) of a one-task
    batch after ``steps`` steps, read out one entry at a time through its metric hook."""
    params = dict(run.model.named_parameters())
    out = torch.empty(shape, dtype=tasks.query_x.dtype)
    for index in itertools.product(*map(range, shape)):
        out[index] = run.algorithm.curve(params, tasks, lambda o, y, i=index: o[i], steps,
                                         run.cfg.trainer.transductive).metric[steps, 0]
    return out


def forbid_the_dataset(monkeypatch) -> None:
    """Loading Omniglot (the task or its data) fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("the dataset was loaded")

    monkeypatch.setattr(OmniglotTasks, "__init__", boom)
    monkeypatch.setattr("metarun.data.omniglot.load_omniglot", boom)
    monkeypatch.setattr("metarun.tasks.omniglot.load_omniglot", boom)


# --- a tiny trained Omniglot run and where its test images come from ------------------------------


@pytest.fixture(scope="module")
def omniglot_run(omniglot_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("omniglot_run")
    cfg = omniglot_cfg(omniglot_cache)
    sup.run_supervised(cfg, run_dir)
    return cfg, run_dir


@pytest.fixture(scope="module")
def raw(omniglot_cache):
    """The raw PNG bytes of a drawing of the cached data: ``raw(character row, drawing index)``."""
    require_data(DATA_DIR / "omniglot" / "images_evaluation.zip")
    data = load_omniglot(DATA_DIR, omniglot_cache, download=False, progress=False)
    zips = {s: zipfile.ZipFile(DATA_DIR / "omniglot" / f"images_{s}.zip") for s in ("background", "evaluation")}

    def read(row: int, drawing: int) -> bytes:
        set_name, alphabet, character = data.characters[row]
        folder = f"images_{set_name}/{alphabet}/{character}/"
        drawings = sorted(n for n in zips[set_name].namelist() if n.startswith(folder) and n.endswith(".png"))
        return zips[set_name].read(drawings[drawing])  # (the cache sorts a character's drawings by name)

    read.data = data
    yield read
    for z in zips.values():
        z.close()


def split_class(cfg, data, split: str, c: int) -> tuple[int, int]:
    """Class ``c`` of a task split -> (its character's row in the data, its rotation in quarter turns)."""
    characters = omniglot_splits(data, cfg.task.split, cfg.task.split_seed)[split]
    return int(characters[c % len(characters)]), c // len(characters)


def raw_images(trained, raw, cfg, episodes, e: int, lo: int, hi: int) -> torch.Tensor:
    """Images ``lo:hi`` of every class of episode ``e`` (in the episode's order: class by class), from
    their raw PNG files through ``preprocess``, each in its class's rotation."""
    rows = [split_class(cfg, raw.data, "test", int(c)) for c in episodes.classes[e]]
    pngs = [raw(row, int(episodes.images[e, w, i])) for w, (row, _) in enumerate(rows) for i in range(lo, hi)]
    turns = [k for _, k in rows for _ in range(lo, hi)]
    return torch.stack([torch.rot90(x, k, dims=(-2, -1)) for x, k in zip(trained.preprocess(pngs), turns)])


# --- (a) preprocessing ----------------------------------------------------------------------------


def test_preprocess_of_a_raw_png_is_the_cached_image_over_255(omniglot_run, raw, tmp_path):
    """Raw PNG bytes (and the same drawing as a file path or a PIL image) through preprocess() equal
    the task's cached split entry for that drawing, uint8 / 255, bit for bit; rotations too."""
    cfg, run_dir = omniglot_run
    trained = metarun.load(run_dir)
    split = instantiate(cfg.task).splits["test"]  # the task as the runner builds it
    n = len(omniglot_splits(raw.data, cfg.task.split, cfg.task.split_seed)["test"])
    assert split.shape[:2] == (4 * n, 20)
    for c, drawing in [(0, 0), (7, 19), (n - 1, 3), (n + 5, 11), (3 * n + 2, 6)]:
        row, quarter_turns = split_class(cfg, raw.data, "test", c)
        png = raw(row, drawing)
        x = trained.preprocess(png)
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(torch.rot90(x, quarter_turns, dims=(-2, -1)), split[c, drawing].float() / 255.0)
    (tmp_path / "drawing.png").write_bytes(png)
    many = trained.preprocess([png, Image.open(io.BytesIO(png)), tmp_path / "drawing.png", str(tmp_path / "drawing.png")])
    assert many.shape == (4, 1, 28, 28) and all(torch.equal(m, x) for m in many)


def write_class_folders(root: Path, classes: int = 2, images: int = 3) -> list[Path]:
    """``root/{train,val,test}/<class>/*`` of small photos in several sizes and formats (PNG, JPEG);
    returns the test split's files, class by class, in name order."""
    rng = np.random.default_rng(0)
    test = []
    for split in ("train", "val", "test"):
        for c in range(classes):
            for i in range(images):
                size = [(20, 14), (16, 16), (9, 11)][i % 3]
                path = root / split / f"n{split}{c:02d}" / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
                test += [path] if split == "test" else []
    return test


@pytest.mark.parametrize("task", ["miniimagenet", "image_folder"])
def test_preprocess_of_image_files_is_the_cached_image_over_255(tmp_path, task):
    """MiniImagenet (layout b) and image_folder: image files (as paths, bytes and PIL images) through
    preprocess() equal the task's cached test split; a checkpoint written at set-up suffices."""
    root = tmp_path / "data"
    files = write_class_folders(root, images=3 if task == "image_folder" else 2)
    common = ("device=cpu", "algorithm.batching=vmap", "task.ways=2", "task.shots=1", "task.queries=1",
              "task.test_queries=1", f"task.cache_dir={tmp_path / 'cache'}", "task.progress=false")
    if task == "miniimagenet":
        cfg = compose_config("experiment=miniimagenet_5w1s", f"task.data_dir={root}", "task.images_per_class=2", *common)
    else:
        cfg = compose_config("task=image_folder", f"task.root={root}", "task.image_size=16", *common)
    run = sup.setup(cfg, tmp_path / "run")
    sup.save(run)
    trained = metarun.load(tmp_path / "run")
    split = run.task.splits["test"]  # [classes, images, 3, size, size]
    assert trained.model_kwargs == {"out_features": 2, "in_channels": 3, "image_size": split.shape[-1]}
    expected = split.flatten(0, 1).float() / 255.0
    assert torch.equal(trained.preprocess(files[:len(expected)]), expected)
    assert torch.equal(trained.preprocess([f.read_bytes() for f in files[:len(expected)]]), expected)
    assert torch.equal(trained.preprocess(Image.open(files[0])), expected[0])


# --- (b) adapt + predict == the runner's evaluation -----------------------------------------------


def test_adapt_and_predict_on_raw_pngs_equal_the_runners_evaluation(omniglot_run, raw):
    """The runner's test episodes, rebuilt from the raw PNG files they came from and run through the
    public API, give the runner's evaluation exactly: the same episode evaluated on its own by the
    runner's code gives bit-identical logits, accuracy and loss after every step; the runner's
    evaluation of its whole test set (the same episodes in one vmap batch) gives the same accuracy."""
    cfg, run_dir = omniglot_run
    trained = metarun.load(run_dir)  # best.pt, as `metarun evaluate=<run>` tests
    assert trained.path.name == "best.pt"
    run = runner(cfg, run_dir, trained.path)
    episodes = evaluated_episodes(run)
    ways, shots, queries = run.task.ways, run.task.shots, run.task.test_queries
    steps = cfg.algorithm.test_inner_steps
    whole = sup.fixed_curve(run, episodes.tasks)  # as evaluate() runs it
    for e in range(cfg.trainer.test_tasks):
        support_x = raw_images(trained, raw, cfg, episodes, e, 0, shots)
        query_x = raw_images(trained, raw, cfg, episodes, e, shots, shots + queries)
        support_y = [w for w in range(ways) for _ in range(shots)]
        query_y = torch.tensor([w for w in range(ways) for _ in range(queries)])
        assert torch.equal(support_x, episodes.tasks.support_x[e]) and torch.equal(query_x, episodes.tasks.query_x[e])
        assert torch.equal(torch.tensor(support_y), episodes.tasks.support_y[e])

        alone = sup.fixed_curve(run, one(episodes.tasks, e))  # the runner's evaluation of this episode alone
        for s in range(steps + 1):
            logits = trained.predict(trained.adapt(support_x, support_y, steps=s), query_x)
            accuracy = (logits.argmax(-1) == query_y).float().mean()
            loss = vmap(torch.nn.functional.cross_entropy)(logits[None], query_y[None])[0]
            assert torch.equal(accuracy, alone.metric[s, 0]) and torch.equal(loss, alone.loss[s, 0]), (e, s)
            assert accuracy == whole.metric[s, e], (e, s)
        if e == 0:  # the logits themselves, bit for bit
            assert torch.equal(logits, runner_outputs(run, one(episodes.tasks, e), steps, logits.shape))
            assert trained.adapt(support_x, support_y).steps == steps  # test_inner_steps by default


# --- (c) sizes from the checkpoint, no dataset ----------------------------------------------------


def test_load_rebuilds_the_model_from_the_checkpoint_alone(omniglot_run, raw, monkeypatch):
    cfg, run_dir = omniglot_run
    pngs = [raw(0, i) for i in range(5)]
    forbid_the_dataset(monkeypatch)
    best = run_dir / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=False)
    assert state["model_kwargs"] == {"out_features": 5, "in_channels": 1, "image_size": 28}
    assert state["metarun_version"] == metarun.__version__
    trained = metarun.load(run_dir)
    assert trained.model_kwargs == state["model_kwargs"] and trained.iteration == state["iteration"]
    assert trained.model.head.out_features == 5 and not trained.model.training
    assert trained.config.task.ways == 5 and trained.config.algorithm.name == "maml"
    saved = trained.model.state_dict()
    assert saved.keys() == state["model"].keys() and all(torch.equal(saved[k], state["model"][k]) for k in saved)
    x = trained.preprocess(pngs)
    assert trained.predict(trained.adapt(x, [0, 1, 2, 3, 4]), x).shape == (5, 5)
    last = metarun.load(run_dir / "checkpoints" / "last.pt")  # a checkpoint file is taken as it is
    assert last.path.name == "last.pt"


# --- (d) checkpoints written before model_kwargs --------------------------------------------------


class RenamedOmniglot(OmniglotTasks):
    """A task family whose model sizes only its data tells (as a user's own may be)."""

    built = 0

    @classmethod
    def model_sizes(cls, task):
        return None

    def __init__(self, *args, **kwargs):
        type(self).built += 1
        super().__init__(*args, **kwargs)


def test_an_old_checkpoint_without_model_kwargs_still_loads(omniglot_run, tmp_path, monkeypatch, caplog):
    """Omniglot's sizes are derived from the config (no dataset); a task whose class cannot say them is
    built from the config, as the runner would, to read them; one that cannot be imported is a
    one-line error."""
    cfg, run_dir = omniglot_run
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    new = metarun.load(run_dir)
    del state["model_kwargs"], state["metarun_version"]
    torch.save(state, tmp_path / "old.pt")
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as patched:
        forbid_the_dataset(patched)
        old = metarun.load(tmp_path / "old.pt")
    assert old.model_kwargs == new.model_kwargs
    assert torch.equal(old.predict(old.adapt(x, range(5)), x), new.predict(new.adapt(x, range(5)), x))

    state["config"]["task"].update(_target_=f"{__name__}.RenamedOmniglot", name="renamed")
    torch.save(state, tmp_path / "renamed.pt")
    with caplog.at_level(logging.WARNING, logger="metarun.api"):
        renamed = metarun.load(tmp_path / "renamed.pt")
    assert RenamedOmniglot.built == 1 and renamed.model_kwargs == new.model_kwargs
    assert "no model_kwargs" in caplog.text

    state["config"]["task"].update(_target_=f"{__name__}.NoSuchTask")
    torch.save(state, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="NoSuchTask cannot be imported") as info:
        metarun.load(tmp_path / "unknown.pt")
    assert "\n" not in str(info.value)


# --- (e) errors -----------------------------------------------------------------------------------


def test_bad_paths_and_images_are_one_line_errors(tmp_path, omniglot_run):
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for bad, fragment in [(tmp_path / "nowhere", "checkpoint not found"), (tmp_path / "empty_run", "no checkpoint in run folder"),
                          (tmp_path / "garbage.pt", "unreadable")]:
        with pytest.raises(MetarunError, match=fragment) as info:
            metarun.load(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    trained = metarun.load(omniglot_run[1])
    small = io.BytesIO()
    Image.new("L", (50, 50)).save(small, format="PNG")
    for image, fragment in [(small.getvalue(), "image is 50x50, expected 105x105"), (b"not a png", "cannot be read"),
                            (str(tmp_path / "missing.png"), "missing.png cannot be read")]:
        with pytest.raises(MetarunError, match=fragment) as info:
            trained.preprocess(image)
        assert "\n" not in str(info.value)


# --- sinusoid: regression, no preprocessing -------------------------------------------------------

ALGORITHMS = {
    "maml": ("algorithm=maml",),
    "anil": ("algorithm=anil",),  # the body's weights are shared by every task, the head's adapted
    "metasgd": ("algorithm=metasgd", "algorithm.rate_init=uniform"),
    "reptile-nontransductive": ("algorithm=reptile", "algorithm.inner_steps=2", "algorithm.test_inner_steps=10",
                                "trainer.transductive=false"),  # predicts each query with the support set
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_sinusoid_adapt_and_predict_equal_the_runners_evaluation(tmp_path, name):
    cfg = compose_config(*TINY, "trainer.test_tasks=2", "task.test_queries=5", *ALGORITHMS[name])
    sup.run_supervised(cfg, tmp_path)
    trained = metarun.load(tmp_path)
    assert trained.model_kwargs == {}
    own = torch.load(trained.path, weights_only=False)["algorithm"]  # Meta-SGD's learned rates
    assert bool(own) == (name == "metasgd")
    assert all(torch.equal(trained.algorithm.state_dict()[k], v) for k, v in own.items())
    run = runner(cfg, tmp_path, trained.path)
    tasks = one(evaluated_episodes(run).tasks, 0)
    steps = cfg.algorithm.test_inner_steps
    curve = sup.fixed_curve(run, tasks)
    sx, sy, qx, qy = (t[0] for t in tasks)
    for s in range(steps + 1):
        out = trained.predict(trained.adapt(sx, sy, steps=s), qx)
        assert torch.equal(vmap(run.task.metric_fn)(out[None], qy[None])[0], curve.metric[s, 0]), s
    assert torch.equal(out, runner_outputs(run, tasks, steps, out.shape))
    with pytest.raises(MetarunError, match="no image preprocessing"):
        trained.preprocess(b"png")


# --- meta-RL: the policy's sizes come from the environments ---------------------------------------


def test_rl_checkpoints_carry_the_policys_sizes(tmp_path):
    cfg = compose_config("task=navigation2d", "trainer.progress=false")
    rl.save(rl.setup(cfg, tmp_path))
    state = checkpoint.load(tmp_path)
    assert state["model_kwargs"] == {"obs_dim": 2, "act_dim": 2}
    trained = metarun.load(tmp_path)
    assert trained.model.log_std.shape == (2,)
    with pytest.raises(MetarunError, match="rollouts"):
        trained.adapt(torch.zeros(1, 2), torch.zeros(1, 2))


# --- the docs' example ----------------------------------------------------------------------------


def test_the_one_shot_runs_example_of_the_docs_runs(omniglot_cache, tmp_path, monkeypatch, capsys):
    """docs/examples/one_shot_runs.py on a tiny 20-way 1-shot run: 20 official runs, 20 queries each."""
    all_runs = DATA_DIR / "omniglot" / "official_small" / "all_runs.zip"
    require_data(all_runs)
    cfg = compose_config("experiment=omniglot_20w1s", *TINY, f"task.data_dir={DATA_DIR}",
                         f"task.cache_dir={omniglot_cache}", "task.progress=false", "trainer.test_tasks=2",
                         "trainer.val_tasks=2", "model.hidden=16")  # (a narrow conv4: the example, not the model, is tested)
    sup.run_supervised(cfg, tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["one_shot_runs.py", str(tmp_path), str(all_runs)])
    runpy.run_path(str(ROOT / "docs" / "examples" / "one_shot_runs.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("run")]) == 20
    assert lines[-2].startswith("mean accuracy over 20 runs: ")
    assert lines[-1] == "(task.split=paper trained on characters of these runs: not a held-out score)"
