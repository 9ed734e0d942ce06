"""The memory plan (raytrain_app.core.memory) against what PyTorch actually holds on CPU: parameter counts, the
bytes autograd saves for backward, and a worker's share of weights and moments under FSDP; and the refusal of a
run that cannot fit, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.memory import GB, activation_bytes, count_parameters, plan_memory
from raytrain_app.core.model import SequenceTransformer, loss_fn
from raytrain_app.core.parallel import parallelize
from raytrain_app.main import main
from raytrain_app.plan import main as plan_main
from tests.conftest import write_dataset
from tests.distributed import config
from tests.helpers import run_in_process

SHAPES = dict(feature_dim=12, seq_len=32, num_classes=5)


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize(("hidden", "layers"), [(16, 1), (64, 3), (2048, 24)])
def test_parameter_count_is_the_models(per_step: bool, hidden: int, layers: int) -> None:
    cfg = TrainConfig(hidden_dim=hidden, num_layers=layers, num_heads=4, per_step=per_step, **SHAPES)
    with torch.device("meta"):  # the 1.2 B configuration costs no memory
        model = SequenceTransformer(cfg)
    assert count_parameters(cfg) == (sum(p.numel() for p in model.parameters()),
                                     sum(p.numel() for p in model.blocks[0].parameters()))


def saved_for_backward(cfg: TrainConfig, batch: int, checkpointed: bool) -> int:
    """Bytes of every tensor autograd keeps from one training forward pass (each storage once, weights aside)."""
    torch.manual_seed(0)
    model = SequenceTransformer(cfg).train()
    parallelize(cfg.replace(activation_checkpointing=checkpointed), model, torch.device("cpu"), 1)  # as training does
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, cfg.seq_len, cfg.feature_dim)
    y = torch.randint(0, cfg.num_classes, (batch, cfg.seq_len) if cfg.per_step else (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y).backward()
    return sum(kept.values())


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_activation_plan_is_what_autograd_keeps(per_step: bool, checkpointed: bool) -> None:
    """fp32, dropout 0: the CPU then runs the same fused attention kernel as a GPU (with dropout it falls back
    to a kernel that keeps the attention matrix, which no GPU kernel does). Checkpointed, forward keeps each
    block's input; the plan adds the one block backward rebuilds at a time."""
    cfg = TrainConfig(hidden_dim=64, num_layers=3, num_heads=4, dropout=0.0, per_step=per_step, **SHAPES)
    measured = saved_for_backward(cfg, 8, checkpointed)
    planned = activation_bytes(cfg, 8, checkpointed, rebuilt_block=False)
    assert planned == pytest.approx(measured, rel=0.01)
    if checkpointed:
        assert planned < activation_bytes(cfg, 8, True) < activation_bytes(cfg, 8, False)


def test_a_workers_share_under_fsdp_is_what_it_holds(gloo_runs: Path) -> None:
    """Rank 0 of the 2-worker FSDP run (tests/unit/test_sharding.py's) holds half the weights and moments, as
    planned (each tensor split by rows, rank 0's shard of an odd one a row longer); the DDP run's rank 0 holds
    them whole."""
    folder = gloo_runs
    for strategy in ("ddp", "fsdp"):
        held = torch.load(folder / f"{strategy}2" / "result.pt", weights_only=True)["held_bytes"]
        plan = plan_memory(TrainConfig.from_dict(config(folder / "data.pkl", strategy)), 2)
        assert held == {"parameters": plan.parameters, "optimizer": plan.optimizer}, strategy


