"""Offline checks that a bundle meets MONAI's bundle contract (used by the test suite).

``verify_metadata`` normally downloads the JSON schema named in ``metadata.json``; hospitals and
CI have no internet, so :data:`METADATA_SCHEMA` restates the rules of MONAI's
``meta_schema_20240725`` (the required top-level keys and the required fields of each input and
output tensor) and :func:`check_metadata` validates against it with ``jsonschema``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["METADATA_SCHEMA", "check_metadata"]

_TENSOR = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
        "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object"},
    },
}

#: The rules of MONAI's bundle metadata schema (2024-07-25 generation), written out for offline use.
METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "type": "object",
    "required": [
        "schema",
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        **{k: {"type": "string"} for k in ("schema", "version", "monai_version", "pytorch_version", "numpy_version")},
        **{k: {"type": "string"} for k in ("task", "description", "authors", "copyright", "data_source", "data_type")},
        "changelog": {"type": "object"},
        "required_packages_version": {"type": "object"},
        "supported_apps": {"type": "object"},
        "eval_metrics": {"type": "object"},
        "references": {"type": "array", "items": {"type": "string"}},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
                "outputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR},
            },
        },
    },
}


def check_metadata(meta_file: str | os.PathLike) -> None:
    """Validate ``meta_file`` offline with MONAI's ``verify_metadata`` against :data:`METADATA_SCHEMA`.

    Also checks the Model Zoo rule that the current ``version`` has a ``changelog`` entry.
    Raises ``ValueError`` naming the file on failure.
    """
    from monai.bundle import verify_metadata

    meta = json.loads(Path(meta_file).read_text())
    if meta.get("version") not in meta.get("changelog", {}):
        raise ValueError(f"{meta_file}: version {meta.get('version')!r} has no changelog entry")
    with tempfile.TemporaryDirectory() as tmp:
        schema_path = Path(tmp) / "schema.json"
        schema_path.write_text(json.dumps(METADATA_SCHEMA))
        try:
            verify_metadata(meta_file=str(meta_file), filepath=str(schema_path))
        except Exception as exc:
            raise ValueError(f"{meta_file} does not meet the MONAI metadata schema: {exc}") from exc
