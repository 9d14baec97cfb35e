"""Every section of `sdd bench` in one process, into one report."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from sdd.bench.context import Size, make_context
from sdd.bench.loops import precision_and_layout, throughput_and_masking
from sdd.bench.measure import torch_threads
from sdd.bench.packs import cuda_seed_packs, seed_packs
from sdd.bench.report import Report
from sdd.bench.runs import artifact_bytes, logging_share, sweep_speedup


def run(size: Size | str = "full", *, workers: int = 0, threads: int = 1) -> Report:
    """Measure every figure on the default device (CUDA if there is one) with `threads` torch threads."""
    import torch

    from sdd.problem import resolve_device

    started = time.perf_counter()
    device = resolve_device("auto")
    environment = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": threads,
                   "load_average_start": round(os.getloadavg()[0], 1), "loader_workers": workers,
                   "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="sdd-bench-") as tmp, torch_threads(threads):
        ctx = make_context(size, device, workers, Path(tmp))
        report = Report(ctx.size.name, str(device), environment)
        report.figures += throughput_and_masking(ctx)
        report.figures += logging_share(ctx)
        report.figures += artifact_bytes(ctx)
        report.figures += sweep_speedup(ctx)
        report.figures += seed_packs(ctx)
        if device.type == "cuda":
            report.figures += precision_and_layout(ctx)
            report.figures += sweep_speedup(ctx, gpu=0.25, item=6, against_plain=False)
            report.figures += cuda_seed_packs(ctx)
        else:
            report.skipped.append({"item": 6, "reason": "no CUDA device: bf16 autocast, channels_last and GPU "
                                                        "sharing are measured on CUDA only"})
            report.skipped.append({"item": 7, "reason": "no CUDA device: packs of 16 small models against 16 "
                                                        "separate trainings are measured on CUDA only"})
    report.environment["load_average_end"] = round(os.getloadavg()[0], 1)
    report.seconds = time.perf_counter() - started
    report.figures.sort(key=lambda f: f.item)
    return report