def test_a_run_that_cannot_fit_its_gpus_is_refused_before_anything_starts(tmp_path: Path, dataset: Path) -> None:
    args = ["--data", str(dataset), "--save-dir", str(tmp_path), "--use-gpu", "--gpu-memory-gb", "80",
            "--hidden-dim", "4096", "--num-layers", "32", "--num-heads", "32", "--num-workers", "8", "--use-amp"]
    result = run_in_process(main, args)
    assert result.returncode == 2
    # What a DDP worker needs, by hand (H 4096, L 32, the dataset's F 4, T 8, C 3; batch B 32, bf16, dropout 0.1):
    #   parameters P = L (12 H^2 + 13 H) + H (F + 1 + T + 2 + C) + C = 6,444,154,880 + 73,731 = 6,444,228,611;
    #     weights, gradients and AdamW moments, 16 bytes each: 103,107,657,776
    #   activations, BTH = 1,048,576 values: per block 16 BTH x 2 bytes + 2 dropout masks 2 BTH + 2 norms' fp32
    #     mean and rstd (2 x 2,048) + attention's logsumexp (B x 32 heads x T x 4 = 32,768) = 35,688,448, x L =
    #     1,142,030,336; outside the blocks the input (B T F x 2) and its dropout mask (BTH), the final norm's
    #     fp32 input (4 BTH) and statistics, the pooled head input (B H x 2), the fp32 logits (B C x 4):
    #     5,509,504; together 1,147,539,840
    #   the CUDA runtime: 1,000,000,000
    # 105,255,197,616 bytes: 105.26 GB.
    assert result.stderr.strip().splitlines() == [
        "error: --strategy ddp --batch-size 32 on 8 worker(s) needs 105.26 GB per GPU by the memory plan, "
        "more than 90% of the 80.00 GB of each GPU (--gpu-memory-gb): --strategy fsdp would fit. See python -m "
        "raytrain_app.plan with the same flags."]
    assert list(tmp_path.iterdir()) == []  # nothing written
    fsdp = run_in_process(plan_main, [*args, "--strategy", "fsdp"])
    assert fsdp.returncode == 0, fsdp.stderr
    assert "does NOT fit" not in fsdp.stdout and ": fits" in fsdp.stdout


def test_the_plan_names_the_smallest_change_and_the_largest_micro_batch(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "long.pkl", seq_len=512)
    args = ["--data", str(data), "--hidden-dim", "2048", "--num-layers", "24", "--num-heads", "16",
            "--batch-size", "128", "--num-workers", "2", "--gpu-memory-gb", "80"]
    result = run_in_process(plan_main, args)
    assert result.returncode == 0, result.stderr
    cfg = TrainConfig(hidden_dim=2048, num_layers=24, num_heads=16, batch_size=128, num_workers=2, feature_dim=4,
                      seq_len=512, num_classes=3)
    plan = plan_memory(cfg)
    assert not plan.fits(80 * GB) and plan_memory(cfg.replace(activation_checkpointing=True)).fits(80 * GB)
    assert "  smallest change that fits: --activation-checkpointing" in result.stdout
    largest = plan.largest_micro_batch(80 * GB)
    assert f"  largest micro-batch that fits: {largest}" in result.stdout
    assert plan_memory(cfg.replace(batch_size=largest)).fits(80 * GB)
    assert not plan_memory(cfg.replace(batch_size=largest + 1)).fits(80 * GB)


def test_a_plugins_plan_counts_its_own_parameters_and_shard_units() -> None:
    """A model of a user's own: its parameters and its largest FSDP unit read off the model itself (on the meta
    device), every tensor split by rows over the workers; its activations are not estimated, and the plan says so."""
    from raytrain_app.core.memory import largest_shard, plan_lines
    from raytrain_app.core.model_spec import build_model
    from tests.helpers import PLUGIN

    cfg = TrainConfig(model=PLUGIN, model_args={"channels": 12, "num_blocks": 3}, feature_dim=4, seq_len=8,
                      num_classes=3, num_workers=2, strategy="fsdp")
    model = build_model(cfg)
    assert count_parameters(cfg) == (sum(p.numel() for p in model.parameters()),
                                     sum(p.numel() for p in model.net.blocks[0].parameters()))
    assert largest_shard(cfg, 2) == sum(-(-p.shape[0] // 2) * p[0].numel() if p.dim() else 1
                                        for p in model.parameters())
    plan = plan_memory(cfg)
    assert plan.activations == 0 and plan.parameters == 4 * largest_shard(cfg, 2)
    assert any("not estimated for --model" in line for line in plan_lines(cfg, 80 * GB))
