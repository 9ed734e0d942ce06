"""The package's shape: the generated CLI reference is current, Ray's internals are reached from one module,
that module refuses another Ray version with one line, and `raytrain COMMAND` is each `python -m` command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from raytrain_app.cli.reference import reference
from raytrain_app.ray_adapter.ray_compat import SUPPORTED_RAY_VERSION, ray_version_problem

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "raytrain_app"
COMPAT = PACKAGE / "ray_adapter" / "ray_compat.py"


def test_the_committed_cli_reference_is_generated_from_the_current_config() -> None:
    committed = (REPO_ROOT / "docs" / "cli.md").read_text()
    assert committed == reference(), "docs/cli.md is stale: run `make docs` and commit it"
    assert "| `--resume-from-checkpoint` |" in committed and "| `--lr-grid` |" in committed


def _private_ray_uses(path: Path) -> list[str]:
    """Imports of, and attribute reads through, non-public Ray modules (a dotted part starting with "_")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray":
            names = [f"ray.{node.attr}"]
        found += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} {n}" for n in names
                  if n.split(".")[0] == "ray" and any(part.startswith("_") for part in n.split(".")[1:])]
    return found


def test_rays_internals_are_reached_from_ray_compat_only() -> None:
    outside = [use for path in sorted(PACKAGE.rglob("*.py")) if path != COMPAT for use in _private_ray_uses(path)]
    assert outside == []
    assert _private_ray_uses(COMPAT), "ray_compat no longer reaches into Ray: then it is not needed"


def test_another_ray_version_is_refused_with_one_line_naming_the_supported_one() -> None:
    assert ray_version_problem(SUPPORTED_RAY_VERSION) is None
    assert f"supports Ray {SUPPORTED_RAY_VERSION} only, and Ray 2.59.1 is installed" in ray_version_problem("2.59.1")
    # A real process whose installed Ray reports another version: it stops at import, with one line.
    code = ("import importlib.metadata as m; real = m.version\n"
            "m.version = lambda name: '2.61.0' if name == 'ray' else real(name)\n"
            "import raytrain_app.ray_adapter.ray_compat\n"
            "print('imported')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2 and "imported" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: raytrain_app supports Ray {SUPPORTED_RAY_VERSION} only, and Ray 2.61.0 is installed: install it "
        f"with pip install 'ray[default,train,tune]=={SUPPORTED_RAY_VERSION}'"]


