"""Checkpoints and data on object storage: a real S3-protocol server on 127.0.0.1 (moto's standalone server)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import load_state
from raytrain_app.cli.flags import parse_config
from raytrain_app.core.schedule import lr_at
from raytrain_app.evaluate import main as evaluate_main
from raytrain_app.storage.location import parse_location
from tests.conftest import (
    REPO_ROOT,
    base_env,
    make_bucket,
    run_main,
    run_until_checkpoint,
    s3_uri,
)
from tests.helpers import (
    EPOCHS,
    KILL_MID_EPOCH_2,
    LAST_STEP,
    STEPS_PER_EPOCH,
    assert_resumed_mid_epoch,
    assert_same_training_state,
    run_in_process,
    run_name_of,
    train_args,
)

pytestmark = pytest.mark.e2e


def s3_state(uri: str) -> dict:
    return load_state(parse_location(uri))


@pytest.fixture(scope="module")
def s3_run(dataset: Path, ray_address: str, s3_endpoint: str, uninterrupted) -> dict:  # noqa: ANN001
    """Train with --save-dir on S3, kill it after a mid-epoch checkpoint, run the same command again. The reference
    is the session's uninterrupted local run of the same command (--save-dir and --keep-checkpoints do not change
    what is trained)."""
    bucket = make_bucket(s3_endpoint, "runs")
    # Its own prefix each time: pytest sets a module's fixtures up again when a worker runs its tests with
    # another module's in between (xdist work stealing), and a second set-up must not find the first one's run.
    prefix = f"experiments-{secrets.token_hex(3)}"
    save_dir = s3_uri(bucket, prefix, s3_endpoint)
    args = train_args(dataset, Path("/unused"), 2)
    args[args.index("--save-dir") + 1] = save_dir
    args[args.index("--keep-checkpoints") + 1] = "100"
    run_name = parse_config(args)[0].default_run_name()
    run_dir = parse_location(save_dir).join(run_name).uri

    killed = run_until_checkpoint(args, ray_address, run_dir, KILL_MID_EPOCH_2)
    assert run_name_of(killed) == run_name
    resumed = run_main(args, ray_address)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {"save_dir": save_dir, "run_name": run_name, "run_dir": run_dir, "reference": uninterrupted(2),
            "prefix": prefix, "dataset": str(dataset), "local_dir": str(dataset.parent / "unused-runs"),
            "resumed": resumed.stdout, "endpoint": s3_endpoint}


def test_s3_run_killed_and_rerun_resumes_from_s3_bit_exact(s3_run: dict) -> None:
    out = s3_run["resumed"]
    assert f"Run {s3_run['run_name']} has checkpoints: continuing it from its latest one." in out
    assert f"Loading checkpoint from: s3://runs/{s3_run['prefix']}/" in out
    assert_resumed_mid_epoch(out, min(KILL_MID_EPOCH_2))
    final = parse_location(s3_run["run_dir"]).join(f"checkpoint_step={LAST_STEP:06d}", "state.pt")
    with final.local_copy() as local_final:
        assert_same_training_state(s3_run["reference"], Path(local_final))
    assert parse_location(s3_run["save_dir"]).join("best_model.pt").is_file()


def test_s3_runs_metrics_hold_each_step_once_and_its_report_marks_the_resume(
        s3_run: dict, capsys: pytest.CaptureFixture) -> None:
    from raytrain_app.observability.metrics import read_rows
    from raytrain_app.report import main as report

    run_dir = parse_location(s3_run["run_dir"])
    rows = read_rows(run_dir.join("metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, LAST_STEP + 1))
    resumed_step = int(re.search(r"Resuming from global step (\d+)", s3_run["resumed"]).group(1))
    assert [(r["event"], r["step"]) for r in rows if r["kind"] == "event"] == [
        ("start", 0), ("resume", resumed_step), ("finished", LAST_STEP)]
    assert report([s3_run["run_dir"]]) == 0
    out = capsys.readouterr().out
    assert f"Resumes: 1\n  at global step {resumed_step}: re-run" in out
    assert f"Plot: {run_dir.join('loss.png').uri}" in out
    assert run_dir.join("loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_kind_of_s3_location_resolves_to_the_checkpoint_it_names(s3_run: dict,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """What --resume-from-checkpoint accepts, on S3, as the driver reads it before any worker starts (in this
    process): a checkpoint folder, best_model.pt, a run folder (its best checkpoint)."""
    from raytrain_app.main import prepare

    save_dir = parse_location(s3_run["save_dir"])
    run_dir = save_dir.join(s3_run["run_name"])
    folder = run_dir.join(f"checkpoint_step={2 * STEPS_PER_EPOCH:06d}")
    best = save_dir.join("best_model.pt")
    best_step = s3_state(best.uri)["global_step"]
    for location, step in ((folder.uri, 2 * STEPS_PER_EPOCH), (best.uri, best_step), (run_dir.uri, best_step)):
        plan = prepare(["--data", s3_run["dataset"], "--save-dir", s3_run["local_dir"], "--lr", "2e-4",
                        "--epochs", str(EPOCHS + 1), "--resume-from-checkpoint", location])
        assert plan.summary.global_step == step and plan.init_from.startswith(f"s3://runs/{s3_run['prefix']}/")
        assert plan.lineage["base_checkpoint"] == plan.init_from and plan.run_name != s3_run["run_name"]
    assert capsys.readouterr().err == ""


def test_fine_tune_from_an_s3_run_folder_on_parquet_data_on_s3(tmp_path: Path, dataset: Path, ray_address: str,
                                                               s3_run: dict) -> None:
    """One run reads everything from the bucket: Parquet data converted there by the data command, and the
    checkpoint it starts from named by its run folder."""
    bucket = make_bucket(s3_run["endpoint"], "parquet")
    data = s3_uri(bucket, "tiny", s3_run["endpoint"])
    converted = subprocess.run([sys.executable, "-m", "raytrain_app.data", "convert", str(dataset), data],
                               env=base_env(), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert converted.returncode == 0, converted.stderr
    source = parse_location(s3_run["save_dir"]).join(s3_run["run_name"]).uri
    args = ["--data", data, "--save-dir", str(tmp_path), "--num-workers", "1", "--batch-size", "16",
            "--eval-every", "1000", "--epochs", str(EPOCHS + 1), "--lr", "2e-4", "--resume-from-checkpoint", source]
    result = run_main(args, ray_address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_name_of(result.stdout) != s3_run["run_name"]
    assert f"Loading checkpoint from: s3://runs/{s3_run['prefix']}/" in result.stdout
    run_dir = tmp_path / run_name_of(result.stdout)
    steps = sorted(int(p.name.split("=")[1]) for p in run_dir.glob("checkpoint_step=*"))
    final = load_state(str(run_dir / f"checkpoint_step={steps[-1]:06d}" / "state.pt"))
    assert final["config"]["lr"] == 2e-4 and final["config"]["data"].startswith("s3://parquet/tiny")
    base = s3_state(parse_location(s3_run["save_dir"]).join("best_model.pt").uri)  # the run folder's best
    assert final["lineage"]["base_global_step"] == base["global_step"] and steps[0] > base["global_step"]
    assert final["epoch"] == EPOCHS + 1
    total = (EPOCHS + 1) * STEPS_PER_EPOCH
    assert final["optimizer_state_dict"]["param_groups"][0]["lr"] == lr_at(
        final["global_step"] - 1, peak_lr=2e-4, warmup_steps=20, total_steps=total)

    # The run folder on S3 scored on the Parquet data on S3, written to S3, is the same as scored on the local
    # pickle it was converted from.
    scores = {}
    for name, where in (("s3", data), ("local", str(dataset))):
        out = s3_uri(bucket, f"eval-{name}", s3_run["endpoint"])
        scored = run_in_process(evaluate_main, ["--checkpoint", source, "--data", where, "--split", "val",
                                                "--out", out])
        assert scored.returncode == 0, scored.stderr
        scores[name] = json.loads(parse_location(out).join("metrics.json").read_bytes())
        assert parse_location(out).join("confusion.png").is_file()
    assert scores["s3"]["checkpoint"].startswith(f"s3://runs/{s3_run['prefix']}/")
    for key in ("loss", "accuracy", "confusion", "classes", "global_step"):
        assert scores["s3"][key] == scores["local"][key], key


def _fails_fast(args: list[str], expected: str) -> None:
    """The command refuses at once, in this process (it ends before Ray starts): one line, exit 2."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from raytrain_app.main import main

    err = io.StringIO()
    started = time.monotonic()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(args)
    assert time.monotonic() - started < 30  # no retrying against storage that is not there
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err.getvalue()


