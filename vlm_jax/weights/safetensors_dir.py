"""Reading and writing the tensors of a Hugging Face model directory with safetensors.

A directory holds either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Pickle checkpoints (``pytorch_model.bin``, ``*.pt``,
``*.pth``, ``*.ckpt``) are refused: unpickling runs arbitrary code and would need torch.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _conversion_hint(path: epath.Path) -> str:
    return ("convert it once with transformers: "
            f"`AutoModel.from_pretrained('{path}').save_pretrained(OUT_DIR, safe_serialization=True)` "
            "and load OUT_DIR")


def _read_file(path: epath.Path) -> dict[str, np.ndarray]:
    if path.is_file() and not str(path).startswith(("gs://", "s3://")):
        tensors = {}
        with safetensors.safe_open(str(path), framework="np") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
        return tensors
    return safetensors.numpy.load(path.read_bytes())


def read_tensors(directory: epath.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a model directory as numpy arrays (bfloat16 via ml_dtypes)."""
    directory = epath.Path(directory)
    if (directory / INDEX_FILE).exists():
        index = json.loads((directory / INDEX_FILE).read_text())
        shards = sorted(set(index["weight_map"].values()))
        missing = [shard for shard in shards if not (directory / shard).exists()]
        if missing:
            raise FileNotFoundError(f"{directory / INDEX_FILE} lists shards that are not there: {missing}")
        tensors = {}
        for shard in shards:
            tensors.update(_read_file(directory / shard))
        return tensors
    if (directory / SINGLE_FILE).exists():
        return _read_file(directory / SINGLE_FILE)
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(f"{directory} holds only pickle checkpoints ({', '.join(pickles)}), which are "
                         f"not loaded because unpickling can run arbitrary code; "
                         + _conversion_hint(directory))
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}; expected a Hugging Face "
                            "model directory saved with safe_serialization=True")


def check_not_pickle(path: epath.PathLike) -> None:
    """Refuses a path that names a pickle checkpoint file instead of a model directory."""
    path = epath.Path(path)
    if path.name.endswith(PICKLE_SUFFIXES) and not path.is_dir():
        raise ValueError(f"{path} is a pickle checkpoint, which is not loaded because unpickling can run "
                         "arbitrary code; " + _conversion_hint(path.parent))


def write_tensors(directory: epath.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes ``model.safetensors`` with the metadata transformers checks for (format=pt)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SINGLE_FILE).write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
