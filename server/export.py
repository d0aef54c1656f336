"""``fedguard export RUN_DIR``: the final global model as TorchScript or ONNX, with the
normalization training used baked in, checked against the PyTorch model on the test split,
and a model card whose privacy section comes from the audited ledger.

A private run whose audit fails is refused unless the caller says ``allow_unaudited`` (the
card then opens with that fact): a served model inherits the trust of its privacy record.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedguard.clients.datasets import CLASS_NAMES, DatasetError, LocalDataError, Normalization, feature_names, raw_test_split
from fedguard.clients.models import count_parameters
from fedguard.clients.own_files import raw_own_examples
from fedguard.conf.contract import ContractError, declared_contract_of
from fedguard.conf.schema import CONTRACT_DATASETS
from fedguard.conf.run_config import config_from_yaml
from fedguard.server.checkpoint import CHECKPOINT_DIR, FINAL_NAME, load_global_model, read_checkpoint
from fedguard.server.model_card import DataContract, ExportCheck, ModelCard, headline
from fedguard.server.privacy_card import privacy_section

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
# Exported and eager models run the same float32 ops; only op order may differ (ONNX Runtime).
LOGIT_TOLERANCE = 1e-4
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(RuntimeError):
    """The run cannot be exported; the message says why and what to do."""


class ExportRefused(ExportError):
    """The run's privacy audit failed and ``allow_unaudited`` was not given."""


class NormalizedModel(nn.Module):
    """Raw inputs in, logits out: ``model((x * scale - mean) / std)``, so callers never
    reimplement the training-time normalization (and cannot get it subtly wrong)."""

    def __init__(self, model: nn.Module, norm: Normalization, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        stat_shape = (1, *input_shape) if norm.per_feature else (1,) * (len(input_shape) + 1)
        self.register_buffer("scale", torch.tensor(norm.scale, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).reshape(stat_shape))
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).reshape(stat_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x * self.scale - self.mean) / self.std)


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    model_path: Path
    card: ModelCard


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_model(wrapped: nn.Module, fmt: str, example: torch.Tensor, path: Path) -> None:
    if fmt == "torchscript":
        with warnings.catch_warnings():  # deprecated since torch 2.10 but still the format `torch.jit.load` reads
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=DeprecationWarning)
            torch.jit.save(torch.jit.trace(wrapped, example), str(path))
        return
    # torch.export-based exporter (the legacy TorchScript-based one is deprecated); batch is dynamic.
    # Its registry warns about every torchvision op it skips and torch.export about pytree internals:
    # noise for a user, whose check is the comparison with the PyTorch model that follows.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                wrapped, (example,), str(path), input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
            )
    finally:
        exporter_log.setLevel(level)


