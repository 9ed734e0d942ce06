"""What several test modules share, so that no test module imports another: sizes, checkpoint files and runs
written in the test process, the reference run the resume tests compare with, wandb's offline files read back,
and the two-node test cluster.

Nothing here starts Ray or reads the test session's settings (fixtures and the helpers that start processes are in
tests/conftest.py, which imports from here, never the other way round). The two-node cluster runs as a process
of its own: `python -m tests.helpers two-node-cluster TEMP_DIR` (see `two_node_cluster`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from raytrain_app.checkpoint.format import load_state, save_checkpoint_dir
from raytrain_app.checkpoint.state import training_state
from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from raytrain_app.core.rng import seed_everything
from raytrain_app.core.trainer import Scores, Trainer
from raytrain_app.datasets.dataset import Dataset, Split
from raytrain_app.datasets.formats import make_synthetic

# Small enough for seconds per run on 2 cores, big enough for several checkpoints per epoch.
TINY_MODEL = ["--hidden-dim", "16", "--num-layers", "2", "--num-heads", "2", "--warmup-steps", "4"]
# A model of a user's own (examples/conv_classifier), the size of TINY_MODEL: the suite's interrupted, forked,
# sharded and resubmitted runs train it, so every guarantee they prove holds for a plug-in, not the built-in alone.
PLUGIN = "examples.conv_classifier.model:spec"
PLUGIN_MODEL = ["--model", PLUGIN, "--model-args", "channels=16,num_blocks=2", "--warmup-steps", "4"]
# A regression model of a user's own (examples/mlp_regressor) on tabular rows, its best model the lowest RMSE: the
# runs whose workers are killed, and the killed sweep, train it.
REGRESSOR = "examples.mlp_regressor.model:spec"
REGRESSION_MODEL = ["--model", REGRESSOR, "--model-args", "width=16,depth=2", "--select-metric", "val_rmse",
                    "--warmup-steps", "4"]


def positive(value: object) -> bool:
    """A measured figure (a benchmark's): a finite number above 0, where 0 would mean nothing was measured."""
    return isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# --- checkpoint files and run folders, written in the test process -------------------------------------------

def checkpoint_state(step: int, eval_loss: float) -> dict:
    """A minimal state of the checkpoint format: counters, one weight, the losses."""
    return {"epoch": 1, "global_step": step, "model_state_dict": {"w": torch.full((2,), float(step))},
            "val_loss": eval_loss, "eval_val_loss": eval_loss, "config": {}}


def ray_run(run_dir: Path, steps: list[int]) -> Path:
    """A run folder as Ray Train leaves it: checkpoint folders and its record of them (latest last)."""
    results = []
    for step in steps:
        save_checkpoint_dir(str(run_dir / f"checkpoint_step={step:06d}"), checkpoint_state(step, 1.0 / step))
        results.append({"version": 0, "checkpoint_dir_name": f"checkpoint_step={step:06d}",
                        "metrics": {"global_step": step, "val_loss": 1.0 / step}})
    snapshot = {"ray_version": "2.60.0", "checkpoint_results": results,
                "checkpoint_report_indices": list(range(len(steps))), "latest_checkpoint_result": results[-1],
                "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(steps),
                "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
                "failed_validation_checkpoint_dir_names": []}
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return run_dir / "checkpoint_manager_snapshot.json"


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: size, modification time and SHA-256."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- data and models in the test process ----------------------------------------------------------------------

def synthetic(num_train: int = 256, per_step: bool = False) -> Dataset:
    """The tiny synthetic dataset (8 steps of 4 features, 3 classes) as the loop reads it, in memory."""
    raw = make_synthetic(num_train=num_train, num_val=64, seq_len=8, feature_dim=4, num_classes=3,
                         per_step=per_step, seed=0)
    split = lambda s: Split(torch.from_numpy(raw[s]["x"]), torch.from_numpy(raw[s]["y"]).long())  # noqa: E731
    return Dataset(train=split("train"), val=split("val"), num_classes=3, seq_len=8, feature_dim=4, per_step=per_step)


CKPT_CFG = TrainConfig(hidden_dim=16, num_layers=2, num_heads=2, feature_dim=4, seq_len=8, num_classes=3,
                       num_workers=1, dropout=0.0)


def trained_checkpoint_of(raw: dict, folder: Path, **settings: Any) -> tuple[Path, Path]:
    """`raw` (a dataset dict; its features scaled and shifted here, so that there is something to standardise)
    written as folder/data.pkl, and a checkpoint of the model `settings` describe trained on it in this process
    with its inputs standardised, as a run from scratch does: (the data, folder/best_model.pt)."""
    import numpy as np

    from raytrain_app.checkpoint.state import with_training_state
    from raytrain_app.cli.preflight import with_data_shape
    from raytrain_app.core.model import set_normalization
    from raytrain_app.core.model_spec import build_model
    from raytrain_app.datasets.formats import open_dataset, write_pickle_atomic
    from raytrain_app.datasets.normalize import feature_stats

    for split in raw.values():
        if isinstance(split, dict):
            split["x"] = split["x"] * np.float32(4.0) + np.float32(2.0)
    write_pickle_atomic(raw, str(folder / "data.pkl"))
    data = open_dataset(str(folder / "data.pkl"))
    cfg = with_data_shape(TrainConfig(data=str(folder / "data.pkl"), **settings), data)
    seed_everything(0, 0)
    model = build_model(cfg)
    set_normalization(model, *feature_stats(data.train))
    trainer = Trainer(cfg, model, model, torch.device("cpu"))
    states: list[dict] = []
    trainer.fit(data, with_training_state(trainer, lambda m, state, best: states.append(state)))
    torch.save(states[-1], folder / "best_model.pt")
    return folder / "data.pkl", folder / "best_model.pt"


def trained_state(step: int = 12) -> dict:
    """A full training state of the CKPT_CFG model (the loop's own state_dict) after a few real optimizer steps."""
    seed_everything(0, 0)
    model = SequenceTransformer(CKPT_CFG)
    trainer = Trainer(CKPT_CFG, model, model, torch.device("cpu"))
    x, y = torch.randn(16, 8, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        trainer.train_step([(x, y)])
    trainer.global_step, trainer.epoch, trainer.best_val_loss = step, 1, 0.75
    trainer.lineage = {"base_checkpoint": "s3://b/base/state.pt", "base_global_step": 8, "base_epoch": 1,
                       "base_sha256": "ab" * 32, "base_lineage": None}
    return training_state(trainer, Scores(loss=0.8, values={"val_accuracy": 0.5}))


def outputs(state_dict: dict) -> torch.Tensor:
    """The CKPT_CFG model's outputs, with these weights, on a fixed input."""
    model = SequenceTransformer(CKPT_CFG).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * 8 * 4).reshape(2, 8, 4))


