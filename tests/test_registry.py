"""The `best-sparse` alias on a real sqlite store: which level run of which chain holds it.

Levels of two chains of one dense run are offered in turn, as each chain's end offers its best level.
"""

from __future__ import annotations

import torch
from mlflow import MlflowClient

from sdd import registry, tracking

NAME = "sdd-mnist1d-mlp"


class Chains:
    """A dense run and two pruning chains under it, with level runs tagged as the chain step tags them."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.exp_id = tracking.experiment_id(client)
        self.dense_id = tracking.start_run(client, self.exp_id, name="dense", tags={"sdd.step": "train"})
        self.chain_ids = {c: tracking.start_run(client, self.exp_id, name=f"chain {c}", parent_run_id=self.dense_id,
                                                tags={"sdd.step": "prune", "sdd.dense_run_id": self.dense_id})
                          for c in ("a", "b")}
        self.level_ids: dict[tuple[str, int], str] = {}

    def offer(self, chain: str, level: int, val_acc: float) -> int | None:
        """Offer level `level` of `chain` (sparsity 1 - 0.8^level) to the registry: the new version or None."""
        chain_id = self.chain_ids[chain]
        run_id = tracking.start_run(self.client, self.exp_id, name=f"level {level}", parent_run_id=chain_id,
                                    tags={"sdd.step": "level", "sdd.level": str(level), "sdd.chain_run_id": chain_id,
                                          "sdd.dense_run_id": self.dense_id})
        self.level_ids[chain, level] = run_id
        metrics = {"val_acc": val_acc, "test_acc": val_acc - 0.02, "sparsity": 1 - 0.8 ** level}
        version = registry.register_best_sparse(self.client, torch.nn.Linear(40, 10), metrics=metrics,
                                                level_run=self.client.get_run(run_id), dense_run_id=self.dense_id,
                                                dataset="mnist1d", model_name="mlp")
        return None if version is None else int(version)  # the sqlite store gives ints; MLflow's types say str

    def holder(self) -> tuple[int, str, str]:
        """(version, chain, level) of the alias holder."""
        version = registry.current_best(self.client, NAME)
        chain = next(c for c, i in self.chain_ids.items() if i == version.tags["chain_run_id"])
        return int(version.version), chain, version.tags["level"]

    def has_model(self, chain: str, level: int) -> bool:
        return any(a.path == "model" for a in self.client.list_artifacts(self.level_ids[chain, level]))


def test_best_sparse_alias_across_chains(store):
    chains = Chains(tracking.get_client())
    assert chains.offer("a", 3, 0.80) == 1  # no holder yet
    assert chains.holder() == (1, "a", "3")

    # Worse val_acc, though sparser: val_acc comes first; nothing is logged for a level that loses.
    assert chains.offer("b", 4, 0.79) is None
    assert chains.holder() == (1, "a", "3") and not chains.has_model("b", 4)
    # Equal val_acc at equal sparsity (as read back from the holder's 6-decimal tags): the holder stays.
    assert chains.offer("b", 3, 0.80) is None
    assert chains.holder() == (1, "a", "3") and not chains.has_model("b", 3)
    # Equal val_acc, sparser: wins the tie.
    assert chains.offer("b", 5, 0.80) == 2
    assert chains.holder() == (2, "b", "5") and chains.has_model("b", 5)
    # Better val_acc wins even when denser.
    assert chains.offer("a", 1, 0.81) == 3
    assert chains.holder() == (3, "a", "1")

    version = registry.current_best(chains.client, NAME)
    assert version.run_id == chains.level_ids["a", 1] and version.tags["dense_run_id"] == chains.dense_id
    assert (version.tags["val_acc"], version.tags["sparsity"]) == ("0.810000", "0.200000")
