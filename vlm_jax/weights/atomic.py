"""Exports that either finished or are not there: write aside, mark complete last, rename into place.

    with atomic_export("/ckpt/export", kind="hf_clip") as staging:
        (staging / "config.json").write_text(...)       # every file of the export

A local export is written into the sibling `<dir>.tmp-<pid>`; `export_complete.json` (MARKER) is
written last, then the directory is renamed to `<dir>`, so a reader never finds a half-written
export under that name, whatever stops the writer. An older export there is replaced: one that
holds the marker is swapped out by two renames (between them `<dir>` is briefly absent, never
partial); a directory without the marker (files of someone else's) keeps its other files and gets
this export's files renamed over it one by one, the marker last. Object stores (gs://) have no
directory rename: the export is written in place, an older marker removed first and the new one
written last. Either way the marker, not config.json, says an export finished (`export_finished`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

from etils import epath

from vlm_jax.errors import UserError

MARKER = "export_complete.json"


def export_finished(directory: epath.PathLike) -> bool:
    """Whether `directory` holds an export whose writer got to its last file (the marker)."""
    return (epath.Path(directory) / MARKER).exists()


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(final: epath.Path) -> None:
    """Removes `<dir>.tmp-<pid>` and `<dir>.old-<pid>` siblings left by writers that died (SIGKILL)."""
    for pattern in (f"{final.name}.tmp-*", f"{final.name}.old-*"):
        for sibling in final.parent.glob(pattern):
            pid = sibling.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)


def _write_marker(directory: epath.Path, record: dict[str, Any]) -> None:
    files = sorted(path.name for path in directory.iterdir() if path.name != MARKER)
    record = {**record, "files": files, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (directory / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _move_into_place(staging: epath.Path, final: epath.Path) -> None:
    if not final.exists():
        os.rename(staging, final)
        return
    if export_finished(final) or not any(final.iterdir()):
        retired = final.parent / f"{final.name}.old-{os.getpid()}"
        os.rename(final, retired)
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
        return
    for path in sorted(staging.iterdir(), key=lambda path: path.name == MARKER):
        target = final / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_export(path: epath.PathLike, **record: Any) -> Iterator[epath.Path]:
    """Yields the directory to write an export of `path` into; on a clean exit writes the marker
    (holding `record`, the file names and the time) and puts the export at `path`. An exception
    leaves `path` as it was (locally) or without a marker (gs://)."""
    final = epath.Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not _is_local(final):
            if (final / MARKER).exists():
                (final / MARKER).unlink()
            final.mkdir(parents=True, exist_ok=True)
            yield final
            _write_marker(final, record)
            return
        _remove_stale_siblings(final)
        staging = final.parent / f"{final.name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            yield staging
            _write_marker(staging, record)
            _move_into_place(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except PermissionError as error:
        raise UserError(f"cannot write the export {final}: permission denied on {error.filename or final}; "
                        "choose a writable directory.") from None
