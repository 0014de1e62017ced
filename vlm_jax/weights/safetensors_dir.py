"""Reading and writing the tensors of a Hugging Face model directory with safetensors.

A directory holds either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Pickle checkpoints (``pytorch_model.bin``, ``*.pt``,
``*.pth``, ``*.ckpt``) are refused: unpickling runs arbitrary code and would need torch. A missing,
unreadable or corrupt file is a `UserError` naming the file.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from vlm_jax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _conversion_hint(path: epath.Path) -> str:
    return ("convert it once with transformers: "
            f"`AutoModel.from_pretrained('{path}').save_pretrained(OUT_DIR, safe_serialization=True)` "
            "and load OUT_DIR")


def read_file(path: epath.Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file; an unreadable or corrupt one is a one-line UserError."""
    try:
        if path.is_file() and not str(path).startswith(("gs://", "s3://")):
            tensors = {}
            with safetensors.safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
            return tensors
        return safetensors.numpy.load(path.read_bytes())
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied; fix its permissions.") from None
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"cannot read the weights file {path} ({type(error).__name__}: {reason}); it is corrupt "
                        "or truncated: download or export it again.") from None


def read_json(path: epath.Path) -> dict:
    """A JSON file of a model directory; a missing, unreadable or malformed one is a one-line UserError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; expected a file of a Hugging Face model directory.") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied; fix its permissions.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); it is corrupt or truncated: "
                        "download or export it again.") from None


def weights_file(directory: epath.PathLike) -> epath.Path:
    """The file that names a directory's weights: the shard index if there is one, else model.safetensors."""
    directory = epath.Path(directory)
    return directory / INDEX_FILE if (directory / INDEX_FILE).exists() else directory / SINGLE_FILE


def read_tensors(directory: epath.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a model directory as numpy arrays (bfloat16 via ml_dtypes)."""
    directory = epath.Path(directory)
    if (directory / INDEX_FILE).exists():
        index = read_json(directory / INDEX_FILE)
        if not isinstance(index.get("weight_map"), dict):
            raise UserError(f"{directory / INDEX_FILE} has no weight_map; it is corrupt: download or export it again.")
        shards = sorted(set(index["weight_map"].values()))
        missing = [shard for shard in shards if not (directory / shard).exists()]
        if missing:
            raise UserError(f"{directory / INDEX_FILE} lists shards that are not there: {missing}; download the "
                            "missing shards.")
        tensors = {}
        for shard in shards:
            tensors.update(read_file(directory / shard))
        return tensors
    if (directory / SINGLE_FILE).exists():
        return read_file(directory / SINGLE_FILE)
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UserError(f"{directory} holds only pickle checkpoints ({', '.join(pickles)}), which are "
                        f"not loaded because unpickling can run arbitrary code; "
                        + _conversion_hint(directory))
    raise UserError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}; expected a Hugging Face "
                    "model directory saved with safe_serialization=True.")


def check_not_pickle(path: epath.PathLike) -> None:
    """Refuses a path that names a pickle checkpoint file instead of a model directory."""
    path = epath.Path(path)
    if path.name.endswith(PICKLE_SUFFIXES) and not path.is_dir():
        raise UserError(f"{path} is a pickle checkpoint, which is not loaded because unpickling can run "
                        "arbitrary code; " + _conversion_hint(path.parent))


def write_tensors(directory: epath.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes ``model.safetensors`` with the metadata transformers checks for (format=pt)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SINGLE_FILE).write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
