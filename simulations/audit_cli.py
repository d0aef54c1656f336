"""``fedguard audit PATH``: verify a privacy ledger and recompute its epsilons.

Exit codes: 0 all good; 1 the audit could not run; 2 bad command line; 3 integrity
(tampering, truncation, missing/unknown/bad signature); 4 a budget exceeded; 5 a
reported epsilon below the recomputation. Integrity outranks mismatch outranks budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from fedguard.privacy.audit.empirical import DEFAULT_CANARIES
from fedguard.privacy.audit.recompute import DEFAULT_TOLERANCE
from fedguard.privacy.audit.runner import AUDIT_DIR, AuditSetupError, ExitCode, run_audit

logger = logging.getLogger(__name__)

PIPED_CONSOLE_WIDTH = 140
DEFAULT_EMPIRICAL_EPSILONS = (1.0, 3.0, 8.0)
EMPIRICAL_FILE = "empirical.json"
# One client trains once on its whole training split: the accountant plans exactly that.
EMPIRICAL_BASE_OVERRIDES = (
    "simulation.num_clients=1", "simulation.rounds=1", "simulation.min_clients_per_round=1",
    "train.local_epochs=30", "progress=false",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedguard audit",
        description="Verify a fedguard privacy ledger (hash chain, signatures) and recompute every epsilon "
        "with Google's dp_accounting. " + __doc__.split("\n\n", 1)[1].replace("\n", " "),
    )
    parser.add_argument("path", type=Path, nargs="?", help="run directory (holding ledger.jsonl) or a ledger file")
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
    empirical = parser.add_argument_group(
        "empirical audit (--empirical; no PATH)",
        "train one client with canaries, non-privately and at each --epsilons, and report the membership-inference "
        "lower bound on epsilon beside the claim (Steinke, Nasr & Jagielski 2023); exit 6 if a bound exceeds its claim",
    )
    empirical.add_argument("--empirical", action="store_true", help="run the empirical audit instead of a ledger audit")
    empirical.add_argument("--epsilons", type=float, nargs="+", default=list(DEFAULT_EMPIRICAL_EPSILONS))
    empirical.add_argument("--canaries", type=int, default=DEFAULT_CANARIES)
    empirical.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="a Hydra override for the audited training (repeat), e.g. --set dataset=fashion_mnist")
    empirical.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[],
                           metavar="KEY=VALUE",
                           help="a Hydra override for the non-private baseline only (repeat): a preset's DP step "
                           "size can diverge unclipped (dp_images: --baseline-set train.learning_rate=0.1), and a "
                           "diverged baseline would understate the attack's strength")
    return parser


def empirical_runs(base: list[str], baseline_overrides: list[str], epsilons: list[float]) -> list[list[str]]:
    """The Hydra overrides of each audited training: the non-private baseline (with its own
    overrides last, so they win), then one private run per claimed epsilon (without them)."""
    runs = [[*base, *baseline_overrides]]
    runs += [[*base, "privacy=sample_dp", f"privacy.target_epsilon={epsilon}"] for epsilon in epsilons]
    return runs


def run_empirical(args: argparse.Namespace) -> int:
    from fedguard.simulations.empirical_audit import run_empirical_audit

    base = [*EMPIRICAL_BASE_OVERRIDES, *args.overrides]
    started = time.monotonic()
    audits = [run_empirical_audit(overrides, canaries=args.canaries)
              for overrides in empirical_runs(base, args.baseline_overrides, args.epsilons)]
    rows = [audit.as_dict() for audit in audits]
    out_dir = args.out or Path(AUDIT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
                "cpus": os.cpu_count(), "wall_seconds": round(time.monotonic() - started, 1),
                "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()]}
    (out_dir / EMPIRICAL_FILE).write_text(
        json.dumps({"measured": measured, "overrides": base, "baseline_overrides": args.baseline_overrides,
                    "audits": rows}, indent=2) + "\n"
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            claim = "none (non-private)" if row["claimed_epsilon"] is None else f"{row['claimed_epsilon']:.3f}"
            print(f"claimed epsilon {claim:>20}  empirical lower bound {row['epsilon_lower_bound']:.3f}  "
                  f"({row['correct']}/{row['guesses']} guesses right, {row['confidence']:.0%} confidence)"
                  f"{'  VIOLATION' if row['violates_claim'] else ''}")
        print(f"wrote {out_dir / EMPIRICAL_FILE}")
    return int(ExitCode.EMPIRICAL_VIOLATION) if any(a.violates_claim for a in audits) else int(ExitCode.OK)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.empirical:
        return run_empirical(args)
    if args.path is None:
        parser.error("PATH is required (or --empirical)")
    try:
        result = run_audit(args.path, args.keys, args.tolerance, with_pld=not args.no_pld)
    except AuditSetupError as err:
        print(f"fedguard audit: {err}", file=sys.stderr)
        return int(ExitCode.ERROR)
    written: list[Path] = []
    if not args.no_report:
        from fedguard.simulations.audit_report import write_outputs  # matplotlib only when needed

        out_dir = args.out or (result.run_dir or result.ledger_path.parent) / AUDIT_DIR
        written = write_outputs(result, out_dir)
    if args.json:
        payload = result.as_dict() | {"written": [str(path) for path in written]}
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        from fedguard.simulations.audit_report import print_table

        console = Console()
        if not console.is_terminal:
            console = Console(width=PIPED_CONSOLE_WIDTH)  # logs and CI: do not wrap the table at 80
        print_table(result, console)
        for path in written:
            console.print(f"wrote {path}")
    return int(result.exit_code)


if __name__ == "__main__":
    raise SystemExit(main())
