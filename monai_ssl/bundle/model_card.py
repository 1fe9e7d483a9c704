"""Model cards: the settings a trained model was made with, in a sidecar next to ``models/model.pt``.

A bundle's ``models/model.pt`` is a bare state dict (what MONAI Label, ``CheckpointLoader`` and
``ckpt_export`` load), so it cannot say at which image size, with which preprocessing or network
settings it was trained. The training run therefore writes ``models/model.json`` next to it
(:class:`ModelCardWriter`, attached to the validation evaluator after ``BestModelSaver``), every
time the model file changes:

.. code-block:: json

    {"format": 1, "bundle": "dual_teacher", "model": "model.pt", "model_sha256": "...",
     "settings": {"spatial_size": 128, "in_channels": 1, "out_channels": 1, "encoder": "resnet34"},
     "network": {"class": "monai_ssl.networks.resnet_unet.EncoderUNet", "n_parameters": 24436369},
     "preprocessing": ["LoadImaged", "...", "ScaleIntensityd", "Resized", "EnsureTyped"],
     "training": {"seed": 0, "max_epochs": 10, ...}, "validation": {"val_mean_dice": 0.89, "epoch": 7}}

``settings`` are the values that change what the model computes at evaluation and inference.
``evaluate.json`` and ``inference.json`` take them from the card by default
(``"spatial_size": "$@model_card.get('spatial_size', 224)"``, with :meth:`ModelCard.load`) and
:meth:`ModelCard.check` stops the run with an error naming the setting, both values and the card
when a value given on the command line (or edited into a config) disagrees with it. A card whose
``model_sha256`` is not the model file's (the model was replaced, e.g. by MONAI Label) and a model
without a card (older runs) are ignored with a warning: the configs' own values are used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from monai_ssl.utils import SettingError, atomic_write

__all__ = ["CARD_FORMAT", "ModelCard", "ModelCardWriter", "card_path", "file_sha256"]

logger = logging.getLogger(__name__)

#: Version of the card layout; a card of another format is refused with an error.
CARD_FORMAT = 1


def card_path(model_path: str | os.PathLike) -> Path:
    """The card of a model file: the same name with ``.json`` (``models/model.pt`` -> ``models/model.json``)."""
    return Path(model_path).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples -> lists, numpy/tensor scalars -> numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _describe_network(network: nn.Module | None) -> dict[str, Any] | None:
    """Class and parameter count of ``network`` (a DDP wrapper is looked through)."""
    if network is None:
        return None
    inner = network.module if isinstance(getattr(network, "module", None), nn.Module) else network
    cls = type(inner)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "n_parameters": sum(p.numel() for p in inner.parameters())}


def _describe_preprocessing(transform: Any) -> list[str] | None:
    """Class names of a (composed) transform chain, in order."""
    if transform is None:
        return None
    inner = getattr(transform, "transforms", None)
    return [type(t).__name__ for t in inner] if isinstance(inner, (list, tuple)) else [type(transform).__name__]


class ModelCardWriter:
    """Write the model card next to ``model_path`` whenever the training run replaces the model.

    Attach it to the validation evaluator *after* the ``BestModelSaver`` (the bundles list it last
    in ``validate#handlers``): on each ``COMPLETED`` event, when ``model_path`` exists and its
    size or modification time changed since the last card this writer wrote, the card (see the
    module docstring) is written atomically with the model's SHA-256. Only rank 0 writes.

    Args:
        model_path: the bare state dict the bundle saves (``models/model.pt``).
        bundle: the bundle's name.
        settings: the values that evaluation/inference must use with this model (image size,
            channels, encoder, normalisation switches, sliding-window preset...): JSON-like values.
        training: other training settings recorded for people (seed, epochs, learning rate,
            datalist...); not checked.
        network: the network that is saved, for its class and parameter count.
        preprocessing: the validation preprocessing chain, for the names of its transforms.
        best_model: the ``BestModelSaver`` that writes ``model_path``: its ``metric_name``, ``best``
            value and ``best_epoch`` are recorded (right also for a model saved before a resume).
            Without it the evaluator's current ``metric_name`` value and epoch are recorded.
        metric_name: the validation metric recorded when there is no ``best_model``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        bundle: str,
        settings: Mapping[str, Any],
        training: Mapping[str, Any] | None = None,
        network: nn.Module | None = None,
        preprocessing: Any = None,
        best_model: Any = None,
        metric_name: str = "val_mean_dice",
    ) -> None:
        self.model_path = Path(model_path)
        self.path = card_path(self.model_path)
        self.bundle = bundle
        self.settings = _plain(dict(settings))
        self.training = _plain(dict(training or {}))
        self.network = _describe_network(network)
        self.preprocessing = _describe_preprocessing(preprocessing)
        self.best_model = best_model
        self.metric_name = metric_name
        self._written_for: tuple[int, int] | None = None

    def attach(self, engine: Engine) -> None:
        """Check the model file after every evaluator run."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the card if the model file changed since the last card."""
        from monai_ssl.handlers.checkpoint import is_rank0

        if not is_rank0() or not self.model_path.is_file():
            return
        stat = self.model_path.stat()
        if self._written_for == (stat.st_size, stat.st_mtime_ns):
            return
        if self.best_model is not None:
            best = self.best_model.best
            validation = {self.best_model.metric_name: None if best is None else float(best), "epoch": self.best_model.best_epoch}
        else:
            metric = engine.state.metrics.get(self.metric_name)
            validation = {self.metric_name: None if metric is None else float(metric), "epoch": engine.state.epoch}
        self.write(validation)
        self._written_for = (stat.st_size, stat.st_mtime_ns)

    def write(self, validation: Mapping[str, Any] | None = None) -> Path:
        """Write the card for the current model file now; return its path."""
        card = {
            "format": CARD_FORMAT,
            "bundle": self.bundle,
            "model": self.model_path.name,
            "model_sha256": file_sha256(self.model_path),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": self.settings,
            "network": self.network,
            "preprocessing": self.preprocessing,
            "training": self.training,
            "validation": _plain(dict(validation or {})),
        }
        atomic_write(self.path, json.dumps(card, indent=2) + "\n")
        logger.info("model card %s: %s", self.path, ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return self.path


class ModelCard:
    """The card of a model file as evaluation and inference read it (see the module docstring).

    Use :meth:`load`; :attr:`settings` is empty when there is no usable card, so :meth:`get`
    returns the config's default and :meth:`check` accepts everything.
    """

    def __init__(self, model_path: str | os.PathLike, data: Mapping[str, Any] | None = None) -> None:
        self.model_path = Path(model_path)
        self.path = card_path(self.model_path)
        self.data = dict(data) if data else None
        self.settings: dict[str, Any] = dict(self.data["settings"]) if self.data else {}

    @classmethod
    def load(cls, model_path: str | os.PathLike) -> ModelCard:
        """Read the card of ``model_path``.

        No model file: an empty card, silently (the run reports the missing model itself). A model
        without a card, or with a card made for other weights (its ``model_sha256`` differs): an
        empty card and a warning that the configs' values are used.

        Raises:
            ValueError: the card is not valid JSON, has another ``format`` or no ``settings`` object.
        """
        model_path = Path(model_path)
        path = card_path(model_path)
        if not model_path.is_file():
            return cls(model_path)
        if not path.is_file():
            logger.warning(
                "%s has no model card (%s): evaluation/inference use the configs' settings; if the model was "
                "trained with others (e.g. --spatial_size), pass the same values", model_path, path,
            )
            return cls(model_path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise SettingError(f"model card {path} is not readable JSON ({err}); delete it or retrain") from err
        if not isinstance(data, dict) or data.get("format") != CARD_FORMAT or not isinstance(data.get("settings"), dict):
            raise SettingError(
                f"model card {path}: expected a JSON object with format {CARD_FORMAT} and a 'settings' object, "
                f"got format {data.get('format') if isinstance(data, dict) else type(data).__name__!r}"
            )
        if data.get("model_sha256") != file_sha256(model_path):
            logger.warning(
                "model card %s was written for other weights than %s (it was replaced since): ignoring the card, "
                "evaluation/inference use the configs' settings", path, model_path,
            )
            return cls(model_path)
        return cls(model_path, data)

    def get(self, key: str, default: Any) -> Any:
        """The card's value of setting ``key``, else ``default`` (the config's own value)."""
        return self.settings.get(key, default)

    def check(self, values: Mapping[str, Any]) -> None:
        """Stop when a setting of this run disagrees with the card.

        Args:
            values: this run's value of each setting (``{"spatial_size": @spatial_size, ...}``);
                keys the card does not have are not checked.

        Raises:
            ValueError: naming every disagreeing setting with both values, and the card.
        """
        wrong = [
            f"{key}={_plain(value)!r} (this run) but the model was trained with {key}={self.settings[key]!r}"
            for key, value in values.items()
            if key in self.settings and _plain(value) != self.settings[key]
        ]
        if wrong:
            raise SettingError(
                f"settings disagree with the model card {self.path} of {self.model_path}: " + "; ".join(wrong)
                + ". Drop the override (the card's values are the default) or pass the model's values; to use "
                "the model at other settings on purpose, move the card away (the run then warns and uses the configs' values)"
            )
