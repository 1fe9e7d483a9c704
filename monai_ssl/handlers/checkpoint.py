"""Crash-safe checkpoints: resumable training state and the deployable best model.

Both are written atomically (a temporary file in the same folder, then ``os.replace``), so a run
killed at any moment leaves either the previous file or the new one, never a truncated file.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_ssl.utils import MissingFileError, UserError, atomic_path, remove_stale_temps, safe_torch_load

__all__ = [
    "atomic_torch_save",
    "RNGState",
    "ResumeCheckpoint",
    "BestModelSaver",
    "TrainedModelLoader",
    "how_to_train",
    "require_trained_model",
    "train_command",
]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) random states, with ``state_dict``/``load_state_dict``.

    The state is made of tensors and plain values only, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)`` (no NumPy arrays or other pickled objects).
    """

    def state_dict(self) -> dict[str, Any]:
        """Capture the current random states as tensors, ints, floats and strings."""
        version, internal, gauss_next = random.getstate()
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
        state: dict[str, Any] = {
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
            "numpy": {
                "bit_generator": str(name),
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore random states captured by :meth:`state_dict`."""
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
        np.random.set_state(
            (npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ResumeCheckpoint:
    """Save everything a run needs to continue, and resume from it when the same run starts again.

    Attach it to the trainer **after** the validation handler so that the saved state includes
    the epoch's validation (best metric, LR scheduler). It saves every ``save_interval`` epochs
    and at the end. :meth:`attach` reads ``<save_dir>/<filename>`` if it exists, with
    ``weights_only=True`` (every saved state is tensors and plain values; a file holding pickled
    objects is refused, naming it, and nothing in it runs), and ``Events.STARTED`` restores it. The
    configured ``max_epochs`` wins over the saved one, so a finished run can be extended.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (networks, teachers,
            optimisers, schedulers, the trainer, :class:`BestModelSaver`, ...). The random states
            are added as ``"rng"``.
        save_interval: epochs between saves.
        filename: checkpoint file name.
        resume: load an existing checkpoint at start (set False to always start afresh).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        filename: str = "resume.pt",
        resume: bool = True,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.path = Path(save_dir) / filename
        # entries that are None (e.g. a stage switched off in the config) are left out
        self.save_dict = {**{k: v for k, v in save_dict.items() if v is not None}, "rng": RNGState()}
        self.save_interval = save_interval
        self.resume = resume
        self._state: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Remove temporary files a killed run left (rank 0), read the checkpoint if there is one (so a
        file that cannot be loaded stops the run here, before the engine starts), then register
        load-at-start and save-every-interval handlers on ``engine``."""
        if is_rank0():
            remove_stale_temps(self.path)
        if self.resume:
            self._state = self._read()
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint atomically (rank 0 only under torch.distributed)."""
        if not is_rank0():
            return
        state = {name: unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        atomic_torch_save(state, self.path)

    def _read(self) -> dict[str, Any] | None:
        """The checkpoint's content (``None`` if there is none), read with ``weights_only=True``.

        A file holding pickled objects (planted, or written by a monai_ssl version that stored
        NumPy random states) is refused with an :class:`~monai_ssl.utils.UnsafeCheckpointError`
        naming it, and nothing in it runs; one without an entry of ``save_dict`` is refused too.
        """
        if not self.path.exists():
            return None
        state = safe_torch_load(
            self.path, "resume checkpoint", "delete it (or use another output_dir) to start the run afresh"
        )
        if not isinstance(state, Mapping):
            raise UserError(f"resume checkpoint {self.path} holds a {type(state).__name__}, not a dict: delete it to start afresh")
        missing = sorted(set(self.save_dict) - set(state))
        if missing:
            raise UserError(f"resume checkpoint {self.path} lacks {missing}; it was written by another configuration")
        return dict(state)

    def load(self, engine: Engine) -> None:
        """Restore every object from the checkpoint, if one exists (the one read by :meth:`attach`, else read now)."""
        state, self._state = (self._state if self._state is not None else self._read()), None
        if state is None:
            return
        max_epochs = engine.state.max_epochs
        for name, obj in self.save_dict.items():
            try:
                unwrap(obj).load_state_dict(state[name])
            except Exception as exc:
                raise UserError(
                    f"resume checkpoint {self.path}: cannot restore {name!r} ({exc}); it was written by another "
                    "configuration: delete it or use another output folder to start afresh"
                ) from exc
        engine.state.max_epochs = max_epochs
        if engine.state.epoch >= max_epochs:
            logger.warning(
                f"{self.path} is already at epoch {engine.state.epoch} of max_epochs {max_epochs}: nothing to train; "
                "raise max_epochs to continue, or delete the checkpoint to start afresh"
            )
        else:
            logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")


class BestModelSaver:
    """Save the bare ``state_dict`` of ``network`` to ``path`` whenever a validation metric improves.

    Attach it to the **evaluator**. ``models/model.pt`` is then loadable strictly by
    ``network_def`` (MONAI Label, ``ckpt_export``, ``CheckpointLoader``). The best value and its
    epoch are part of :meth:`state_dict`, so a resumed run never overwrites a better model.

    Args:
        network: the network to save (DDP-wrapped is fine).
        path: output file, e.g. ``models/model.pt``.
        metric_name: key in ``evaluator.state.metrics``.
        higher_is_better: direction of improvement.
    """

    def __init__(
        self,
        network: nn.Module,
        path: str | os.PathLike,
        metric_name: str = "val_mean_dice",
        higher_is_better: bool = True,
    ) -> None:
        self.network = network
        self.path = Path(path)
        self.metric_name = metric_name
        self.higher_is_better = higher_is_better
        self.best: float | None = None
        self.best_epoch = -1

    def attach(self, evaluator: Engine) -> None:
        """Remove temporary files a killed run left next to ``path`` (rank 0); check the metric after each evaluation run."""
        if is_rank0():
            remove_stale_temps(self.path)
        evaluator.add_event_handler(Events.COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        if self.metric_name not in evaluator.state.metrics:
            raise KeyError(f"BestModelSaver: metric {self.metric_name!r} not in {sorted(evaluator.state.metrics)}")
        value = float(evaluator.state.metrics[self.metric_name])
        improved = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        if not improved:
            return
        self.best = value
        self.best_epoch = evaluator.state.epoch  # ValidationHandler runs the evaluator at the trainer's epoch
        if is_rank0():
            atomic_torch_save(unwrap(self.network).state_dict(), self.path)
            logger.info(f"{self.metric_name} improved to {value:.4f} at epoch {self.best_epoch}: saved {self.path}")

    def state_dict(self) -> dict[str, Any]:
        """Best value and epoch so far."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the best value and epoch."""
        self.best, self.best_epoch = state["best"], state["best_epoch"]


def train_command(bundle_name: str, bundle_root: str | os.PathLike, ckpt_dir: str | os.PathLike | None = None) -> str:
    """The ``monai.bundle run`` command that trains ``bundle_name`` into ``ckpt_dir/model.pt``.

    ``--bundle_root`` / ``--ckpt_dir`` are added only where they differ from the bundle's defaults
    (``bundles/<name>`` from the repository root, and its ``models`` folder).
    """
    from monai_ssl.bundle import resolve_bundle_root

    root = Path(bundle_root)
    config = root / "configs" / "train.json"
    if not config.is_file():
        config = Path(__file__).resolve().parents[2] / "bundles" / bundle_name / "configs" / "train.json"
    try:
        shown = config.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = config
    parts = ["python", "-m", "monai.bundle", "run", "--config_file", str(shown)]
    if root.resolve() != Path(resolve_bundle_root(bundle_name)).resolve():
        parts += ["--bundle_root", str(root)]
    if ckpt_dir is not None and Path(ckpt_dir).resolve() != (root / "models").resolve():
        parts += ["--ckpt_dir", str(ckpt_dir)]
    return shlex.join(parts)


def how_to_train(model_path: str | os.PathLike, bundle_name: str | None = None,
                 bundle_root: str | os.PathLike | None = None) -> str:
    """The sentence an error about a missing trained model ends with: the command that trains it."""
    path = Path(model_path)
    if bundle_name is None:
        return "train the bundle first (its configs/train.json writes it)"
    root = bundle_root if bundle_root is not None else path.parent.parent
    return f"train the bundle first: {train_command(bundle_name, root, path.parent)}"


def require_trained_model(model_path: str | os.PathLike, bundle_name: str | None = None,
                          bundle_root: str | os.PathLike | None = None, how_to_make: str | None = None) -> None:
    """Stop with :class:`~monai_ssl.utils.MissingFileError` (one line naming the file and the command
    that trains it) when ``model_path`` does not exist; evaluate/inference configs call it first."""
    path = Path(model_path)
    if not path.is_file():
        reason = how_to_make if how_to_make is not None else how_to_train(path, bundle_name, bundle_root)
        raise MissingFileError(f"no trained model: {path} does not exist; {reason}")


class TrainedModelLoader:
    """Load the trained model (``models/model.pt``, a bare state dict) into a network when an engine starts.

    A drop-in for MONAI's ``CheckpointLoader`` in evaluate/inference configs, loading with
    ``weights_only=True`` and ``strict`` as it does, whose errors are one line naming the file:
    at ``Events.STARTED`` (before the first batch is read) a missing file stops the run with the
    command that trains the model, a file holding pickled objects is refused
    (:class:`~monai_ssl.utils.UnsafeCheckpointError`) and nothing in it runs, and weights that do
    not fit the network say so. Building the handler reads nothing, so a bundle's configs can be
    parsed and its properties checked (``check_properties``, MONAI Label) before a model exists.

    Args:
        load_path: the state dict file.
        load_dict: ``{"model": network}``; with several entries, the file holds one state dict per key.
        map_location: ``torch.load``'s ``map_location``.
        strict: strict ``load_state_dict``.
        bundle_name: the bundle (e.g. ``"supervised"``), for the training command in the error.
        bundle_root: the bundle's root folder (as configured), for the same command.
    """

    def __init__(
        self,
        load_path: str | os.PathLike,
        load_dict: Mapping[str, Any],
        map_location: Any = None,
        strict: bool = True,
        bundle_name: str | None = None,
        bundle_root: str | os.PathLike | None = None,
    ) -> None:
        if not load_dict:
            raise ValueError("TrainedModelLoader: load_dict is empty")
        self.load_path = Path(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.strict = strict
        self.how_to_make = how_to_train(self.load_path, bundle_name, bundle_root)

    def attach(self, engine: Engine) -> None:
        """Load the weights at ``Events.STARTED``."""
        engine.add_event_handler(Events.STARTED, self)

    def _read(self) -> Any:
        require_trained_model(self.load_path, how_to_make=self.how_to_make)
        return safe_torch_load(self.load_path, "trained model", self.how_to_make, map_location=self.map_location)

    def __call__(self, engine: Engine | None = None) -> None:
        """Read the file and load its weights strictly into every network of ``load_dict``."""
        state = self._read()
        if not isinstance(state, Mapping):
            raise UserError(f"trained model {self.load_path} holds a {type(state).__name__}, not a state dict; {self.how_to_make}")
        key = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and key not in state:
            state = {key: state}  # a bare state dict of the one network
        for name, obj in self.load_dict.items():
            if name not in state:
                raise UserError(f"trained model {self.load_path} has no entry {name!r} (it has {sorted(state)[:5]})")
            try:
                unwrap(obj).load_state_dict(state[name], strict=self.strict)
            except Exception as exc:
                raise UserError(
                    f"trained model {self.load_path} does not fit the configured network {name!r} (it was trained with "
                    f"other settings: {str(exc).splitlines()[0]}); use the training settings or {self.how_to_make}"
                ) from exc
        logger.info(f"loaded the trained model {self.load_path}")


def unwrap(obj: Any) -> Any:
    """The module inside a ``DataParallel`` / ``DistributedDataParallel`` wrapper, else ``obj``."""
    return obj.module if isinstance(obj, nn.Module) and hasattr(obj, "module") and isinstance(obj.module, nn.Module) else obj


def is_rank0() -> bool:
    """True outside ``torch.distributed`` and on rank 0 inside it."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
