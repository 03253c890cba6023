"""Few-shot classification: episode sampling, and Omniglot / MiniImagenet runs end to end."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from metarun.data.cache import DataError
from metarun.tasks.classification import FewShotClassification
from tests.conftest import DATA_DIR
from tests.test_cli import assert_one_line_error, only_run_dir


def synthetic_splits(classes=(7, 4, 4), images=6, size=5):
    """Each image's pixels encode (class, image) so tests can check what was gathered."""
    out = {}
    for split, n in zip(("train", "val", "test"), classes):
        c = torch.arange(n).view(n, 1, 1, 1, 1) * 10
        i = torch.arange(images).view(1, images, 1, 1, 1)
        out[split] = (c + i).expand(n, images, 1, size, size).to(torch.uint8).clone()
    return out


@pytest.mark.unit
def test_episodes_have_the_right_shapes_labels_and_images():
    family = FewShotClassification(synthetic_splits(), ways=3, shots=2, queries=3, test_queries=3)
    batch = family.sample(50, 2, 3, torch.Generator().manual_seed(0))
    t = batch.tasks
    assert t.support_x.shape == (50, 6, 1, 5, 5) and t.query_x.shape == (50, 9, 1, 5, 5)
    assert t.support_y.tolist()[0] == [0, 0, 1, 1, 2, 2] and t.query_y.tolist()[0] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    codes = lambda x: (x[..., 0, 0, 0] * 255).round().long()  # noqa: E731  (class * 10 + image)
    support, query = codes(t.support_x).view(50, 3, 2), codes(t.query_x).view(50, 3, 3)
    both = torch.cat([support, query], dim=2)
    assert (both // 10 == batch.classes[:, :, None]).all()  # each slot holds one class ...
    assert all(len(set(row.tolist())) == 5 for row in both.view(150, 5))  # ... with distinct images
    assert all(len(set(row.tolist())) == 3 for row in batch.classes)  # distinct classes per task
    # labels are permuted across tasks: a class does not always get the same label
    label_of_class0 = [row.tolist().index(0) for row in batch.classes if 0 in row.tolist()]
    assert len(set(label_of_class0)) > 1
    assert t.support_x.dtype == torch.float32 and 0 <= t.support_x.min() and t.support_x.max() <= 1


@pytest.mark.unit
def test_episodes_are_seeded_and_split_aware():
    family = FewShotClassification(synthetic_splits(), ways=3, shots=1, queries=1, test_queries=1)
    a = family.sample(4, 1, 1, torch.Generator().manual_seed(5), split="val")
    b = family.sample(4, 1, 1, torch.Generator().manual_seed(5), split="val")
    assert torch.equal(a.classes, b.classes) and torch.equal(a.tasks.support_x, b.tasks.support_x)
    assert a.classes.max() < 4  # the val split has 4 classes


@pytest.mark.unit
def test_episodes_are_uniform_random_permutations():
    """Classes and images are the first entries of a uniform random permutation per task (the
    reference: a full sort of the same uniform draws; ties may come out in either order), and every
    class is equally likely in every slot."""
    family = FewShotClassification(synthetic_splits(classes=(40, 5, 5), images=6), ways=5, shots=1,
                                   queries=2, test_queries=2)
    batch = family.sample(4000, 1, 2, torch.Generator().manual_seed(1))
    reference = torch.Generator().manual_seed(1)
    for draws, chosen in ((torch.rand(4000, 40, generator=reference), batch.classes),
                          (torch.rand(4000, 5, 6, generator=reference), batch.images)):
        k = chosen.shape[-1]
        assert torch.equal(draws.gather(-1, chosen), draws.sort(dim=-1).values[..., :k])
    # each of the 40 classes in each of the 5 label slots: 100 expected, sd about 10
    counts = torch.zeros(5, 40).scatter_add_(1, batch.classes.T, torch.ones(5, 4000))
    assert counts.min() > 55 and counts.max() < 145


@pytest.mark.unit
@pytest.mark.parametrize("kwargs,message", [
    ({"ways": 5}, "task.ways=5 is more than the 4 classes of the val split"),
    ({"shots": 4, "queries": 3}, "task.shots + task.queries = 7 is more than the 6 images"),
    ({"test_queries": 6}, "task.shots + task.test_queries = 7"),
])
def test_impossible_episodes_are_refused(kwargs, message):
    args = {"ways": 3, "shots": 1, "queries": 1, "test_queries": 1, **kwargs}
    with pytest.raises(DataError, match=message.replace("+", r"\+")):
        FewShotClassification(synthetic_splits(), **args)


@pytest.mark.smoke
@pytest.mark.parametrize("preset", ["omniglot_5w1s", "omniglot_5w1s_noconv"])
def test_omniglot_preset_runs_end_to_end_on_real_data(cli, omniglot_cache, preset):
    proc = cli(f"experiment={preset}", "debug=smoke", f"task.data_dir={DATA_DIR}",
               f"task.cache_dir={omniglot_cache}", "task.progress=false", "trainer.test_tasks=10")
    assert proc.returncode == 0, proc.stderr
    run = only_run_dir(cli.cwd)
    results = json.loads((run / "results.json").read_text())
    # the headline, transductive, and from the same adaptation the queries predicted each with the support set
    assert results["metric"] == "accuracy" and set(results["results"]) == {"1-shot", "1-shot, non-transductive"}
    assert results["transductive"] is True
    for row in results["results"].values():
        for value in row.values():
            assert 0.0 <= value["mean"] <= 1.0
    assert "1-shot, non-transductive" in proc.stdout
    assert (run / "checkpoints" / "best.pt").is_file()
    assert "1-shot" in proc.stdout
    assert f"Omniglot: read the 28x28 cache {omniglot_cache / 'omniglot_28x28_uint8_v1.pt'}" in (run / "metarun.log").read_text()


@pytest.mark.smoke
def test_omniglot_missing_data_offline_is_one_line(cli, tmp_path):
    """The message names the absolute folders it looked in and both ways to point elsewhere."""
    proc = cli("task=omniglot", "task.data_dir=empty", f"task.cache_dir={tmp_path / 'c'}", "task.download=false")
    assert_one_line_error(proc, "images_background.zip", f"in {cli.cwd / 'empty'} and {cli.cwd / 'empty' / 'omniglot'}",
                          "task.data_dir=", "METARUN_DATA_DIR")


def write_pickles(root, classes=(5, 5, 5), images=20):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "validation", "test"), classes):
        data = rng.integers(0, 256, size=(n * images, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{split[:2]}{c:06d}": list(range(c * images, (c + 1) * images)) for c in range(n)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)


@pytest.mark.smoke
def test_miniimagenet_preset_runs_on_synthetic_pickles(cli, tmp_path):
    data = tmp_path / "mini"
    data.mkdir()
    write_pickles(data)
    common = ("experiment=miniimagenet_5w1s", "debug=smoke", f"task.data_dir={data}",
              f"task.cache_dir={tmp_path / 'cache'}", "task.images_per_class=20", "task.progress=false",
              "task.queries=2", "task.test_queries=2",  # few 84x84 queries: a CPU smoke run stays quick
              "algorithm.meta_batch_size=2", "algorithm.inner_steps=1", "algorithm.test_inner_steps=2",
              "trainer.report_steps=[0,2]", "trainer.test_tasks=4", "trainer.val_tasks=2")
    proc = cli(*common)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((only_run_dir(cli.cwd) / "results.json").read_text())
    assert results["task"] == "miniimagenet" and set(results["results"]["1-shot"]) == {"after_0_steps", "after_2_steps"}
    assert_one_line_error(cli(*common, "task.ways=6"), "task.ways=6 is more than the 5 classes")
    assert_one_line_error(cli(*common, "task.queries=30"), "task.shots + task.queries = 31")
