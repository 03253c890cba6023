"""``metarun report``: the tables' numbers against the run folders' results.json, the plots, a
table per task, and one line for each kind of bad input."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from metarun import report

pytestmark = pytest.mark.smoke

SWEEP = ["debug=smoke", "algorithm.inner_lr=0.01,0.02", "algorithm.inner_steps=1,2", "seed=0,1",
         "trainer.num_threads=1"]
RL_RUN = ["task=navigation2d", "trainer.iterations=2", "algorithm.meta_batch_size=2", "algorithm.trajectories=3",
          "task.horizon=8", "trainer.test_tasks=4", "algorithm.test_inner_lrs=[0.1,0.05]", "trainer.progress=false",
          "trainer.num_threads=1"]


def metarun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A 2x2 sinusoid sweep with 2 seeds (8 runs, debug-short) and a meta-RL run, in one folder."""
    root = tmp_path_factory.mktemp("report")
    done = metarun("-m", *SWEEP, "hydra.sweep.dir=outputs/multirun/sweep", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    done = metarun(*RL_RUN, "hydra.run.dir=outputs/runs/nav", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "outputs"


def test_sweep_table_pools_seeds_as_the_results_say(runs, tmp_path):
    sweep = runs / "multirun" / "sweep"
    done = metarun("report", str(sweep), "--out", str(tmp_path), cwd=runs.parent)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == 4  # 2 x 2 configurations, the seeds pooled
    jobs = [p for p in sweep.iterdir() if (p / "results.json").is_file()]
    assert len(jobs) == 8
    for row in rows:
        assert row["seeds"] == "0 1"
        mine = [p for p in jobs if f"algorithm.inner_lr={row['algorithm.inner_lr']}," in p.name
                and f"algorithm.inner_steps={row['algorithm.inner_steps']}," in p.name]
        assert len(mine) == 2
        results = [json.loads((p / "results.json").read_text()) for p in mine]
        for key in results[0]["results"]["10-shot"]:  # after_<n>_steps
            means = [r["results"]["10-shot"][key]["mean"] for r in results]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(means), rel=1e-12)
            assert float(row[f"{key}_sd"]) == pytest.approx(statistics.stdev(means), rel=1e-12)
            cis = sorted(float(c) for c in row[f"{key}_ci95_per_run"].split())
            assert cis == pytest.approx(sorted(r["results"]["10-shot"][key]["ci95"] for r in results), rel=1e-12)
        assert float(row["iterations"]) == statistics.fmean(r["training"]["iterations_reached"] for r in results)
        assert float(row["ms_per_iteration"]) == pytest.approx(
            statistics.fmean(r["training"]["ms_per_iteration_last_sitting"] for r in results))
        info = json.loads((mine[0] / "run_info.json").read_text())
        assert row["commit"].startswith(info["versions"]["source"]["commit"][:7])
        assert row["metarun"] == info["versions"]["metarun"]
    # the printed table and the Markdown one: the differing overrides are the columns, not the seed
    header = done.stdout.splitlines()[1].split()
    assert header[:3] == ["algorithm.inner_lr", "algorithm.inner_steps", "seeds"]
    md = (tmp_path / "report.md").read_text()
    assert f"Made by `metarun report {sweep} --out {tmp_path}`" in md
    assert md.count("\n| 0.0") == 4
    for name in ("validation_vs_time", "validation_vs_iterations", "adaptation"):
        assert (tmp_path / f"sinusoid_10_shot_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (tmp_path / f"sinusoid_10_shot_{name}.svg").read_bytes()[:500]


def test_mixed_tasks_give_a_table_each_and_rl_its_return_figure(runs, tmp_path):
    done = metarun("report", str(runs), "--out", str(tmp_path), "--no-plots", cwd=runs.parent)
    assert done.returncode == 0, done.stderr
    assert "sinusoid, 10-shot: test mse" in done.stdout and "navigation2d: test return" in done.stdout
    tables, _, _ = report.build([runs])
    rl = next(t for t in tables if t.metric == "return")
    assert [len(c.runs) for c in rl.configurations] == [1]
    nav = json.loads((runs / "runs" / "nav" / "results.json").read_text())
    row = next(r for r in csv.DictReader((tmp_path / "report.csv").open()) if r["task"] == "navigation2d")
    assert float(row["after_2_steps_mean"]) == pytest.approx(nav["results"]["return"]["after_2_steps"]["mean"])
    assert row["after_2_steps_sd"] == ""  # one run: no spread over seeds
    written = report.plot_table(rl, tmp_path)
    # the paper's Figure 5 form, and the training curve (meta-RL does not validate)
    assert {p.name for p in written} == {f"navigation2d_{name}.{ext}" for ext in ("png", "svg") for name in
                                         ("return_vs_gradient_steps", "training_return_vs_time",
                                          "training_return_vs_iterations")}
    assert [e["iteration"] for e in nav["training_log"]] == [1, 2]


def test_published_numbers_join_the_rows_they_match(runs, tmp_path):
    published = tmp_path / "published.yaml"
    published.write_text("- task: sinusoid\n  where: {algorithm.inner_lr: 0.01}\n  value: 0.35\n"
                         "  source: Finn et al. 2017\n- task: navigation2d\n  value: -11.7\n")
    done = metarun("report", str(runs), "--published", str(published), "--out", str(tmp_path), "--no-plots",
                   cwd=runs.parent)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert {r["algorithm.inner_lr"]: r["published"] for r in rows if r["task"] == "sinusoid"} == {"0.01": "0.35",
                                                                                                   "0.02": ""}
    assert next(r["published"] for r in rows if r["task"] == "navigation2d") == "-11.7"
    assert "0.35 (Finn et al. 2017)" in (tmp_path / "report.md").read_text()


def test_bad_input_is_one_line_each(runs, tmp_path):
    def line(*args: str) -> str:
        done = metarun("report", *args, cwd=tmp_path)
        assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr.strip()

    assert line() == "metarun report: error: the following arguments are required: folders (metarun report --help)"
    assert line(str(tmp_path / "nowhere")) == f"metarun report: error: {tmp_path / 'nowhere'}: no such folder"
    empty = tmp_path / "empty"
    (empty / "a" / "b").mkdir(parents=True)
    assert "no run folder found" in line(str(empty))
    # an older results.json (no metric, cells of another shape): named, with what to do
    old = tmp_path / "old"
    shutil.copytree(runs / "runs" / "nav", old)
    results = json.loads((old / "results.json").read_text())
    del results["metric"]
    (old / "results.json").write_text(json.dumps(results))
    message = line(str(old))
    assert f"{old / 'results.json'} was written by an older metarun" in message
    assert f"metarun evaluate={old}" in message
    (old / "results.json").write_text("{not json")
    assert f"{old / 'results.json'} cannot be read" in line(str(old))
    bad = tmp_path / "published.yaml"
    bad.write_text("task: sinusoid\n")
    assert "expected a YAML list" in line(str(runs / "runs"), "--published", str(bad))


def test_a_run_that_did_not_finish_is_a_note_not_an_error(runs, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(runs / "runs" / "nav", mixed / "done")
    (mixed / "stopped").mkdir()
    shutil.copy(runs / "runs" / "nav" / "run_info.json", mixed / "stopped")
    done = metarun("report", str(mixed), "--no-plots", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"note: {mixed / 'stopped'}: no results.json" in done.stdout
    # a folder of runs (as outputs/runs) gets no report folder among its runs: ./report instead
    assert (tmp_path / "report" / "report.md").is_file() and not (mixed / "report").exists()


def test_diverged_tasks_get_their_count_and_the_mean_without_them(runs, tmp_path):
    sweep = tmp_path / "sweep"
    jobs = sorted(p for p in (runs / "multirun" / "sweep").iterdir() if (p / "results.json").is_file())[:2]
    for i, job in enumerate(jobs):  # the two seeds of one configuration; seed 1 had 3 diverged test tasks
        shutil.copytree(job, sweep / job.name)
        if i == 1:
            results = json.loads((job / "results.json").read_text())
            cell = results["results"]["10-shot"]["after_10_steps"]
            cell.update(mean=1e9, diverged_tasks=3, mean_without_diverged=0.5)
            (sweep / job.name / "results.json").write_text(json.dumps(results))
    tables, _, _ = report.build([sweep])
    header, rows = report.table_rows(tables[0], [])
    first = json.loads((jobs[0] / "results.json").read_text())["results"]["10-shot"]["after_10_steps"]
    assert rows[0][header.index("diverged tasks per run (after 10)")] == f"{first['diverged_tasks']},3"
    pooled = report.pooled(tables[0].configurations[0], "10-shot", 10)
    assert pooled.without == pytest.approx((first["mean_without_diverged"] + 0.5) / 2)
    assert pooled.mean == pytest.approx((first["mean"] + 1e9) / 2)


def test_update_remakes_the_marked_tables_of_a_markdown_file(runs, tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nText before.\n\n<!-- metarun report outputs/multirun/sweep -->\n| an old | table |\n"
                   "<!-- end of report -->\n\nText after.\n")
    done = metarun("report", "--update", str(doc), cwd=runs.parent)  # the block's folders: from the current folder
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"updated {doc}: 1 table block(s)"
    text = doc.read_text()
    assert text.startswith("# Results\n\nText before.\n\n<!-- metarun report outputs/multirun/sweep -->\n| algorithm.")
    assert text.endswith("<!-- end of report -->\n\nText after.\n") and "an old" not in text
    tables, _, _ = report.build([runs / "multirun" / "sweep"])
    assert report.markdown(*report.table_rows(tables[0], [])) in text  # the report's own table, unedited
    done = metarun("report", "--update", str(doc), cwd=runs.parent)
    assert done.stdout.strip().endswith("(unchanged)")
    # a block whose folders are not there: one line, and the file is left as it was
    doc.write_text(text.replace("outputs/multirun/sweep", "outputs/gone"))
    before = doc.read_text()
    done = metarun("report", "--update", str(doc), cwd=runs.parent)
    assert done.returncode == 2 and done.stderr.strip() == "metarun report: error: outputs/gone: no such folder"
    assert doc.read_text() == before
    # beside a block that can be remade, a block whose runs are gone is kept word for word and named
    gone_block = before[before.index("<!-- metarun report"):]
    doc.write_text(f"{gone_block}\nBetween.\n\n<!-- metarun report outputs/multirun/sweep -->\n| old |\n"
                   "<!-- end of report -->\n")
    done = metarun("report", "--update", str(doc), cwd=runs.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"updated {doc}: 1 table block(s); kept 1 whose folders are not here (outputs/gone)"
    assert doc.read_text().startswith(gone_block + "\nBetween.\n") and "| old |" not in doc.read_text()


def test_parity_runs_one_row_per_implementation_and_the_test_curve_table(tmp_path):
    """A reference's run folders as parity/common.py writes them beside a metarun run with a test_curve:
    --by implementation makes one row each (metarun's called metarun), and a second table gives the test
    means during training, pooled over seeds, "–" where a configuration has no point."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "parity"))
    import common

    for seed, accs in ((0, (0.60, 0.70)), (1, (0.64, 0.74))):
        points = [{"iteration": n, "train_seconds": n / 10, "accuracy": {0: [0.2] * 4, 50: [a, a + 0.02, a, a - 0.02]}}
                  for n, a in zip((250, 500), accs)]
        common.write_run(tmp_path / "reference" / f"seed{seed}", algorithm="reptile", reference="openai/x@" + "a" * 40,
                         seed=seed, config={"inner_batch": 10}, shots=1, points=points)
    mine = tmp_path / "metarun" / "seed0"
    shutil.copytree(tmp_path / "reference" / "seed0", mine)
    results = json.loads((mine / "results.json").read_text())
    results["test_curve"] = [{"iteration": 500, "train_seconds": 9.0, "accuracy_after_50_steps": 0.8}]
    (mine / "results.json").write_text(json.dumps(results))
    (mine / "config.yaml").write_text(json.dumps({"seed": 0, "algorithm": {"name": "reptile"}}))
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "reference"), str(mine), "--by", "implementation", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| openai/x@aaaaaaa | 0,1 |" in rows["openai/x@aaaaaaa"] and "| metarun | 0 |" in rows["metarun"]
    during = [line for line in md.splitlines() if "after 250 outer steps" in line]
    assert during and "after 500 outer steps" in during[0]
    reference_row = next(line for line in md.splitlines() if line.startswith("| openai/x@aaaaaaa | 0,1 | 50 |"))
    # 250 steps: the seeds' means 0.60 and 0.64 (sd 0.028); 500: 0.70 and 0.74
    assert "62.00 ± 2.83 (2)" in reference_row and "72.00 ± 2.83 (2)" in reference_row
    assert next(line for line in md.splitlines() if line.startswith("| metarun | 0 | 50 |")).split(" | ")[3:5] == [
        "–", "80.00 (1) |"]
    assert (out / "omniglot_1_shot_test_vs_iterations.png").is_file()


def test_runs_on_other_image_folders_are_other_rows_and_a_repeated_seed_is_said(tmp_path):
    """Two image_folder runs with the same seed and different task.root were pooled as one row
    `seeds 0,0`: a dataset's root is what it measures. The same seed twice in one row is said."""
    def run(root, seed, accuracy, name):
        results = {"task": "image_folder", "metric": "accuracy", "headline": "1-shot", "lower_is_better": False,
                   "results": {"1-shot": {"after_1_steps": {"mean": accuracy, "ci95": 0.01}}}}
        config = {"seed": seed, "task.root": root, "task.cache_dir": f"/cache/{name}", "algorithm.name": "maml"}
        return report.Run(tmp_path / name, results, config, {}, {"seed": seed})

    tables = report.group_runs([run("/data/a", 0, 0.8, "a"), run("/data/b", 0, 0.6, "b")])
    (table,) = tables
    assert table.columns == ["task.root"] and [c.settings["task.root"] for c in table.configurations] == [
        "/data/a", "/data/b"]
    # runs that differ only in a cache folder are one configuration; a seed given twice is said
    (table,) = report.group_runs([run("/data/a", 0, 0.8, "a"), run("/data/a", 0, 0.7, "c")])
    (conf,) = table.configurations
    assert report.seeds_cell(conf) == "0,0 (seed 0 more than once)"
    header, rows = report.table_rows(table, [])
    assert rows[0][header.index("seeds")] == "0,0 (seed 0 more than once)"


def test_runs_with_one_validation_point_get_no_single_dot_curves(tmp_path):
    """A run validated once drew a one-dot 'curve' on a wide axis: no validation plot then, and a note."""
    done = metarun("debug=smoke", "trainer.iterations=2", "trainer.val_interval=2", "trainer.num_threads=1",
                   "trainer.progress=false", "hydra.run.dir=short", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    done = metarun("report", "short", "--out", "report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: sinusoid, 10-shot: no validation plots: every configuration has 1 point(s)" in done.stdout
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert not any("validation" in name for name in written) and any("adaptation" in name for name in written)


def test_every_figure_keeps_its_legend_below_the_axes(runs, tmp_path, monkeypatch):
    """A legend of long labels (parity's implementation, init and input) covered the curves inside the axes."""
    import matplotlib.pyplot as plt

    placed, close = [], plt.close

    def check_then_close(fig):
        fig.canvas.draw()
        ax = fig.axes[0]
        legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
        placed.append(legend.y1 <= axes.y0)
        close(fig)

    monkeypatch.setattr(plt, "close", check_then_close)
    tables, _, _ = report.build([runs])
    written = [path for table in tables for path in report.plot_table(table, tmp_path)]
    assert len(placed) == len(written) // 2 >= 5 and all(placed)
