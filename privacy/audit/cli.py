"""``fedguard audit PATH``: verify a privacy ledger and recompute its epsilons.

Exit codes: 0 all good; 1 the audit could not run; 2 bad command line; 3 integrity
(tampering, truncation, missing/unknown/bad signature); 4 a budget exceeded; 5 a
reported epsilon below the recomputation. Integrity outranks mismatch outranks budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console

from privacy.audit.recompute import DEFAULT_TOLERANCE
from privacy.audit.runner import AUDIT_DIR, AuditSetupError, ExitCode, run_audit

logger = logging.getLogger(__name__)

PIPED_CONSOLE_WIDTH = 140


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedguard audit",
        description="Verify a fedguard privacy ledger (hash chain, signatures) and recompute every epsilon "
        "with Google's dp_accounting. " + __doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    parser.add_argument("path", type=Path, help="run directory (holding ledger.jsonl) or a ledger file")
    parser.add_argument(
        "--keys",
        type=Path,
        default=None,
        help="key registry: a directory of server.pub / client-<id>.pub files, or a JSON "
        '{"keys": [{"party": ..., "public_key": ...}]}. Default: PATH/keys (weaker: ships with the ledger)',
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"relative excess of the recomputed over the reported epsilon flagged as mismatch (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument("--out", type=Path, default=None, help="where report.md and plots go (default RUN_DIR/audit)")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    parser.add_argument(
        "--no-pld", action="store_true", help="skip the informational PLD column for RDP runs (faster on huge ledgers)"
    )
    # Reserved: the empirical (membership-inference) audit will hang off this flag.
    parser.add_argument("--empirical", action="store_true", help="empirical privacy test (not implemented yet)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.empirical:
        print("fedguard audit: --empirical is not implemented yet", file=sys.stderr)
        return int(ExitCode.USAGE)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_audit(args.path, args.keys, args.tolerance, with_pld=not args.no_pld)
    except AuditSetupError as err:
        print(f"fedguard audit: {err}", file=sys.stderr)
        return int(ExitCode.ERROR)
    written: list[Path] = []
    if not args.no_report:
        from privacy.audit.report import write_outputs  # matplotlib only when needed

        out_dir = args.out or (result.run_dir or result.ledger_path.parent) / AUDIT_DIR
        written = write_outputs(result, out_dir)
    if args.json:
        payload = result.as_dict() | {"written": [str(path) for path in written]}
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        from privacy.audit.report import print_table

        console = Console()
        if not console.is_terminal:
            console = Console(width=PIPED_CONSOLE_WIDTH)  # logs and CI: do not wrap the table at 80
        print_table(result, console)
        for path in written:
            console.print(f"wrote {path}")
    return int(result.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
