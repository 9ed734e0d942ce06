"""`python -m raytrain_app.predict` on the session's Ray cluster, output on the local S3 server: a run SIGKILLed
while it writes leaves nothing at --out, and the same command run again writes every row, as the model applied in
this process scores it, with the rows that cannot be scored reported. Input checks without Ray:
tests/unit/test_prediction_input.py."""

from __future__ import annotations

import os
import re
import secrets
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import set_normalization
from raytrain_app.core.model_spec import build_model
from raytrain_app.storage.location import parse_location
from tests.conftest import (
    computed_once,
    finish_process,
    make_bucket,
    run_main,
    s3_uri,
    start_process,
    wait_until,
)
from tests.helpers import PLUGIN

pytestmark = pytest.mark.e2e

T, F, C = 16, 4, 3
ROWS_PER_FILE = 1500
NAN_ROW, SHORT_ROW = ROWS_PER_FILE + 7, 2 * ROWS_PER_FILE + 11  # in the second and third file


def write_inputs(root: Path) -> tuple[Path, Path, np.ndarray]:
    """A per-sequence model with random weights and input statistics that are not the identity (.pt), and three
    Parquet files: fixed-size x, the same with a NaN, and variable-size lists with one row a value short. Every
    row has an id; returns (checkpoint, data folder, x of every row as [N, T*F] with NaN where it is short)."""
    cfg = TrainConfig(model=PLUGIN, model_args={"channels": 32, "num_blocks": 2}, feature_dim=F, seq_len=T,
                      num_classes=C, dropout=0.0)  # a model of a user's own: predict rebuilds it from the file
    torch.manual_seed(0)
    model = build_model(cfg)
    set_normalization(model, torch.linspace(-1, 1, F), torch.linspace(0.5, 3, F))
    checkpoint = root / "model.pt"
    torch.save({"model_state_dict": model.state_dict(), "config": cfg.to_dict(), "global_step": 9, "epoch": 1},
               checkpoint)
    x = np.random.default_rng(0).normal(size=(3 * ROWS_PER_FILE, T * F)).astype(np.float32)
    x[NAN_ROW, 5] = np.nan
    data = root / "data"
    data.mkdir()
    for i in range(3):
        rows = x[i * ROWS_PER_FILE:(i + 1) * ROWS_PER_FILE]
        if i < 2:
            column = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), T * F)
        else:
            lists = [list(r) for r in rows]
            lists[SHORT_ROW - 2 * ROWS_PER_FILE] = lists[SHORT_ROW - 2 * ROWS_PER_FILE][:-1]
            column = pa.array(lists, type=pa.list_(pa.float32()))
        ids = pa.array(1_000_000 + np.arange(i * ROWS_PER_FILE, (i + 1) * ROWS_PER_FILE))
        table = pa.table({"x": column, "y": pa.array(np.zeros(ROWS_PER_FILE, np.int64)), "id": ids})
        pq.write_table(table.replace_schema_metadata({"seq_len": str(T), "feature_dim": str(F)}),
                       data / f"part-{i}.parquet", row_group_size=500)
    x[SHORT_ROW] = np.nan
    return checkpoint, data, x


def s3_files(uri: str) -> list[str]:
    location = parse_location(uri)
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    return sorted(i.path for i in location.fs.get_file_info(selector) if i.type == pafs.FileType.File)


