"""The roster fingerprint sites compare out of band (fedguard roster fingerprint).

Attack: the operator, who writes the roster, slips in an entry of its own (a free colluder
every site trusts) or gives one site a different roster. Sites that compare fingerprints
over a channel the operator does not run see the difference.
"""

from __future__ import annotations

import logging
import os

from fedguard.clients.deployment.roster_commands import roster_main
from fedguard.clients.secagg_identity import site_roster
from fedguard.privacy.secagg.identity import Roster


def _identities(tmp_path, capsys, names):
    lines = []
    for name in names:
        assert roster_main(["identity", "--state-dir", str(tmp_path / name), "--name", name]) == 0
        lines.append(capsys.readouterr().out.strip())
    return lines


def test_sites_comparing_fingerprints_catch_an_added_or_swapped_entry(tmp_path, capsys, caplog):
    lines = _identities(tmp_path, capsys, ["lab-a", "lab-b", "lab-c"])
    honest = tmp_path / "honest.json"
    assert roster_main(["make", "--out", str(honest), *lines]) == 0
    made = capsys.readouterr().out
    assert roster_main(["fingerprint", "--roster", str(honest)]) == 0
    printed = capsys.readouterr().out.split("  (")[0]
    assert printed.startswith("3 sites ") and len(printed.split()[-1]) == 39 and printed in made
    # The same entries in another order: the same fingerprint.
    reordered = tmp_path / "reordered.json"
    assert roster_main(["make", "--out", str(reordered), *reversed(lines)]) == 0
    capsys.readouterr()
    assert roster_main(["fingerprint", "--roster", str(reordered)]) == 0
    assert capsys.readouterr().out.split("  (")[0] == printed
    # The operator's own extra entry, a site's key swapped for the operator's, or a site renamed: all differ.
    sybil = f"lab-d={os.urandom(32).hex()}"
    swapped = [lines[0], lines[1], f"lab-c={os.urandom(32).hex()}"]
    renamed = [lines[0], lines[1], lines[2].replace("lab-c", "lab-x")]
    for variant in ([*lines, sybil], swapped, renamed):
        assert Roster({n: bytes.fromhex(k) for n, k in (line.split("=") for line in variant)}).fingerprint() != printed
    # A site logs the fingerprint of the roster it pinned, once per file version.
    installed = tmp_path / "lab-a" / "secagg" / "roster.json"
    installed.write_text(honest.read_text())
    with caplog.at_level(logging.INFO, logger="fedguard.privacy.secagg.identity"):
        site_roster({"state-dir": str(tmp_path / "lab-a")})
    assert any(printed.split(" sites ")[1] in r.getMessage() and str(installed) in r.getMessage() for r in caplog.records)
    assert roster_main(["fingerprint", "--state-dir", str(tmp_path / "lab-a")]) == 0
    assert capsys.readouterr().out.split("  (")[0] == printed
    assert roster_main(["fingerprint", "--state-dir", str(tmp_path / "nowhere")]) == 1