# --- the reference run of the resume tests (tests/integration) ------------------------------------------------

STEPS_PER_EPOCH = 16  # 256 train sequences / (workers * batch * accumulation) = 16 in every setup below
EPOCHS = 3
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
MID_EPOCH_2 = {18, 21, 24, 27, 30}  # checkpoints inside epoch 2 (16 and 32 are epoch ends)
# Where the resume tests kill a run: early in epoch 2, because Ray may register more checkpoints while the killed
# driver's workers wind down (two more were seen on a loaded machine), and the one resumed from must still be
# inside an epoch.
KILL_MID_EPOCH_2 = {18, 21, 24}


# A progress line of a run of `train_args` on a console that is not a terminal, every field there.
PROGRESS = re.compile(rf"progress: epoch \d+/{EPOCHS} step (\d+)/{LAST_STEP} \(\d+%\) train_ema_loss \d+\.\d{{4}} "
                      r"best_val_loss \S+ best_val_accuracy \S+ samples/s \d+\.\d ETA \S+")


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint_step={step:06d}"


def train_args(dataset: Path, save_dir: Path, workers: int, *extra: str,
               model: tuple[str, ...] | list[str] = tuple(PLUGIN_MODEL)) -> list[str]:
    # Checkpoints every 3 steps: 3 ... 15, 16 (epoch end), 18, 21, 24, 27, 30, 32 (epoch end), ...
    geometry = ["--batch-size", "4", "--grad-accum-steps", "2"] if workers == 2 else ["--batch-size", "16"]
    return ["--data", str(dataset), "--save-dir", str(save_dir), "--num-workers", str(workers),
            "--epochs", str(EPOCHS), "--eval-every", "3", "--dropout", "0.1", "--aug-noise-std", "0.05",
            "--keep-checkpoints", "2", *geometry, *model, *extra]


