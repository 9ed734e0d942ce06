"""The benchmarks that need no Ray, run in a quick mode: each must measure what it says it measures. Every figure
it promises is there; both sides of a comparison did the same work, in the counts asked for; and every rate and
ratio it prints is recomputed here from the raw counts and seconds it records (an inverted or mistaken formula
fails). Their timing targets are the benchmarks' and docs/performance.md's: on a shared, loaded 2-core machine a
ratio of two timings is no verdict on the code, so nothing here bounds a time. The benchmarks on a cluster or on
S3: tests/integration/test_benchmarks.py."""

from __future__ import annotations

from typing import Any

from pytest import approx

from raytrain_app.core.config import TrainConfig
from raytrain_app.core.model import SequenceTransformer
from tests.helpers import positive


def test_data_throughput_feeds_both_readers_the_same_rows_and_computes_its_ratios(benchmark: Any) -> None:
    rows, batch = 512, 64  # of 8 x 4 features
    figures = benchmark("data_throughput.py", "--rows", str(rows), "--seq-len", "8", "--feature-dim", "4",
                        "--batch-size", str(batch), timeout=300)
    assert set(figures) == {"dataset_1x_mb", "train_features_bytes", "throughput_ratio_parquet_vs_pickle_1x",
                            "throughput_ratio_parquet_vs_pickle_4x", "reader_only_ratio_parquet_vs_pickle_1x",
                            "peak_memory_growth_1x_to_4x_parquet", "peak_memory_growth_1x_to_4x_pickle", "runs"}
    # The sizes asked for, as written: 512 rows of 8 x 4 float32 features, and four times that.
    one_x = rows * 8 * 4 * 4
    assert figures["train_features_bytes"] == {"1x": one_x, "4x": 4 * one_x}
    assert figures["dataset_1x_mb"] == round(one_x / 2**20, 1)
    runs = figures["runs"]
    # Both readers with the training step at both sizes, and alone at 1x: each measurement its own process.
    assert set(runs) == {"pickle_1x", "parquet_1x", "pickle_4x", "parquet_4x", "pickle_1x_reader_only",
                         "parquet_1x_reader_only"}
    for name, run in runs.items():
        scaled = rows * (4 if "_4x" in name else 1)
        assert set(run) == {"train_rows", "samples", "steps", "loop_s", "samples_per_s", "open_s", "peak_rss_mb"}
        # The reader opened the rows written and delivered each one once (1 epoch of full batches): the same work
        # for both readers.
        assert run["train_rows"] == run["samples"] == scaled, (name, run)
        # The training step ran on every batch; the reader alone ran none.
        assert run["steps"] == (0 if name.endswith("_reader_only") else scaled // batch), (name, run)
        assert positive(run["loop_s"]) and positive(run["open_s"]) and positive(run["peak_rss_mb"]), (name, run)
        assert run["samples_per_s"] == approx(run["samples"] / run["loop_s"]), name

    def rate(name: str) -> float:
        return runs[name]["samples"] / runs[name]["loop_s"]

    def growth(reader: str) -> float:
        return runs[f"{reader}_4x"]["peak_rss_mb"] / runs[f"{reader}_1x"]["peak_rss_mb"] - 1

    assert figures["throughput_ratio_parquet_vs_pickle_1x"] == approx(rate("parquet_1x") / rate("pickle_1x"))
    assert figures["throughput_ratio_parquet_vs_pickle_4x"] == approx(rate("parquet_4x") / rate("pickle_4x"))
    assert figures["reader_only_ratio_parquet_vs_pickle_1x"] == approx(
        rate("parquet_1x_reader_only") / rate("pickle_1x_reader_only"))
    assert figures["peak_memory_growth_1x_to_4x_parquet"] == approx(growth("parquet"))
    assert figures["peak_memory_growth_1x_to_4x_pickle"] == approx(growth("pickle"))


def test_gpu_throughput_times_the_steps_asked_for_in_each_precision_and_computes_its_rates(benchmark: Any) -> None:
    # bf16 and fp16, not compiled: torch.compile of the train step is tests/unit/test_loop.py's, and on CPU it
    # doubles this test's time.
    figures = benchmark("gpu_throughput.py", "--hidden-dim", "32", "--num-layers", "1", "--num-heads", "2",
                        "--seq-len", "16", "--batch-size", "2", "--steps", "3", "--warmup", "1", "--variants",
                        "bf16,fp16", "--peak-tflops", "2")
    assert set(figures) == {"device", "torch", "ray_installed", "target_mfu_bf16", "peak_tflops", "bf16", "fp16",
                            "checkpoint"}
    assert figures["device"] == "cpu"  # the project's torch is the CPU wheel (pyproject.toml)
    assert figures["peak_tflops"] == 2
    params = sum(p.numel() for p in SequenceTransformer(TrainConfig(
        hidden_dim=32, num_layers=1, num_heads=2, feature_dim=64, seq_len=16, num_classes=16)).parameters())
    for name, expected in (("bf16", ("bfloat16", False)), ("fp16", ("float16", True))):
        variant = figures[name]
        assert set(variant) == {"amp_dtype", "grad_scaler", "compiled", "params", "steps", "tokens", "loop_s",
                                "step_s", "tokens_per_s", "mfu"}, variant
        # The precision the name says (fp16 scales its loss, bf16 needs no scaler), and the model asked for.
        assert (variant["amp_dtype"], variant["grad_scaler"], variant["compiled"]) == (*expected, False), variant
        assert variant["params"] == params
        # The 3 steps asked for were timed, warm-up left out, each on 2 sequences of 16 tokens.
        assert variant["steps"] == 3 and variant["tokens"] == 3 * 2 * 16, variant
        assert positive(variant["loop_s"]), variant
        tokens_per_s = variant["tokens"] / variant["loop_s"]
        assert variant["tokens_per_s"] == approx(tokens_per_s), variant
        assert variant["step_s"] == approx(variant["loop_s"] / variant["steps"]), variant
        # MFU: 6 FLOPs per parameter and token plus attention's 12 x layers x width x sequence, against 2 TFLOP/s.
        assert variant["mfu"] == approx(tokens_per_s * (6 * params + 12 * 1 * 32 * 16) / 2e12), variant
    checkpoint = figures["checkpoint"]
    assert set(checkpoint) == {"state_bytes", "copy_to_host_s", "save_s", "load_s", "state_gb",
                               "copy_to_host_gb_per_s", "save_gb_per_s", "load_gb_per_s"}
    # The full training state was written: at least the fp32 weights and AdamW's two moments, 12 bytes a parameter.
    assert checkpoint["state_bytes"] >= 12 * params
    gb = checkpoint["state_bytes"] / 1e9
    assert checkpoint["state_gb"] == approx(gb)
    for rate, seconds in (("copy_to_host_gb_per_s", "copy_to_host_s"), ("save_gb_per_s", "save_s"),
                          ("load_gb_per_s", "load_s")):
        assert positive(checkpoint[seconds]), checkpoint
        assert checkpoint[rate] == approx(gb / checkpoint[seconds]), (rate, checkpoint)
