"""`fedguard client --config site.yaml`: the file's settings go through the flags' own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard.clients.deployment.site_file import SiteFileError
from fedguard.clients.launch import client_main, parse_client_args


def _site_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_file_settings_relative_paths_and_flag_override(tmp_path):
    path = _site_file(tmp_path, "server: fl.example.org:9092\nca: certs/ca.crt\ntrusted-publishers: trusted.yaml\n"
                                "partition_id: 1\nnum-partitions: 3\ndevice: cpu\nepsilon-budget: 4\nstate-dir: /var/lib/site\n")
    args = parse_client_args(["--config", str(path), "--partition-id", "2"])
    assert args.server == "fl.example.org:9092" and args.num_partitions == 3 and args.epsilon_budget == 4.0
    assert args.partition_id == 2  # the flag wins over the file
    assert args.ca == tmp_path / "conf" / "certs" / "ca.crt"  # relative to the file, not the working directory
    assert args.trusted_publishers == tmp_path / "conf" / "trusted.yaml"
    assert args.state_dir == Path("/var/lib/site")


def test_a_site_with_its_own_files_needs_no_partition_count_and_lists_its_models(tmp_path):
    path = _site_file(tmp_path, "server: fl.example.org:9092\nca: ca.crt\ntrusted-publishers: trusted.yaml\n"
                                "partition-id: 0\ndata: data/site.csv\ncustom-model: [wine_net:build, other:make]\n")
    args = parse_client_args(["--config", str(path)])
    assert args.num_partitions is None and args.data == tmp_path / "conf" / "data" / "site.csv"
    assert args.custom_model == ["wine_net:build", "other:make"]  # a repeatable flag: a list in the file
    no_data = _site_file(tmp_path, "server: s:1\nca: ca.crt\npartition-id: 0\n")
    with pytest.raises(SystemExit):
        parse_client_args(["--config", str(no_data)])  # a built-in dataset needs --num-partitions


@pytest.mark.parametrize(("text", "message"), [
    ("sever: x:1\n", "unknown setting 'sever'; allowed: ca, contract, custom-model, data, data-root, device"),
    ("partition-id: first\n", "partition-id must be an integer"),
    ("device: gpu\n", "device must be one of auto, cpu, cuda"),
    ("ca: [a, b]\n", "ca must be a single value"),
    ("- server\n", "must be a mapping"),
])
def test_bad_settings_name_the_key_and_what_is_allowed(tmp_path, text, message):
    with pytest.raises(SiteFileError, match=message.replace("[", r"\[")):
        parse_client_args(["--config", str(_site_file(tmp_path, text))])


def test_file_values_meet_the_same_site_checks_as_flags(tmp_path, capsys):
    path = _site_file(tmp_path, "server: 127.0.0.1:9092\nca: ca.crt\npartition-id: 3\nnum-partitions: 3\n")
    assert client_main(["--config", str(path)]) == 1
    assert "partition-id" in capsys.readouterr().err
    assert client_main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read the site file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_client_args(["--config", str(_site_file(tmp_path, "server: 127.0.0.1:9092\n"))])
    assert "missing --ca, --partition-id (or the same keys" in capsys.readouterr().err
