"""FSDP against DDP, sharded checkpoints and resharding, on 1 and 2 CPU processes (gloo), without Ray.

Each run is the product's loop in real processes (tests/distributed.py): the model in the requested layout,
checkpoints written by `save_training_state`, restored by `restore_training_state`. Every run is elastic
(--num-workers 1-2), so a run on 1 worker accumulates 2 micro-batches per step and keeps the effective batch.

Tolerance. With the same weights, data and dropout masks, FSDP and DDP add the same two fp32 gradients per
element (a reduce-scatter or an all-reduce of 2 values is one addition, and halving is exact); what differs is
the order in which the clipping norm sums its squares (per shard, then across workers, against over whole
tensors), which moves the clip factor by an ulp whenever the norm is above --grad-clip. AdamW divides each
gradient by its own running scale, so for a parameter whose gradient is zero up to rounding (the attention's key
bias: softmax ignores a constant shift) an ulp of difference becomes an lr-sized step. Over these runs that stays
below 1e-5 absolute; the tests allow rtol 1e-4, atol 1e-5. Without clipping in play the two are equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import (
    MANIFEST_FILE,
    STATE_FILE,
    as_location,
    checkpoint_problem,
    load_state,
    rank_manifest_name,
)
from raytrain_app.checkpoint.resolve import summarize
from raytrain_app.checkpoint.sharded import read_full_weights
from tests.distributed import MID, STEPS, config, train_all
from tests.helpers import flip_a_byte

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="session")
def runs(gloo_runs: Path) -> Path:
    return gloo_runs


def result(folder: Path) -> dict:
    return torch.load(folder / "result.pt", weights_only=True)


def assert_close_runs(a: dict, b: dict, from_step: int = 1) -> None:
    steps = [s for s in sorted(a["losses"]) if s >= from_step]
    assert steps and steps == [s for s in sorted(b["losses"]) if s >= from_step]
    for step in steps:
        assert a["losses"][step] == pytest.approx(b["losses"][step], rel=RTOL, abs=ATOL), step
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=RTOL, atol=ATOL, msg=name)


def test_fsdp_on_2_workers_matches_ddp_step_for_step(runs: Path) -> None:
    ddp, fsdp = result(runs / "ddp2"), result(runs / "fsdp2")
    assert sorted(ddp["losses"]) == list(range(1, STEPS + 1))
    assert ddp["checkpoints"] == fsdp["checkpoints"] == [f"checkpoint_step={s:06d}" for s in (5, 8, 10, 15, 16)]
    assert_close_runs(ddp, fsdp)
    assert ddp["losses"][STEPS] < ddp["losses"][1]  # it learned something: the comparison is not of no-ops


def test_a_sharded_checkpoint_holds_every_workers_shard_and_a_small_state_file(runs: Path) -> None:
    folder = runs / "fsdp2" / f"checkpoint_step={MID:06d}"
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert names == {STATE_FILE, "meta.json", MANIFEST_FILE, rank_manifest_name(1), "shards/.metadata",
                     "shards/__0_0.distcp", "shards/__1_0.distcp"}
    state = load_state(str(folder / STATE_FILE))  # weights_only: no code runs
    assert "model_state_dict" not in state and "optimizer_state_dict" not in state
    assert state["sharded"] == {"strategy": "fsdp", "world_size": 2, "dir": "shards"}
    # The weights gathered from the shards are the DDP run's at the same step (its state.pt holds them whole).
    ddp_state = load_state(str(runs / "ddp2" / f"checkpoint_step={MID:06d}" / STATE_FILE))
    weights = read_full_weights(str(folder / "shards"), state["model_shapes"])
    for name, tensor in ddp_state["model_state_dict"].items():
        torch.testing.assert_close(weights[name], tensor, rtol=RTOL, atol=ATOL, msg=name)
    # The driver's summary comes from the small state file: shapes, counters, optimizer present.
    summary = summarize(as_location(str(folder / STATE_FILE)))
    assert summary.global_step == MID and summary.has_optimizer
    assert summary.model_shapes == {k: tuple(v.shape) for k, v in ddp_state["model_state_dict"].items()}
    assert json.loads((folder / "meta.json").read_text())["sharded"]["world_size"] == 2


def test_a_damaged_or_missing_shard_makes_the_checkpoint_not_whole(runs: Path, tmp_path: Path) -> None:
    source = runs / "fsdp2" / f"checkpoint_step={MID:06d}"
    assert checkpoint_problem(str(source)) is None
    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    flip_a_byte(damaged / "shards" / "__1_0.distcp")
    assert checkpoint_problem(str(damaged)) == (
        "shards/__1_0.distcp does not match the SHA-256 in its manifest (damaged)")
    missing = tmp_path / "missing"
    shutil.copytree(source, missing)
    (missing / rank_manifest_name(1)).unlink()
    assert checkpoint_problem(str(missing)) == (
        "manifest.rank1.json is missing or damaged (a worker's shard of the checkpoint)")


def test_resuming_on_the_same_workers_continues_exactly(runs: Path, tmp_path: Path) -> None:
    """From the same mid-epoch checkpoint: FSDP stopped and resumed unchanged (bit for bit), FSDP -> DDP and
    DDP -> FSDP, each continuing as the uninterrupted run of its new strategy does."""
    cases = {"fsdp-again": ("fsdp2", "fsdp"), "fsdp-to-ddp": ("fsdp2", "ddp"), "ddp-to-fsdp": ("ddp2", "fsdp")}
    resumed = train_all(tmp_path, {name: {"config": config(runs / "data.pkl", strategy),
                                          "resume": runs / source / f"checkpoint_step={MID:06d}"}
                                   for name, (source, strategy) in cases.items()}, world_size=2)
    for name, (_, strategy) in cases.items():
        reference = result(runs / f"{strategy}2")
        assert min(resumed[name]["losses"]) == MID + 1, name
        assert_close_runs(resumed[name], reference, from_step=MID + 1)
    again, reference = resumed["fsdp-again"], result(runs / "fsdp2")
    assert all(torch.equal(v, reference["weights"][k]) for k, v in again["weights"].items())
    assert all(again["losses"][s] == reference["losses"][s] for s in again["losses"])


def test_resharding_2_to_1_and_1_to_2_workers_in_either_strategy(runs: Path, tmp_path: Path) -> None:
    """A 2-worker checkpoint of either strategy resumes on 1 worker of either; all continue identically (the
    state moved between layouts is the same). Then a 1-worker FSDP checkpoint resumes on 2 workers of either
    strategy, identically again."""
    data = runs / "data.pkl"
    cases = {"fsdp-to-fsdp1": ("fsdp2", "fsdp"), "ddp-to-ddp1": ("ddp2", "ddp"), "fsdp-to-ddp1": ("fsdp2", "ddp")}
    on_one = train_all(tmp_path, {name: {"config": config(data, strategy),
                                         "resume": runs / source / f"checkpoint_step={MID:06d}"}
                                  for name, (source, strategy) in cases.items()}, world_size=1)
    reference = on_one["ddp-to-ddp1"]
    assert min(reference["losses"]) == MID + 1
    for run in on_one.values():
        assert_close_runs(run, reference, from_step=MID + 1)
    # 1 -> 2: the 1-worker FSDP run's checkpoint at step 10 (written by one process), on 2 workers.
    one_worker_ckpt = tmp_path / "fsdp-to-fsdp1" / "checkpoint_step=000010"
    assert load_state(str(one_worker_ckpt / STATE_FILE))["sharded"]["world_size"] == 1
    on_two = train_all(tmp_path, {f"fsdp1-to-{strategy}2": {"config": config(data, strategy),
                                                            "resume": one_worker_ckpt}
                                  for strategy in ("fsdp", "ddp")}, world_size=2)
    assert min(on_two["fsdp1-to-fsdp2"]["losses"]) == 11
    assert_close_runs(on_two["fsdp1-to-fsdp2"], on_two["fsdp1-to-ddp2"], from_step=11)


def test_options_that_change_nothing_and_those_that_change_the_numbers(runs: Path, tmp_path: Path) -> None:
    """On 2 workers: --activation-checkpointing under FSDP trains bit for bit as without it; FSDP skips its
    reduce-scatter while accumulating and matches DDP with 2 micro-batches per step; with --use-amp (bf16) FSDP's
    mixed-precision policy and DDP's autocast train alike within bf16's precision; --grad-compression bf16 stays
    within it of the fp32 all-reduce without being equal to it."""
    data = runs / "data.pkl"
    accum = {"batch_size": 8, "grad_accum_steps": 2}
    variants = {
        "fsdp-recompute": {"strategy": "fsdp", "activation_checkpointing": True},
        "fsdp-accum": {"strategy": "fsdp", **accum}, "ddp-accum": {"strategy": "ddp", **accum},
        "fsdp-bf16": {"strategy": "fsdp", "use_amp": True}, "ddp-bf16": {"strategy": "ddp", "use_amp": True},
        "ddp-compressed": {"strategy": "ddp", "grad_compression": "bf16"},
    }
    out = train_all(tmp_path, {name: {"config": {**config(data, "ddp"), **changes}}
                               for name, changes in variants.items()}, world_size=2)
    fsdp, ddp = result(runs / "fsdp2"), result(runs / "ddp2")
    assert out["fsdp-recompute"]["losses"] == fsdp["losses"]
    assert all(torch.equal(v, fsdp["weights"][k]) for k, v in out["fsdp-recompute"]["weights"].items())
    assert_close_runs(out["fsdp-accum"], out["ddp-accum"])
    assert out["fsdp-accum"]["losses"] != fsdp["losses"]  # another batch geometry: not the same run by accident
    for a, b in (("fsdp-bf16", "ddp-bf16"), ("ddp-compressed", "ddp")):
        other = out[b] if b in out else ddp
        for step, loss in out[a]["losses"].items():
            assert loss == pytest.approx(other["losses"][step], rel=2e-2), (a, step)
    assert out["ddp-compressed"]["losses"] != ddp["losses"]


def test_ckpt_shows_and_exports_a_sharded_checkpoint_and_the_driver_reads_only_its_meta(
        runs: Path, tmp_path: Path) -> None:
    """`ckpt export` gathers the shards into one safetensors file equal to the DDP run's weights at the same
    step; `ckpt show` says how the state is sharded; the summary the driver starts from comes from meta.json
    (the test replaces state.pt by bytes that are not a checkpoint: the summary is unchanged)."""
    from safetensors.torch import load_file

    from raytrain_app.ckpt import main as ckpt_main
    from tests.helpers import run_in_process

    folder = tmp_path / "ckpt"
    shutil.copytree(runs / "fsdp2" / f"checkpoint_step={MID:06d}", folder)
    shown = run_in_process(ckpt_main, ["show", str(folder)])
    assert shown.returncode == 0, shown.stderr
    assert "weights and optimizer state sharded by 2 worker(s) in shards/" in shown.stdout
    assert "Manifest: whole (every file matches manifest.json)" in shown.stdout
    exported = run_in_process(ckpt_main, ["export", str(folder), str(tmp_path / "w.safetensors")])
    assert exported.returncode == 0, exported.stderr
    weights = load_file(str(tmp_path / "w.safetensors"))
    ddp = load_state(str(runs / "ddp2" / f"checkpoint_step={MID:06d}" / STATE_FILE))["model_state_dict"]
    assert weights.keys() == ddp.keys()
    for name, tensor in ddp.items():
        torch.testing.assert_close(weights[name], tensor, rtol=RTOL, atol=ATOL, msg=name)

    before = summarize(as_location(str(folder / STATE_FILE)))
    (folder / STATE_FILE).write_bytes(b"not a checkpoint")
    assert summarize(as_location(str(folder / STATE_FILE))) == before
    assert before.sharded and before.has_optimizer and before.global_step == MID
