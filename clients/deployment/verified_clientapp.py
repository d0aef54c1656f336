"""One task of a site's SuperNode: check the run's app signature, then run its ClientApp or refuse.

Run by the site's app gate (clients/deployment/app_gate.py) with the task's token, in place
of Flower's ``flwr-clientapp``: one process per message, as Flower does it (a fork of the warm
gate, or a fresh interpreter with ``--task-launch spawn``). It pulls the task's
input from the SuperNode's runtime API, and only if a trusted publisher signed exactly this FAB
(clients/deployment/app_signing.py) does it unpack the FAB and load its ClientApp. Otherwise it
answers the message with an error (code INVALID_FAB) whose reason names the run and the cause,
so the ServerApp logs which site refused and why, and logs the same line on the site.

Why not Flower's ``run_clientapp`` with a check around it: it pulls the task input itself (a
task's input can be pulled once), unpacks the FAB and imports the ClientApp in one function,
with no point between pulling and importing where a site could decide; the steps below are the
same public Flower calls in the same order, with the decision in between.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import logging
import sys
import time
import zipfile
from pathlib import Path

from fedguard.clients.wire.protocol import SERVER_ROUND_KEY
from fedguard.clients.deployment.supernode_poll import OBJECT_PULL_BACKOFF
from fedguard.clients.deployment.app_signing import (
    RUN_CONFIG_APP_SIGNATURE,
    AppSignatureError,
    app_refusal,
    metadata_refusal,
    read_trusted_publishers,
)
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.common.config import get_flwr_home, get_project_dir
from flwr.common.constant import APP_DIR as FLOWER_APPS_DIR
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import (  # pylint: disable=no-name-in-module
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

logger = logging.getLogger("fedguard.site")
REFUSAL_PREFIX = "fedguard site refused run"
# The FAB's own metadata folder (hashes of its files), which Flower's install does not copy.
FAB_INFO_DIR = ".info/"
# One line per task on the site's log, read by `fedguard bench deployment` for its breakdown.
TIMING_PREFIX = "fedguard task timing"


# The SuperNode hands out a task before it has downloaded the message's objects from the server;
# Flower's pull retries a missing object after 1, 2, 4, ... s (capped at 10), which a warm task
# process, ready in a fraction of a second, would spend waiting. It asks its own SuperNode (on
# loopback) again as often as the SuperNode and the ServerApp retry theirs (supernode_poll.py).


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """Flower 1.41's ``pull_task_input`` (same public calls, same order), with OBJECT_PULL_BACKOFF."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    initial_backoff, backoff_cap = OBJECT_PULL_BACKOFF
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=initial_backoff, backoff_cap=backoff_cap,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message lacks its own id
    return message, context, run, fab


