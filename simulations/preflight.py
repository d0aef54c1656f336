"""Checks `fedguard simulate` runs before Hydra makes a run directory and before Ray starts.

Why: the simulation engine takes many seconds to start and turns a user's mistake into a
long traceback, after Hydra has already made an empty ``outputs/<time>/`` folder. Every
mistake found here ends in one line on stderr and exit status 2 instead.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedguard.conf import CONFIG_MODULE, CONFIG_NAME, ConfigError, validate_config

logger = logging.getLogger(__name__)

# Exit status for a user's mistake (as argparse uses), distinct from a crash (1).
USAGE_ERROR = 2
# Hydra options that take a value and still compose fedguard's own config (--cfg job prints it).
_OPTIONS_WITH_VALUE = ("--cfg", "-c", "--package", "-p")
_MULTIRUN = ("-m", "--multirun")


@dataclass
class SimulateArgs:
    """`fedguard simulate`'s command line, split into what fedguard and what Hydra reads."""

    overrides: list[str] = field(default_factory=list)
    hydra_argv: list[str] = field(default_factory=list)  # what goes on to @hydra.main
    check_only: bool = False
    multirun: bool = False
    other_job: bool = False  # --help, --info, another config: leave it all to Hydra


def split_args(argv: Sequence[str]) -> SimulateArgs:
    """Separate fedguard's own ``--check`` and Hydra's options from the overrides."""
    args = SimulateArgs()
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--check":
            args.check_only = True
        elif item in _OPTIONS_WITH_VALUE:
            args.hydra_argv.extend(items[i:i + 2])
            i += 1
        elif item in _MULTIRUN:
            args.multirun = True
            args.hydra_argv.append(item)
        elif item.startswith("-"):
            args.other_job = True  # --help, --info, another config dir...: Hydra's business
            args.hydra_argv.append(item)
        else:
            args.overrides.append(item)
            args.hydra_argv.append(item)
        i += 1
    return args


