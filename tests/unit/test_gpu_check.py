"""benchmarks/gpu_check.py's CPU fallback, run as the lent GPU machine runs the script: a process of its own in
which importing ray, wandb, matplotlib, yaml or safetensors fails (that machine has none of them), with the
package imported from this checkout. Every check must print exactly one line, the CUDA-only ones SKIP with their
reason and the others PASS; and a check must FAIL, with a non-zero exit code, when the code it checks is broken
(so the script cannot be one that always says PASS)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, require_slow

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
CUDA_ONLY = {"pinned_batches", "memory_plan"}
ON_CPU = {"train_step_bf16", "train_step_fp16", "non_finite_skip_bf16", "non_finite_skip_fp16", "fused_adamw",
          "activation_checkpointing", "torch_compile", "checkpoint_resume", "fit_loop", "fsdp_world1",
          "evaluate_scoring", "predict_scoring", "throughput_bf16"}

# Runs the script after putting a finder first on the meta path that refuses the packages the GPU machine lacks,
# and after applying argv[1] (a sabotage, or nothing). At exit it reports what was refused, which of those
# modules got imported anyway, and where the package came from.
DRIVER = """
import atexit, importlib.abc, json, runpy, sys
BLOCKED = {"ray", "wandb", "matplotlib", "yaml", "safetensors"}
refused = []

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            refused.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine has none)")
        return None

def report():
    imported = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    package = sys.modules.get("raytrain_app")
    print("IMPORTS", json.dumps({"refused": sorted(set(refused)), "imported": imported,
                                 "package": getattr(package, "__file__", None)}), file=sys.stderr)

sys.meta_path.insert(0, Refuse())
atexit.register(report)
exec(sys.argv[1])
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""

VERDICT = re.compile(r"^(PASS|FAIL|SKIP) (\w+): (.+) \((\d+\.\d) s\)$", re.MULTILINE)


def run_gpu_check(*args: str, sabotage: str = "") -> tuple[subprocess.CompletedProcess, list[tuple[str, ...]]]:
    """The script on CPU under the driver (`-I`: no PYTHONPATH, no user site, as on a bare machine); its result and
    its verdict lines (status, name, detail, seconds)."""
    require_slow("runs benchmarks/gpu_check.py")
    result = subprocess.run([sys.executable, "-I", "-c", DRIVER, sabotage, str(SCRIPT), "--device", "cpu", *args],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    return result, VERDICT.findall(result.stdout)


def imports_of(result: subprocess.CompletedProcess) -> dict[str, Any]:
    line = next(line for line in result.stderr.splitlines() if line.startswith("IMPORTS "))
    return json.loads(line.removeprefix("IMPORTS "))


def test_the_cpu_fallback_passes_every_check_but_the_cuda_only_ones_without_ray(benchmark: Any,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    result, verdicts = run_gpu_check("--json", str(out))
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert sorted(name for _, name, _, _ in verdicts) == sorted(ON_CPU | CUDA_ONLY), output  # one line each
    for status, name, detail, _ in verdicts:
        if name in CUDA_ONLY:
            assert status == "SKIP" and "CUDA-only" in detail, (name, detail)
        else:
            assert status == "PASS", (name, detail)
    assert re.search(rf"^SUMMARY: {len(ON_CPU)} passed, 0 failed, {len(CUDA_ONLY)} skipped in ", result.stdout,
                     re.MULTILINE), result.stdout
    report = json.loads(out.read_text())
    assert [(c["status"], c["name"]) for c in report["checks"]] == [(s, n) for s, n, _, _ in verdicts]
    assert report["counts"] == {"PASS": len(ON_CPU), "FAIL": 0, "SKIP": len(CUDA_ONLY)}
    assert report["device"] == "cpu" and report["size"] == "tiny"
    imports = imports_of(result)
    assert imports["refused"] == [] and imports["imported"] == [], imports  # not even tried
    assert Path(imports["package"]).is_relative_to(REPO_ROOT / "raytrain_app"), imports  # the source tree's


@pytest.mark.parametrize(("sabotage", "broken", "reason"), [
    # A resume that forgets the RNG state: dropout draws other masks after the restore.
    ("import raytrain_app.checkpoint.state as s; s.restore_rng_state = lambda state: None",
     "checkpoint_resume", "differ from the uninterrupted run"),
    # Activation checkpointing without the saved RNG state: the recompute draws other dropout masks.
    ("import functools, torch.utils.checkpoint as c, raytrain_app.core.model_spec as m; "
     "m.checkpoint = functools.partial(c.checkpoint, preserve_rng_state=False)",
     "activation_checkpointing", "recompute changed the losses"),
])
def test_a_check_fails_and_the_exit_code_says_so_when_the_code_it_checks_is_broken(
        benchmark: Any, sabotage: str, broken: str, reason: str) -> None:
    result, verdicts = run_gpu_check("--only", f"{broken},fit_loop", sabotage=sabotage)
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 1, output
    statuses = {name: (status, detail) for status, name, detail, _ in verdicts}
    assert statuses.keys() == {broken, "fit_loop"}, output
    assert statuses[broken][0] == "FAIL" and reason in statuses[broken][1], statuses[broken]
    assert statuses["fit_loop"][0] == "PASS", statuses["fit_loop"]  # one failing check does not stop the others
    assert re.search(r"^SUMMARY: 1 passed, 1 failed, 0 skipped in ", result.stdout, re.MULTILINE), result.stdout
