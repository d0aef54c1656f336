"""``fedguard export RUN_DIR --format torchscript|onnx --out DIR [--data PATH] [--allow-unaudited]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedguard.server.checkpoint import CheckpointError
from fedguard.server.export import FORMATS, ExportError, ExportRefused, export_run

logger = logging.getLogger(__name__)


def export_main(argv: list[str]) -> int:
    """Exit 0 on success, 3 when the audit refuses the export, 1 on any other error; one message each."""
    parser = argparse.ArgumentParser(prog="fedguard export",
                                     description="Export a run's final global model with its model card.")
    parser.add_argument("run_dir", type=Path, help="a finished run directory (holds checkpoints/final.pt)")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--out", type=Path, required=True, help="directory for the model and its card")
    parser.add_argument("--data", type=Path,
                        help="a run over sites' own files (dataset=tabular / images) has no shared test split: check "
                             "the exported model on this site's own files (read under the run's contract)")
    parser.add_argument("--allow-unaudited", action="store_true",
                        help="export even if the privacy audit fails (the card's first line then says so)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        result = export_run(args.run_dir, args.format, args.out, allow_unaudited=args.allow_unaudited, data=args.data)
    except ExportRefused as err:
        print(f"fedguard export: {err}")
        return 3
    except (ExportError, CheckpointError, OSError) as err:
        print(f"fedguard export: {err}")
        return 1
    card = result.card
    print(card.headline)
    print(f"model: {result.model_path}  card: {args.out / 'model_card.json'}, {args.out / 'MODEL_CARD.md'}")
    print(f"check: {card.export.test_examples} {'examples of ' + str(args.data) if args.data else 'test examples'}, max |logit diff| vs PyTorch "
          f"{card.export.max_abs_diff_logits:.3g} (tolerance {card.export.tolerance:g}), "
          f"exported accuracy {card.export.exported_test_accuracy:.4f}")
    return 0