def test_unreachable_endpoint(tmp_path: Path, dataset: Path) -> None:
    _fails_fast(["--data", str(dataset), "--save-dir", "s3://runs/x?endpoint_override=http://127.0.0.1:9"],
                "the storage endpoint cannot be reached")


def test_missing_bucket(tmp_path: Path, dataset: Path, s3_endpoint: str) -> None:
    _fails_fast(["--data", str(dataset), "--save-dir", f"s3://no-such-bucket/x?endpoint_override={s3_endpoint}"],
                "the bucket 'no-such-bucket' does not exist")


def test_wrong_credentials(tmp_path: Path, dataset: Path) -> None:
    """A second server that checks credentials (moto with authentication on) refuses unknown keys."""
    from tests.conftest import _free_port, _wait_for_port

    port = _free_port()
    env = {**base_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, server)
        _fails_fast(["--data", str(dataset), "--save-dir", f"s3://runs/x?endpoint_override=http://127.0.0.1:{port}"],
                    "access denied: check the credentials")
    finally:
        server.kill()  # it takes 15 s to honour SIGTERM
        server.wait(timeout=30)


def test_unknown_uri_scheme(tmp_path: Path, dataset: Path) -> None:
    _fails_fast(["--data", "ftp://host/data.pkl", "--save-dir", str(tmp_path / "runs")],
                "--data ftp://host/data.pkl: unknown URI scheme 'ftp://'")
    assert not (tmp_path / "runs").exists()


