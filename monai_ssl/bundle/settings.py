"""Coercion of the bundles' user-facing settings, so that a command-line switch means what it says.

``python -m monai.bundle run ... --amp false`` hands the config the *string* ``'false'``
(python-fire only types ``False``, ``0``, ``1e-3``, ``[1, 2]``; lowercase ``true``/``false`` and
anything unparsable stay strings), and a non-empty string is truthy. ``monai.bundle run`` has no
hook between the overrides and the config, so every bundle config routes each of its boolean and
numeric top-level ids through one of these functions in its ``settings`` section
(``"settings": {"amp": "$monai_ssl.bundle.as_bool(@amp, 'amp')", ...}``); the components read
``@settings#amp``, never ``@amp``, and the first item of ``initialize`` resolves ``@settings``
(:func:`log_settings`) so that a bad value stops the run at start-up with an error naming the id.
"""

from __future__ import annotations

import ast
import os
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_ssl.utils import SettingError

__all__ = ["BOOL_WORDS", "as_bool", "as_float", "as_int", "as_prompts", "as_size", "as_weights", "log_settings"]

logger = logging.getLogger(__name__)

#: Accepted spellings of a boolean (case-insensitive), besides ``True``/``False`` and ``1``/``0``.
BOOL_WORDS: dict[str, bool] = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
_NONE_WORDS = ("none", "null")
_BOOL_ACCEPTED = "true/false, True/False, yes/no (any case) or 1/0"


def _is_none(value: Any) -> bool:
    """``None``, or a string spelling it (``none``/``null``, any case)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _fail(name: str, value: Any, accepted: str, optional: bool) -> SettingError:
    """The error for a bad setting: the id, the value as given, and what is accepted."""
    if optional:
        accepted += ", or null/None (the default)"
    return SettingError(f"setting '{name}': got {value!r} ({type(value).__name__}); accepted: {accepted}")


def as_bool(value: Any, name: str, *, optional: bool = False) -> bool | None:
    """``value`` as a bool: accepts ``True``/``False``, ``1``/``0`` (int or string) and the words
    ``true/false/yes/no`` in any case; anything else raises ``ValueError`` naming ``name``.

    With ``optional=True``, ``None`` (or ``"none"``/``"null"``) is returned as ``None``
    (for settings whose ``null`` means "decided by another setting").
    """
    if optional and _is_none(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    raise _fail(name, value, _BOOL_ACCEPTED, optional)


def _bounds(minimum: float | None, maximum: float | None) -> str:
    """Human-readable range, e.g. ``">= 1"`` or ``"in [0, 1]"``."""
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _check_range(number: float, name: str, value: Any, accepted: str, minimum: float | None,
                 maximum: float | None, optional: bool) -> None:
    """Raise the setting's error if ``number`` is outside ``[minimum, maximum]``."""
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _fail(name, value, accepted, optional)


def as_int(value: Any, name: str, minimum: int | None = None, *, maximum: int | None = None,
           optional: bool = False) -> int | None:
    """``value`` as an int (an int, an integral float such as ``1e3``, or a string of one);
    ``ValueError`` naming ``name`` otherwise, or when outside ``[minimum, maximum]``.
    Booleans are refused (``--batch_size True`` is a mistake, not 1).

    With ``optional=True``, ``None`` (or ``"none"``/``"null"``) is returned as ``None``.
    """
    accepted = "an integer" + _bounds(minimum, maximum)
    if optional and _is_none(value):
        return None
    number: Any = value
    if isinstance(number, str):
        text = number.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _fail(name, value, accepted, optional) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _fail(name, value, accepted, optional)
    if isinstance(number, float):
        if not number.is_integer():
            raise _fail(name, value, accepted, optional)
        number = int(number)
    _check_range(number, name, value, accepted, minimum, maximum, optional)
    return number


