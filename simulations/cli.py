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

commands:
  simulate   run a federated simulation (Flower simulation engine, Ray) from conf/
  bench      benchmarks that print figures and write JSON (fedguard bench --help)
  audit      verify a run's privacy ledger and recompute its epsilons (fedguard audit --help)
  export     export a run's final model (TorchScript/ONNX) with its privacy model card
  serve      serve an exported model over HTTP (POST /predict, GET /model-card, GET /health)

separate sites (Flower deployment engine; TLS and site keys always on):
  certs      create the federation's CA and the server's TLS certificate
  keys       create a client site's authentication key pair
  server     start the SuperLink (server site)
  register   register a client site's public key with the SuperLink
  client     join the federation as a site (SuperNode)
  run        submit a run to the SuperLink (same Hydra overrides as simulate)

Run `fedguard simulate --help` for Hydra's help and the config groups.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "simulate":
        import fedguard.conf  # registers the schema  # noqa: F401
        from fedguard.simulations.simulate import simulate

        sys.argv = ["fedguard simulate", *rest]
        simulate()
        return 0
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
