"""A site's own files, read with maintained libraries and checked against the run's data contract.

Tables: CSV and Parquet (pandas / pyarrow), NumPy ``.npz`` with one array per column, or a
Hugging Face ``datasets`` directory (``save_to_disk``). Images: a folder with one sub-folder
per class (Pillow), an ``.npz`` with ``images`` and ``labels``, or a ``datasets`` directory with
``image`` and ``label`` columns.

Every refusal is a :class:`LocalDataError` naming the file, the column or the row. The server
hears it as the site's reason for sitting the run out, without the row, the image file or a count
of bad records (``LocalDataError.public``): those single out records. Nor does it hear where the
files lie (a file's name only) or what the site holds beyond the contract (its other columns, a
class folder's name). The site's log keeps all of it, and no message ever quotes a cell's value.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedguard.clients.datasets import LocalDataError
from fedguard.conf.contract import Contract, ImageContract, TabularContract, class_text

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet", ".pq", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# What `datasets.Dataset.save_to_disk` leaves in a directory.
HF_MARKERS = ("dataset_info.json", "state.json")
HF_DICT_MARKER = "dataset_dict.json"


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (all((path / m).is_file() for m in HF_MARKERS) or (path / HF_DICT_MARKER).is_file())


def files_fingerprint(path: Path) -> str:
    """The id of the site's per-data privacy account: SHA-256 over the sorted digests of every file
    under its ``--data`` path.

    It depends on what the site holds and on nothing a run chooses (seed, validation split, contract,
    scaling): a server that varied those would otherwise open a fresh, unspent account on the same
    records with every run. File names and order do not count, so moving or renaming keeps the account.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digests = []
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(block)
        digests.append(digest.digest())
    return hashlib.sha256(b"fedguard-site-files/1" + b"".join(sorted(digests))).hexdigest()


def resolve_data_path(path: Path, contract: Contract) -> Path:
    """The file or folder a site's ``--data PATH`` means: the path itself, or the one data file in it."""
    if not path.exists():
        raise LocalDataError(f"{path}: no such file or directory (this site's --data)")
    if path.is_file() or _is_hf_dir(path):
        return path
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    if isinstance(contract, ImageContract):
        files = [p for p in files if p.suffix.lower() == ".npz"]
        if not files:
            return path  # an image folder: one sub-folder per class
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise LocalDataError(f"{path}: expected one data file ({', '.join(TABLE_SUFFIXES)}) in this directory; found {found}")
    return files[0]


def _load_hf(path: Path):
    from datasets import DatasetDict, load_from_disk  # on first use: `datasets` is slow to import

    try:
        data = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure of the library means the same to the site
        raise LocalDataError(f"{path}: cannot read the saved `datasets` directory ({type(err).__name__}: {err})") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise LocalDataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(data)})")
        data = data["train"]
    return data


