"""The privacy ledger's format, signing, keys and writer (resume, crash, locking)."""

from __future__ import annotations

import json
import stat

import pytest

from fedguard.privacy.client_budget import ClientPrivacyState
from fedguard.privacy.ledger import (
    LEDGER_FILE,
    LedgerError,
    LedgerFormatError,
    LedgerWriter,
    RunStarted,
    SampleDpTraining,
    canonical_json,
    check_chain,
    config_hash,
    entry_from_wire,
    entry_hash,
    entry_to_wire,
    genesis_hash,
    read_ledger,
    sign_entry,
    verify_entry,
)
from fedguard.privacy.ledger_events import ClientDpRelease, EventError
from fedguard.privacy.signing import (
    KEY_ID_HEX_CHARS,
    KeyFileError,
    KeyRegistry,
    client_party,
    generate_signing_key,
    key_id,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    parse_public_key,
    save_signing_key,
)
from cryptography.hazmat.primitives import serialization

AWKWARD_FLOATS = [0.1, 1 / 3, 1e-300, 5e-324, 2.0**53 + 1, 123456789.123456789, 1e-5]


def training(client: str = "0", server_round: int = 1, epsilon: float = 0.5) -> SampleDpTraining:
    return SampleDpTraining(client, server_round, 1.1, 0.03125, 12, 1.0, 1e-5, "rdp", epsilon, 8.0)


def test_signing_key_file_is_private_and_never_overwritten(tmp_path):
    key = generate_signing_key()
    path = tmp_path / "site.key"
    public_path = save_signing_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_signing_key(path).public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(public_path)) == key_id(key.public_key())
    assert public_path.read_text().startswith("ssh-ed25519 ")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        save_signing_key(generate_signing_key(), path)
    assert path.read_bytes() == before
    other = generate_signing_key()
    save_signing_key(other, path, force=True)
    assert key_id(load_signing_key(path).public_key()) == key_id(other.public_key())


def test_public_keys_load_from_pem_and_openssh_with_the_same_id():
    public = generate_signing_key().public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert key_id(parse_public_key(pem)) == key_id(parse_public_key(ssh)) == key_id(public)
    assert len(key_id(public)) == KEY_ID_HEX_CHARS
    with pytest.raises(KeyFileError):
        parse_public_key("ssh-ed25519 not-base64")


def test_registry_directory_and_json_bind_keys_to_parties(tmp_path):
    server, client = generate_signing_key(), generate_signing_key()
    registry = KeyRegistry()
    registry.add("server", server.public_key())
    registry.add(client_party(7), client.public_key())
    registry.save_dir(tmp_path / "keys")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["client-7.pub", "server.pub"]
    loaded = KeyRegistry.load(tmp_path / "keys")
    assert loaded.get(key_id(client.public_key())).party == "client:7"
    document = {"keys": [{"party": "server", "public_key": (tmp_path / "keys" / "server.pub").read_text()}]}
    (tmp_path / "keys.json").write_text(json.dumps(document))
    assert KeyRegistry.load(tmp_path / "keys.json").parties() == {key_id(server.public_key()): "server"}
    with pytest.raises(KeyFileError, match="registered for both"):
        registry.add("client:8", client.public_key())
    with pytest.raises(KeyFileError):
        KeyRegistry.load(tmp_path / "nowhere")


@pytest.mark.parametrize("value", AWKWARD_FLOATS)
def test_signed_floats_survive_a_json_round_trip(value):
    key = generate_signing_key()
    entry = sign_entry({"seq": 0, "body": {"x": value}}, key)
    reparsed = json.loads(canonical_json(entry))
    assert reparsed["body"]["x"] == value
    assert verify_entry(reparsed, key.public_key())


def test_signature_covers_every_field_and_names_the_key():
    key = generate_signing_key()
    entry = sign_entry({"seq": 3, "prev": "ab", "party": "server", "body": {"epsilon": 1.0}}, key)
    assert entry["key_id"] == key_id(key.public_key())
    assert verify_entry(entry, key.public_key())
    for field, value in [("seq", 4), ("prev", "ac"), ("party", "client:1"), ("body", {"epsilon": 0.5})]:
        assert not verify_entry(entry | {field: value}, key.public_key()), field
    assert not verify_entry(entry, generate_signing_key().public_key())
    assert not verify_entry(entry | {"signature": "!!not base64!!"}, key.public_key())


def test_writer_chains_signs_and_fsyncs_entries(tmp_path):
    key = generate_signing_key()
    path = tmp_path / LEDGER_FILE
    with LedgerWriter(path, key, "server", ledger_id="run-1") as writer:
        first = writer.append(RunStarted("run-1", config_hash("a: 1\n"), 10.0, 1e-5))
        second = writer.append(training())
    entries = read_ledger(path)
    assert [e["seq"] for e in entries] == [0, 1]
    assert entries[0]["prev"] == genesis_hash("run-1")
    assert entries[1]["prev"] == entry_hash(entries[0])
    assert entries == [first, second]
    assert all(verify_entry(e, key.public_key()) for e in entries)
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 2
    assert entries[1]["body"]["budget_epsilon"] == 8.0


