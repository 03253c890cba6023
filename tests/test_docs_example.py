"""The worked example of docs/algorithms.md ("Adding an algorithm"), carried out as written.

The page's code blocks marked ``title="<path>"`` are written into a copy of the package and its
configs (the registry block's lines are added to the registry), then the page's own commands run
there: the float64 gradient check and a short training run. A change to the interface that breaks
the example fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "algorithms.md"
BLOCK = re.compile(r'```(?P<lang>\w+) title="(?P<title>[^"]+)"\n(?P<body>.*?)```', re.DOTALL)


def blocks() -> dict[str, str]:
    return {m["title"]: m["body"] for m in BLOCK.finditer(PAGE.read_text())}


def add_to_registry(registry: Path, lines: str) -> None:
    """The registry block's import goes after the last algorithm import, its entry into ALGORITHMS."""
    text = registry.read_text()
    imports = [line for line in lines.splitlines() if line.startswith("from ")]
    entries = [line for line in lines.splitlines() if line.strip().startswith('"')]
    assert len(imports) == 1 and len(entries) == 1, "the registry block: one import and one entry"
    last_import = max(m.end() for m in re.finditer(r"^from metarun\.algorithms\.\w+ import .*$", text, re.M))
    text = text[:last_import] + "\n" + imports[0] + text[last_import:]
    text = re.sub(r"(ALGORITHMS: dict\[.*?\n)(.*?)(^\})", lambda m: m[1] + m[2] + entries[0] + "\n" + m[3], text,
                  count=1, flags=re.M | re.S)
    registry.write_text(text)


def test_the_eighth_algorithm_of_the_docs_is_one_module_one_registry_line_and_one_yaml(tmp_path):
    code = blocks()
    module = next(t for t in code if t.startswith("metarun/algorithms/") and not t.endswith("__init__.py"))
    config = next(t for t in code if t.startswith("configs/algorithm/"))
    registry = next(t for t in code if t.startswith("metarun/algorithms/__init__.py"))
    check = next(t for t in code if t.startswith("check_"))
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "metarun", tmp_path / "metarun", ignore=ignore)
    shutil.copytree(ROOT / "configs", tmp_path / "configs", ignore=ignore)
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=ignore)
    (tmp_path / module).write_text(code[module])
    (tmp_path / config).write_text(code[config])
    add_to_registry(tmp_path / "metarun" / "algorithms" / "__init__.py", code[registry])
    (tmp_path / check).write_text(code[check])

    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    name = Path(config).stem
    gradients = subprocess.run([sys.executable, check], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
    assert gradients.returncode == 0, gradients.stderr
    assert "ok" in gradients.stdout
    run = subprocess.run([sys.executable, "-m", "metarun", f"algorithm={name}", "debug=smoke",
                          "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "results.json").is_file()
    import torch

    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    rate = state["algorithm"]["rate"]
    assert rate.shape == () and float(rate) != 0.01  # meta-learned from its start (MAML's sinusoid alpha)
    bench = subprocess.run([sys.executable, "-m", "metarun.bench", "--configs", "sinusoid", "--algorithms", name,
                            "--devices", "cpu", "--iterations", "2", "--rounds", "1", "--warmup", "1", "--rl",
                            "--no-memory", "--processes", "0", "--out", "bench"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert bench.returncode == 0, bench.stderr
    assert [line.split()[1:4] for line in bench.stdout.splitlines() if line.startswith("sinusoid")] == [
        [name, "cpu", "loop"], [name, "cpu", "vmap"]]