def read_table(path: Path):
    """The file as a pandas DataFrame (one column per array of an .npz)."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if _is_hf_dir(path):
            return _load_hf(path).to_pandas()
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                columns = {key: arrays[key] for key in arrays.files}
            if bad := [key for key, values in columns.items() if values.ndim != 1]:
                raise LocalDataError(f"{path}: array {bad[0]!r} is not one value per row (a table's .npz holds one "
                                     "1-D array per column)")
            if len({len(values) for values in columns.values()}) > 1:
                raise LocalDataError(f"{path}: its column arrays have different lengths")
            return pd.DataFrame(columns)
    except LocalDataError:
        raise
    except Exception as err:  # noqa: BLE001 - a parser's failure is the file's problem, named as such
        raise LocalDataError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    raise LocalDataError(f"{path}: unknown table format {suffix!r}; allowed: {', '.join(TABLE_SUFFIXES)} or a "
                         "`datasets` directory")


def _numeric_column(values, column: str, where: Path) -> np.ndarray:
    import pandas as pd

    as_numbers = pd.to_numeric(values, errors="coerce")
    wrong = as_numbers.isna() & values.notna()
    if wrong.any():
        row = int(np.flatnonzero(wrong.to_numpy())[0]) + 1
        logger.error("%s row %d column %r: %r is not a number", where, row, column, values.iloc[row - 1])
        raise LocalDataError(f"{where}: column {column!r} must be numeric; row {row} is not a number "
                             f"({int(wrong.sum())} such row(s))",
                             public=f"{Path(where).name}: column {column!r} must be numeric and is not")
    numbers = as_numbers.to_numpy(dtype=np.float64)
    if (bad := ~np.isfinite(numbers)).any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise LocalDataError(f"{where}: column {column!r} row {row} is empty, NaN or infinite ({int(bad.sum())} such row(s))",
                             public=f"{Path(where).name}: column {column!r} holds empty, NaN or infinite values")
    return numbers


def _coded_column(values, column: str, allowed: tuple[str, ...], where: Path, what: str) -> np.ndarray:
    """Indices into ``allowed``; a missing or unlisted value is refused naming the row."""
    index = {name: i for i, name in enumerate(allowed)}
    codes = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values.tolist(), start=1):
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            raise LocalDataError(f"{where}: column {column!r} row {row} is empty or NaN",
                                 public=f"{Path(where).name}: column {column!r} holds empty or NaN values")
        code = index.get(class_text(value))
        if code is None:
            logger.error("%s row %d column %r: %r is not one of %s", where, row, column, value, list(allowed))
            raise LocalDataError(f"{where}: column {column!r} row {row} holds a {what} the contract does not list "
                                 f"(allowed: {', '.join(allowed)})",
                                 public=f"{Path(where).name}: column {column!r} holds a {what} the contract does not list")
        codes[row - 1] = code
    return codes


@dataclass(frozen=True)
class TableRecords:
    """A site's table as the contract reads it, before any scaling: numeric columns (float64, in
    contract order), category indices (one array per categorical feature) and label indices."""

    numeric: np.ndarray
    codes: tuple[np.ndarray, ...]
    labels: np.ndarray

    def take(self, rows: np.ndarray) -> TableRecords:
        return TableRecords(self.numeric[rows], tuple(c[rows] for c in self.codes), self.labels[rows])


@dataclass(frozen=True)
class ImageRecords:
    """A site's images as N x C x H x W uint8 pixels of the contract's size, and label indices."""

    pixels: np.ndarray
    labels: np.ndarray

    def take(self, rows: np.ndarray) -> ImageRecords:
        return ImageRecords(self.pixels[rows], self.labels[rows])


SiteRecords = TableRecords | ImageRecords


def table_records(path: Path, contract: TabularContract) -> TableRecords:
    """The file's contract columns, checked (each refusal names the column and row)."""
    frame = read_table(path)
    if missing := [c for c in contract.columns if c not in frame.columns]:
        raise LocalDataError(f"{path}: column {missing[0]!r} is missing ({len(missing)} contract column(s) missing; "
                             f"the file has {', '.join(map(str, frame.columns[:20]))})",
                             public=f"{Path(path).name}: column {missing[0]!r} is missing")
    if len(frame) == 0:
        raise LocalDataError(f"{path}: holds no rows", public=f"{Path(path).name}: holds no rows")
    numeric, codes = [], []
    for feature in contract.features:
        if feature.kind == "numeric":
            numeric.append(_numeric_column(frame[feature.name], feature.name, path))
        else:
            codes.append(_coded_column(frame[feature.name], feature.name, feature.categories, path, "category"))
    labels = _coded_column(frame[contract.label], contract.label, contract.classes, path, "label")
    matrix = np.stack(numeric, axis=1) if numeric else np.zeros((len(frame), 0))
    return TableRecords(matrix, tuple(codes), labels)


def encode_records(records: SiteRecords, contract: Contract) -> np.ndarray:
    """Model inputs: numeric ``(value - center) / scale``, categorical one-hot, in contract order;
    images ``(pixel / 255 - mean) / std``."""
    if isinstance(records, ImageRecords):
        assert isinstance(contract, ImageContract)
        pixels = records.pixels.astype(np.float32) / 255.0
        return ((pixels - contract.mean) / contract.std).astype(np.float32)
    assert isinstance(contract, TabularContract)
    blocks, numeric, coded = [], iter(records.numeric.T), iter(records.codes)
    for feature in contract.features:
        if feature.kind == "numeric":
            blocks.append(((next(numeric) - feature.center) / feature.scale)[:, None])
        else:
            blocks.append(np.eye(feature.width)[next(coded)])
    return np.concatenate(blocks, axis=1).astype(np.float32)


def table_examples(path: Path, contract: TabularContract) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (numeric scaled, categorical one-hot, in contract order) and label indices."""
    records = table_records(path, contract)
    return encode_records(records, contract), records.labels


def _fit_image(image, contract: ImageContract, where: str) -> np.ndarray:
    """One image as a C x H x W uint8 array of the contract's size, by its resize rule."""
    from PIL import Image

    image = image.convert("L" if contract.channels == 1 else "RGB")
    size = (contract.width, contract.height)
    if image.size != size:
        got = f"{image.size[0]}x{image.size[1]}"
        if contract.resize == "refuse":
            raise LocalDataError(f"{where}: image is {got} (width x height), the contract needs "
                                 f"{contract.width}x{contract.height} and resize=refuse",
                                 public=f"an image is not {contract.width}x{contract.height} and the contract says resize=refuse")
        if contract.resize == "resize":
            image = image.resize(size, Image.Resampling.BILINEAR)
        else:  # center_crop
            if image.size[0] < contract.width or image.size[1] < contract.height:
                raise LocalDataError(f"{where}: image is {got}, smaller than the contract's "
                                     f"{contract.width}x{contract.height} (resize=center_crop)",
                                     public=f"an image is smaller than {contract.width}x{contract.height} "
                                            "(resize=center_crop)")
            left, top = (image.size[0] - contract.width) // 2, (image.size[1] - contract.height) // 2
            image = image.crop((left, top, left + contract.width, top + contract.height))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _folder_images(root: Path, contract: ImageContract) -> tuple[list[np.ndarray], list[int]]:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise LocalDataError(f"{root}: holds no class sub-folders (one per class: {', '.join(contract.classes)})",
                             public=f"{root.name}: holds no class sub-folders")
    if unknown := [p.name for p in class_dirs if p.name not in contract.classes]:
        # Which class the site holds beyond the contract is data about its records: log only.
        raise LocalDataError(f"{root / unknown[0]}: folder is not a class of the contract "
                             f"(allowed: {', '.join(contract.classes)})",
                             public=f"{root.name}: a class folder is not a class of the contract")
    images, labels = [], []
    for folder in class_dirs:
        for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                with Image.open(file) as image:
                    images.append(_fit_image(image, contract, str(file)))
            except (UnidentifiedImageError, OSError) as err:
                raise LocalDataError(f"{file}: unreadable image ({type(err).__name__})",
                                     public=f"an image in class folder {folder.name!r} is unreadable") from None
            labels.append(contract.classes.index(folder.name))
    if not images:
        raise LocalDataError(f"{root}: its class folders hold no images",
                             public=f"{root.name}: its class folders hold no images")
    return images, labels