def test_writer_resume_continues_the_same_chain(tmp_path):
    key = generate_signing_key()
    path = tmp_path / LEDGER_FILE
    with LedgerWriter(path, key, "server") as writer:
        writer.append(training(server_round=1))
        ledger_id = writer.ledger_id
    with LedgerWriter(path, key, "server") as writer:
        assert writer.ledger_id == ledger_id and writer.next_seq == 1
        writer.append(training(server_round=2))
    entries = read_ledger(path)
    check_chain(entries, path)
    assert [e["body"]["round"] for e in entries] == [1, 2]
    assert entries[1]["prev"] == entry_hash(entries[0])
    with pytest.raises(LedgerError, match="holds ledger"):
        LedgerWriter(path, key, "server", ledger_id="another")


def test_truncated_last_line_stops_the_writer_and_keeps_the_file(tmp_path):
    key = generate_signing_key()
    path = tmp_path / LEDGER_FILE
    with LedgerWriter(path, key, "server") as writer:
        for server_round in (1, 2, 3):
            writer.append(training(server_round=server_round))
    data = path.read_bytes()
    cut = data[: len(data) - 40]  # a crash mid-write of line 3
    path.write_bytes(cut)
    with pytest.raises(LedgerFormatError, match="line 3: last line is incomplete") as caught:
        LedgerWriter(path, key, "server")
    assert caught.value.line_number == 3
    assert path.read_bytes() == cut  # nothing dropped, nothing appended


def test_garbled_or_non_canonical_lines_are_named(tmp_path):
    key = generate_signing_key()
    path = tmp_path / LEDGER_FILE
    with LedgerWriter(path, key, "server") as writer:
        writer.append(training(server_round=1))
        writer.append(training(server_round=2))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{not json\n")
    with pytest.raises(LedgerFormatError, match="line 2: not valid JSON"):
        read_ledger(path)
    path.write_bytes(lines[0] + lines[1].replace(b'{"body"', b'{ "body"'))
    with pytest.raises(LedgerFormatError, match="line 2: .*canonical"):
        read_ledger(path)


def test_a_second_writer_on_the_same_file_is_refused(tmp_path):
    key = generate_signing_key()
    path = tmp_path / LEDGER_FILE
    with LedgerWriter(path, key, "server"):
        with pytest.raises(LedgerError, match="locked"):
            LedgerWriter(path, key, "server")
    with LedgerWriter(path, key, "server") as writer:  # released on close
        assert writer.next_seq == 0


def test_server_embeds_a_client_entry_only_if_it_verifies(tmp_path):
    client_key, server_key = generate_signing_key(), generate_signing_key()
    registry = KeyRegistry()
    registry.add("client:0", client_key.public_key())
    registry.add("server", server_key.public_key())
    with LedgerWriter(tmp_path / "site.jsonl", client_key, "client:0") as site:
        client_entry = site.append(training())
    with LedgerWriter(tmp_path / LEDGER_FILE, server_key, "server") as server:
        outer = server.append_client_entry(client_entry, registry)
        assert outer["body"]["entry"] == client_entry
        forged = dict(client_entry, body=dict(client_entry["body"], epsilon=0.01))
        with pytest.raises(LedgerError, match="signature or party"):
            server.append_client_entry(forged, registry)
        impostor = sign_entry(dict(client_entry, party="client:0"), generate_signing_key())
        with pytest.raises(LedgerError, match="unregistered key"):
            server.append_client_entry(impostor, registry)
        assert server.next_seq == 1
    embedded = read_ledger(tmp_path / LEDGER_FILE)[0]["body"]["entry"]
    assert verify_entry(embedded, client_key.public_key())


def test_training_event_from_a_client_privacy_report():
    state = ClientPrivacyState(1.1, 0.02, 1e-5, "rdp", None, history=[(1.1, 0.02, 50)], rounds_participated=1)
    report = state.report(steps_this_round=50, refused=False)
    event = SampleDpTraining.from_report(report, client=4, server_round=1, max_grad_norm=1.0)
    assert event.client == "4" and event.steps == 50 and event.budget_epsilon is None
    assert event.epsilon == pytest.approx(report["epsilon"]) and event.epsilon > 0
    with pytest.raises(EventError):
        SampleDpTraining("1", 1, 1.1, 1.5, 10, 1.0, 1e-5, "rdp", 1.0)
    with pytest.raises(EventError):
        ClientDpRelease(1, 1.0, 1.0, 1.0, "uniform", 0.1, 10, 10, 1e-5, "rdp", 1.0)
    with pytest.raises(EventError):
        ClientDpRelease(1, 1.0, 1.0, 1.0, "poisson", 0.1, 10, 11, 1e-5, "rdp", 1.0)


def test_entries_travel_as_strings_and_site_keys_are_created_once(tmp_path):
    key = load_or_create_signing_key(tmp_path / "site" / "client.key")
    assert (tmp_path / "site" / "client.key.pub").is_file()
    assert key_id(load_or_create_signing_key(tmp_path / "site" / "client.key").public_key()) == key_id(key.public_key())
    with LedgerWriter(tmp_path / "site.jsonl", key, "client:0") as site:
        entry = site.append(training())
    wire = entry_to_wire(entry)
    assert isinstance(wire, str) and entry_from_wire(wire) == entry
    with pytest.raises(LedgerFormatError):
        entry_from_wire(wire.replace('"seq":0', '"seq": 0'))
    with LedgerWriter(tmp_path / LEDGER_FILE, generate_signing_key(), "server") as server:
        outer = server.append_client_entry(entry)
        with pytest.raises(LedgerError, match="nested"):
            server.append_client_entry(outer)