def assert_resumed_mid_epoch(output: str, killed_at_least: int) -> int:
    """The re-run continued from a checkpoint inside an epoch, at or after the one seen before the kill (Ray may
    have registered later ones meanwhile), and said so; returns its step."""
    step = int(re.search(r"Resuming from global step (\d+)", output).group(1))
    assert killed_at_least <= step < LAST_STEP and step % STEPS_PER_EPOCH != 0, output
    assert f"Epochs: {EPOCHS} (starting from epoch {step // STEPS_PER_EPOCH + 1}, batch " in output, output
    return step


def run_name_of(output: str) -> str:
    match = re.search(r"Run: (\S+) in", output)
    assert match, output
    return match.group(1)


def assert_kept_checkpoints(output: str, run_dir: Path, keep: int) -> None:
    """--keep-checkpoints K keeps the K best by validation loss (as printed at each validation) and the latest."""
    val_by_step = {int(m.group(1)): float(m.group(2))
                   for m in re.finditer(r"step (\d+) train_ema_loss \S+ val_loss (\S+)", output)}
    assert sorted(val_by_step) == [s for s in range(1, LAST_STEP + 1) if s % 3 == 0 or s % STEPS_PER_EPOCH == 0]
    best = sorted(val_by_step, key=lambda s: (val_by_step[s], -s))[:keep]
    kept = {int(p.name.split("=")[1]) for p in run_dir.glob("checkpoint_step=*")}
    assert kept == set(best) | {LAST_STEP}


def assert_same_training_state(a_path: Path, b_path: Path, last_step: int = LAST_STEP, epochs: int = EPOCHS) -> None:
    a, b = load_state(str(a_path)), load_state(str(b_path))
    assert a["global_step"] == b["global_step"] == last_step
    assert a["epoch"] == b["epoch"] == epochs
    assert a["val_loss"] == b["val_loss"]
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for name, tensor in a["model_state_dict"].items():
        assert torch.equal(tensor, b["model_state_dict"][name]), name
    sa, sb = a["optimizer_state_dict"]["state"], b["optimizer_state_dict"]["state"]
    assert sa.keys() == sb.keys()
    for param_id, moments in sa.items():
        for key, tensor in moments.items():
            assert torch.equal(tensor, sb[param_id][key]), (param_id, key)


# --- wandb's offline run files, read back: what a test asserts wandb was given ---------------------------------

def wandb_records(path: str) -> Iterator[object]:
    """The records of a wandb run file (.wandb: W&B's LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        if pos + 7 + length > len(raw):  # a record still being written
            return
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Each offline run file in creation order: its run id, group, logged steps, config and the keys it logged
    with their last values."""
    runs = []
    for path in sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")),
                       key=lambda p: Path(p).stat().st_mtime_ns):
        run = {"id": None, "group": None, "steps": [], "config": {}, "logged": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["group"] = record.run.run_id, record.run.run_group or None
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["steps"].append(record.history.step.num)
                run["logged"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                      for item in record.history.item})
        runs.append(run)
    return runs


# --- a two-node Ray cluster on this machine, as a process of its own ------------------------------------------

