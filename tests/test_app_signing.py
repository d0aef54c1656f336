"""Signed apps, without processes: what a site accepts and what it refuses, and why (clients/deployment/app_signing.py).

The site's decision is ``app_refusal``; these tests attack it with the changes a submitter
could make: edit the app after signing, strip the signature, sign with their own key under a
trusted publisher's id, replay a signature of another app, damage the record.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.clients.deployment.app_signing import (
    AppSignature,
    AppSignatureError,
    app_refusal,
    build_app_fab,
    create_publisher_key,
    load_publisher_key,
    metadata_refusal,
    read_trusted_publishers,
    sign_fab,
    trusted_entry,
)
from fedguard.clients.deployment.publisher_commands import key_main, sign_main


def _fab(app_code: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", '[tool.flwr.app.components]\nclientapp = "clients.app:app"\n')
        fab.writestr("clients/app.py", app_code)
    return buffer.getvalue()


def _project_fab(name: str = "tinyapp", version: str = "1.0.0") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = []\n\n'
                     '[tool.flwr.app]\npublisher = "fedguard"\n\n[tool.flwr.app.components]\n'
                     'serverapp = "clients.app:server"\nclientapp = "clients.app:app"\n\n[tool.flwr.app.config]\n')
        fab.writestr("clients/app.py", "app = None\n")
    return buffer.getvalue()


def test_the_runs_metadata_must_name_the_signed_fab():
    """Attack: the SuperLink pairs a validly signed FAB with the id, version or hash of another app
    installed on the site (say, one from a publisher the site has revoked), which Flower would load."""
    fab = _project_fab()
    digest = hashlib.sha256(fab).hexdigest()
    assert metadata_refusal(fab, digest, "fedguard/tinyapp", "1.0.0") is None
    assert "but the signed FAB is fedguard/tinyapp 1.0.0" in metadata_refusal(fab, digest, "fedguard/oldapp", "1.0.0")
    assert "but the signed FAB is" in metadata_refusal(fab, digest, "fedguard/tinyapp", "0.9.0")
    other = hashlib.sha256(_project_fab(name="oldapp")).hexdigest()
    assert "but carries FAB" in metadata_refusal(fab, other, "fedguard/tinyapp", "1.0.0")
    assert "cannot be read" in metadata_refusal(b"not a zip", hashlib.sha256(b"not a zip").hexdigest(), "a/b", "1")


@pytest.fixture
def publisher(tmp_path):
    private, _ = create_publisher_key(tmp_path / "pub", "consortium")
    key = load_publisher_key(private)
    trusted_file = tmp_path / "trusted.yaml"
    trusted_file.write_text(trusted_entry("consortium", key.public_key()) + "\n")
    return key, read_trusted_publishers(trusted_file)


def test_signed_app_is_accepted(publisher):
    key, trusted = publisher
    fab = _fab("app = 'honest'\n")
    assert app_refusal(fab, sign_fab(fab, key, "consortium").to_json(), trusted) is None


def test_app_modified_after_signing_is_refused(publisher):
    key, trusted = publisher
    signature = sign_fab(_fab("app = 'honest'\n"), key, "consortium").to_json()
    reason = app_refusal(_fab("app = 'honest'\nimport shutil  # ship the data out\n"), signature, trusted)
    assert reason is not None and "modified after signing" in reason


def test_unsigned_and_malformed_are_refused(publisher):
    key, trusted = publisher
    fab = _fab("app = 'honest'\n")
    assert "unsigned" in app_refusal(fab, "", trusted)
    assert "unsigned" in app_refusal(fab, None, trusted)
    assert "malformed" in app_refusal(fab, "{not json", trusted)
    record = json.loads(sign_fab(fab, key, "consortium").to_json())
    record["signature"] = record["signature"][:-4]
    assert "malformed" in app_refusal(fab, json.dumps(record), trusted)


def test_own_key_under_a_trusted_id_is_refused(publisher):
    """The submitter signs the exact FAB, with their key, claiming the trusted publisher's id."""
    _, trusted = publisher
    fab = _fab("app = 'evil'\n")
    forged = sign_fab(fab, ed25519.Ed25519PrivateKey.generate(), "consortium").to_json()
    assert "does not verify" in app_refusal(fab, forged, trusted)
    # ...or under an id the site never trusted
    other = sign_fab(fab, ed25519.Ed25519PrivateKey.generate(), "someone-else").to_json()
    assert "does not trust" in app_refusal(fab, other, trusted)


