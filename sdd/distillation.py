"""Knowledge distillation: the Hinton/DSD2 loss and resolving a teacher from the MLflow store."""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass

import mlflow
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from sdd import tracking
from sdd.errors import UsageError
from sdd.measures import predict
from sdd.training import LossFn

log = logging.getLogger(__name__)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), batch mean.

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    """
    ce = F.cross_entropy(student, y)
    if alpha == 0.0:
        return ce
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


@dataclass
class Teacher:
    model: nn.Module
    uri: str
    run_id: str


_MODELS_ALIAS = re.compile(r"^models:/([^/@]+)@([^/]+)$")
_MODELS_VERSION = re.compile(r"^models:/([^/@]+)/(\d+)$")


@dataclass(frozen=True)
class TeacherRef:
    uri: str  # as given (normalised)
    run_id: str
    artifact_uri: str  # where the MLflow model lives, e.g. runs:/ID/model


def resolve_teacher(client: MlflowClient, ref: str) -> TeacherRef:
    """Resolve any accepted reference form against `client`'s store (not MLflow's global URI)."""
    ref = ref.strip()
    version = None
    try:
        if m := _MODELS_ALIAS.match(ref):
            version = client.get_model_version_by_alias(m.group(1), m.group(2))
        elif m := _MODELS_VERSION.match(ref):
            version = client.get_model_version(m.group(1), m.group(2))
    except MlflowException:
        raise UsageError(f"teacher {ref}: no such registered model version or alias") from None
    if version is not None:
        return TeacherRef(ref, version.run_id, version.source)
    if ref.startswith("models:/"):
        raise UsageError(f"teacher {ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    run_id = tracking.parse_run_ref(ref)
    tracking.get_run(client, run_id)
    parts = ref[len("runs:/"):].strip("/").split("/", 1) if ref.startswith("runs:/") else [run_id]
    path = parts[1] if len(parts) > 1 else "model"
    return TeacherRef(ref, run_id, f"runs:/{run_id}/{path}")


def _download_model(client: MlflowClient, artifact_uri: str, dst: str) -> str:
    if artifact_uri.startswith("runs:/"):
        run_id, _, path = artifact_uri[len("runs:/"):].partition("/")
        return client.download_artifacts(run_id, path, dst)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst,
                                               tracking_uri=client.tracking_uri)


def load_teacher(client: MlflowClient, ref: str, input_shape: tuple[int, ...], num_classes: int,
                 device: torch.device) -> Teacher:
    """Load and check a teacher; any problem is a UsageError raised before training starts."""
    resolved = resolve_teacher(client, ref)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = mlflow.pytorch.load_model(_download_model(client, resolved.artifact_uri, tmp),
                                              map_location=device)
    except Exception as err:  # MLflow raises many kinds here; all mean "not a loadable model"
        raise UsageError(f"teacher {ref}: cannot load a PyTorch model from {resolved.artifact_uri} "
                         f"({type(err).__name__})") from None
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape), device=device))
    except Exception:
        raise UsageError(f"teacher {ref}: does not accept inputs of shape {tuple(input_shape)}") from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise UsageError(f"teacher {ref}: outputs {out.shape[1]} classes, the dataset has {num_classes}")
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, resolved.uri, resolved.run_id)


def distillation_loss(teacher: Teacher, x_train: torch.Tensor, alpha: float, temperature: float,
                      augmented: bool) -> LossFn:
    """A loss for `training.fit`. Without augmentation the teacher's logits are computed once for
    the whole training set and indexed per batch; with augmentation the teacher sees each batch."""
    if augmented:
        def loss(logits, y, x, _idx):
            with torch.no_grad():
                t = teacher.model(x).float()
            return kd_loss(logits, t, y, alpha, temperature)
        return loss
    cached = predict(teacher.model, x_train)

    def loss_cached(logits, y, _x, idx):
        t = cached if idx is None else cached[idx]
        return kd_loss(logits, t, y, alpha, temperature)
    return loss_cached