def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the last ``key=value`` override gives (``+``/``++`` prefixes allowed), or None."""
    found = None
    for override in overrides:
        name, sep, value = override.partition("=")
        if sep and name.lstrip("+") == key:
            found = value
    return found


def _flat_keys(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys = [prefix.rstrip(".")] if prefix else []
        for key, value in node.items():
            keys.extend(_flat_keys(value, f"{prefix}{key}."))
        return keys
    return [prefix.rstrip(".")]


def _composition_error(err: Exception, overrides: Sequence[str]) -> ConfigError:
    """Hydra's composition errors as one line; a misspelled key gets the nearest real key."""
    text = str(err)
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        wrong = match.group(1)
        known = _flat_keys(OmegaConf.to_container(_compose([]), resolve=False))
        groups = ["dataset", "model", "strategy", "partition", "simulation", "privacy", "secure_agg", "deployment"]
        close = difflib.get_close_matches(wrong, [*known, *groups], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; `fedguard simulate --cfg job` lists every key"
        return ConfigError(f"{wrong} is not a config key{hint}")
    text = text.split("Config search path", 1)[0]  # Hydra's search path: noise for a user
    cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else ""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    if cause and cause not in text:
        lines.append(f"({cause})")
    return ConfigError(" ".join(lines) or type(err).__name__)


def _compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def compose_checked(overrides: Sequence[str]) -> DictConfig:
    """Compose the config the job will get and run every config check on it (ConfigError)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise _composition_error(err, overrides) from None
    validate_config(cfg, overrides)
    return cfg


def check_run_dir(cfg: DictConfig, run_dir: Path | None) -> None:
    """Refuse a directory that already holds a run's results, unless resumed or overwritten."""
    from fedguard.server.run_record import existing_results

    if run_dir is None or cfg.resume or cfg.overwrite:
        return
    if found := existing_results(run_dir):
        raise ConfigError(
            f"run directory {run_dir} already holds a run's results ({', '.join(found)}); choose another hydra.run.dir, "
            f"continue that run with resume={run_dir}, or replace its results with overwrite=true"
        )


def check_data(cfg: DictConfig) -> None:
    """The dataset's files exist (ConfigError naming them), without loading them."""
    from fedguard.clients.datasets import DatasetError, check_dataset_files
    from fedguard.conf.schema import CONTRACT_DATASETS

    if cfg.dataset.name in CONTRACT_DATASETS:
        if not cfg.simulation.site_data:
            raise ConfigError(f"dataset={cfg.dataset.name} is each site's own files: a simulation needs "
                              "simulation.site_data=[PATH,...], one file or directory per virtual site")
        for i, path in enumerate(cfg.simulation.site_data):
            if not Path(path).exists():
                raise ConfigError(f"simulation.site_data[{i}]={path}: no such file or directory")
        return
    try:
        check_dataset_files(cfg.dataset)
    except DatasetError as err:
        raise ConfigError(str(err)) from None


def check_before_engine(cfg: DictConfig, run_dir: Path | None) -> None:
    """What can fail before Ray starts: data files, the run directory, the resume point."""
    check_data(cfg)
    check_run_dir(cfg, run_dir)
    if cfg.resume:
        from fedguard.server.app import load_resume_point
        from fedguard.server.checkpoint import CheckpointError

        try:
            load_resume_point(cfg, Path(cfg.resume))
        except CheckpointError as err:
            raise ConfigError(str(err) if str(err).startswith("cannot resume") else f"cannot resume: {err}") from None


def check_resources(cfg: DictConfig, warn: bool = True) -> None:
    """Ray would wait forever for GPUs that do not exist; say so before starting.

    ``warn=False``: only the refusal (the CLI's early check; the run itself warns once)."""
    import torch

    wants_gpu = cfg.simulation.client_resources.num_gpus > 0
    if wants_gpu and not cfg.simulation.ray_address and not torch.cuda.is_available():
        raise ConfigError(
            f"simulation.client_resources.num_gpus={cfg.simulation.client_resources.num_gpus} but torch sees "
            "no GPU on this machine; set it to 0 (or join a Ray cluster with GPUs via simulation.ray_address)"
        )
    if warn and not wants_gpu and cfg.device != "cpu" and torch.cuda.is_available():
        logger.warning(
            "a GPU is present but simulated clients get no share of it, so they train on the CPU; "
            "set simulation.client_resources.num_gpus (e.g. 0.5 = two clients per GPU) to use it"
        )


def warn_if_noise_swamps_update(cfg: DictConfig) -> str | None:
    """Print (once, on stderr) that client-level DP's noise will swamp the update, if it will.

    A warning, not a refusal: a user may want the chance-level run (to measure it, or to
    test the pipeline). Returns the warning for tests.
    """
    from fedguard.server.noise_check import swamped_update_warning

    warning = swamped_update_warning(cfg)
    if warning is not None:
        print(f"fedguard: warning: {warning}", file=sys.stderr, flush=True)
    return warning


def preflight(args: SimulateArgs) -> DictConfig:
    """All checks of a single run, before Hydra's job starts; raises ConfigError naming what to fix."""
    cfg = compose_checked(args.overrides)
    run_dir = override_value(args.overrides, "hydra.run.dir")
    check_before_engine(cfg, Path(cfg.resume) if cfg.resume else Path(run_dir) if run_dir else None)
    check_resources(cfg, warn=False)  # imports torch: last
    warn_if_noise_swamps_update(cfg)
    return cfg


def resume_overrides(args: SimulateArgs, cfg: DictConfig) -> list[str]:
    """A resumed run logs into its original directory (Hydra's own files in .hydra-resume/)."""
    if not cfg.resume or override_value(args.overrides, "hydra.run.dir") is not None:
        return []
    return [f"hydra.run.dir={cfg.resume}", "hydra.output_subdir=.hydra-resume"]


def fail(message: str) -> int:
    """Print a user's mistake as one line on stderr; returns the exit status."""
    print(f"fedguard: {message}", file=sys.stderr)
    return USAGE_ERROR
