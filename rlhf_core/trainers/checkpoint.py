"""The checkpoint format: tensors in safetensors, everything else in JSON, a manifest written last. No pickle.

A checkpoint directory holds

    model.safetensors                 the trained model's state dict (the unwrapped model, LoRA base included)
    optimizer.safetensors / .json     the optimizer's state: its tensors / the structure around them
    scheduler.json                    the LR scheduler's state (and `object-<i>.*` for extra registered objects)
    scaler.json                       the fp16 GradScaler's state (only with one)
    rng-<process>.safetensors / .json the RNG states of one process: torch CPU and CUDA generators / python and
                                      numpy (written by each process itself)
    trainer_state.json                the loop's own state (written by the caller)
    manifest.json                     every other file's size and sha256; written last, so a directory with a
                                      manifest that matches its files is complete

Loading reads only safetensors (`safetensors.torch.load_file`, which cannot run code) and JSON, so replacing a
checkpoint file can corrupt a resume but never execute anything.

`encode_tree` / `decode_tree` carry any state dict made of dicts, lists, tuples, scalars, strings, None and
tensors: each tensor is replaced by `{"__tensor__": key}` and stored under `key` in the safetensors file;
tuples and dicts with non-string keys (an optimizer's `{param_index: state}`) are tagged so they come back
as they were.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhf_core.atomic import fsync_dir, fsync_file, sha256_file

MANIFEST_FILENAME = "manifest.json"
MODEL_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------------------
# State dicts ↔ (JSON, tensors)
# ------------------------------------------------------------------------------------------------------------


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-serialisable copy of `obj`; its tensors are moved (detached, on CPU) into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, encode_tree(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path or 'root'} in a checkpoint")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: decode_tree(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def save_tree(directory: Path, stem: str, state: Any) -> None:
    """`stem.json` (+ `stem.safetensors` when `state` holds tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_tree(state, tensors)
    if tensors:
        save_file(tensors, directory / f"{stem}.safetensors")
    (directory / f"{stem}.json").write_text(json.dumps(encoded))


def load_tree(directory: Path, stem: str) -> Any:
    """What `save_tree` stored under `stem`."""
    tensor_file = directory / f"{stem}.safetensors"
    tensors = load_file(tensor_file) if tensor_file.is_file() else {}
    return decode_tree(json.loads((directory / f"{stem}.json").read_text()), tensors)


# ------------------------------------------------------------------------------------------------------------
# Model and RNG
# ------------------------------------------------------------------------------------------------------------


def save_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """The (unwrapped) model's state dict; tied weights are stored once."""
    save_model(model, str(directory / MODEL_FILE), force_contiguous=True)


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load `model.safetensors` into the (unwrapped) model; every key must match."""
    missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}"
        )


def save_rng(directory: Path, process_index: int) -> None:
    """This process's RNG states: torch generators as uint8 tensors, python's and numpy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, directory / f"rng-{process_index}.safetensors")
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    states = {"python": encode_tree(random.getstate(), {}), "numpy": numpy_state}
    (directory / f"rng-{process_index}.json").write_text(json.dumps(states))


def load_rng(directory: Path, process_index: int) -> bool:
    """Restore this process's RNG states; False when the checkpoint has none for it (other process count)."""
    tensor_file = directory / f"rng-{process_index}.safetensors"
    if not tensor_file.is_file():
        return False
    tensors = load_file(tensor_file)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    states = json.loads((directory / f"rng-{process_index}.json").read_text())
    random.setstate(decode_tree(states["python"], {}))
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    return True


# ------------------------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------------------------


def write_manifest(directory: Path) -> None:
    """Hash and fsync every file of `directory`, then write and fsync `manifest.json` and the directory.
    Call once every other file is written."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILENAME):
        fsync_file(path)
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = directory / MANIFEST_FILENAME
    manifest.write_text(json.dumps({"format": 1, "files": files}, indent=2, sort_keys=True))
    fsync_file(manifest)
    fsync_dir(directory)


def manifest_problem(directory: Path, check_hashes: bool) -> str | None:
    """Why `directory` is not a complete checkpoint (None: it is): no readable manifest, or a listed file
    missing or of another size — or, with `check_hashes`, of other contents."""
    try:
        files = json.loads((directory / MANIFEST_FILENAME).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest.json"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if check_hashes and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None
