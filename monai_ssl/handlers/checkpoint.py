"""Crash-safe checkpoints: resumable training state and the deployable best model.

Both are written atomically (a temporary file in the same folder, then ``os.replace``), so a run
killed at any moment leaves either the previous file or the new one, never a truncated file.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_ssl.utils import atomic_path

__all__ = ["atomic_torch_save", "RNGState", "ResumeCheckpoint", "BestModelSaver"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class RNGState:
    """Python, NumPy and torch (CPU and CUDA) random states, with ``state_dict``/``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        """Capture the current random states."""
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore random states captured by :meth:`state_dict`."""
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ResumeCheckpoint:
    """Save everything a run needs to continue, and resume from it when the same run starts again.

    Attach it to the trainer **after** the validation handler so that the saved state includes
    the epoch's validation (best metric, LR scheduler). It saves every ``save_interval`` epochs
    and at the end; at ``Events.STARTED`` it loads ``<save_dir>/<filename>`` if it exists. The
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

    def attach(self, engine: Engine) -> None:
        """Register load-at-start and save-every-interval handlers on ``engine``."""
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint atomically (rank 0 only under torch.distributed)."""
        if not is_rank0():
            return
        state = {name: unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        atomic_torch_save(state, self.path)

    def load(self, engine: Engine) -> None:
        """Restore every object from the checkpoint, if one exists."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # left by a run killed mid-save
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a foreign or damaged file: say which and stop
            raise RuntimeError(f"cannot read resume checkpoint {self.path}: {exc}; delete it to start afresh") from exc
        missing = sorted(set(self.save_dict) - set(state))
        if missing:
            raise RuntimeError(f"resume checkpoint {self.path} lacks {missing}; it was written by another configuration")
        max_epochs = engine.state.max_epochs
        for name, obj in self.save_dict.items():
            try:
                unwrap(obj).load_state_dict(state[name])
            except Exception as exc:
                raise RuntimeError(
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
        """Check the metric after each evaluation run."""
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


def unwrap(obj: Any) -> Any:
    """The module inside a ``DataParallel`` / ``DistributedDataParallel`` wrapper, else ``obj``."""
    return obj.module if isinstance(obj, nn.Module) and hasattr(obj, "module") and isinstance(obj.module, nn.Module) else obj


def is_rank0() -> bool:
    """True outside ``torch.distributed`` and on rank 0 inside it."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
