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


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Images per site (different sizes) and each site's class mix: site 0 sees every class evenly,
# site 1 mostly tops and footwear, site 2 never a bag or an ankle boot.
IMAGE_SITE_SIZES = (300, 200, 150)
IMAGE_SITE_WEIGHTS = (
    (1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    (3, 1, 3, 1, 3, 3, 1, 3, 1, 3),
    (2, 2, 2, 2, 2, 2, 2, 2, 0, 0),
)


def write_image_sites(root: Path, sizes=IMAGE_SITE_SIZES, source: Path = FASHION_MNIST_DIR, split: str = "train",
                      offset: int = 0) -> list[Path]:
    """One image folder per site under ``root`` (a sub-folder per class of conf/dataset/images.yaml,
    one PNG per image), cut from Fashion-MNIST's ``split`` files without overlap, by
    IMAGE_SITE_WEIGHTS; ``offset`` skips that many images first (a disjoint set for testing)."""
    import numpy as np
    from PIL import Image

    from fedguard.clients.datasets import _find_idx_file, read_idx
    from fedguard.conf import compose_config

    classes = list(compose_config(["dataset=images"]).dataset.contract.classes)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx_file(source, f"{prefix}-images-idx3-ubyte"))[offset:]
    labels = read_idx(_find_idx_file(source, f"{prefix}-labels-idx1-ubyte"))[offset:]
    unused = {c: list(np.flatnonzero(labels == c)) for c in range(len(classes))}
    sites = []
    for i, (size, weights) in enumerate(zip(sizes, IMAGE_SITE_WEIGHTS)):
        share = np.asarray(weights, dtype=float) / sum(weights)
        counts = np.floor(share * size).astype(int)
        counts[int(np.argmax(share))] += size - counts.sum()
        site = root / f"site-{i}"
        for c, n in enumerate(counts):
            if n == 0:
                continue  # a class this site never saw: no folder (an empty one is refused)
            folder = site / classes[c]
            folder.mkdir(parents=True, exist_ok=True)
            for index in unused[c][:n]:
                Image.fromarray(images[index]).save(folder / f"{index + offset}.png")
            unused[c] = unused[c][n:]
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
