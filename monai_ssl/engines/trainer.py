"""Semi-supervised trainer: a MONAI ``SupervisedTrainer`` with a second, unlabelled data stream."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from monai.data import DataLoader, MetaTensor
from monai.data.utils import set_rnd
from monai.engines import SupervisedTrainer
from monai.engines.trainer import Trainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from ignite.engine import Events
from monai.utils.enums import CommonKeys as Keys
from torch.optim import Optimizer

__all__ = ["SemiSupervisedTrainer", "Objective", "UnlabeledDataLoader", "autocast_context", "SKIPPED_STEPS_WARNING"]

#: Consecutive optimiser steps skipped by the CUDA grad scaler (inf/NaN float16 gradients) per warning.
SKIPPED_STEPS_WARNING = 20


class Objective(Protocol):
    """A method's loss: named, already weighted loss terms for one labelled + unlabelled batch.

    ``labeled`` holds ``image`` and ``label`` tensors on the training device; ``unlabeled`` holds
    ``image`` (or is ``None`` when training is supervised only). The returned mapping must contain
    the student's prediction for the labelled images under ``"pred"`` and one scalar tensor per
    loss term whose name starts with ``"loss_"``; the trainer sums the terms and back-propagates.
    An objective that never uses unlabelled data sets ``uses_unlabeled_data = False`` (the
    trainer then does not warn when there is none).
    """

    def __call__(
        self, engine: "SemiSupervisedTrainer", labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor] | None
    ) -> Mapping[str, torch.Tensor]: ...


def autocast_context(device: torch.device, enabled: bool, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """Mixed-precision context: float16 autocast on CUDA, bfloat16 autocast on CPU, nothing when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype or torch.float16)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16)


class UnlabeledDataLoader(DataLoader):
    """MONAI ``DataLoader`` for the unlabelled stream, which may be empty.

    PyTorch's ``RandomSampler`` refuses a dataset of zero cases (``num_samples=0``), so a
    ``shuffle=True`` loader over an empty unlabelled list would stop the bundle before training.
    With an empty dataset this loader ignores ``shuffle`` (there is nothing to shuffle) and has
    length 0; :class:`SemiSupervisedTrainer` then trains supervised only, with a warning. With
    cases it is exactly ``monai.data.DataLoader(dataset, shuffle=shuffle, **kwargs)``.
    """

    def __init__(self, dataset: Any, shuffle: bool = False, **kwargs: Any) -> None:
        if _is_empty(dataset):
            shuffle = False
        super().__init__(dataset, shuffle=shuffle, **kwargs)


class SemiSupervisedTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iterations draw a labelled and an unlabelled batch.

    The labelled loader is the main loader (so bundle properties and MONAI Label work unchanged).
    The unlabelled loader is cycled beside it. Both iterators restart at every epoch (after the
    samplers' ``set_epoch``) and again whenever they run out within an epoch, so that a run
    resumed from an epoch-boundary checkpoint draws exactly the batches an uninterrupted run
    would have. Set ``epoch_length`` (e.g. the longer of the two loaders) to decide what an
    epoch means.

    Every ``IterationEvents`` is fired (``FORWARD_COMPLETED``, ``LOSS_COMPLETED``,
    ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``) and ``state.output`` holds ``image``, ``label``,
    ``pred``, ``loss`` and each named loss term (detached) for StatsHandler/TensorBoard.

    Args:
        device, max_epochs, train_data_loader, network, optimizer: as ``SupervisedTrainer``.
        objective: the method's :class:`Objective`.
        unlabeled_data_loader: loader of unlabelled batches (dicts with ``image``); ``None`` or an
            empty loader trains supervised only, with a warning.
        extra_optimizers: further optimisers stepped with ``optimizer`` (e.g. a second network's).
        amp: mixed precision; bfloat16 autocast on CPU, float16 with a grad scaler on CUDA.
        amp_dtype: override the autocast dtype.
        channels_last: move the network and inputs to channels-last memory format.
        loss_function: kept for compatibility; the objective computes the loss.
        kwargs: every other ``SupervisedTrainer`` argument (handlers, epoch_length, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer,
        objective: Objective,
        unlabeled_data_loader: Iterable | None = None,
        extra_optimizers: Sequence[Optimizer] = (),
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        loss_function: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            amp=amp,
            **kwargs,
        )
        self.objective = objective
        self.extra_optimizers = list(extra_optimizers)
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        if unlabeled_data_loader is not None and _is_empty(unlabeled_data_loader):
            unlabeled_data_loader = None
        if unlabeled_data_loader is None and getattr(objective, "uses_unlabeled_data", True):
            message = (
                "SemiSupervisedTrainer: no unlabelled data (the unlabelled list is empty or there is no "
                f"unlabelled loader); {type(objective).__name__} trains supervised only (its unsupervised "
                "terms are skipped)."
            )
            warnings.warn(message, stacklevel=2)
            self.logger.warning(message)
        self.unlabeled_data_loader = unlabeled_data_loader
        self._unlabeled_iter: Iterator | None = None
        self._unlabeled_cycle = 0
        self.skipped_steps = 0
        self.add_event_handler(Events.EPOCH_STARTED, self._restart_loaders)

    @property
    def optimizers(self) -> list[Optimizer]:
        """The main optimiser followed by ``extra_optimizers``."""
        return [self.optimizer, *self.extra_optimizers]

    def run(self) -> None:  # type: ignore[override]
        """Run training; a CUDA grad scaler is made only for CUDA float16 autocast."""
        use_scaler = self.amp and self.state.device.type == "cuda" and self.amp_dtype in (None, torch.float16)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        super(Trainer, self).run()  # skip Trainer.run, which always makes a CUDA scaler

    def _restart_loaders(self, engine: "SemiSupervisedTrainer") -> None:
        """Start both loaders afresh at every epoch, so an epoch's batches depend only on the
        random state at its start (what a resumed run restores), whatever ``epoch_length`` is.

        That includes the random transforms of loaders without worker processes: MONAI seeds
        those once, when the loader is made, and their state is in no checkpoint, so they are
        re-seeded here from torch's random state (as loader workers are at every epoch)."""
        for loader in (self.data_loader, self.unlabeled_data_loader):
            if loader is not None and getattr(loader, "num_workers", None) == 0 and hasattr(loader, "dataset"):
                set_rnd(loader.dataset, int(torch.empty((), dtype=torch.int64).random_().item()))
        engine.set_data(self.data_loader)
        if self.unlabeled_data_loader is not None:
            self._unlabeled_cycle = 0
            self._unlabeled_iter = self._new_unlabeled_iter(engine.state.epoch)

    def _new_unlabeled_iter(self, epoch: int) -> Iterator:
        loader = self.unlabeled_data_loader
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            # distinct shuffles for each pass within an epoch, reproducible from the epoch number
            sampler.set_epoch(epoch * 1000 + self._unlabeled_cycle)
        return iter(loader)  # type: ignore[arg-type]

    def next_unlabeled_batch(self) -> Any:
        """Return the next unlabelled batch, restarting the loader when it runs out."""
        if self._unlabeled_iter is None:
            self._unlabeled_iter = self._new_unlabeled_iter(self.state.epoch)
        try:
            return next(self._unlabeled_iter)
        except StopIteration:
            self._unlabeled_cycle += 1
            self._unlabeled_iter = self._new_unlabeled_iter(self.state.epoch)
            return next(self._unlabeled_iter)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if isinstance(batch, MetaTensor):  # plain tensors: MetaTensor bookkeeping slows every op
            batch = batch.as_tensor()
        batch = batch.to(self.state.device, non_blocking=self.non_blocking, **self.to_kwargs)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _iteration(self, engine: "SemiSupervisedTrainer", batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """One step: prepare both batches, call the objective, back-propagate, step every optimiser."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[:2]
        labeled = {Keys.IMAGE: self._to_device(inputs), Keys.LABEL: self._to_device(targets)}
        unlabeled = None
        if self.unlabeled_data_loader is not None:
            u_batch = self.next_unlabeled_batch()
            u_images = default_prepare_batch(u_batch, engine.state.device, engine.non_blocking)[0]
            unlabeled = {Keys.IMAGE: self._to_device(u_images)}
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        engine.network.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast_context(engine.state.device, engine.amp, self.amp_dtype):
            result = self.objective(engine, labeled, unlabeled)
            engine.state.output[Keys.PRED] = result[Keys.PRED]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = {k: v for k, v in result.items() if k.startswith("loss_")}
            if not terms:
                raise ValueError(f"{type(self.objective).__name__} returned no 'loss_*' term (keys: {sorted(result)})")
            loss = torch.stack([t.float() for t in terms.values()]).sum()
            engine.state.output[Keys.LOSS] = loss
            engine.state.output.update({k: v.detach() for k, v in terms.items()})
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.scaler is not None:
            scale = engine.scaler.get_scale()
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            for opt in self.optimizers:
                engine.scaler.step(opt)
            engine.scaler.update()
            self.track_skipped_steps(scale, engine.scaler.get_scale())
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            for opt in self.optimizers:
                opt.step()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def track_skipped_steps(self, scale_before: float, scale_after: float) -> None:
        """Count consecutive steps the grad scaler skipped (its scale shrank because a gradient was
        inf/NaN in float16) and warn every :data:`SKIPPED_STEPS_WARNING` of them: a run whose steps
        are all skipped does not learn, and nothing else would say so."""
        if scale_after >= scale_before:
            self.skipped_steps = 0
            return
        self.skipped_steps += 1
        if self.skipped_steps % SKIPPED_STEPS_WARNING == 0:
            self.logger.warning(
                f"{self.skipped_steps} consecutive optimiser steps skipped by the float16 grad scaler "
                f"(scale now {scale_after:g}): a loss term gives inf/NaN gradients in float16; "
                "run with amp off (float32) to find it"
            )


def _is_empty(loader: Iterable) -> bool:
    """True when ``loader`` (or a dataset) has a length and it is 0; False when it has no length."""
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return False