def installed_copy_matches(fab_content: bytes, directory: Path) -> bool:
    """True when ``directory`` holds exactly the FAB's files, byte for byte (and nothing else),
    as plain files: a symbolic link anywhere in the copy (planted by a local user who can write
    Flower's home) fails the match, since its target could change after the comparison."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    if any(path.is_symlink() for path in directory.rglob("*")):
        return False
    with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
        members = {name: archive.read(name) for name in archive.namelist()
                   if not name.startswith(FAB_INFO_DIR) and not name.endswith("/")}
    present = {path.relative_to(directory).as_posix() for path in directory.rglob("*") if not path.is_dir()}
    if present != set(members):
        return False
    return all((directory / name).read_bytes() == content for name, content in members.items())


def install_once(fab_content: bytes, fab_id: str, fab_version: str, fab_hash: str) -> bool:
    """Install a FAB this task has verified, unless the copy Flower's loader would read is already
    exactly it; True when it installed.

    Why: Flower's ``install_from_fab`` unpacks every file of the FAB (about 200) into a temporary
    folder and re-hashes them for every task (0.4-0.5 s on the shared cores), and a SecAgg+ round
    is six tasks a site. Comparing the installed copy with the verified bytes costs a tenth of
    that. And Flower's install, finding the folder there, keeps it as it is, whatever it holds;
    here only a copy equal to the signed FAB is used, and anything else (partial, changed, extra
    files) is removed and installed afresh by Flower's own install.
    """
    try:
        directory = get_project_dir(fab_id, fab_version, fab_hash)
    except ValueError:  # a malformed FAB id: Flower's install and loader report it
        directory = None
    if directory is not None and installed_copy_matches(fab_content, directory):
        return False
    if directory is not None and directory.exists():
        apps = (get_flwr_home() / FLOWER_APPS_DIR).resolve()
        if directory.resolve().parent != apps:  # a version or id that would name a folder elsewhere
            raise AppSignatureError(f"the app folder {directory} is not in {apps}")
        logger.warning("installed app %s differs from the run's signed FAB; installing it again", directory.name)
        shutil.rmtree(directory)
    install_from_fab(fab_content, skip_prompt=True)
    return True


def run_task(runtime_api_address: str, token: str, trusted_file: Path, launched_at: float | None = None) -> int:
    """Serve one task; 0 when the ClientApp ran, 1 when the site refused it or it failed.

    ``launched_at`` (the launcher's clock when it started this task) dates the task's start-up
    in its timing line: how long the process took from launch to its first own line of work.
    """
    clock = {"entered": time.time()}
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # the SuperNode's runtime API listens on 127.0.0.1 only (fedguard client)
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the task failed before its input arrived"
    try:
        message, context, run, fab = pull_task_input(client)
        clock["pulled"] = time.time()
        try:
            # Read on every task: a site revokes a publisher by editing the file, no restart needed.
            refusal = app_refusal(fab.content, str(context.run_config.get(RUN_CONFIG_APP_SIGNATURE, "")),
                                  read_trusted_publishers(trusted_file))
            # The loader below picks the installed app by the run's metadata: it must name these bytes.
            refusal = refusal or metadata_refusal(fab.content, fab.hash_str, run.fab_id, run.fab_version)
        except AppSignatureError as err:
            refusal = f"this site's trusted publishers cannot be read: {err}"
        if refusal is not None:
            details = f"{REFUSAL_PREFIX} {run.run_id} (app {run.fab_id} {run.fab_version}, FAB {fab.hash_str[:16]}): {refusal}"
            logger.error("%s", details)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            return 1
        install_once(fab.content, run.fab_id, run.fab_version, fab.hash_str)
        client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str
        )
        clock["loaded"] = time.time()
        reply = client_app(message=message, context=context)
        clock["answered"] = time.time()
        status, details = SubStatus.COMPLETED, ""
        return 0
    except Exception as err:  # the reply must still go back, as flwr-clientapp's does
        logger.exception("the ClientApp failed")
        details = f"{type(err).__name__}: {err}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        return 1
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client, context if status == SubStatus.COMPLETED else None, status, details)
        finally:
            heartbeat.stop()
            client.close()
            clock["pushed"] = time.time()
            _log_timing(message, clock, launched_at)


def _round_and_stage(message: Message | None) -> tuple[int | None, str | None]:
    """The server round a message belongs to (fedguard's servers put it in the message's config,
    not in Flower's group id) and, for a SecAgg+ stage request, the stage."""
    try:
        for record in message.content.config_records.values():
            value = record.get(SERVER_ROUND_KEY, record.get("round"))
            if value is not None:
                stage = record.get("stage")
                return int(value), None if stage is None else str(stage)
    except Exception:  # noqa: BLE001 - a timing line never fails a task
        pass
    return None, None


def _log_timing(message: Message | None, clock: dict[str, float], launched_at: float | None) -> None:
    """The task's phases in seconds: start-up (launch to entry), pull, app load, the app's own
    work, push. A phase the task never reached is left out."""
    def span(start: str, end: str) -> float | None:
        return round(clock[end] - clock[start], 4) if start in clock and end in clock else None

    if launched_at is not None:
        clock["launched"] = launched_at
    phases = {"start_s": span("launched", "entered"), "pull_s": span("entered", "pulled"),
              "load_s": span("pulled", "loaded"), "app_s": span("loaded", "answered"),
              "push_s": span("answered", "pushed")}
    round_number, stage = _round_and_stage(message)
    line = {"run": message.metadata.run_id if message else None, "round": round_number, "stage": stage,
            "type": message.metadata.message_type if message else None,
            "end": round(clock["pushed"], 4),
            **{k: v for k, v in phases.items() if v is not None}}
    logger.info("%s %s", TIMING_PREFIX, json.dumps(line))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedguard.clients.deployment.verified_clientapp")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--trusted-publishers", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--launched-at", type=float, help="the launcher's time.time() when it started this task")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API call (2 a second) otherwise
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    return run_task(args.runtime_api_address, args.token, args.trusted_publishers, args.launched_at)


if __name__ == "__main__":
    sys.exit(main())
