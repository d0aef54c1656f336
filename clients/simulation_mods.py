"""Mods that give a simulation's virtual sites the settings a real site sets itself.

A real site names its own files (``fedguard client --data``) and the team models it accepts
(``--custom-model``) in its node config; in ``fedguard simulate`` every virtual site runs on the
machine of whoever started it, so these fill the same node-config keys from the run's
``simulation.site_data`` and ``model.target``. A setting already present wins.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedguard.clients.site import CUSTOM_MODELS_KEY, DATA_KEY, PARTITION_ID_KEY


def with_custom_model(target: str) -> Mod:
    """Simulation only: the virtual sites run on the machine of whoever started it, so they
    accept the run's own model.target (a real site lists it: `fedguard client --custom-model`)."""

    def custom_model(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        context.node_config.setdefault(CUSTOM_MODELS_KEY, target)
        return call_next(msg, context)

    return custom_model


def with_site_data(paths: list[str]) -> Mod:
    """Give virtual site i of a simulation ``paths[i]`` as its own files (``simulation.site_data``),
    as a real site names them with ``fedguard client --data``; a site's own setting wins."""

    def site_data(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        partition = context.node_config.get(PARTITION_ID_KEY)
        if not context.node_config.get(DATA_KEY) and isinstance(partition, int) and 0 <= partition < len(paths):
            context.node_config[DATA_KEY] = paths[partition]
        return call_next(msg, context)

    return site_data
