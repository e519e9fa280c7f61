"""Safe file I/O shared by every writer and reader: atomic writes and the PEFT adapter-directory format.

Every write goes to a temporary file (or folder) next to its destination and is renamed into place, so an
interrupted run never leaves a partial file. Tensors are read from safetensors; a legacy ``adapter_model.bin`` is
read with ``torch.load(weights_only=True)``, never unpickled freely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` for a temporary file in ``path``'s folder, then renames it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata=None) -> Path:
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage: give it plain copies on the CPU.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def atomic_write_dir(path: PathLike, fill: Callable[[Path], None]) -> Path:
    """Builds a folder with ``fill(tmp_dir)`` next to ``path`` and swaps it into place (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file (or a weights-only torch ``.bin``), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".bin":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated or not a weights-only pickle
            raise ValueError(f"cannot read {path} as a weights-only torch file: {e}") from e
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise ValueError(f"cannot read {path} as safetensors (corrupt or truncated?): {e}") from e


def read_peft_adapter_dir(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, adapter_config) of a PEFT adapter folder: adapter_model.safetensors (or .bin) + config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"not a PEFT adapter folder: {path}")
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        weights = path / ADAPTER_WEIGHTS_BIN
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN}")
    return load_tensors(weights), config


def write_peft_adapter_dir(path: PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Writes a PEFT-loadable adapter folder atomically (the whole folder appears at once)."""

    def fill(tmp: Path) -> None:
        atomic_save_safetensors(tmp / ADAPTER_WEIGHTS, state_dict, metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, dict(config))

    return atomic_write_dir(path, fill)
