"""--strategy fsdp end to end on the session's Ray cluster: sharded checkpoints written by both workers, a real
kill, a damaged shard on the S3 server, best_model.pt consolidated, and the guide's fine-tune from it.

The geometry is the resume tests' (tests.helpers.train_args). The reference is an uninterrupted FSDP run of the
same command (trained once per session); the killed run must end with the same bits.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import pytest
import torch

from raytrain_app.checkpoint.sharded import read_full_state
from raytrain_app.cli.flags import parse_config
from raytrain_app.storage.location import parse_location
from tests.conftest import computed_once, latest_checkpoint_step, make_bucket, run_main, run_until_checkpoint, s3_uri
from tests.helpers import (
    LAST_STEP,
    MID_EPOCH_2,
    assert_resumed_mid_epoch,
    ckpt,
    flip_a_byte,
    run_name_of,
    train_args,
)

pytestmark = pytest.mark.e2e

FSDP = ("--strategy", "fsdp")


@pytest.fixture(scope="session")
def fsdp_reference(shared_tmp: Path, dataset: Path, ray_address: str) -> Path:
    """The run folder of an uninterrupted 2-worker FSDP run."""

    def train(save_dir: Path) -> str:
        result = run_main(train_args(dataset, save_dir, 2, *FSDP), ray_address)
        assert result.returncode == 0, result.stdout + result.stderr
        return str(save_dir / run_name_of(result.stdout))

    return Path(computed_once(shared_tmp, "fsdp-reference", train))


def full_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor (weights, AdamW moments and step counts) of a sharded checkpoint folder, whole."""
    return read_full_state(str(folder / "shards"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


def test_a_killed_fsdp_run_on_s3_with_a_damaged_shard_falls_back_and_ends_identical(
        tmp_path: Path, dataset: Path, ray_address: str, s3_endpoint: str, fsdp_reference: Path) -> None:
    """Killed after a mid-epoch checkpoint; then one byte of worker 1's shard of the latest checkpoint is flipped
    on the S3 server. The re-run of the same command names the shard, continues from the checkpoint before it,
    and ends with the uninterrupted run's weights and moments, bit for bit."""
    bucket = make_bucket(s3_endpoint, "sharded")
    save_dir = s3_uri(bucket, f"runs-{secrets.token_hex(3)}", s3_endpoint)
    args = train_args(dataset, Path("/unused"), 2, *FSDP)
    args[args.index("--save-dir") + 1] = save_dir
    args[args.index("--keep-checkpoints") + 1] = "100"
    run_dir = parse_location(save_dir).join(parse_config(args)[0].default_run_name())
    run_until_checkpoint(args, ray_address, run_dir.uri, MID_EPOCH_2 - {18})
    latest = latest_checkpoint_step(run_dir.uri)
    deadline = time.monotonic() + 60  # Ray may register one more checkpoint while the killed run winds down
    while time.monotonic() < deadline:
        time.sleep(2)
        if (now := latest_checkpoint_step(run_dir.uri)) == latest:
            break
        latest = now
    shard = run_dir.join(f"checkpoint_step={latest:06d}", "shards", "__1_0.distcp")
    local = tmp_path / "shard"
    local.write_bytes(shard.read_bytes())
    flip_a_byte(local)
    shard.write_bytes(local.read_bytes())

    resumed = run_main(args, ray_address)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (f"checkpoint {run_dir.join(f'checkpoint_step={latest:06d}')} is not whole: shards/__1_0.distcp does "
            "not match the SHA-256 in its manifest (damaged)") in resumed.stdout
    step = assert_resumed_mid_epoch(resumed.stdout, min(MID_EPOCH_2))
    assert step < latest
    with run_dir.join(f"checkpoint_step={LAST_STEP:06d}").local_copy() as final:
        assert_same_tensors(full_state(Path(final)), full_state(ckpt(fsdp_reference, LAST_STEP)))


def test_best_model_of_an_fsdp_run_is_one_file_and_the_guides_fine_tune_works_from_it(
        tmp_path: Path, dataset: Path, ray_address: str, fsdp_reference: Path) -> None:
    """best_model.pt holds the guide's keys, loads with weights_only=True into a plain model, and equals the
    weights and moments gathered from the shards of the checkpoint it was written with. Fine-tuning from it with
    a lower --lr (DDP, the default strategy) continues from its step and optimizer."""
    from raytrain_app.core.config import TrainConfig
    from raytrain_app.core.model import SequenceTransformer

    best_path = fsdp_reference.parent / "best_model.pt"
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    for key in ("epoch", "global_step", "model_state_dict", "optimizer_state_dict", "val_loss", "train_ema_loss",
                "config"):
        assert key in best, key
    model = SequenceTransformer(TrainConfig.from_dict(best["config"]))
    model.load_state_dict(best["model_state_dict"])  # strict: every key, every shape
    shards = full_state(ckpt(fsdp_reference, best["global_step"]))
    for name, tensor in best["model_state_dict"].items():
        assert torch.equal(tensor, shards[f"model.{name}"]), name
    names = [name for name, _ in model.named_parameters()]
    decayed = [n for n, p in model.named_parameters() if p.dim() >= 2]  # the optimizer's order (core.optim)
    order = decayed + [n for n in names if n not in decayed]
    for index, moments in best["optimizer_state_dict"]["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(tensor, shards[f"optimizer.{order[index]}.{key}"]), (index, key)

    epochs = best["epoch"] + 1
    tuned = run_main(["--data", str(dataset), "--resume-from-checkpoint", str(best_path), "--lr", "1e-4",
                      "--epochs", str(epochs), "--save-dir", str(tmp_path / "tuned"), "--num-workers", "2",
                      "--batch-size", "8", "--eval-every", "100"], ray_address)
    assert tuned.returncode == 0, tuned.stdout + tuned.stderr
    assert re.search(rf"Workers loaded {re.escape(str(best_path))}: weights, optimizer; at epoch {best['epoch']}, "
                     rf"global step {best['global_step']}", tuned.stdout), tuned.stdout
    assert f"Epoch {epochs}, global step {best['global_step'] + 16}" in tuned.stdout, tuned.stdout
