"""``fedguard serve DIR``: an exported model behind HTTP (FastAPI on uvicorn).

``POST /predict`` takes raw inputs as the model card's data contract describes them and
answers class, class name and probabilities; ``GET /model-card`` returns the card (so a
caller sees the privacy guarantee of the model it queries); ``GET /health``. Every input is
checked against the contract before the model sees it: a bad request gets a 4xx naming the
bad field, never a 500 from deep inside the model.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import io
import json
import logging
import math
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fedguard.server.export import MODEL_FILES, load_exported
from fedguard.server.model_card import load_card

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # 256 Fashion-MNIST images as JSON fit with room to spare


class InputError(ValueError):
    """A request that does not fit the contract; ``loc`` names the field (FastAPI's 422 shape)."""

    def __init__(self, loc: list[str | int], msg: str, status: int = 422) -> None:
        super().__init__(msg)
        self.loc, self.msg, self.status = loc, msg, status


@dataclass(frozen=True)
class Contract:
    """The parts of the card's data contract the validator needs, read once at start."""

    kind: str
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    raw_range: tuple[float, float] | None

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Contract:
        c = card["contract"]
        return cls(c["kind"], tuple(c["input_shape"]), tuple(c["classes"]),
                   tuple(c["feature_names"]) if c.get("feature_names") else None,
                   tuple(c["raw_range"]) if c.get("raw_range") else None)


def _number(value: Any, loc: list[str | int]) -> float:
    # bool is an int subclass and "1.5" would pass np.asarray: both are type errors here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(loc, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InputError(loc, "NaN or infinite values are not accepted")
    return float(value)


def _nested(value: Any, shape: tuple[int, ...], loc: list[str | int]) -> list:
    """Check a nested list has exactly ``shape``; returns it with every leaf a float."""
    if not shape:
        return _number(value, loc)  # type: ignore[return-value]
    if not isinstance(value, list):
        raise InputError(loc, f"expected an array of length {shape[0]}, got {type(value).__name__}")
    if len(value) != shape[0]:
        raise InputError(loc, f"expected length {shape[0]} here (shape {list(shape)}), got {len(value)}")
    return [_nested(item, shape[1:], [*loc, i]) for i, item in enumerate(value)]


def _example(value: Any, contract: Contract, loc: list[str | int]) -> np.ndarray:
    shape = contract.input_shape
    if contract.kind == "tabular" and isinstance(value, dict):
        names = contract.feature_names
        if names is None:
            raise InputError(loc, "this model's features have no names: send a list of numbers")
        unknown = sorted(set(value) - set(names))
        missing = [name for name in names if name not in value]
        if unknown or missing:
            raise InputError(loc, f"unknown feature(s) {unknown[:5]}, missing feature(s) {missing[:5]}")
        return np.array([_number(value[name], [*loc, name]) for name in names], dtype=np.float32)
    if contract.kind == "tabular" and isinstance(value, list) and len(value) != shape[0]:
        raise InputError(loc, f"expected {shape[0]} features, got {len(value)}")
    if contract.kind == "image" and shape[0] == 1 and _is_matrix(value):  # one channel may come as H x W
        return np.array(_nested(value, shape[1:], loc), dtype=np.float32)[None]
    return np.array(_nested(value, shape, loc), dtype=np.float32)


def _is_matrix(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list) and bool(value[0]) \
        and not isinstance(value[0][0], list)


def _png(text: Any, contract: Contract, loc: list[str | int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # torchvision's dependency; only images need it

    if not isinstance(text, str):
        raise InputError(loc, f"expected a base64 string, got {type(text).__name__}")
    channels, height, width = contract.input_shape
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as err:
        raise InputError(loc, f"not a base64-encoded PNG image: {err}") from err
    if image.size != (width, height):
        raise InputError(loc, f"image is {image.size[0]}x{image.size[1]}, the model takes {width}x{height}")
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    low, high = contract.raw_range or (0.0, 255.0)
    return low + pixels / 255.0 * (high - low)


def parse_batch(body: Any, contract: Contract, max_batch: int) -> np.ndarray:
    """The request body as a float32 batch of the contract's shape, or InputError."""
    if not isinstance(body, dict):
        raise InputError(["body"], 'expected a JSON object: {"inputs": [...]} (or {"images_png": [...]} for images)')
    fields = [key for key in ("inputs", "images_png") if key in body]
    if len(fields) != 1 or set(body) - {"inputs", "images_png"}:
        raise InputError(["body"], 'send exactly one field: "inputs" (or "images_png" for image models)')
    field_name = fields[0]
    if field_name == "images_png" and contract.kind != "image":
        raise InputError(["body", field_name], "this model takes tabular rows, not images")
    batch = body[field_name]
    if not isinstance(batch, list):
        raise InputError(["body", field_name], f"expected a list of examples, got {type(batch).__name__}")
    if not batch:
        raise InputError(["body", field_name], "empty batch: send at least one example")
    if len(batch) > max_batch:
        raise InputError(["body", field_name], f"batch of {len(batch)} exceeds the limit of {max_batch}")
    parse = _png if field_name == "images_png" else _example
    return np.stack([parse(item, contract, ["body", field_name, i]) for i, item in enumerate(batch)])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _error(err: InputError) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": err.loc, "msg": err.msg, "type": "value_error"}]}, status_code=err.status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(["body"], f"body of {declared} bytes exceeds the limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(["body"], f"body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model_dir: Path | str, max_batch: int = DEFAULT_MAX_BATCH,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app for one exported model directory (``fedguard export --out DIR``)."""
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    fmt = card["export"]["format"]
    model_path = model_dir / MODEL_FILES[fmt]
    predict_logits = load_exported(model_path, fmt)
    contract = Contract.from_card(card)
    app = FastAPI(title="fedguard model", description=card["headline"])

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "format": fmt, "sha256": card["export"]["sha256"]}

    @app.get("/model-card")
    def model_card() -> dict[str, Any]:
        return card

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            raw = await _read_body(request, max_body_bytes)
            try:
                body = json.loads(raw)  # NaN/Infinity parse to floats and are refused by the checks
            except (ValueError, RecursionError) as err:
                raise InputError(["body"], f"not valid JSON: {err}") from err
            batch = parse_batch(body, contract, max_batch)
        except InputError as err:
            logger.info("rejected request: %s: %s", err.loc, err.msg)
            return _error(err)
        probabilities = _softmax(predict_logits(batch).astype(np.float64))
        predictions = [{"class_index": int(row.argmax()), "class_name": contract.classes[int(row.argmax())],
                        "probabilities": [round(float(p), 6) for p in row]} for row in probabilities]
        return JSONResponse({"predictions": predictions})

    logger.info("serving %s (%s): %s", model_path, fmt, card["headline"])
    return app


def serve_main(argv: list[str]) -> int:
    """Run uvicorn in the foreground; it stops cleanly on SIGTERM and SIGINT (Ctrl-C)."""
    parser = argparse.ArgumentParser(prog="fedguard serve", description="Serve an exported model over HTTP.")
    parser.add_argument("model_dir", type=Path, help="a directory written by `fedguard export --out`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # an imported library may have configured the root logger already
    try:
        app = create_app(args.model_dir, args.max_batch, args.max_body_bytes)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        print(f"fedguard serve: cannot load a model from {args.model_dir}: {err}", flush=True)
        return 1
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False))
    server.run()
    logger.info("stopped after %s", "a signal" if server.stopped_by_signal else "the server ended")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, except that after a graceful stop on SIGTERM/SIGINT the process exits 0
    (uvicorn re-raises the signal, so a supervisor would see 'killed by signal')."""

    stopped_by_signal = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        logger.info("received %s: finishing open requests, then stopping", signal.Signals(sig).name)
        self.stopped_by_signal = True
        self.handle_exit(sig, frame)
