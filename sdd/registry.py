"""The model registry: the best sparse model of each dataset x model family under the `best-sparse` alias."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from sdd.phases import selection_key

if TYPE_CHECKING:  # the analysis reads the registry without importing torch
    import torch

log = logging.getLogger(__name__)

ALIAS = "best-sparse"


def registered_name(dataset: str, model: str) -> str:
    return f"sdd-{dataset}-{model}"


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model once, even when several chains race to create it."""
    for attempt in range(5):
        try:
            client.get_registered_model(name)
            return
        except MlflowException:
            pass
        try:
            client.create_registered_model(name, description="Best sparse model found by sdd pruning chains "
                                                             f"(alias @{ALIAS}: best val_acc, ties: sparser).")
            return
        except MlflowException:
            time.sleep(0.1 * (attempt + 1))
    client.get_registered_model(name)


def current_best(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def register_best_sparse(client: MlflowClient, model: torch.nn.Module, *, level_run: Run, dense_run_id: str,
                         dataset: str, model_name: str, metrics: dict[str, float]) -> str | None:
    """Log `model` to its level run and move the alias to it if it beats the current holder.

    Returns the new version number, or None when the current holder is at least as good.
    """
    name = registered_name(dataset, model_name)
    val_acc, sparsity = metrics["val_acc"], metrics["sparsity"]  # chains refuse parents without a val split
    holder = current_best(client, name)
    if holder is not None:
        held = selection_key(float(holder.tags.get("val_acc", "-1")), float(holder.tags.get("sparsity", "0")))
        if held >= selection_key(val_acc, sparsity):
            log.info("%s@%s (v%s, val_acc %s) is at least as good; not replaced", name, ALIAS, holder.version,
                     holder.tags.get("val_acc"))
            return None
    from sdd import tracking

    run_id = level_run.info.run_id
    uri = tracking.log_model(client, run_id, model)
    _ensure_registered_model(client, name)
    tags = {"run_id": run_id, "dense_run_id": dense_run_id, "chain_run_id": level_run.data.tags.get("sdd.chain_run_id", ""),
            "level": level_run.data.tags.get("sdd.level", ""), "sparsity": f"{sparsity:.6f}",
            "val_acc": f"{val_acc:.6f}", "test_acc": f"{metrics['test_acc']:.6f}"}
    version = client.create_model_version(name, uri, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, ALIAS, version.version)
    log.info("registered %s version %s as @%s (val_acc %.4f, sparsity %.4f)", name, version.version, ALIAS,
             val_acc, sparsity)
    return version.version
