"""--strategy fsdp end to end on the session's Ray cluster, everything on the S3 server: Parquet data read from
there, sharded checkpoints written there by both workers, a real kill, a damaged shard and the fall back to the
checkpoint before it, best_model.pt consolidated, and the guide's fine-tune from it. The storage tests
(test_storage_e2e.py) read this run too: metrics, report, evaluate and every kind of S3 location.

The geometry is the resume tests' (tests.helpers.train_args), and the reference is their uninterrupted 2-worker
DDP run: on CPU, FSDP on 2 workers trains as DDP on 2 workers (tests/unit/test_sharding.py, which also shows
an FSDP run stopped and resumed bit for bit), so one reference serves both; the comparison allows the same
tolerance as there (the clipping norm sums in another order, and AdamW magnifies an ulp on a gradient that is
zero up to rounding). A resume that lost a step's data or a worker's random state would miss by far more.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.format import load_state
from raytrain_app.checkpoint.sharded import read_full_state
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model_spec import build_model
from raytrain_app.core.optim import build_optimizer
from tests.helpers import LAST_STEP, MID_EPOCH_2, PLUGIN, assert_resumed_mid_epoch, run_name_of

pytestmark = pytest.mark.e2e

RTOL, ATOL = 1e-4, 1e-5  # see tests/unit/test_sharding.py for why


def full_state(folder: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor (weights, AdamW moments and step counts) of a sharded checkpoint folder, whole."""
    return read_full_state(f"{folder}/shards")


def by_name(state: dict) -> dict[str, torch.Tensor]:
    """A full state's weights and moments keyed as a sharded checkpoint's tensors are."""
    cfg = TrainConfig.from_dict(state["config"])
    with torch.device("meta"):
        model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    out = {f"model.{k}": v for k, v in state["model_state_dict"].items()}
    for index, moments in state["optimizer_state_dict"]["state"].items():
        out.update({f"optimizer.{order[index]}.{key}": t for key, t in moments.items()})
    return out


def test_a_killed_fsdp_run_with_a_damaged_shard_falls_back_and_ends_as_the_uninterrupted_run(
        killed_fsdp_run: dict, uninterrupted) -> None:
    """The re-run names the damaged shard, continues mid-epoch from the checkpoint before it in Ray's record (and
    Ray restores that one too), reading its Parquet data and checkpoints from S3, and ends with the uninterrupted
    run's weights and moments (trained from the pickle: both formats serve the same rows in the same order)."""
    run_dir, latest, out = killed_fsdp_run["run_dir"], killed_fsdp_run["damaged"], killed_fsdp_run["output"]
    assert run_name_of(killed_fsdp_run["killed"]) == run_dir.name
    assert f"Run {run_dir.name} has checkpoints: continuing it from its latest one." in out
    assert (f"checkpoint {run_dir.join(f'checkpoint_step={latest:06d}')} is not whole: shards/__1_0.distcp does "
            "not match the SHA-256 in its manifest (damaged)") in out
    fallback = killed_fsdp_run["fallback"]
    assert assert_resumed_mid_epoch(out, min(MID_EPOCH_2)) == fallback < latest
    fallback_dir = run_dir.join(f"checkpoint_step={fallback:06d}").uri.split("?")[0]  # as printed: no endpoint
    assert f"Loading checkpoint from: {fallback_dir}/state.pt" in out, out
    # Ray names an S3 checkpoint without its scheme.
    assert re.search(rf"Workers loaded \S*{fallback_dir.removeprefix('s3://')}:", out), out
    assert killed_fsdp_run["save_dir"].join("best_model.pt").is_file()
    with run_dir.join(f"checkpoint_step={LAST_STEP:06d}").local_copy() as final:
        final_state = full_state(final)
    reference = by_name(load_state(str(uninterrupted(2))))
    assert final_state.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(final_state[key], tensor, rtol=RTOL, atol=ATOL, msg=key)


def test_best_model_of_an_fsdp_run_is_one_file_and_the_guides_fine_tune_works_from_it(
        killed_fsdp_run: dict, dataset: Path) -> None:
    """best_model.pt holds the guide's keys, loads with weights_only=True into a plain model, and equals the
    weights and moments of the sharded checkpoint it was written with. The guide's fine-tune from it (a lower
    --lr, --epochs one more) continues from its step and optimizer in a whole model: the loop here, in this
    process; the command line around it is the one the DDP fine-tune tests run, for a file of the same format."""
    from raytrain_app.checkpoint.state import restore_training_state
    from raytrain_app.core.rng import seed_everything
    from raytrain_app.core.schedule import lr_at
    from raytrain_app.core.trainer import Trainer
    from raytrain_app.datasets.formats import open_dataset

    best_uri = killed_fsdp_run["save_dir"].join("best_model.pt")
    with best_uri.local_copy() as local:
        best = torch.load(local, map_location="cpu", weights_only=True)
    for key in ("epoch", "global_step", "model_state_dict", "optimizer_state_dict", "val_loss", "train_ema_loss",
                "config"):
        assert key in best, key
    assert best["config"]["model"] == PLUGIN  # the suite's sharded run trains a plug-in that names its shard units
    build_model(TrainConfig.from_dict(best["config"])).load_state_dict(best["model_state_dict"])  # strict
    with killed_fsdp_run["run_dir"].join(f"checkpoint_step={best['global_step']:06d}").local_copy() as folder:
        shards = full_state(folder)
        # Resharded from the 2 workers that wrote it to 1: the sharded folder itself loads into one whole model.
        one_cfg = TrainConfig.from_dict({**best["config"], "strategy": "ddp", "num_workers": 1})
        one = Trainer(one_cfg, build_model(one_cfg), None, torch.device("cpu"))
        assert restore_training_state(one, load_state(f"{folder}/state.pt"), checkpoint_dir=str(folder)).optimizer
    assert all(torch.equal(t, shards[f"model.{k}"]) for k, t in one.model.state_dict().items())
    assert by_name(best).keys() <= shards.keys()
    assert all(torch.equal(tensor, shards[key]) for key, tensor in by_name(best).items())

    cfg = TrainConfig.from_dict({**best["config"], "lr": 1e-4, "epochs": best["epoch"] + 1, "strategy": "ddp",
                                 "data": str(dataset)})
    seed_everything(cfg.seed, 0)
    model = build_model(cfg)
    tuned = Trainer(cfg, model, model, torch.device("cpu"))
    report = restore_training_state(tuned, load_state(best_uri), fork=True)
    assert report.optimizer and (tuned.epoch, tuned.global_step) == (best["epoch"], best["global_step"])
    data = open_dataset(str(dataset))
    assert tuned.fit(data, lambda metrics, eval_val_loss, is_best: None)
    steps = tuned.steps_per_epoch(data)
    assert tuned.global_step == best["global_step"] + steps
    assert tuned.optimizer.param_groups[0]["lr"] == lr_at(tuned.global_step - 1, peak_lr=1e-4,
                                                           warmup_steps=cfg.warmup_steps,
                                                           total_steps=tuned.schedule.total_steps)
    assert torch.equal(tuned.optimizer.state_dict()["state"][0]["step"],
                       best["optimizer_state_dict"]["state"][0]["step"] + steps)  # the moments continued