def test_signature_of_another_app_with_its_hash_claimed_is_refused(publisher):
    """Replaying a genuine signature and rewriting its fab_sha256 to the new FAB's does not help."""
    key, trusted = publisher
    genuine = sign_fab(_fab("app = 'honest'\n"), key, "consortium")
    evil = _fab("app = 'evil'\n")
    import hashlib

    replay = AppSignature(genuine.key_id, genuine.signed_at, genuine.signature, hashlib.sha256(evil).hexdigest())
    assert "does not verify" in app_refusal(evil, replay.to_json(), trusted)


def test_trusted_publishers_file_errors_name_the_entry(tmp_path):
    bad = tmp_path / "trusted.yaml"
    bad.write_text("consortium: not-a-key\n")
    with pytest.raises(AppSignatureError, match="consortium"):
        read_trusted_publishers(bad)
    bad.write_text("[]\n")
    with pytest.raises(AppSignatureError, match="at least one"):
        read_trusted_publishers(bad)
    with pytest.raises(AppSignatureError, match="cannot read"):
        read_trusted_publishers(tmp_path / "missing.yaml")


def _tiny_app(tmp_path: Path) -> Path:
    """A minimal Flower app tree (pyproject with the app components, one ClientApp module)."""
    app = tmp_path / "app"
    (app / "clients").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedguard"\n\n[tool.flwr.app.components]\n'
        'serverapp = "clients.app:server"\nclientapp = "clients.app:app"\n\n[tool.flwr.app.config]\n'
    )
    (app / "clients" / "app.py").write_text("app = None\n")
    return app


@pytest.mark.deployment  # imports Flower's FAB builder and CLI: ~2 s
def test_publisher_commands_sign_what_flwr_run_builds(tmp_path, capsys):
    """`fedguard publisher key` prints the sites' line; `sign` signs the FAB Flower's builder makes of the tree."""
    from flwr.cli.build import build_fab_from_disk

    app = _tiny_app(tmp_path)
    for junk in (app / ".venv" / "lib" / "big.py", app / "clients" / "__pycache__" / "app.cpython-311.pyc"):
        junk.parent.mkdir(parents=True)
        junk.write_text("never in a FAB\n")
    (app / ".gitignore").write_text(".venv/\n__pycache__/\n")
    # What is signed is byte for byte what `flwr run` builds (fedguard skips walking .venv).
    assert build_app_fab(app) == build_fab_from_disk(app)
    assert key_main(["--out", str(tmp_path / "pub"), "--id", "consortium"]) == 0
    line = capsys.readouterr().out
    (tmp_path / "trusted.yaml").write_text(line)
    assert (tmp_path / "pub" / "app_publisher_key").stat().st_mode & 0o777 == 0o600
    assert key_main(["--out", str(tmp_path / "pub"), "--id", "consortium"]) == 1  # no silent overwrite
    signature_file = tmp_path / "app.sig"
    assert sign_main(["--key", str(tmp_path / "pub" / "app_publisher_key"), "--app", str(app), "--out", str(signature_file)]) == 0
    trusted = read_trusted_publishers(tmp_path / "trusted.yaml")
    assert app_refusal(build_fab_from_disk(app), signature_file.read_text(), trusted) is None
    (app / "clients" / "app.py").write_text("app = None\nimport os\n")
    assert "modified after signing" in app_refusal(build_fab_from_disk(app), signature_file.read_text(), trusted)


@pytest.mark.deployment  # imports Flower's FAB builder: ~2 s
def test_signed_fab_includes_what_flwr_run_picks_up_outside_the_source(tmp_path):
    """`flwr run`'s walk does not skip .git/, .pytest_cache/ or node_modules/: a .md or .json there
    goes into the FAB it submits, so it must go into the FAB the publisher signs (a stray .md in
    .git/ once made every site refuse a run as "modified after signing")."""
    from flwr.cli.build import build_fab_from_disk

    app = _tiny_app(tmp_path)
    (app / ".gitignore").write_text("__pycache__/\n")
    strays = {".git/notes.md": "# a note\n", ".pytest_cache/README.md": "# cache\n",
              "node_modules/pkg/package.json": "{}\n", "clients/.venv/setup.py": "x = 1\n"}
    for relative, text in strays.items():
        (app / relative).parent.mkdir(parents=True, exist_ok=True)
        (app / relative).write_text(text)
    (app / ".venv" / "lib").mkdir(parents=True)  # skipped by both: Flower's own ".venv/**"
    (app / ".venv" / "lib" / "big.py").write_text("never in a FAB\n")
    submitted = build_fab_from_disk(app)
    names = set(zipfile.ZipFile(io.BytesIO(submitted)).namelist())
    assert set(strays) <= names and ".venv/lib/big.py" not in names  # what Flower itself ships
    assert build_app_fab(app) == submitted