def load_exported(path: Path, fmt: str):
    """A callable numpy float32 batch -> numpy logits, for the check and for ``fedguard serve``."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

        return run
    import onnxruntime  # noqa: PLC0415 - optional extra, checked before export

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0]


def _contract(input_shape: tuple[int, ...], num_classes: int, norm: Normalization,
              names: tuple[str, ...] | None, classes: tuple[str, ...] | None) -> DataContract:
    classes = classes or tuple(str(i) for i in range(num_classes))
    return DataContract(
        kind="image" if len(input_shape) == 3 else "tabular",
        input_shape=input_shape,
        classes=tuple(classes),
        feature_names=names,
        raw_range=norm.raw_range,
        preprocessing={"formula": "(x * scale - mean) / std", "scale": norm.scale, "mean": list(norm.mean),
                       "std": list(norm.std), "statistics": "training split only",
                       "per": "feature" if norm.per_feature else "all values"},
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} cannot be read ({err}): is this a finished fedguard run directory?") from err


def _check_data(cfg: DictConfig, data: Path | None) -> None:
    if cfg.dataset.name in CONTRACT_DATASETS and data is None:
        raise ExportError(f"dataset={cfg.dataset.name} trained on the sites' own files, so there is no shared test "
                          "split: check the exported model on a site's own files with --data PATH")
    if cfg.dataset.name not in CONTRACT_DATASETS and data is not None:
        raise ExportError(f"--data is for runs over sites' own files (dataset=tabular / images); this run used "
                          f"dataset={cfg.dataset.name}, whose test split the check uses")


def _check_split(cfg: DictConfig, data: Path | None):
    """``(raw inputs, labels, normalization, input names, class names, where from)`` for the export check."""
    if data is None:
        raw_x, test_y, norm = raw_test_split(cfg.dataset, int(cfg.seed))
        classes = CLASS_NAMES.get(cfg.dataset.name)
        return raw_x, test_y, norm, feature_names(cfg.dataset), classes, f"the central test split of {cfg.dataset.name}"
    try:
        raw_x, labels, norm, names = raw_own_examples(cfg.dataset, str(data))
    except (LocalDataError, DatasetError, ContractError) as err:
        raise ExportError(f"--data {data}: {err}") from None
    classes = declared_contract_of(cfg.dataset).classes
    return raw_x, labels, norm, names or None, classes, f"this site's own files {data}"


def export_run(run_dir: Path | str, fmt: str, out_dir: Path | str, *, allow_unaudited: bool = False,
               data: Path | str | None = None) -> ExportResult:
    """Export ``RUN_DIR/checkpoints/final.pt``, checked on the run's test split or, for a run over
    sites' own files, on ``data`` (a site's files under the run's contract); raise ExportRefused
    when the audit fails."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    data = Path(data) if data is not None else None
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "onnx" and (missing := missing_onnx_packages()):
        raise ExportError(f"--format onnx needs the package(s) {', '.join(missing)}: pip install 'fedguard[serve]'")
    checkpoint_path = run_dir / CHECKPOINT_DIR / FINAL_NAME
    payload = read_checkpoint(checkpoint_path)
    cfg = config_from_yaml(payload["config_yaml"])
    _check_data(cfg, data)
    summary = _read_json(run_dir / "summary.json")

    privacy = privacy_section(run_dir, cfg)  # audits the ledger when the run was private
    if privacy.audit is not None and not privacy.audit.passed:
        if not allow_unaudited:
            raise ExportRefused(f"refusing to export {run_dir}: privacy audit {privacy.audit.verdict} "
                                "(`fedguard audit RUN_DIR` says why; --allow-unaudited exports anyway, marked so)")
        logger.warning("exporting %s although its audit failed (--allow-unaudited)", run_dir)

    model = load_global_model(checkpoint_path)
    input_shape, num_classes = tuple(int(v) for v in payload["input_shape"]), int(payload["num_classes"])
    raw_x, test_y, norm, names, classes, source = _check_split(cfg, data)
    wrapped = NormalizedModel(model, norm, input_shape).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILES[fmt]
    with torch.inference_mode():
        reference = model(torch.from_numpy(norm.apply(raw_x))).numpy()
    _write_model(wrapped, fmt, torch.from_numpy(raw_x[:2].astype(np.float32)), model_path)
    exported = load_exported(model_path, fmt)(raw_x.astype(np.float32))
    diff = float(np.max(np.abs(exported - reference)))
    if not diff <= LOGIT_TOLERANCE:
        raise ExportError(f"exported model differs from the PyTorch model by {diff:.3g} > {LOGIT_TOLERANCE:g} on the test split")
    check = ExportCheck(format=fmt, file=model_path.name, sha256=_sha256(model_path), test_examples=len(raw_x),
                        max_abs_diff_logits=diff, tolerance=LOGIT_TOLERANCE,
                        exported_test_accuracy=float(np.mean(exported.argmax(axis=1) == test_y)))
    final = summary.get("final", {})
    card = ModelCard(
        headline=headline(privacy),
        task=f"{num_classes}-class classification of {cfg.dataset.name}",
        contract=_contract(input_shape, num_classes, norm, names, classes),
        architecture=f"{cfg.model.name}: {model}".replace("\n", " "),
        parameters=count_parameters(model),
        training={"model": OmegaConf.to_container(cfg.model), "strategy": cfg.strategy.name,
                  "rounds": summary.get("rounds"), "clients": summary.get("clients"), "partition": cfg.partition.name,
                  "seed": int(cfg.seed), "checkpoint_round": int(payload["round"])},
        metrics={"test_accuracy": final.get("accuracy"), "test_loss": final.get("loss"),
                 "measured_on": f"the central test split of {cfg.dataset.name} ({len(raw_x)} examples), "
                                "by the server after the last round (summary.json)"}
        if data is None else {"accuracy_on_site_files": check.exported_test_accuracy,
                              "measured_on": f"{source} ({len(raw_x)} examples, all of them: training rows "
                                             "included), by fedguard export"},
        privacy=privacy,
        export=check,
        source_run=str(run_dir.resolve()),
        warnings=("TorchScript is deprecated in torch >= 2.10; prefer --format onnx for new deployments",)
        if fmt == "torchscript" else (),
    )
    card.write(out_dir)
    logger.info("exported %s to %s (max |diff| %.3g)", run_dir, model_path, diff)
    return ExportResult(out_dir=out_dir, model_path=model_path, card=card)
