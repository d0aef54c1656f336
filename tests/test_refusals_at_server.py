"""Every refusal of a site's own files, as the site logs it and as the server logs it.

Each case writes a bad file or folder, sends it a real train request through the ClientApp
(every mod, as a SuperNode runs it) and hands the reply to the server's own reply sorting
(``server/federation.py::sort_train_replies``), whose warning is the server's log line. The site's
log must name the file and the column or row; the server's line must name the file's name and
the column or the kind of problem, and never the row, a cell's value, the image file, the folder
the files lie in, or what the site holds beyond the contract.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from fedguard.clients.app import app as client_app
from fedguard.conf import compose_config
from fedguard.server.federation import sort_train_replies
from own_files_support import tiny_image_folder, train_request

# Over a second each on a loaded 2-core machine (a full ClientApp request): with the simulations.
pytestmark = [pytest.mark.simulation, pytest.mark.usefixtures("flower_task_identity")]

TABLE = {"features": [{"name": "age", "center": 50, "scale": 10},
                      {"name": "smoker", "type": "categorical", "categories": ["no", "yes"]}],
         "label": "outcome", "classes": ["healthy", "ill"]}
ROWS = {"age": [40.0, 60.0, 55.0, 30.0] * 3, "smoker": ["no", "yes", "yes", "no"] * 3,
        "outcome": ["healthy", "ill", "ill", "healthy"] * 3}
IMAGES = {"channels": 1, "height": 8, "width": 8, "resize": "refuse", "mean": 0.5, "std": 0.5,
          "classes": ["cat", "dog"]}


def _table(root, edit):
    rows = {k: list(v) for k, v in ROWS.items()}
    edit(rows)
    root.mkdir()
    pd.DataFrame(rows).to_csv(root / "ward7.csv", index=False)
    return root / "ward7.csv"


def _folder(root, size=(8, 8), classes=("cat", "dog"), per_class=4):
    return tiny_image_folder(root, size, classes, per_class, prefix="scan")


def _unreadable(root):
    _folder(root)
    (root / "dog" / "scan2.png").write_bytes(b"\x89PNG but not really")
    return root


def _npz_label(root):
    root.mkdir()
    np.savez(root / "scans.npz", images=np.zeros((6, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 0, 1, 7, 0]))
    return root / "scans.npz"


def _empty(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    return root


# (kind of data, how the bad copy is made, what the site's log says, what the server's line says,
#  what the server's line must not say)
CASES = {
    "missing-column": ("table", lambda d: _table(d, lambda r: r.pop("smoker")),
                       "column 'smoker' is missing", "ward7.csv: column 'smoker' is missing", ("age, outcome",)),
    "wrong-type": ("table", lambda d: _table(d, lambda r: r["age"].__setitem__(1, "sixty-one")),
                   "column 'age' must be numeric; row 2 is not a number",
                   "ward7.csv: column 'age' must be numeric and is not", ("sixty-one", "row")),
    "nan": ("table", lambda d: _table(d, lambda r: r["age"].__setitem__(2, float("nan"))),
            "column 'age' row 3 is empty, NaN or infinite",
            "ward7.csv: column 'age' holds empty, NaN or infinite values", ("row",)),
    "unknown-category": ("table", lambda d: _table(d, lambda r: r["smoker"].__setitem__(3, "since 2019")),
                         "column 'smoker' row 4 holds a category the contract does not list",
                         "ward7.csv: column 'smoker' holds a category the contract does not list", ("since 2019", "row")),
    "label-outside": ("table", lambda d: _table(d, lambda r: r["outcome"].__setitem__(4, "deceased")),
                      "column 'outcome' row 5 holds a label the contract does not list",
                      "ward7.csv: column 'outcome' holds a label the contract does not list", ("deceased", "row")),
    "no-rows": ("table", lambda d: _table(d, lambda r: [v.clear() for v in r.values()]),
                "holds no rows", "ward7.csv: holds no rows", ()),
    "unreadable-image": ("images", _unreadable, "dog/scan2.png: unreadable image",
                         "an image in class folder 'dog' is unreadable", ("scan2",)),
    "wrongly-sized-image": ("images", lambda d: _folder(d, size=(10, 12)), "cat/scan0.png: image is 10x12",
                            "an image is not 8x8 and the contract says resize=refuse", ("scan0", "10x12")),
    "empty-folder": ("images", _empty, "its class folders hold no images",
                     "site-data: its class folders hold no images", ()),
    "label-outside-classes": ("images", lambda d: _folder(d, classes=("cat", "horse")),
                              "horse: folder is not a class of the contract",
                              "site-data: a class folder is not a class of the contract", ("horse",)),
    "label-outside-classes-npz": ("images", _npz_label, "scans.npz image 5: label outside the contract's classes",
                                  "a label is outside the contract's classes", ("image 5", "scans.npz image")),
}


def _cfg(kind: str):
    cfg = compose_config(["dataset=tabular" if kind == "table" else "dataset=images", "model=logreg"])
    cfg.dataset.contract = TABLE if kind == "table" else IMAGES
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_each_refusal_is_named_at_the_site_and_at_the_servers_log(tmp_path, caplog, case):
    kind, make, site_says, server_says, never = CASES[case]
    data = make(tmp_path / "site-data")
    cfg = _cfg(kind)
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "data": str(data)}, state=RecordDict(),
                      run_config={})
    with caplog.at_level(logging.WARNING):
        reply = client_app(train_request(cfg), context)
        site_lines = [r.getMessage() for r in caplog.records if r.name.startswith("fedguard.clients")]
        caplog.clear()
        # The reply as the server receives it: the node it came from is the SuperNode's.
        reply.metadata.__dict__["_src_node_id"] = 3
        sorted_replies = sort_train_replies(1, [reply])
    assert sorted_replies.failed == [reply] and not sorted_replies.usable
    assert any(site_says in line for line in site_lines), site_lines
    server_lines = [r.getMessage() for r in caplog.records if r.name.startswith("fedguard.server")]
    assert len(server_lines) == 1, server_lines
    (line,) = server_lines
    assert line.startswith("round 1: client node 3 failed: LocalDataError: ") and server_says in line, line
    for secret in (*never, str(tmp_path)):
        assert secret not in line, (secret, line)
