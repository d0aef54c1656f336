"""The ``fedguard`` command: one entry point, one subcommand per job.

Hydra overrides after the subcommand pass straight through, e.g.
``fedguard simulate dataset=fashion_mnist model=cnn`` or ``fedguard simulate -m strategy=fedavg,fedprox``.
"""

from __future__ import annotations

import importlib
import sys

# Separate-sites commands: name -> (module, function taking the remaining argv).
DEPLOYMENT_COMMANDS = {
    "certs": ("fedguard.clients.deployment.key_commands", "certs_main"),
    "keys": ("fedguard.clients.deployment.key_commands", "keys_main"),
    "roster": ("fedguard.clients.deployment.roster_commands", "roster_main"),
    "publisher": ("fedguard.clients.deployment.publisher_commands", "publisher_main"),
    "server": ("fedguard.server.launch", "server_main"),
    "register": ("fedguard.server.launch", "register_main"),
    "client": ("fedguard.clients.launch", "client_main"),
    "run": ("fedguard.server.submit", "run_main"),
}
# From a trained run to a served model: name -> (module, function taking the remaining argv).
MODEL_COMMANDS = {
    "export": ("fedguard.server.export_cli", "export_main"),
    "serve": ("fedguard.server.serve", "serve_main"),
}

USAGE = """usage: fedguard <command> [hydra overrides or options]
       fedguard --version

commands:
  simulate   run a federated simulation (Flower simulation engine, Ray) from conf/
  bench      benchmarks that print figures and write JSON (fedguard bench --help)
  audit      verify a run's privacy ledger and recompute its epsilons (fedguard audit --help)
  export     export a run's final model (TorchScript/ONNX) with its privacy model card
  serve      serve an exported model over HTTP (POST /predict, GET /model-card, GET /health)

separate sites (Flower deployment engine; TLS and site keys always on):
  certs      create the federation's CA and the server's TLS certificate
  keys       create a client site's authentication key pair
  roster     a site's secure-aggregation identity key; the roster of them all every site pins
  publisher  the app publisher's signing key and signature (sites run only signed apps)
  server     start the SuperLink on loopback behind nginx (server site; sites see only the Fleet API)
  register   register a client site's public key with the SuperLink
  client     join the federation as a site (SuperNode)
  run        submit a run to the SuperLink (same Hydra overrides as simulate)

Run `fedguard simulate --help` for Hydra's help and the config groups;
`fedguard simulate --check [overrides]` runs every check without training.
"""


def version_text() -> str:
    """fedguard's version and those of the libraries whose behaviour it depends on (bug reports)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"fedguard {of('fedguard')} (flwr {of('flwr')}, opacus {of('opacus')}, torch {of('torch')})"


def simulate_main(argv: list[str]) -> int:
    """`fedguard simulate`: check everything checkable, then hand the overrides to Hydra's job.

    The checks run before ``@hydra.main`` so that a mistake leaves no ``outputs/<time>/``
    folder and never starts Ray; a sweep (-m) is checked per job inside the job instead.
    """
    import fedguard.conf  # registers the schema  # noqa: F401
    from fedguard.conf import ConfigError
    from fedguard.simulations.preflight import fail, preflight, resume_overrides, split_args

    args = split_args(argv)
    hydra_argv = args.hydra_argv
    if not args.multirun and not args.other_job:
        try:
            cfg = preflight(args)
        except ConfigError as err:
            return fail(f"bad config: {err}")
        if args.check_only:
            print("fedguard: config OK; the checks before training passed (nothing was run)")
            return 0
        hydra_argv = [*hydra_argv, *resume_overrides(args, cfg)]
    elif args.check_only:
        return fail("--check takes a single run's overrides (no -m sweep, no other Hydra option)")
    from fedguard.simulations.simulate import simulate

    sys.argv = ["fedguard simulate", *hydra_argv]
    simulate()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command in ("-V", "--version"):
        print(version_text())
        return 0
    if command == "simulate":
        try:
            return simulate_main(rest)
        except KeyboardInterrupt:  # before the engine started (the run itself handles its own)
            print("fedguard: interrupted before the engine started; nothing was run", file=sys.stderr)
            return 130
    if command == "bench":
        from fedguard.simulations.bench import main as bench_main

        return bench_main(rest)
    if command == "audit":
        from fedguard.simulations.audit_cli import main as audit_main

        return audit_main(rest)
    if command in DEPLOYMENT_COMMANDS or command in MODEL_COMMANDS:
        module_name, function_name = {**DEPLOYMENT_COMMANDS, **MODEL_COMMANDS}[command]
        return getattr(importlib.import_module(module_name), function_name)(rest)
    print(f"fedguard: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