def test_raytrain_console_script_runs_each_command() -> None:
    raytrain = Path(sys.executable).with_name("raytrain")
    listing = subprocess.run([str(raytrain), "--help"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    commands = {"train": "main", "tune": "tune", "ckpt": "ckpt", "jobs": "jobs", "report": "report", "data": "data",
                "plan": "plan"}
    for command, module in commands.items():
        assert f"  {command} " in listing.stdout and f"(python -m raytrain_app.{module})" in listing.stdout
    # The same command both ways: the same line, the same exit code.
    missing = str(REPO_ROOT / "no-such-checkpoint.pt")
    by_script = subprocess.run([str(raytrain), "ckpt", "show", missing], capture_output=True, text=True, timeout=120)
    by_module = subprocess.run([sys.executable, "-m", "raytrain_app.ckpt", "show", missing], capture_output=True,
                               text=True, timeout=120, cwd=REPO_ROOT)
    assert by_script.returncode == by_module.returncode == 2
    assert by_script.stderr == by_module.stderr and by_script.stderr.startswith("error: ")
    # evaluate and predict too: the script's refusal is the module's, line for line (the module run in this process).
    from raytrain_app.evaluate import main as evaluate_main
    from raytrain_app.predict import main as predict_main
    from tests.helpers import run_in_process

    for command, module_main, extra in (("evaluate", evaluate_main, []),
                                        ("predict", predict_main, ["--out", str(REPO_ROOT / "no-such-out")])):
        assert f"(python -m raytrain_app.{command})" in listing.stdout
        args = ["--checkpoint", missing, "--data", str(REPO_ROOT / "no-such-data"), *extra]
        by_script = subprocess.run([str(raytrain), command, *args], capture_output=True, text=True, timeout=120)
        by_module = run_in_process(module_main, args)
        assert (by_script.returncode, by_script.stderr) == (by_module.returncode, by_module.stderr) == (
            2, f"error: --checkpoint {missing}: nothing there\n"), (command, by_script.stderr, by_module.stderr)
    unknown = subprocess.run([str(raytrain), "fly"], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown command 'fly'")


LIBRARY_LAYERS = ("ray_adapter", "observability", "checkpoint", "core", "datasets", "storage")


def test_the_library_layers_log_and_never_print() -> None:
    """A library module speaks through its logger (`observability.console` decides what reaches the console); only
    the commands and `cli` print. `print` passed as a callable (a `warn=print` default) counts too."""
    prints = [f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
              for layer in LIBRARY_LAYERS for path in sorted((PACKAGE / layer).rglob("*.py"))
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Name) and node.id == "print"]
    assert prints == [], "print in a library layer: log through logging.getLogger(__name__) instead"
    assert (PACKAGE / "ray_adapter" / "worker.py").is_file() and (PACKAGE / "storage").is_dir()  # scanned something


CONFIG = PACKAGE / "core" / "config.py"
DIRECTION_SOURCES = ("higher_is_better", "selects_max")  # core.config: the one place that says a metric's direction


def _says_direction(node: ast.expr) -> bool:
    """`higher_is_better(metric)` or `cfg.selects_max`, possibly negated."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _says_direction(node.operand)
    if isinstance(node, ast.Call):
        node = node.func
    return (isinstance(node, ast.Name) and node.id in DIRECTION_SOURCES
            or isinstance(node, ast.Attribute) and node.attr in DIRECTION_SOURCES)


def _is_max_or_min(node: ast.expr) -> bool:
    """"max", max, or a call of max (a Tune mode, the function, its result)."""
    if isinstance(node, ast.Call):
        node = node.func
    return (isinstance(node, ast.Constant) and node.value in ("max", "min")
            or isinstance(node, ast.Name) and node.id in ("max", "min"))


def _direction_decisions_by_name(source: str, where: str) -> list[str]:
    """Places that decide a metric's direction themselves: a comparison with a metric's name
    (`metric == "val_accuracy"`), a choice between max and min (`"max" if ... else "min"`, `(max if ... else
    min)`) or a `higher_is_better=` argument that is not from core.config."""
    found = []
    for node in ast.walk(ast.parse(source)):
        bad = None
        if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in ("val_accuracy", "val_rmse", "val_mae")
                for c in (node.left, *node.comparators)):
            bad = node
        elif isinstance(node, ast.IfExp) and _is_max_or_min(node.body) and _is_max_or_min(node.orelse) \
                and not _says_direction(node.test):
            bad = node
        elif isinstance(node, ast.keyword) and node.arg == "higher_is_better" and not _says_direction(node.value):
            bad = node.value
        if bad is not None:
            found.append(f"{where}:{bad.lineno} {ast.unparse(bad)}")
    return found


def test_a_metrics_direction_comes_only_from_core_config() -> None:
    """Whether higher is better (accuracy) or lower (a loss, RMSE, MAE) is said once, in core.config
    (HIGHER_IS_BETTER); everything that ranks checkpoints, trials or rows asks it. The check itself is checked on
    the shapes it looks for."""
    outside = [found for path in sorted(PACKAGE.rglob("*.py")) if path != CONFIG
               for found in _direction_decisions_by_name(path.read_text(), str(path.relative_to(REPO_ROOT)))]
    assert outside == []
    sample = ('a = max if metric == "val_accuracy" else min\n'
              'b = "max" if up else "min"\n'
              'c = f(higher_is_better=score == "val_rmse")\n'
              'd = max(rows) if up else min(rows)\n'
              'ok = (max if higher_is_better(m) else min, "max" if not cfg.selects_max else "min")\n'
              'ok = metric == "val_loss"\n')
    assert sorted(found.split(" ", 1)[0] for found in _direction_decisions_by_name(sample, "s")) == [
        "s:1", "s:1", "s:2", "s:3", "s:3", "s:4"]
