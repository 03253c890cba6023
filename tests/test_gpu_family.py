"""The GPU family step (.ci/gpu-family), run here on a CPU on a tiny budget: every algorithm's Omniglot
5-way 1-shot preset trains, is tested, and ends up in one report table beside its paper's number.
On a GPU the same script runs each for FAMILY_MINUTES with the meta-step in a CUDA graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml"]


@pytest.mark.smoke
def test_family_step_runs_every_preset_and_reports_them_beside_the_papers(tmp_path, omniglot_cache):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "GRAPH": "false", "FAMILY_MINUTES": "5",
           "OUT": str(tmp_path / "out"), "FAMILY_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "METARUN_DATA_DIR": str(DATA_DIR),
           "FAMILY_ARGS": f"trainer.iterations=2 trainer.val_interval=2 trainer.checkpoint_interval=2 trainer.val_tasks=2 "
                          f"trainer.test_tasks=4 algorithm.meta_batch_size=2 algorithm.batching=vmap "
                          f"trainer.num_threads=1 task.cache_dir={omniglot_cache}"}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-family")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "out" / "family" / "report.md").read_text()
    published = {"maml": "98.7", "fomaml": "98.3", "metasgd": "99.53", "mamlpp": "99.47", "reptile": "97.68",
                 "imaml": "99.16", "anil": "96.2"}
    for algorithm in ALGORITHMS:
        results = json.loads((tmp_path / "out" / "family" / f"results_{algorithm}.json").read_text())
        assert results["training"]["iterations"] == 2 and results["test_tasks"] == 4
        row = next(line for line in report.splitlines() if line.startswith(f"| {algorithm} |"))
        assert published[algorithm] in row  # the paper's number beside the run's
    # each algorithm evaluated as its preset says: Meta-SGD after its one step, Reptile after its 50
    assert "after_1_steps" in json.loads((tmp_path / "out" / "family" / "results_metasgd.json").read_text())[
        "results"]["1-shot"] and "after_3_steps" not in json.loads(
        (tmp_path / "out" / "family" / "results_metasgd.json").read_text())["results"]["1-shot"]
    assert "after_50_steps" in json.loads((tmp_path / "out" / "family" / "results_reptile.json").read_text())[
        "results"]["1-shot"]


@pytest.mark.smoke
def test_rl_step_benches_both_paths_trains_and_reports(tmp_path):
    """.ci/gpu-rl on a CPU with a tiny HalfCheetah: the bench rows of both paths, a run evaluated, its report."""
    pytest.importorskip("mujoco")
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "RL_RUN": str(tmp_path / "run"), "OMP_NUM_THREADS": "1",
           "RL_BENCH_ARGS": "--rl navigation2d --iterations 1 --threads 1",
           "RL_ARGS": "task.horizon=5 algorithm.meta_batch_size=2 algorithm.trajectories=2 trainer.iterations=2 "
                      "trainer.test_tasks=2 trainer.num_threads=1 task.threads=2"}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-rl")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out" / "rl"
    record = json.loads(next(out.glob("bench_*.json")).read_text())
    assert [(r["config"], r["path"], r["device"]) for r in record["rl"]] == [
        ("navigation2d", "gymnasium + autograd", "cpu"), ("navigation2d", "batched + factored (autograd)", "cpu"),
        ("navigation2d", "batched + factored", "cpu")]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "halfcheetah_dir" and results["training"]["iterations"] == 2
    assert len(results["training_log"]) == 2  # the return during training, every iteration
    assert "halfcheetah_dir" in (out / "report.md").read_text()
