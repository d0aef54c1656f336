"""Tiny image folders for the own-files tests: one sub-folder per class, one grey PNG per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def tiny_image_folder(root: Path, size: tuple[int, int] = (8, 8), classes: tuple[str, ...] = ("cat", "dog"),
                      per_class: int = 3, prefix: str = "") -> Path:
    """Image ``i`` of class ``label`` is a flat ``size`` (width, height) image of value 40 * label + i,
    saved as ``<root>/<class>/<prefix><i>.png``; returns ``root``."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full(size[::-1], 40 * label + i, dtype=np.uint8)).save(root / name / f"{prefix}{i}.png")
    return root
