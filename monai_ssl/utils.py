"""Small shared utilities: atomic file writes, stale temporary files, safe checkpoint loading,
and errors whose message is all a user needs."""

from __future__ import annotations

import os
import pickle
import re
import secrets
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "MissingFileError",
    "SettingError",
    "UnsafeCheckpointError",
    "UserError",
    "atomic_path",
    "atomic_write",
    "remove_stale_temps",
    "remove_stale_temps_in",
    "safe_torch_load",
]

# the temporary files of atomic_path: ".<target name>.<8 characters>.tmp" (8 hex digits since
# 0644 files; the 8 characters of tempfile.mkstemp before); nothing else is ever removed
_TEMP_INFIX = r"\.[A-Za-z0-9_]{8}\.tmp"


class UserError(RuntimeError):
    """An error caused by the user's files or settings whose message says what is wrong and what to do.

    When one ends a program uncaught (also as the cause of a wrapper, e.g. MONAI's "Failed to
    evaluate" of a bundle config), only ``error: <message>`` is printed, not a traceback; set
    ``MONAI_SSL_TRACEBACK=1`` to see the traceback. Creating one installs that ``sys.excepthook``
    (once; every other exception goes to the previous hook unchanged).
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        _install_brief_excepthook()


class MissingFileError(UserError, FileNotFoundError):
    """A file the run needs does not exist; the message says how to make it."""


class UnsafeCheckpointError(UserError):
    """A checkpoint that a safe (``weights_only=True``) ``torch.load`` refuses: it holds pickled objects."""


def _user_error_in_chain(exc: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``exc`` and the exceptions it was raised from/during."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class SettingError(UserError, ValueError):
    """A wrong setting (a command-line value, a value that disagrees with a model card): a
    ``ValueError`` that, uncaught, prints as one ``error: ...`` line like every :class:`UserError`."""


def _install_brief_excepthook() -> None:
    """Make an uncaught exception whose chain holds a :class:`UserError` print one line."""
    if getattr(sys.excepthook, "_monai_ssl_brief", False):
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None) -> None:
        user_error = _user_error_in_chain(exc)
        if user_error is None or os.environ.get("MONAI_SSL_TRACEBACK"):
            previous(exc_type, exc, tb)
        else:
            print(f"error: {user_error}", file=sys.stderr)

    hook._monai_ssl_brief = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _new_temp(path: Path) -> Path:
    """Create an empty ``.<name>.<8 hex>.tmp`` next to ``path`` with mode ``0o666 & ~umask``."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    On any error (or a kill) ``path`` keeps its previous content: the temporary file is removed
    (a killed process leaves a ``.<name>.<8 hex>.tmp`` file that never replaces ``path``; see
    :func:`remove_stale_temps`). The file gets the mode a plain ``open(path, "w")`` would give
    (``0o666`` less the umask, i.e. ``0644`` under the usual umask ``022``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` left for ``path`` in a killed run.

    Only files named ``.<name of path>.<8 characters>.tmp`` next to ``path`` are removed (no
    other file, whatever its name). Call it when a run starts, before it writes ``path``; two
    processes writing the same file at once are not supported anyway. Returns the removed paths.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}") + _TEMP_INFIX)
    removed = []
    for candidate in path.parent.iterdir():
        if pattern.fullmatch(candidate.name) and candidate.is_file() and not candidate.is_symlink():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed



def remove_stale_temps_in(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove every temporary file that :func:`atomic_path` left in ``folder`` (and, with
    ``recursive``, its sub-folders) in a killed run: files named ``.<name>.<8 characters>.tmp``,
    no other file. For stores with many files (APPG masks); call it while holding the store's lock."""
    root = Path(folder)
    if not root.is_dir():
        return []
    pattern = re.compile(r"\..+" + _TEMP_INFIX)
    removed = []
    for candidate in root.rglob(".*.tmp") if recursive else root.glob(".*.tmp"):
        if pattern.fullmatch(candidate.name) and candidate.is_file() and not candidate.is_symlink():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed

def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", remedy: str = "", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what to do.

    A file that holds pickled objects (code a full unpickling would run, or objects such as NumPy
    arrays that only a full unpickling restores) is refused with :class:`UnsafeCheckpointError`
    and nothing in it runs; a missing file raises :class:`MissingFileError` and an unreadable one
    :class:`UserError`, each naming ``what`` and ``path`` and ending with ``remedy``.
    """
    import torch

    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist{tail}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        holds = f"a pickled reference to {found.group(1)}" if found else "pickled objects, not only tensors and plain values"
        legacy = (
            " (NumPy objects: e.g. a resume file of a monai_ssl version before random states were stored as tensors)"
            if found and found.group(1).startswith("numpy")
            else ""
        )
        raise UnsafeCheckpointError(
            f"refusing to load {what} {path}: it holds {holds}{legacy}, which only an unsafe load "
            f"(weights_only=False) could restore and which could run code; nothing in it was run{tail}"
        ) from exc
    except Exception as exc:
        raise UserError(f"cannot read {what} {path} ({type(exc).__name__}: {exc}){tail}") from exc

@contextmanager
def modules_replaced(stand_ins: Mapping[str, types.ModuleType]) -> Iterator[None]:
    """Put ``stand_ins`` in ``sys.modules`` for the ``with`` block, then restore what was there
    (used to import a package past a dependency that cannot import here, e.g. timm/torchvision)."""
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