def _label_index(value, contract: ImageContract, where: str) -> int:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        if 0 <= int(value) < contract.num_classes:
            return int(value)
    elif class_text(value) in contract.classes:
        return contract.classes.index(class_text(value))
    raise LocalDataError(f"{where}: label outside the contract's classes (0..{contract.num_classes - 1} or a name)",
                         public=f"a label is outside the contract's classes (0..{contract.num_classes - 1} or a name)")


def _array_images(path: Path, contract: ImageContract) -> tuple[list[np.ndarray], list[int]]:
    """Images from an .npz (``images``, ``labels``) or a `datasets` dir (``image``, ``label``)."""
    from PIL import Image

    if _is_hf_dir(path):
        data = _load_hf(path)
        if missing := [c for c in ("image", "label") if c not in data.column_names]:
            raise LocalDataError(f"{path}: column {missing[0]!r} is missing (an image dataset needs 'image' and 'label')")
        pictures, raw_labels = data["image"], data["label"]
    else:
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if missing := [k for k in ("images", "labels") if k not in arrays.files]:
                    raise LocalDataError(f"{path}: array {missing[0]!r} is missing (an image .npz needs 'images', 'labels')")
                stack, raw_labels = arrays["images"], arrays["labels"].tolist()
        except LocalDataError:
            raise
        except Exception as err:  # noqa: BLE001
            raise LocalDataError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
        if stack.ndim == 4:
            stack = stack[:, 0] if stack.shape[1] == 1 else stack.transpose(0, 2, 3, 1)
        if stack.ndim != 3 and not (stack.ndim == 4 and stack.shape[-1] == 3):
            raise LocalDataError(f"{path}: 'images' must be N x H x W or N x C x H x W; got {stack.shape}")
        if not np.issubdtype(stack.dtype, np.integer) or stack.min(initial=0) < 0 or stack.max(initial=0) > 255:
            raise LocalDataError(f"{path}: 'images' must hold integer pixel values 0..255")
        pictures = [Image.fromarray(a.astype(np.uint8)) for a in stack]
    if len(pictures) != len(raw_labels):
        raise LocalDataError(f"{path}: {len(pictures)} images but {len(raw_labels)} labels")
    images = [_fit_image(p, contract, f"{path} image {i + 1}") for i, p in enumerate(pictures)]
    labels = [_label_index(v, contract, f"{path} image {i + 1}") for i, v in enumerate(raw_labels)]
    if not images:
        raise LocalDataError(f"{path}: holds no images")
    return images, labels


def image_records(path: Path, contract: ImageContract) -> ImageRecords:
    is_folder = path.is_dir() and not _is_hf_dir(path)
    images, labels = _folder_images(path, contract) if is_folder else _array_images(path, contract)
    return ImageRecords(np.stack(images), np.asarray(labels, dtype=np.int64))


def image_examples(path: Path, contract: ImageContract) -> tuple[np.ndarray, np.ndarray]:
    """N x C x H x W float32 inputs (``(pixel / 255 - mean) / std``) and label indices."""
    records = image_records(path, contract)
    return encode_records(records, contract), records.labels


def read_site_records(data: str, contract: Contract) -> SiteRecords:
    """A site's records from its ``--data`` path, checked against ``contract``, not yet scaled."""
    path = resolve_data_path(Path(data), contract)
    if isinstance(contract, TabularContract):
        return table_records(path, contract)
    return image_records(path, contract)


def read_site_examples(data: str, contract: Contract) -> tuple[np.ndarray, np.ndarray]:
    """A site's examples from its ``--data`` path, checked against ``contract``."""
    path = resolve_data_path(Path(data), contract)
    if isinstance(contract, TabularContract):
        return table_examples(path, contract)
    return image_examples(path, contract)
