"""The ``fedguard`` command: one entry point, one subcommand per job.

Hydra overrides after the subcommand pass straight through, e.g.
``fedguard simulate dataset=fashion_mnist model=cnn`` or ``fedguard simulate -m strategy=fedavg,fedprox``.
"""

from __future__ import annotations

import sys

USAGE = """usage: fedguard <command> [hydra overrides or options]

commands:
  simulate   run a federated simulation (Flower simulation engine, Ray) from conf/
  bench      benchmarks that print figures and write JSON (fedguard bench --help)

Run `fedguard simulate --help` for Hydra's help and the config groups.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "simulate":
        import conf  # registers the schema  # noqa: F401
        from simulations.simulate import simulate

        sys.argv = ["fedguard simulate", *rest]
        simulate()
        return 0
    if command == "bench":
        from simulations.bench import main as bench_main

        return bench_main(rest)
    print(f"fedguard: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
