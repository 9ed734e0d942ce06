"""The cluster definitions users launch: cluster.yaml (Ray's autoscaler, checked by Ray's own validation),
jobs/rayjob.yaml (KubeRay) and jobs/runtime_env.yaml; and the submit helper's checks before it submits."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError

from raytrain_app.cli.flags import parse_config
from raytrain_app.jobs import main as jobs_main
from tests.conftest import REPO_ROOT
from tests.helpers import run_in_process

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
RAYJOB_YAML = REPO_ROOT / "jobs" / "rayjob.yaml"
RUNTIME_ENV_YAML = REPO_ROOT / "jobs" / "runtime_env.yaml"


def validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_passes_rays_autoscaler_validation_and_holds_what_the_readme_promises() -> None:
    config = load(CLUSTER_YAML)
    prepared = validate(config)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}  # no training on the head
    start_head = " ".join(prepared["head_start_ray_commands"])
    assert "--num-cpus=0" in start_head and "--num-gpus=0" in start_head
    assert "--dashboard-host=127.0.0.1" in start_head  # the job API only through the SSH tunnel
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert set(workers) == {"gpu_spot", "gpu_ondemand"}
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] > 0 and t["resources"]["GPU"] >= 1
    assert workers["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in workers["gpu_ondemand"]["node_config"]
    # On a tie the autoscaler launches the higher priority (v2) or the name that sorts last (v1): spot first.
    assert sorted(workers)[-1] == "gpu_spot"
    assert workers["gpu_spot"]["priority"] > workers["gpu_ondemand"]["priority"]
    assert prepared["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any("pip install" in c and "/home/ray/raytrain_app" in c for c in prepared["setup_commands"])
    assert prepared["file_mounts"]["/home/ray/raytrain_app"] == "."
    assert "IpPermissions" not in prepared["provider"].get("security_group", {})  # no extra ports opened


# Ray checks the schema with jsonschema; the docker section's image it checks itself, with an assert.
@pytest.mark.parametrize(("where", "key", "error", "message"), [
    ((), "idle_timeout_minutes", ValidationError, "'idle_timeout_minute' was unexpected"),
    (("available_node_types", "gpu_spot"), "max_workers", ValidationError, "'max_worker' was unexpected"),
    (("available_node_types", "head"), "node_config", ValidationError, "'node_config' is a required property"),
    (("docker",), "image", AssertionError, "Must provide a container & image name"),
])
def test_a_misspelled_field_fails_validation(where: tuple[str, ...], key: str, error: type[Exception],
                                             message: str) -> None:
    config = load(CLUSTER_YAML)
    section = config
    for name in where:
        section = section[name]
    section[key[:-1]] = section.pop(key)  # drop the last letter
    with pytest.raises(error, match=message):
        validate(config)


def test_rayjob_retries_the_same_run_from_object_storage_on_an_autoscaling_gpu_group() -> None:
    job = load(RAYJOB_YAML)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["python", "-m", "raytrain_app.main"]
    cfg, given = parse_config(command[3:])  # every flag is one raytrain_app.main accepts
    assert {"run_name", "save_dir"} <= given  # a pinned run on object storage: each retry resumes it
    assert cfg.save_dir.startswith("s3://") and cfg.use_gpu and cfg.elastic
    assert spec["backoffLimit"] >= 1
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [gpu_group] = cluster["workerGroupSpecs"]
    assert gpu_group["minReplicas"] == 0 < gpu_group["maxReplicas"]
    assert gpu_group["maxReplicas"] >= cfg.num_workers
    [container] = gpu_group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_runtime_env_lets_the_driver_save_on_stop() -> None:
    env = load(RUNTIME_ENV_YAML)
    assert env["working_dir"] == "."
    assert env["env_vars"]["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "d.pkl"], "--save-dir ./checkpoints: a job runs in a fresh copy of the working directory"),
    (["--data", "d.pkl", "--save-dir", "ckpts"], "--save-dir ckpts: a job runs in a fresh copy"),
    (["--data", "d.pkl", "--save-dir", "/abs", "--num-workers", "3-1"], "--num-workers 3-1: the range must be"),
    (["--data", "d.pkl", "--save-dir", "/abs", "--lr", "0"], "--lr must be positive"),
    ([], "nothing to submit"),
    (["--data", "d.pkl", "--save-dir", "/abs"], "cannot reach the Ray job API at http://127.0.0.1:9"),
])
def test_submit_refuses_what_cannot_work_with_one_line_before_submitting(args: list[str], message: str) -> None:
    # The address points nowhere: a bad command is refused before the helper tries it.
    result = run_in_process(jobs_main, ["submit", "--address", "http://127.0.0.1:9", "--", *args])
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: ") and message in line


def test_submit_pins_the_run_or_sweep_name_every_attempt_continues() -> None:
    from raytrain_app.cli.flags import parse_sweep_config
    from raytrain_app.core.config import sweep_identity_hash
    from raytrain_app.jobs import plan_entry

    train = ["--data", "/d.pkl", "--save-dir", "s3://bucket/ckpt", "--epochs", "3"]
    entry = plan_entry(train, sweep=False)
    name = parse_config(train)[0].default_run_name()
    assert (entry.module, entry.run, entry.args) == ("raytrain_app.main", name, [*train, "--run-name", name])
    assert entry.entrypoint() == shlex.join(["python", "-m", "raytrain_app.main", *entry.args])
    assert plan_entry([*train, "--run-name", "mine"], sweep=False).args == [*train, "--run-name", "mine"]

    sweep = ["--base-checkpoint", "/b.pt", "--lr-grid", "1e-4,1e-3", *train]
    entry = plan_entry(sweep, sweep=True)
    sweep_cfg, cfg, _ = parse_sweep_config(sweep)
    name = f"sweep-{sweep_identity_hash(sweep_cfg, cfg)}"  # the name raytrain_app.tune gives it
    assert (entry.module, entry.run, entry.args) == ("raytrain_app.tune", name, [*sweep, "--sweep-name", name])


def test_submit_from_outside_the_repository_refuses_to_upload_the_wrong_folder(tmp_path: Path) -> None:
    result = run_in_process(jobs_main, ["submit", "--address", "http://127.0.0.1:9", "--", "--data", "/d.pkl",
                                        "--save-dir", "/abs"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (f"error: the runtime env's working_dir '.' is {tmp_path}, which does not hold raytrain_app/: "
                    "run this command from the repository root")


@pytest.mark.parametrize(("status", "exit_code", "retried"), [
    ("SUCCEEDED", 0, False), ("STOPPED", 130, False), ("FAILED", 2, False), ("FAILED", 3, False),
    ("FAILED", 1, True), ("FAILED", -9, True), ("FAILED", 143, True),
])
def test_the_helper_resubmits_only_what_another_attempt_can_finish(status: str, exit_code: int, retried: bool) -> None:
    """A refused command (2) and a diverged run (3) would only repeat; a killed or failed driver continues."""
    from types import SimpleNamespace

    from raytrain_app.jobs import _final_outcome

    info = SimpleNamespace(status=SimpleNamespace(value=status), driver_exit_code=exit_code, error_type=None)
    assert (_final_outcome(info, "run-x") is None) == retried
    if status == "FAILED" and exit_code == 3:
        assert _final_outcome(info, "run-x")[1] == 3 and "diverged" in _final_outcome(info, "run-x")[0]
