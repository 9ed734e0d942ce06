"""A Ray Train worker SIGKILLed mid-run: the seconds from the kill to the first optimizer step after Ray Train
restarts the worker group, and the optimizer steps lost (trained after the checkpoint the restart resumes from).
Beside it the same for a minimal Ray Train loop (a small model, a checkpoint of one number), so the difference
is this service's own cost: loading data, building the model, verifying and loading the checkpoint.
Prints one JSON object.

Both runs are real commands on a real Ray instance (RAY_ADDRESS, else a local one each starts). The kill comes
`--kill-delay` seconds after a checkpoint is registered. The step at the kill is read from what the run said
last before it (the progress lines, 10 a second, for this service; a file the minimal loop rewrites every step),
so the service's steps lost are a lower bound by up to a tenth of a second of steps. Beside each figure are the
wall-clock times (Unix seconds) it is computed from: the kill, and the first step after the restart.
`--only service` (or `minimal`) runs one of the two, and prints no difference.

    python benchmarks/recovery.py [--rows 16384] [--eval-every 100] [--kill-after-step 200] [--kill-delay 1.0]
        [--only service|minimal]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# The same controller poll for both (this service sets 0.2 s unless told otherwise).
ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def rank0_pid(log: Path) -> int | None:
    found = re.findall(r"- \(ip=[\d.]+, pid=(\d+)\) world_rank=0", log.read_text())
    return int(found[-1]) if found else None


def registered_step(run_dir: Path) -> int:
    try:
        record = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):
        return -1
    latest = record.get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"].split("=")[1]) if latest else -1


def kill_when(proc: subprocess.Popen, log: Path, ready: object, delay: float, timeout: float = 600) -> float:
    """SIGKILL rank 0's worker `delay` s after `ready()` holds; returns the kill's wall-clock time."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the run ended (or stalled) before the kill:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    time.sleep(delay)
    pid = rank0_pid(log)
    os.kill(pid, signal.SIGKILL)
    return time.time()


def service(args: argparse.Namespace, tmp: str) -> dict:
    from raytrain_app.datasets.formats import make_synthetic, write_pickle_atomic
    from raytrain_app.observability.metrics import read_rows
    from raytrain_app.storage.location import parse_location

    data = os.path.join(tmp, "data.pkl")
    write_pickle_atomic(make_synthetic(num_train=args.rows, num_val=512, seq_len=32, feature_dim=16, num_classes=4,
                                       per_step=False, seed=0), data)
    save_dir = Path(tmp, "runs")
    argv = ["--data", data, "--save-dir", str(save_dir), "--num-workers", str(args.workers), "--epochs", "2",
            "--eval-every", str(args.eval_every), "--hidden-dim", "128", "--num-layers", "2", "--num-heads", "4",
            "--progress-every", "0.1"]
    log = Path(tmp, "service.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raytrain_app.main", *argv], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=ENV, start_new_session=True)
        try:
            run_dir = lambda: next(iter(save_dir.glob("run-*")), None)  # noqa: E731
            killed_at = kill_when(proc, log, lambda: run_dir() and registered_step(run_dir()) >= args.kill_after_step,
                                  args.kill_delay)
            said = re.findall(r"progress: epoch \d+/\d+ step (\d+)/", log.read_text())
            kill_step = int(said[-1]) if said else -1
            if proc.wait(timeout=900) != 0:
                raise SystemExit(f"the run failed after the kill:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    rows = read_rows(parse_location(str(run_dir() / "metrics.jsonl")))
    resume = next(i for i, r in enumerate(rows) if r.get("event") == "resume")
    first = next(r for r in rows[resume:] if r.get("kind") == "checkpoint" and "first_step_time" in r)
    restored = rows[resume]["step"]
    return {"restored_step": restored, "step_at_kill_at_least": kill_step, "steps_lost": kill_step - restored,
            "kill_to_first_step_s": first["first_step_time"] - killed_at, "cause": rows[resume]["cause"],
            "killed_at": killed_at, "first_step_at": first["first_step_time"]}


MINIMAL = '''
import json, os, sys, tempfile, time
import ray.train, torch
from ray.train.torch import TorchTrainer

def loop(config):
    step, restored = 0, False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step = json.load(open(os.path.join(d, "s.json")))["step"]
        restored = True
    model = torch.nn.Linear(128, 128)
    opt = torch.optim.AdamW(model.parameters())
    while step < config["steps"]:
        loss = model(torch.randn(32, 128)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        if restored:
            json.dump({"step": step, "time": time.time()}, open(config["dir"] + "/first.json", "w")); restored = False
        with open(config["dir"] + "/step.tmp", "w") as f:  # replaced whole: the kill reads it at any moment
            f.write(str(step))
        os.replace(config["dir"] + "/step.tmp", config["dir"] + "/step")
        time.sleep(config["step_s"])
        if step % config["every"] == 0:
            d = tempfile.mkdtemp(); json.dump({"step": step}, open(d + "/s.json", "w"))
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_step={step:06d}")

config = json.loads(sys.argv[1])
TorchTrainer(loop, train_loop_config=config,
             scaling_config=ray.train.ScalingConfig(num_workers=config["workers"]),
             run_config=ray.train.RunConfig(name="minimal", storage_path=config["dir"],
                                            failure_config=ray.train.FailureConfig(max_failures=3))).fit()
'''


def minimal(args: argparse.Namespace, tmp: str, step_s: float) -> dict:
    config = {"steps": args.kill_after_step * 4, "every": args.eval_every, "dir": tmp, "step_s": step_s,
              "workers": args.workers}
    log = Path(tmp, "minimal.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", MINIMAL, json.dumps(config)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=ENV, start_new_session=True)
        try:
            run_dir = Path(tmp, "minimal")
            killed_at = kill_when(proc, log, lambda: registered_step(run_dir) >= args.kill_after_step,
                                  args.kill_delay)
            kill_step = int(Path(tmp, "step").read_text())
            if proc.wait(timeout=900) != 0:
                raise SystemExit(f"the minimal run failed after the kill:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    first = json.loads(Path(tmp, "first.json").read_text())
    restored = first["step"] - 1
    return {"restored_step": restored, "step_at_kill": kill_step, "steps_lost": kill_step - restored,
            "kill_to_first_step_s": first["time"] - killed_at, "killed_at": killed_at, "first_step_at": first["time"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--kill-after-step", type=int, default=200,
                        help="Kill once a checkpoint at or after this step is registered.")
    parser.add_argument("--kill-delay", type=float, default=1.0)
    parser.add_argument("--only", choices=("service", "minimal"), help="Run only this one (no difference).")
    args = parser.parse_args()
    figures: dict = {}
    if args.only != "minimal":
        with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
            figures["service"] = service(args, tmp)
    if args.only != "service":
        with tempfile.TemporaryDirectory(prefix="recovery-min-") as tmp:
            # Paced at 10 ms a step: a CPU step of this service's size.
            figures["minimal_ray_train_loop"] = minimal(args, tmp, step_s=0.01)
    if not args.only:
        figures["extra_recovery_s_vs_minimal"] = (figures["service"]["kill_to_first_step_s"]
                                                  - figures["minimal_ray_train_loop"]["kill_to_first_step_s"])
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
