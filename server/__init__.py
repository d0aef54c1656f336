"""fedguard's server side: the ServerApp, its layers, launch and submission.

Importing this package refuses a bare ``flwr run`` of the checkout before Flower starts a
background SuperLink and installs gigabytes (see :mod:`fedguard.server.flower_cli_guard`);
in every other process the check is one look at ``sys.argv``.
"""

from fedguard.server.flower_cli_guard import refuse_bare_flwr_run as _refuse_bare_flwr_run

_refuse_bare_flwr_run()