def as_float(value: Any, name: str, minimum: float | None = None, *, maximum: float | None = None,
             optional: bool = False) -> float | None:
    """``value`` as a finite float (an int, a float, or a string such as ``"1e-3"``);
    ``ValueError`` naming ``name`` otherwise, or when outside ``[minimum, maximum]``.
    Booleans, ``nan`` and infinities are refused.

    With ``optional=True``, ``None`` (or ``"none"``/``"null"``) is returned as ``None``.
    """
    accepted = "a finite number" + _bounds(minimum, maximum)
    if optional and _is_none(value):
        return None
    number: Any = value
    if isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            raise _fail(name, value, accepted, optional) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise _fail(name, value, accepted, optional)
    number = float(number)
    _check_range(number, name, value, accepted, minimum, maximum, optional)
    return number


def as_size(value: Any, name: str, ndim: int | None = None, minimum: int = 1, *,
            optional: bool = False) -> int | list[int] | None:
    """A size (``spatial_size``, ``crop_size``, a window, layers per stage): an int or a list of
    ints, each ``>= minimum``; strings such as ``"128"``, ``"[128, 96]"`` or ``"128,96"`` are
    parsed. ``ValueError`` naming ``name`` otherwise.

    ``ndim``: the number of entries required; a single int is then repeated ``ndim`` times and
    the result is always a list. Without ``ndim`` an int stays an int and a list stays a list.
    With ``optional=True``, ``None`` (or ``"none"``/``"null"``) is returned as ``None``.
    """
    entries = f"{ndim} integers" if ndim is not None else "integers"
    accepted = f"an integer or a list of {entries} (e.g. 128 or [128, 96]), each >= {minimum}"
    if optional and _is_none(value):
        return None
    parsed: Any = value
    if isinstance(parsed, str):
        text = parsed.strip()
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise _fail(name, value, accepted, optional) from None
    if isinstance(parsed, Sequence) and not isinstance(parsed, str):
        items = list(parsed)
        if not items or (ndim is not None and len(items) != ndim):
            raise _fail(name, value, accepted, optional)
        try:
            result: int | list[int] = [as_int(v, name, minimum) for v in items]  # type: ignore[misc]
        except ValueError:
            raise _fail(name, value, accepted, optional) from None
        return result
    try:
        single = as_int(parsed, name, minimum)
    except ValueError:
        raise _fail(name, value, accepted, optional) from None
    return [single] * ndim if ndim is not None else single  # type: ignore[list-item]



def as_prompts(value: Any, name: str) -> list[str] | None:
    """Text prompts: ``None`` (``null``/``none``: the method's default), one prompt (a string) or a
    list of non-empty strings (also written as ``"['dark oval', 'dark round']"``); always a list or
    ``None``, so a single prompt is never read letter by letter. ``ValueError`` naming ``name`` otherwise."""
    if _is_none(value):
        return None
    parsed: Any = value
    if isinstance(parsed, str) and parsed.strip().startswith("["):
        try:
            parsed = ast.literal_eval(parsed.strip())
        except (ValueError, SyntaxError):
            raise _fail(name, value, "a prompt, a list of prompts or null", False) from None
    if isinstance(parsed, str):
        parsed = [parsed]
    if isinstance(parsed, Sequence) and parsed and all(isinstance(p, str) and p.strip() for p in parsed):
        return [p.strip() for p in parsed]
    raise _fail(name, value, "a prompt, a list of non-empty prompts or null", False)


def as_weights(value: Any, name: str) -> str | None:
    """Where a network's initial weights come from: ``None`` (``null``/``none``: random init),
    ``"pretrained"`` (the weights a package ships) or the path of an existing local file;
    ``ValueError`` naming ``name`` otherwise (nothing is ever downloaded)."""
    if _is_none(value):
        return None
    if isinstance(value, (str, os.PathLike)):
        text = str(value).strip()
        if text == "pretrained":
            return text
        if text and Path(text).expanduser().is_file():
            return str(Path(text).expanduser())
    accepted = "null (random init), 'pretrained' (weights a package ships) or the path of an existing local weights file"
    raise _fail(name, value, accepted, False)


def log_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Log the coerced settings on one line and return them as a dict; bundles call it as the first
    item of ``initialize`` (``"$monai_ssl.bundle.log_settings(@settings)"``), which resolves every
    setting and so stops a bad command-line value before any data is loaded."""
    resolved = dict(settings)
    logger.info("settings: %s", ", ".join(f"{key}={resolved[key]!r}" for key in sorted(resolved)))
    return resolved