def two_node_cluster(temp_dir: str) -> None:
    """Ray's test utilities (`ray.cluster_utils.Cluster`) start a head and a second node, each with one CPU, all on
    127.0.0.1 (the `ray start` CLI refuses a second node in loopback-only mode). Prints the cluster's address and
    the second node's id, then follows commands on stdin:
      drain   drains the second node for preemption, as a cloud's spot reclaim notice does (the GCS call that
              `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` makes, without starting a CLI process: under
              load that start took seconds, and the run could finish before the node was lost), prints `drained`;
      remove  SIGKILLs every process of the second node (a lost spot instance), prints `removed`;
      add     starts a new second node with one CPU (the autoscaler's replacement), prints `added`;
    end of input shuts the cluster down."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every node on loopback; read when ray is imported
    from ray.cluster_utils import Cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray's test cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster (by default /tmp/ray, which a
    # machine where Ray never ran does not have, and which a user's own cluster uses): keep it in the test's folder.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    # Inherited by every process of the cluster: Ray's own actors find their cluster by it (see conftest).
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir,
                                                                "gcs_server_port": port})
    second = cluster.add_node(num_cpus=1, temp_dir=temp_dir)
    print(cluster.address, second.node_id, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "drain":
                import time

                from ray._raylet import GcsClient
                from ray.core.generated import autoscaler_pb2

                accepted, why = GcsClient(address=cluster.gcs_address).drain_node(
                    second.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                    "spot reclaim", time.time_ns() // 1_000_000 + 60_000)
                print("drained" if accepted else f"refused {why}", flush=True)
            elif line.strip() == "remove":
                cluster.remove_node(second, allow_graceful=False)
                print("removed", flush=True)
            elif line.strip() == "add":
                second = cluster.add_node(num_cpus=1, temp_dir=temp_dir)
                print("added", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] != ["two-node-cluster"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tests.helpers two-node-cluster TEMP_DIR")
    two_node_cluster(sys.argv[2])


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_in_process(main: Callable[[list[str]], int], args: list[str], cwd: Path | None = None) -> Any:
    """A command's `main` run in this process, for commands that end before any Ray process starts: what
    `python -m` would give (returncode, stdout, stderr) without a process start and its imports each time."""
    import contextlib
    import io
    import types

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or REPO_ROOT):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 1
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# --- file-system events (Linux inotify), for a wait shorter than any poll -----------------------------------------

class FileEvents:
    """Wakes a waiting test when a file is created or written under the folders it watches (Linux inotify through
    ctypes; a folder created under a watched one is watched too), so that it can act within a window shorter than
    a poll (a checkpoint being copied) without spinning on the cores the copy needs."""

    CREATE, MODIFY, MOVED_TO, IS_DIR = 0x100, 0x2, 0x80, 0x40000000

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}

    def watch(self, folder: Path) -> None:
        wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), self.CREATE | self.MODIFY | self.MOVED_TO)
        if wd >= 0:  # a folder gone meanwhile is not watched
            self.folders[wd] = folder
            for child in folder.iterdir() if folder.is_dir() else ():
                if child.is_dir() and child not in self.folders.values():
                    self.watch(child)

    def wait(self, timeout: float) -> int:
        """Block until something happens under the watched folders or `timeout` seconds pass; how many events."""
        import select

        if not select.select([self.fd], [], [], timeout)[0]:
            return 0
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return 0
        count, pos = 0, 0
        while pos + 16 <= len(data):
            wd, mask, _, length = struct.unpack_from("iIII", data, pos)
            name = data[pos + 16:pos + 16 + length].split(b"\0", 1)[0].decode()
            pos += 16 + length
            count += 1
            if mask & self.IS_DIR and mask & (self.CREATE | self.MOVED_TO) and wd in self.folders:
                self.watch(self.folders[wd] / name)
        return count

    def close(self) -> None:
        os.close(self.fd)