def test_data_uri_without_parquet_files(tmp_path: Path, s3_endpoint: str) -> None:
    bucket = make_bucket(s3_endpoint, "datasets")
    parse_location(s3_uri(bucket, "empty/README.txt", s3_endpoint)).write_bytes(b"not data")
    data = s3_uri(bucket, "empty", s3_endpoint)
    _fails_fast(["--data", data, "--save-dir", str(tmp_path / "runs")], "is a folder without Parquet files")
    assert not (tmp_path / "runs").exists()


def test_pickle_dataset_read_from_s3(dataset: Path, s3_endpoint: str) -> None:
    from raytrain_app.datasets.formats import load_dataset, open_dataset

    bucket = make_bucket(s3_endpoint, "pickles")
    uri = s3_uri(bucket, "tiny.pkl", s3_endpoint)
    parse_location(uri).write_bytes(dataset.read_bytes())
    local, remote = load_dataset(str(dataset)), open_dataset(uri)
    assert remote.uri.startswith("s3://pickles/tiny.pkl?endpoint_override=127.0.0.1:")
    assert torch.equal(local.train.x, remote.train.x) and torch.equal(local.val.y, remote.val.y)


def test_a_checkpoint_on_s3_is_verified_and_a_cut_off_one_refused(tmp_path: Path, s3_endpoint: str) -> None:
    from raytrain_app.checkpoint.format import CheckpointError, checkpoint_problem, save_checkpoint_dir
    from raytrain_app.checkpoint.resolve import resolve_checkpoint
    from raytrain_app.storage.publish import publish_file

    bucket = make_bucket(s3_endpoint, "verify")
    local = tmp_path / "checkpoint_step=000005"
    save_checkpoint_dir(str(local), {"epoch": 1, "global_step": 5, "val_loss": 0.5, "config": {},
                                     "model_state_dict": {"w": torch.ones(1000)}})
    remote = parse_location(s3_uri(bucket, "run/checkpoint_step=000005", s3_endpoint))
    for name in ("state.pt", "meta.json", "manifest.json"):
        publish_file(str(local / name), remote.join(name))
    assert checkpoint_problem(remote) is None
    assert resolve_checkpoint(remote.uri).uri == remote.join("state.pt").uri
    remote.join("state.pt").write_bytes((local / "state.pt").read_bytes()[:100])
    assert "state.pt is 100 bytes, its manifest says" in checkpoint_problem(remote)
    with pytest.raises(CheckpointError, match="is not whole: state.pt is 100 bytes"):
        resolve_checkpoint(remote.uri)
