"""The step table: every step's config class, config hash, run function, MLflow step tag and sweep stage.

The CLI, the Ray trainable, the sweep's "already finished?" lookup, the chain-config builder and the
MLproject checks all dispatch through `STEPS`; adding a step is one entry here (plus its run module).
Importing this module is cheap (no torch, no mlflow): run functions import their module when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdd import config


@dataclass(frozen=True)
class Step:
    name: str  # the CLI command and MLproject entry point
    stage: str  # the study-file stage whose trials run this step
    config_class: type
    help: str
    # config_hash(config, teacher_run_id): the `sdd.config_hash` of the run the step would make
    hash_config: Callable[[Any, str | None], str]
    # run(config, tracking_uri=, experiment=, parent_run_id=, extra_tags=) -> dense.StepResult
    run: Callable[..., Any]
    # covers(config, finished run of its hash) -> whether that run holds all the config asks for; a
    # finished run that does not (a chain asked for more levels) is continued by the step, not reused
    covers: Callable[[Any, Any], bool] = lambda cfg, run: True
    # run_pack(configs, tracking_uri=, experiment=, parent_run_id=, extra_tags=[one dict per config]) ->
    # [dense.StepResult]: configs that differ only in their seed (chains: and their dense parent, of that
    # seed), trained as one seed pack (sdd.packs); None: the step has no packs
    run_pack: Callable[..., Any] | None = None

    @property
    def tag(self) -> str:
        """The `sdd.step` tag of the runs this step makes."""
        return self.name

    def config_hash(self, cfg: Any, teacher_run: str | None = None) -> str:
        return self.hash_config(cfg, teacher_run)

    def from_flat(self, values: dict[str, Any]) -> Any:
        return config.from_flat_dict(self.config_class, values)


def chain_covers(cfg: config.PruneConfig, run: Any) -> bool:
    """Whether a finished chain run (an MLflow Run) holds every level `cfg` asks for: it ran at least
    `cfg.depth()` levels, or its early stop ended it (the rule does not depend on the depth asked
    for, so a deeper chain would stop at the same level)."""
    if "sdd.early_stop_level" in run.data.tags:
        return True
    return run.data.metrics.get("levels_run", 0.0) >= cfg.depth()


def _run_train(cfg: config.TrainConfig, *, tracking_uri: str | None = None, experiment: str | None = None,
               parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> Any:
    from sdd.dense import run_train

    return run_train(cfg, tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id,
                     extra_tags=extra_tags)


def _run_train_pack(cfgs: list[config.TrainConfig], *, tracking_uri: str | None = None,
                    experiment: str | None = None, parent_run_id: str | None = None,
                    extra_tags: list[dict[str, str]] | None = None) -> Any:
    from sdd.dense import run_train_pack

    return run_train_pack(cfgs, tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id,
                          extra_tags=extra_tags)


def _run_prune(cfg: config.PruneConfig, *, tracking_uri: str | None = None, experiment: str | None = None,
               parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> Any:
    """A chain goes into its dense parent's experiment, nested under that parent: `experiment` and
    `parent_run_id` do not apply."""
    from sdd.chain import run_prune

    return run_prune(cfg, tracking_uri=tracking_uri, extra_tags=extra_tags)


def _run_distill(cfg: config.DistillChainConfig, *, tracking_uri: str | None = None, experiment: str | None = None,
                 parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> Any:
    from sdd.chain import run_prune

    return run_prune(cfg.prune, cfg.distill, tracking_uri=tracking_uri, extra_tags=extra_tags)


def _run_prune_pack(cfgs: list[config.PruneConfig], *, tracking_uri: str | None = None,
                    experiment: str | None = None, parent_run_id: str | None = None,
                    extra_tags: list[dict[str, str]] | None = None) -> Any:
    from sdd.chain import run_prune_pack

    return run_prune_pack(cfgs, tracking_uri=tracking_uri, extra_tags=extra_tags)


def _run_distill_pack(cfgs: list[config.DistillChainConfig], *, tracking_uri: str | None = None,
                      experiment: str | None = None, parent_run_id: str | None = None,
                      extra_tags: list[dict[str, str]] | None = None) -> Any:
    from sdd.chain import run_prune_pack

    distills = {repr(sorted(config.to_flat_dict(cfg.distill).items())) for cfg in cfgs}
    if len(distills) != 1:
        raise ValueError("the chains of a seed pack must distil from the same teacher, alike")
    return run_prune_pack([cfg.prune for cfg in cfgs], cfgs[0].distill, tracking_uri=tracking_uri,
                          extra_tags=extra_tags)


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("train", "dense", config.TrainConfig, "train one dense model (an MLflow run)",
         lambda cfg, teacher: config.train_hash(cfg, teacher), _run_train, run_pack=_run_train_pack),
    Step("prune", "prune", config.PruneConfig,
         "prune a dense run level by level, retraining in between (a chain of MLflow runs)",
         lambda cfg, teacher: config.chain_hash(cfg, cfg.parent, None, None), _run_prune, chain_covers,
         run_pack=_run_prune_pack),
    Step("distill", "distill", config.DistillChainConfig,
         "a pruning chain whose retraining distils from a teacher model",
         lambda cfg, teacher: config.chain_hash(cfg.prune, cfg.prune.parent, cfg.distill, teacher), _run_distill,
         lambda cfg, run: chain_covers(cfg.prune, run), run_pack=_run_distill_pack),
)}

STEP_OF_STAGE: dict[str, Step] = {step.stage: step for step in STEPS.values()}
