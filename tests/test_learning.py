"""Meta-training actually meta-learns: short real runs, judged by the evaluation protocol."""

from __future__ import annotations

import pytest

from metarun.trainers import supervised as sup
from tests.conftest import DATA_DIR, compose_config


@pytest.mark.smoke
def test_sinusoid_maml_learns_to_adapt_in_one_step(tmp_path):
    """3,000 iterations (~15 s): after one inner step the MSE must fall well below the
    pre-adaptation MSE, which stays near the variance of the task distribution (~2.9)."""
    cfg = compose_config("device=cpu", "trainer.iterations=3000", "trainer.val_interval=1000",
                         "trainer.checkpoint_interval=1000", "trainer.test_tasks=200",
                         "trainer.report_steps=[0,1,10]", "trainer.progress=false")
    row = sup.run_supervised(cfg, tmp_path)["results"]["10-shot"]
    before, after = row["after_0_steps"]["mean"], row["after_1_steps"]["mean"]
    assert before > 2.0
    assert after < 0.5 * before
    assert row["after_10_steps"]["mean"] < after


@pytest.mark.slow
def test_omniglot_5w1s_learns_on_cpu(tmp_path, omniglot_cache):
    """300 iterations of meta-batch 8 on real Omniglot (~1 min): well above chance (20 %)."""
    cfg = compose_config("experiment=omniglot_5w1s", "device=cpu", f"task.data_dir={DATA_DIR}",
                         f"task.cache_dir={omniglot_cache}", "task.progress=false", "algorithm.meta_batch_size=8",
                         "trainer.iterations=300", "trainer.val_interval=100", "trainer.checkpoint_interval=100",
                         "trainer.test_tasks=200", "trainer.progress=false")
    row = sup.run_supervised(cfg, tmp_path)["results"]["1-shot"]
    assert row["after_1_steps"]["mean"] > 0.6
    assert row["after_1_steps"]["mean"] > row["after_0_steps"]["mean"] + 0.2