@pytest.fixture(scope="session")
def killed_then_run_again(shared_tmp: Path, tmp_path_factory: pytest.TempPathFactory, ray_address: str,
                          s3_endpoint: str) -> dict:
    """Start predict, SIGKILL it once its staging folder holds a file, look at --out, then run it again (a pool
    of one to two replicas) to the end. Computed once per test session (both tests read it)."""

    def compute(root: Path) -> dict:
        root.mkdir(parents=True, exist_ok=True)
        checkpoint, data, _ = write_inputs(root)
        out = s3_uri(make_bucket(s3_endpoint, f"predict-{secrets.token_hex(3)}"), "scores", s3_endpoint)
        staging = out.replace("/scores?", "/scores.partial?")
        args = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", out]
        # One replica and batches of 4 rows: the replica's calls dominate, so its three output files (one per
        # input file) land seconds apart and the kill at the first one comes well before the last.
        proc, log = start_process([*args, "--num-replicas", "1", "--batch-size", "4"], ray_address,
                                  module="raytrain_app.predict")
        try:
            wait_until(lambda: any(path.endswith(".parquet") for path in s3_files(staging)),
                       "a file written by predict", timeout=240, proc=proc, log=log)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            killed_output = finish_process(proc, log, timeout=30)
        after_kill = {"out": s3_files(out), "staging": s3_files(staging), "output": killed_output}
        result = run_main([*args, "--num-replicas", "1-2", "--batch-size", "64"], ray_address,
                          module="raytrain_app.predict", timeout=300)
        return {"checkpoint": str(checkpoint), "out": out, "staging": staging, "after_kill": after_kill,
                "returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}

    run = computed_once(shared_tmp, "predict-killed-then-run-again", compute)
    # The rows as this process reads them (write_inputs is deterministic: the same rows every time).
    return {**run, "x": write_inputs(tmp_path_factory.mktemp("predict-x"))[2]}


def test_a_killed_prediction_leaves_nothing_at_out_and_the_same_command_then_completes(killed_then_run_again) -> None:
    after_kill, result = killed_then_run_again["after_kill"], killed_then_run_again
    assert after_kill["out"] == [], after_kill  # killed mid-run: nothing at --out
    assert any(path.endswith(".parquet") for path in after_kill["staging"]), after_kill  # it was writing
    assert result["returncode"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    assert "  Replicas: 1-2 x 1 CPU, batch 64; " in result["stdout"]  # an autoscaling pool of one to two
    # The re-run removed what the killed one left, moved its whole output into place, and left no staging.
    assert s3_files(killed_then_run_again["staging"]) == []
    names = [path.rsplit("/", 1)[1] for path in s3_files(killed_then_run_again["out"])]
    assert "_SUCCESS" in names and all(n == "_SUCCESS" or n.endswith(".parquet") for n in names), names


def test_every_row_is_scored_as_the_model_in_this_process_scores_it(killed_then_run_again) -> None:
    result, x = killed_then_run_again, killed_then_run_again["x"]
    assert result["returncode"] == 0, result["stdout"][-3000:] + result["stderr"][-3000:]
    n = len(x)
    # The summary line counts the two rejected rows.
    assert re.search(rf"Predicted {n:,} rows in [\d.]+ s \([\d,]+ rows/s\): {n - 2:,} scored, 2 rejected",
                     result["stdout"]), result["stdout"]
    location = parse_location(killed_then_run_again["out"])
    table = pads.dataset(location.path, filesystem=location.fs, format="parquet").to_table().sort_by("row")
    assert table.schema == pa.schema([("row", pa.int64()), ("id", pa.int64()), ("predicted", pa.int64()),
                                      ("probabilities", pa.list_(pa.float32(), C)), ("error", pa.string())])
    assert table.column("row").to_pylist() == list(range(n))  # every row once
    assert table.column("id").to_pylist() == list(range(1_000_000, 1_000_000 + n))
    errors = {i: e for i, e in enumerate(table.column("error").to_pylist()) if e is not None}
    assert errors == {NAN_ROW: "x has NaN, infinite or missing values",
                      SHORT_ROW: f"x has {T * F - 1} values, the checkpoint expects seq_len {T} x feature_dim {F} "
                                 f"= {T * F} values"}
    scored = np.isfinite(x).all(axis=1)
    state = torch.load(killed_then_run_again["checkpoint"], weights_only=True)
    model = build_model(TrainConfig.from_dict(state["config"]))
    model.load_state_dict(state["model_state_dict"])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x[scored].reshape(-1, T, F)))
    kept = table.filter(pa.compute.is_null(table.column("error")))
    assert table.column("predicted").null_count == table.column("probabilities").null_count == 2
    assert torch.equal(torch.tensor(kept.column("predicted").to_pylist()), logits.argmax(-1))
    got = torch.from_numpy(np.array(kept.column("probabilities").combine_chunks().flatten()).reshape(-1, C))
    # Ray Data cuts the rows into batches other than this one big batch, and a matrix product's kernels may block
    # (and so round) a row's sums differently for another batch height: the last bit may differ, nothing more.
    assert torch.allclose(got, torch.softmax(logits, -1), rtol=0, atol=1e-6)
