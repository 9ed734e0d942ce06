"""Batch inference on Ray Data: read tasks -> a pool of model replicas -> Parquet files in a staging folder.

    read tasks (one per piece of row groups, or per row range of a pickle's array in the object store)
      -> map_batches(ModelReplica): an actor pool of MIN-MAX replicas, each holding the model once
      -> write_parquet into the staging folder (the command moves it into place when it is whole)

Reading is streamed: a read task holds one piece (at most 64 MB of row groups) and Ray Data's streaming executor
keeps only a bounded number of blocks in flight, whatever the size of the input. The weights go into the object
store once and every replica reads them from there. Every output row carries the global index of its input row,
so the order Ray Data completes blocks in does not matter.

`raytrain_app.checkpoint.inference.score_table` is the whole of what a replica does to a batch, without Ray: the
tests and benchmarks/gpu_check.py call it directly. Ray is imported only inside the functions that need it.

Output columns: `row` int64; `id` (when the input has one); `predicted` int64, or fixed_size_list<int64>[T] for a
per-step model; `probabilities` fixed_size_list<float32>[C], or [T*C] row-major per step; `error` string (null for
a scored row; for a rejected row predicted and probabilities are null). A regression model's `predicted` is its
output, float32 or fixed_size_list<float32>[T] per step, and there is no `probabilities`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from raytrain_app.checkpoint.inference import TrainedModel, score_table
from raytrain_app.core.errors import UserError
from raytrain_app.datasets.prediction_input import DECODE_BYTES, PIECE_BYTES, PredictionInput, decode_array, read_piece
from raytrain_app.storage.location import Location


@dataclass(frozen=True)
class Replicas:
    """How the model is served: an actor pool of `min_size` to `max_size` replicas, each with `cpus` CPUs (and
    torch intra-op threads) and, with `use_gpu`, one GPU."""

    min_size: int
    max_size: int
    cpus: int = 1
    use_gpu: bool = False


# Reading and writing run as Ray tasks of 1 CPU beside the replicas: a pool that took every CPU would leave the
# read tasks waiting for a CPU forever (seen with 2 replicas on 2 CPUs), so one CPU is kept for them.
IO_CPUS = 1


def cluster_replicas(requested: tuple[int, int] | None, *, cpus: int, use_gpu: bool) -> Replicas:
    """The replica pool for the connected cluster: `requested` (MIN, MAX), or 1 to as many as fit beside one CPU
    for reading and writing. UserError when MIN do not fit in what the cluster can ever offer (Ray Data would
    wait for them forever)."""
    from raytrain_app.ray_adapter.capacity import cluster_capacity, how_many_fit

    capacity, autoscales = cluster_capacity()
    need = {"CPU": float(cpus), **({"GPU": 1.0} if use_gpu else {})}
    room = {**capacity, "CPU": capacity.get("CPU", 0.0) - IO_CPUS}
    fit = how_many_fit(need, room)
    low, high = requested or (1, max(1, fit))
    if low > fit:
        has = ", ".join(f"{capacity.get(name, 0):g} {name}" for name in need)
        asked = f"{low}-{high}" if high > low else f"{low}"
        raise UserError(f"--num-replicas {asked}: {low} replica(s) of {cpus} CPU"
                        + (" and 1 GPU" if use_gpu else "") + f" each, and {IO_CPUS} CPU for reading and writing, "
                        "do not fit in this cluster" + (" even at its autoscaler's maximum" if autoscales else "")
                        + f" ({has}): ask for fewer" + (" or drop --use-gpu" if use_gpu else ""))
    return Replicas(low, high, cpus, use_gpu)


class ModelReplica:
    """One replica of the model (a Ray Data actor): built once from the weights in the object store, then
    `score_table` on every batch it is given."""

    def __init__(self, spec: TrainedModel, weights_ref: Any, device: str, threads: int) -> None:
        import ray

        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS for an actor's CPUs; torch's own pool too
        self.cfg, self.device = spec.cfg, torch.device(device)
        self.model = dataclasses.replace(spec, weights=ray.get(weights_ref)).build(self.device)

    def __call__(self, table: pa.Table) -> pa.Table:
        return score_table(self.model, table, self.cfg, self.device)


def _read_functions(source: PredictionInput) -> list[tuple[Callable[[], Iterator[pa.Table]], int, int]]:
    """(read function, rows, bytes) of every read task."""
    shape, id_type = source.shape, source.id_type
    if source.array is None:
        return [((lambda p=piece: read_piece(p, shape, id_type)), piece.num_rows, piece.size_bytes)
                for piece in source.pieces]
    import ray

    array_ref = ray.put(source.array)  # once; read tasks map their rows of it from the object store
    row_bytes = shape.size * 4
    task_rows, chunk_rows = max(1, PIECE_BYTES // row_bytes), max(1, DECODE_BYTES // row_bytes)

    def read_rows(start: int, stop: int) -> Iterator[pa.Table]:
        array = ray.get(array_ref)
        for a in range(start, stop, chunk_rows):
            yield decode_array(array[a:min(stop, a + chunk_rows)], a, shape)

    ranges = [(a, min(source.num_rows, a + task_rows)) for a in range(0, source.num_rows, task_rows)]
    return [((lambda a=a, b=b: read_rows(a, b)), b - a, (b - a) * row_bytes) for a, b in ranges]


def _dataset(source: PredictionInput) -> tuple[Any, int]:
    """The input as a Ray dataset of read tasks (Datasource is Ray Data's public interface for custom reads), and
    about how many blocks they yield."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    functions = _read_functions(source)

    class PredictionInputDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(size for _, _, size in functions)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            return [ReadTask(read, BlockMetadata(num_rows=rows, size_bytes=int(size), input_files=None,
                                                 exec_stats=None), per_task_row_limit=per_task_row_limit)
                    for read, rows, size in functions]

        def get_name(self) -> str:
            return "PredictionInput"

    # One block per decoded chunk: Ray Data would otherwise split the reads into about 200 blocks (its default
    # parallelism), each an actor call, a write task and an output file (200 files of 1,250 rows for 250,000 rows,
    # written one after another behind the model: 48 s where 38 s was enough with 8 files).
    dataset = ray.data.read_datasource(PredictionInputDatasource(), override_num_blocks=len(functions))
    return dataset, sum(max(1, -(-size // DECODE_BYTES)) for _, _, size in functions)


def predict_to(model: TrainedModel, source: PredictionInput, staging: Location, *, replicas: Replicas,
               batch_size: int) -> None:
    """Score every row of `source` with `model` on the connected Ray cluster; Parquet files into `staging`."""
    import ray
    import ray.data

    weights_ref = ray.put(model.weights)  # once: every replica reads them from the object store
    spec = dataclasses.replace(model, weights={})
    dataset, blocks = _dataset(source)
    # Start as many replicas as there are blocks to give them, up to MAX. Left to Ray Data's autoscaler, a 1-2
    # pool started with one replica and added the second only once inputs had queued: 0.76 of the bare loop's
    # rows/s on 2 cores against 0.99 with both replicas from the start (benchmarks/predict_throughput.py).
    initial = min(replicas.max_size, max(replicas.min_size, blocks))
    scored = dataset.map_batches(
        ModelReplica,
        fn_constructor_args=(spec, weights_ref, "cuda" if replicas.use_gpu else "cpu", replicas.cpus),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=replicas.min_size, max_size=replicas.max_size,
                                           initial_size=initial),
        num_cpus=replicas.cpus,
        num_gpus=1 if replicas.use_gpu else None,
        udf_modifying_row_count=False,
    )
    # A file per block: one for every 16 MB of input (DECODE_BYTES).
    scored.write_parquet(staging.path, filesystem=staging.fs)
