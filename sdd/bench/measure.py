"""How `sdd bench` measures: interleaved repeats, median ratios, and the process state a case sets for
itself (torch threads, environment variables, fresh tracking stores)."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(repeats: int, runners: Sequence[Callable[[], float]]) -> list[list[float]]:
    """Per runner, its measurement in each repeat; the order rotates every repeat so that drifting load
    from other processes falls on every runner alike."""
    out: list[list[float]] = [[] for _ in runners]
    for r in range(repeats):
        for i in [(r + k) % len(runners) for k in range(len(runners))]:
            out[i].append(runners[i]())
    return out


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


@contextlib.contextmanager
def patched_environ(**values: str | None) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Stores:
    """Fresh sqlite tracking stores in a temporary folder, copied from one migrated empty database
    (MLflow's schema migration costs seconds per new database)."""

    def __init__(self, root: Path) -> None:
        from mlflow import MlflowClient

        self.root = root
        self.template = root / "empty.db"
        MlflowClient(tracking_uri=f"sqlite:///{self.template}").search_experiments(max_results=1)
        self.count = 0

    def new(self, name: str, experiment: str) -> str:
        """A new store holding `experiment`, whose artifacts also stay in the temporary folder (a sqlite
        store's default artifact root is ./mlruns in the working directory)."""
        from mlflow import MlflowClient

        self.count += 1
        path = self.root / f"{name}-{self.count}.db"
        shutil.copy(self.template, path)
        uri = f"sqlite:///{path}"
        artifacts = self.root / f"{name}-{self.count}-artifacts"
        MlflowClient(tracking_uri=uri).create_experiment(experiment, artifact_location=artifacts.as_uri())
        return uri
