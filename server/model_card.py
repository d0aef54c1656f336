"""The model card an export writes next to the model: what the model takes, what it was
trained on, how well it does, and which privacy guarantee holds against whom.

Every epsilon printed here names its observer (DESIGN.md: a number without its observer is
a defect). The card is built from the run's own records (config, summary.json, the ledger and
the audit of it), never from what the caller asserts, and is written as JSON (for machines,
served at ``GET /model-card``) and Markdown (for people).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CARD_FORMAT = "fedguard-model-card/1"
CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"

UNAUDITED_BANNER = "UNAUDITED EXPORT: the run's privacy audit failed; its privacy figures cannot be trusted."
NO_DP_BANNER = "No differential privacy: this model may reveal individual training records."
SAMPLE_OBSERVER = "per training record, against anyone who sees the site's updates (server, other sites, model users)"
CLIENT_OBSERVER = "per site (all of its data), against users of the released models and other sites (who do not know the cohorts)"


@dataclass(frozen=True)
class DataContract:
    """What ``POST /predict`` accepts: raw inputs (before the normalization the model applies)."""

    kind: str  # "image" or "tabular"
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    raw_range: tuple[float, float] | None  # images: pixel values the model expects (PNG maps 0..255 onto it)
    preprocessing: dict[str, Any]  # baked into the exported module; stated so others can reproduce it

    @property
    def num_features(self) -> int:
        count = 1
        for size in self.input_shape:
            count *= size
        return count


@dataclass(frozen=True)
class Guarantee:
    level: str  # "sample" or "client"
    epsilon: float  # the max over sites for sample level
    epsilon_mean: float | None
    delta: float
    observer: str
    accountant: str
    adjacency: str


@dataclass(frozen=True)
class AuditSection:
    verdict: str
    passed: bool
    exit_code: int
    ledger_id: str | None
    ledger_head_sha256: str | None
    entries_verified: int
    key_ids: dict[str, str]  # key id -> party it was checked against
    keys_source: str
    keys_from_run_dir: bool


@dataclass(frozen=True)
class PrivacySection:
    mode: str  # none | sample_dp | client_dp | sample_and_client_dp
    statement: str
    guarantees: tuple[Guarantee, ...]
    secure_aggregation: bool
    audit: AuditSection | None  # None: no DP, nothing to audit


@dataclass(frozen=True)
class ExportCheck:
    format: str
    file: str
    sha256: str
    test_examples: int
    max_abs_diff_logits: float
    tolerance: float
    exported_test_accuracy: float


@dataclass(frozen=True)
class ModelCard:
    headline: str
    task: str
    contract: DataContract
    architecture: str
    parameters: int
    training: dict[str, Any]
    metrics: dict[str, Any]
    privacy: PrivacySection
    export: ExportCheck
    source_run: str
    format: str = CARD_FORMAT
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / CARD_JSON, out_dir / CARD_MARKDOWN
        json_path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
        md_path.write_text(render_markdown(self), encoding="utf-8")
        return json_path, md_path


def headline(privacy: PrivacySection) -> str:
    """The card's first line: the one fact a reader must not miss."""
    if privacy.audit is not None and not privacy.audit.passed:
        return UNAUDITED_BANNER
    if not privacy.guarantees:
        return NO_DP_BANNER
    parts = [f"epsilon {g.epsilon:.3g} (delta {g.delta:g}) {g.observer}" for g in privacy.guarantees]
    return "Differentially private model: " + "; ".join(parts) + ". Audit: PASS."


def render_markdown(card: ModelCard) -> str:
    c, p, e = card.contract, card.privacy, card.export
    lines = [
        card.headline,
        "",
        f"# Model card: {card.task}",
        "",
        f"Exported from run `{card.source_run}` ({card.format}).",
        "",
        "## Data contract",
        f"- kind: {c.kind}; input shape per example: {list(c.input_shape)} ({c.num_features} values)",
        f"- classes ({len(c.classes)}): {', '.join(c.classes)}",
    ]
    if c.feature_names:
        lines.append(f"- features: {', '.join(c.feature_names)}")
    if c.raw_range:
        lines.append(f"- raw pixel range: {c.raw_range[0]:g}..{c.raw_range[1]:g} (PNG 0..255 is mapped onto it)")
    lines += [f"- preprocessing (inside the exported model): `{json.dumps(c.preprocessing)}`", "",
              "## Model", f"- architecture: {card.architecture}", f"- parameters: {card.parameters:,}",
              f"- training config: `{json.dumps(card.training)}`", "",
              "## Metrics", *[f"- {k}: {v}" for k, v in card.metrics.items()], "",
              "## Privacy", f"- mode: {p.mode}", f"- {p.statement}",
              f"- secure aggregation: {'on' if p.secure_aggregation else 'off'}"]
    for g in p.guarantees:
        mean = f", mean over sites {g.epsilon_mean:.4g}" if g.epsilon_mean is not None else ""
        lines.append(f"- {g.level}-level: epsilon {g.epsilon:.4g}{mean}, delta {g.delta:g}, {g.observer}; "
                     f"accountant {g.accountant}; adjacency: {g.adjacency}")
    if p.audit is None:
        lines.append("- audit: not applicable (no ledger: nothing private was spent)")
    else:
        a = p.audit
        lines += [f"- audit verdict: {a.verdict}", f"- ledger {a.ledger_id}, head sha256 {a.ledger_head_sha256}, "
                  f"{a.entries_verified} entries verified",
                  f"- checked with keys from {a.keys_source}"
                  + (" (shipped with the run: proves internal consistency only)" if a.keys_from_run_dir else ""),
                  *[f"  - {kid}: {party}" for kid, party in sorted(a.key_ids.items())]]
    lines += ["", "## Export check", f"- format {e.format}, file `{e.file}` (sha256 {e.sha256})",
              f"- exported vs PyTorch model on {e.test_examples} test examples: max |logit difference| "
              f"{e.max_abs_diff_logits:.3g} (tolerance {e.tolerance:g}); exported accuracy {e.exported_test_accuracy:.4f}"]
    if card.warnings:
        lines += ["", "## Warnings", *[f"- {w}" for w in card.warnings]]
    return "\n".join(lines) + "\n"


def load_card(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / CARD_JSON).read_text(encoding="utf-8"))
