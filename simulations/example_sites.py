"""``python -m fedguard.simulations.example_sites DIR``: three sites' own CSV files to rehearse on.

Written from scikit-learn's bundled wine set (178 real rows, 3 cultivars) in the layout of
``conf/dataset/tabular.yaml``: ``color_intensity`` becomes the categorical ``colour``
(pale / medium / deep) so the contract has a categorical column, and the cultivar label is
text. The three sites differ in size and label mix (one never saw class_0), as real sites do.
Used by the README walkthrough, the tests and ``fedguard bench own-files``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Share of each cultivar's rows at sites 0, 1, 2: on the whole set sizes 55 / 69 / 54, and
# site 2 holds no class_0.
SITE_SHARES = {"class_0": (0.68, 0.32, 0.0), "class_1": (0.14, 0.56, 0.30), "class_2": (0.10, 0.21, 0.69)}
CSV_NAME = "wine.csv"


def wine_table():
    """The wine set as one DataFrame with the contract's column names."""
    import numpy as np
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    frame = data.frame.rename(columns={"od280/od315_of_diluted_wines": "od280_od315"})
    intensity = frame.pop("color_intensity")
    frame["colour"] = np.where(intensity < 3.5, "pale", np.where(intensity < 7.0, "medium", "deep"))
    frame["cultivar"] = [f"class_{t}" for t in frame.pop("target")]
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def write_sites(root: Path, frame=None) -> list[Path]:
    """One directory per site under ``root``, each holding its own ``wine.csv`` cut from ``frame``
    (default: the whole wine set) by SITE_SHARES; returns the directories."""
    import numpy as np
    import pandas as pd

    frame = wine_table() if frame is None else frame
    parts: list[list] = [[] for _ in range(3)]
    for name, rows in frame.groupby("cultivar"):
        cuts = np.round(np.cumsum(SITE_SHARES[name]) * len(rows)).astype(int)
        for i, (lo, hi) in enumerate(zip([0, *cuts[:-1]], cuts)):
            parts[i].append(rows.iloc[lo:hi])
    sites = []
    for i, rows in enumerate(parts):
        site = root / f"site-{i}"
        site.mkdir(parents=True, exist_ok=True)
        pd.concat(rows).sample(frac=1.0, random_state=i).to_csv(site / CSV_NAME, index=False)
        sites.append(site)
    return sites


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fedguard.simulations.example_sites DIR", file=sys.stderr)
        return 2
    for site in write_sites(Path(argv[0])):
        print(site / CSV_NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
