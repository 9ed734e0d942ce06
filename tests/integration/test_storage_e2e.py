"""Checkpoints and data on object storage: a real S3-protocol server on 127.0.0.1 (moto's standalone server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import load_state
from raytrain_app.evaluate import main as evaluate_main
from raytrain_app.storage.location import parse_location
from tests.conftest import base_env, make_bucket, s3_uri, slow_resource
from tests.helpers import (
    EPOCHS,
    LAST_STEP,
    STEPS_PER_EPOCH,
    run_in_process,
)

pytestmark = pytest.mark.e2e


def s3_state(uri: str) -> dict:
    return load_state(parse_location(uri))


def test_an_s3_runs_metrics_hold_each_step_once_and_its_report_marks_the_resume(
        killed_fsdp_run: dict, capsys: pytest.CaptureFixture) -> None:
    """The session's FSDP run on the S3 server, killed and run again (tests/conftest.py): its metrics.jsonl and
    the report made from them, all on the bucket."""
    from raytrain_app.observability.metrics import read_rows
    from raytrain_app.report import main as report

    run_dir = killed_fsdp_run["run_dir"]
    rows = read_rows(run_dir.join("metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, LAST_STEP + 1))
    resumed_step = killed_fsdp_run["fallback"]
    assert [(r["event"], r["step"]) for r in rows if r["kind"] == "event"] == [
        ("start", 0), ("resume", resumed_step), ("finished", LAST_STEP)]
    assert report([run_dir.uri]) == 0
    out = capsys.readouterr().out
    assert f"Resumes: 1\n  at global step {resumed_step}: re-run" in out
    assert f"Plot: {run_dir.join('loss.png').uri}" in out
    assert run_dir.join("loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_kind_of_s3_location_resolves_to_the_checkpoint_it_names(
        killed_fsdp_run: dict, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What --resume-from-checkpoint accepts, on S3, as the driver reads it before any worker starts (in this
    process): a checkpoint folder, best_model.pt, a run folder (its best checkpoint)."""
    from raytrain_app.main import prepare

    save_dir, run_dir = killed_fsdp_run["save_dir"], killed_fsdp_run["run_dir"]
    folder = run_dir.join(f"checkpoint_step={2 * STEPS_PER_EPOCH:06d}")
    best = save_dir.join("best_model.pt")
    best_step = s3_state(best.uri)["global_step"]
    prefix = save_dir.uri.split("?")[0]
    for location, step in ((folder.uri, 2 * STEPS_PER_EPOCH), (best.uri, best_step), (run_dir.uri, best_step)):
        plan = prepare(["--data", str(dataset), "--save-dir", str(tmp_path), "--lr", "2e-4",
                        "--epochs", str(EPOCHS + 1), "--resume-from-checkpoint", location])
        assert plan.summary.global_step == step and plan.init_from.startswith(prefix + "/")
        assert plan.lineage["base_checkpoint"] == plan.init_from and plan.run_name != run_dir.name
        assert plan.lineage["base_global_step"] == step
    assert capsys.readouterr().err == ""


def test_a_run_folder_on_s3_scored_on_parquet_on_s3_equals_it_scored_on_the_local_pickle(
        killed_fsdp_run: dict, dataset: Path, s3_endpoint: str) -> None:
    """evaluate reads the run folder's best checkpoint (its shards gathered) and the Parquet copy of the data from
    the bucket and writes its scores there; the same as the pickle the data was converted from gives locally."""
    bucket = make_bucket(s3_endpoint, "scores")
    source = killed_fsdp_run["run_dir"].uri
    scores = {}
    for name, where in (("s3", killed_fsdp_run["data"]), ("local", str(dataset))):
        out = s3_uri(bucket, f"eval-{name}", s3_endpoint)
        scored = run_in_process(evaluate_main, ["--checkpoint", source, "--data", where, "--split", "val",
                                                "--out", out])
        assert scored.returncode == 0, scored.stderr
        scores[name] = json.loads(parse_location(out).join("metrics.json").read_bytes())
        assert parse_location(out).join("confusion.png").is_file()
    assert scores["s3"]["checkpoint"].startswith(killed_fsdp_run["save_dir"].uri.split("?")[0] + "/")
    for key in ("loss", "accuracy", "confusion", "classes", "global_step"):
        assert scores["s3"][key] == scores["local"][key], key
    assert 0 < scores["s3"]["accuracy"] <= 1


def _fails_fast(args: list[str], expected: str) -> None:
    """The command refuses at once, in this process (it ends before Ray starts): one line, exit 2."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from raytrain_app.main import main
    from raytrain_app.storage.location import CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S

    err = io.StringIO()
    started = time.monotonic()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(args)
    # No retrying against storage that is not there: the storage client's own limits (one connection attempt and
    # one request, each within its timeout), not pyarrow's default minutes of retries.
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + REQUEST_TIMEOUT_S
    assert code == 2, err.getvalue()
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err.getvalue()


def test_unreachable_endpoint(tmp_path: Path, dataset: Path) -> None:
    _fails_fast(["--data", str(dataset), "--save-dir", "s3://runs/x?endpoint_override=http://127.0.0.1:9"],
                "the storage endpoint cannot be reached")


def test_missing_bucket(tmp_path: Path, dataset: Path, s3_endpoint: str) -> None:
    _fails_fast(["--data", str(dataset), "--save-dir", f"s3://no-such-bucket/x?endpoint_override={s3_endpoint}"],
                "the bucket 'no-such-bucket' does not exist")


@pytest.fixture
@slow_resource
def authenticating_s3_endpoint() -> Iterator[str]:
    """A second S3 server, one that checks credentials (moto with authentication on)."""
    from tests.conftest import _free_port, _wait_for_port

    port = _free_port()
    env = {**base_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, server)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()  # it takes 15 s to honour SIGTERM
        server.wait(timeout=30)


def test_wrong_credentials(tmp_path: Path, dataset: Path, authenticating_s3_endpoint: str) -> None:
    """The server refuses unknown keys."""
    _fails_fast(["--data", str(dataset), "--save-dir", f"s3://runs/x?endpoint_override={authenticating_s3_endpoint}"],
                "access denied: check the credentials")


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
