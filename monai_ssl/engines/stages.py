"""Multi-stage pipelines: stages that leave an artifact with a manifest and are skipped when it is done.

The dual-teacher bundle runs three stages in one ``monai.bundle run`` (methods spec §1.2-1.4):

1. :class:`APPGStage` makes training-free pseudo-labels for the unlabelled images
   (:func:`monai_ssl.pseudo.appg.run_appg`: resumable per image, reused when the settings hash matches);
2. :class:`StaticTeacherWarmup` (STWP) trains the static teacher on the valid pseudo-labels with
   BCE + Dice, writes ``static_teacher.pt`` (bare state dict) and ``static_teacher.json`` (its
   manifest), then freezes the network; a run stopped mid-stage resumes from its own checkpoint,
   and a complete artifact made by the same settings (including the APPG config hash and image
   list) is loaded instead of retrained;
3. the dual-teacher SSL stage is the bundle's ordinary trainer (with its own resume checkpoint),
   whose student and EMA teacher start from the static teacher (:func:`copy_weights`); the
   warm-up stage is part of that trainer's resume checkpoint (its ``state_dict`` is the static
   teacher's settings hash), so a run is never resumed on top of a different static teacher.

Under ``torch.distributed`` the first two stages run on rank 0 only; the other ranks wait for the
artifact to be complete and then load it.

Seeding: every stage seeds Python, NumPy and torch at its start with :func:`seed_stage` from the
run's seed and its own name (``"appg"``, ``"stwp"``, and ``"train"`` for the bundle's trainer,
seeded by the bundle's ``run`` list before the trainer's loaders are made), so a stage draws the
same random numbers whether the stages before it ran in this process, were loaded from disk or
were resumed: a run killed in any stage and restarted ends with the same model as one that was
never interrupted. A resume checkpoint then restores the random state where it stopped (its
``Events.STARTED`` handler runs after the stage's seeding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from torch import nn

from monai_ssl.data.datalist import load_datalist
from monai_ssl.evaluation.handlers import MetricsLogger
from monai_ssl.foundation.interfaces import AutocastSegmenter, BoxProposer, PromptableSegmenter, bf16_supported
from monai_ssl.handlers.checkpoint import ResumeCheckpoint, atomic_torch_save, is_rank0, unwrap
from monai_ssl.handlers.teachers import freeze
from monai_ssl.methods.supervised import SupervisedObjective
from monai_ssl.pseudo.appg import DEFAULT_MIN_CHECK_DICE, run_appg
from monai_ssl.pseudo.store import config_hash, store_lock, valid_pseudo_datalist
from monai_ssl.pseudo.calibration import (
    CALIBRATION_VERSION,
    NoTargetError,
    calibrate,
    calibrated_prompts,
    calibrated_proposer,
    calibration_record,
    load_calibration,
    save_calibration,
)
from monai_ssl.utils import atomic_write, remove_stale_temps, safe_torch_load

from .trainer import SemiSupervisedTrainer

__all__ = ["APPGStage", "StageArtifact", "StaticTeacherWarmup", "component_description", "copy_weights", "seed_stage", "stage_seed"]

logger = logging.getLogger(__name__)

_SCALARS = (bool, int, float, str, type(None))
#: The warm-up's settings hash when it was skipped because there are no unlabelled images.
NO_UNLABELED_DIGEST = "skipped: no unlabelled images"


def stage_seed(seed: int, name: str) -> int:
    """The seed of stage ``name`` in a run seeded with ``seed``: the first four bytes of the SHA-256
    of ``"<seed>/<name>"`` (the same in every process and Python version, unlike ``hash``; below
    2**32, as NumPy needs)."""
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None:
        raise ValueError(f"seed must be an int, got {seed!r} (stage {name!r})")
    if not name:
        raise ValueError("a stage needs a name to derive its seed from")
    return int.from_bytes(hashlib.sha256(f"{value}/{name}".encode()).digest()[:4], "big")


def seed_stage(seed: int, name: str) -> int:
    """Seed Python, NumPy and torch for stage ``name`` (``monai.utils.set_determinism`` with
    :func:`stage_seed`) and return that seed.

    Call it at the start of a stage, before the stage makes anything that draws random numbers
    (networks, data loaders, which draw their transforms' seeds when made): the stage's random
    numbers then depend on ``(seed, name)`` only, not on what ran before it in the process.
    """
    value = stage_seed(seed, name)
    set_determinism(seed=value)
    logger.debug("stage %s seeded with %d (run seed %d)", name, value, seed)
    return value


def component_description(component: Any) -> dict[str, Any]:
    """What identifies a proposer/segmenter for the APPG config hash: its ``describe()`` (every
    proposer and segmenter of ``monai_ssl.foundation`` has one; ``scripts/run_appg.py`` records
    the same, so the CLI and the bundle reuse each other's pseudo-labels), else its class and
    scalar settings."""
    describe = getattr(component, "describe", None)
    if callable(describe):
        return dict(describe())
    cls = type(component)
    out: dict[str, Any] = {"name": f"{cls.__module__}.{cls.__qualname__}"}
    for key, value in sorted(vars(component).items()):
        if key.startswith("_") or key == "device":
            continue
        if isinstance(value, _SCALARS) or (isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
        elif isinstance(value, os.PathLike):
            out[key] = str(value)
    return out


def copy_weights(source: nn.Module, targets: Sequence[nn.Module]) -> None:
    """Load ``source``'s state dict into every network of ``targets`` (strict; DDP wrappers unwrapped).

    The dual-teacher student and its EMA teacher start from the static teacher (spec §1.1).
    """
    state = unwrap(source).state_dict()
    for target in targets:
        unwrap(target).load_state_dict(state)


class StageArtifact:
    """A stage's output file guarded by a manifest ``<stem>.json`` that records the settings hash.

    The artifact counts as complete only when the manifest says ``complete``, its hash equals the
    hash of ``settings`` and the file exists. Write the file atomically first, then
    :meth:`commit`, so a crash leaves either the old complete pair or an incomplete one.
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.manifest_path = self.path.with_suffix(".json")
        self.settings = dict(settings)
        self.digest = config_hash(self.settings)

    def is_complete(self) -> bool:
        """True when the manifest is complete, made by the same settings, and the file exists."""
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return manifest.get("complete") is True and manifest.get("config_hash") == self.digest and self.path.exists()

    def commit(self, info: Mapping[str, Any] | None = None) -> None:
        """Write the complete manifest (settings, hash, time and ``info``) atomically."""
        manifest = {
            "complete": True,
            "config_hash": self.digest,
            "config": self.settings,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **dict(info or {}),
        }
        atomic_write(self.manifest_path, json.dumps(manifest, indent=1) + "\n")



class APPGStage:
    """Stage 1: APPG pseudo-labels for the ``key`` images of a datalist (see :func:`run_appg`).

    Args:
        datalist: datalist JSON path.
        dataset_dir: folder the datalist's relative paths refer to.
        out_dir: the pseudo-label store (masks, journal, manifest, report).
        proposer: box proposer (e.g. :class:`~monai_ssl.foundation.AppearanceBoxProposer`).
        segmenter: promptable segmenter (e.g. ``LiteMedSAMPredictor``).
        prompts: appearance prompts (default None: the calibration's, else the paper's three).
        top_k: candidate boxes per image.
        candidate_policy: one of :data:`monai_ssl.pseudo.appg.CANDIDATE_POLICIES` (default
            ``"rerank"``: box score, predicted IoU and the mask's own image evidence).
        min_foreground: δ of Eq.6.
        rerank: weights of the ``"rerank"`` policy (default ``DEFAULT_RERANK``).
        precision: ``"bf16"``, ``"fp32"`` or ``"auto"`` (bf16 autocast where the CPU has native bf16).
        truth_dir: optional folder of ``<case_id>.png`` truth masks, for the report only.
        key: datalist key of the images to pseudo-label.
        progress: show a progress bar.
        workers: processes computing the images (``run_appg``'s ``workers``: more than 1 spawns
            that many worker processes, each with a copy of the proposer and segmenter and
            ``torch.get_num_threads() // workers`` threads); not part of the settings hash.
        calibration: ``"auto"`` (default): fitted on the datalist's ``calibration_key`` images
            and masks only (:func:`monai_ssl.pseudo.calibration.calibrate`, cached in
            ``<out_dir>/calibration.json`` and reused while its inputs are unchanged); a path to a
            calibration JSON (``scripts/calibrate_appg.py``); a calibration dict; or ``"none"``
            (also None, False, ``"false"``, ``"off"``) for the generic defaults. Recorded in the
            APPG config hash.
        calibration_key: datalist key of the labelled images used by ``"auto"``.
        check_key: datalist key of the labelled images APPG is also run on to report its Dice
            against their masks (``run_appg``'s ``check_images``); None skips the check.
        min_check_dice: below this labelled-image Dice APPG warns (log and report).
        seed: the run's seed; :meth:`run` starts with ``seed_stage(seed, "appg")``. Not part of
            the settings hash: the shipped proposers and segmenters draw no random numbers (with
            ``workers > 1`` a random one would not be reproducible anyway, since chunks go to
            whichever worker is free).
    """

    def __init__(
        self,
        datalist: str | os.PathLike,
        dataset_dir: str | os.PathLike,
        out_dir: str | os.PathLike,
        proposer: BoxProposer,
        segmenter: PromptableSegmenter,
        prompts: Sequence[str] | None = None,
        top_k: int = 3,
        candidate_policy: str = "rerank",
        min_foreground: float = 0.01,
        rerank: Mapping[str, float] | None = None,
        precision: str = "auto",
        truth_dir: str | os.PathLike | None = None,
        key: str = "unlabeled",
        progress: bool = True,
        workers: int = 1,
        calibration: str | os.PathLike | Mapping[str, Any] | bool | None = "auto",
        calibration_key: str = "labeled",
        check_key: str | None = "labeled",
        min_check_dice: float = DEFAULT_MIN_CHECK_DICE,
        seed: int = 0,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
        self.datalist, self.dataset_dir, self.key = datalist, dataset_dir, key
        self.out_dir = Path(out_dir)
        self.proposer = proposer
        self.bf16 = precision == "bf16" or (precision == "auto" and bf16_supported())
        self.segmenter = segmenter
        self.prompts = list(prompts) if prompts else None
        off = calibration is None or calibration is False or (isinstance(calibration, str) and calibration.lower() in ("none", "false", "off"))
        self.calibration = None if off else calibration
        self.calibration_key, self.check_key, self.min_check_dice = calibration_key, check_key, float(min_check_dice)
        self.top_k, self.candidate_policy, self.min_foreground = top_k, candidate_policy, min_foreground
        self.rerank = dict(rerank) if rerank else None
        self.truth_dir = Path(truth_dir) if truth_dir else None
        self.progress = progress
        self.workers = workers
        self.seed = seed

    @property
    def manifest_path(self) -> Path:
        """Where the complete manifest is (or will be)."""
        return self.out_dir / "manifest.json"

    def image_count(self) -> int:
        """Number of images to pseudo-label (the datalist's ``key`` list, checked as :meth:`run` loads it)."""
        return len(load_datalist(self.datalist, self.dataset_dir, self.key))

    def _calibration(self, segmenter: PromptableSegmenter, segmenter_config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The calibration to use (see the class docstring); ``"auto"`` fits it or reuses the cached fit."""
        if self.calibration is None:
            return None
        if isinstance(self.calibration, Mapping):
            return dict(self.calibration)
        if not (isinstance(self.calibration, str) and self.calibration == "auto"):
            return load_calibration(self.calibration)
        labelled = load_datalist(self.datalist, self.dataset_dir, self.calibration_key)
        inputs = {
            "version": CALIBRATION_VERSION,
            "labelled": [
                [item["image"], item["label"], hashlib.sha256(Path(item["label"]).read_bytes()).hexdigest()] for item in labelled
            ],
            "proposer": component_description(self.proposer),
            "segmenter": dict(segmenter_config),
            "prompts": self.prompts,
            "top_k": self.top_k,
        }
        digest = config_hash(inputs)
        cache = self.out_dir / "calibration.json"
        with store_lock(self.out_dir):
            try:
                cached = json.loads(cache.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cached = None
            if isinstance(cached, dict) and cached.get("inputs_hash") == digest:
                return cached
            logger.info("APPG: calibrating on the %d images of %r of %s (their masks only)", len(labelled), self.calibration_key, self.datalist)
            try:
                calibration = calibrate(
                    labelled, self.proposer, segmenter, self.prompts, self.top_k,
                    source=f"auto: {len(labelled)} images of key {self.calibration_key!r} of {self.datalist}",
                )
            except NoTargetError as err:
                logger.warning("%s: APPG uses the generic defaults", err)
                return None
            calibration["inputs_hash"] = digest
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_calibration(cache, calibration)
        return calibration

    def run(self) -> Path:
        """Make (or reuse, or finish) the pseudo-labels; return the manifest path."""
        seed_stage(self.seed, "appg")
        images = load_datalist(self.datalist, self.dataset_dir, self.key)
        segmenter = AutocastSegmenter(self.segmenter) if self.bf16 else self.segmenter
        segmenter_config = {**component_description(self.segmenter), "precision": "bf16" if self.bf16 else "fp32"}
        calibration = self._calibration(segmenter, segmenter_config)
        proposer = calibrated_proposer(self.proposer, calibration)
        prompts = calibrated_prompts(self.prompts, calibration)
        rerank = {**(calibration or {}).get("rerank", {}), **(self.rerank or {})} or None
        check_images = load_datalist(self.datalist, self.dataset_dir, self.check_key) if self.check_key else None
        # the same description as scripts/run_appg.py, so each reuses the other's results
        config = {
            "proposer": component_description(proposer),
            "segmenter": segmenter_config,
            "calibration": calibration_record(calibration),
        }
        notes = ["no calibration: the proposer's and rerank's generic defaults"] if calibration is None else [
            f"calibration ({calibration.get('source')}): brightness {calibration.get('brightness')}",
            *(f"calibration warning: {w}" for w in calibration.get("warnings", [])),
        ]
        truth_lookup = None
        if self.truth_dir is not None:
            truth_dir = self.truth_dir

            def truth_lookup(case_id: str) -> Path | None:
                path = truth_dir / f"{case_id}.png"
                return path if path.exists() else None

        return run_appg(
            images, self.out_dir, proposer, segmenter, prompts, self.top_k, self.candidate_policy,
            self.min_foreground, config=config, truth_lookup=truth_lookup, progress=self.progress, rerank=rerank,
            workers=self.workers, check_images=check_images, min_check_dice=self.min_check_dice, notes=notes,
        )


class StaticTeacherWarmup:
    """Stage 2 (STWP, spec §1.3): train the static teacher on the valid APPG pseudo-labels, then freeze it.

    Loss ``BCE + Dice`` on logits (``DiceCELoss(sigmoid=True)``), Adam, no ground truth. The
    result is ``weights_path`` (bare state dict of ``network``) plus its manifest
    (``<stem>.json``); settings = the APPG manifest's config hash and image list + this stage's
    hyper-parameters. While training, a resume checkpoint lives in ``work_dir/<hash prefix>``, so
    a killed run continues where it stopped and a changed setting never resumes a stale run.

    Args:
        network: the static teacher (trained in place, frozen at the end).
        appg: the APPG stage whose valid pseudo-labels are the training set.
        weights_path: where the trained weights go (e.g. ``models/static_teacher.pt``).
        work_dir: folder for the stage's resume checkpoint.
        transform: preprocessing of ``{"image", "label"}`` pairs (e.g. ``segmentation_transforms_2d``).
        batch_size: images per batch.
        max_epochs: passes over the valid pseudo-labels.
        epoch_length: iterations per epoch (default: one pass).
        learning_rate: Adam learning rate.
        device: training device.
        amp: mixed precision (bf16 autocast on CPU, fp16 + scaler on CUDA).
        channels_last: channels-last memory format.
        num_workers: data loader workers.
        seed: the run's seed; the warm-up starts with ``seed_stage(seed, "stwp")`` (data order,
            augmentation). The network's initial weights are drawn where it is made (in a bundle:
            when the config is parsed, after the ``initialize`` seeding).
        progress: show a progress bar.
        handlers: extra ignite handlers (objects with ``attach(engine)``) for the warm-up trainer,
            e.g. a ``TensorBoardStatsHandler``; attached after the resume checkpoint.
    """

    def __init__(
        self,
        network: nn.Module,
        appg: APPGStage,
        weights_path: str | os.PathLike,
        work_dir: str | os.PathLike,
        transform: Any,
        batch_size: int = 4,
        max_epochs: int = 100,
        epoch_length: int | None = None,
        learning_rate: float = 1e-4,
        device: str | torch.device = "cpu",
        amp: bool = True,
        channels_last: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        progress: bool = True,
        handlers: Sequence[Any] = (),
    ) -> None:
        if max_epochs < 1 or batch_size < 1 or (epoch_length is not None and epoch_length < 1):
            raise ValueError(f"max_epochs, batch_size and epoch_length must be >= 1, got {max_epochs}, {batch_size}, {epoch_length}")
        self.network, self.appg = network, appg
        self.weights_path, self.work_dir = Path(weights_path), Path(work_dir)
        self.transform = transform
        self.batch_size, self.max_epochs, self.epoch_length = batch_size, max_epochs, epoch_length
        self.learning_rate, self.device, self.amp = learning_rate, torch.device(device), amp
        self.channels_last, self.num_workers, self.seed, self.progress = channels_last, num_workers, seed, progress
        self.handlers = list(handlers)
        self.digest: str | None = None

    def _artifact(self, manifest_path: Path, data: list[dict[str, str]]) -> StageArtifact:
        appg_manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listing = hashlib.sha256(json.dumps([(d["case_id"], d["image"]) for d in data]).encode()).hexdigest()
        net = unwrap(self.network)
        settings = {
            "stage": "stwp",
            "appg_config_hash": appg_manifest["config_hash"],
            "pseudo_label_images": listing,
            "n_images": len(data),
            "network": f"{type(net).__module__}.{type(net).__qualname__}",
            "n_parameters": sum(p.numel() for p in net.parameters()),
            "transform": _describe_transform(self.transform),
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "epoch_length": self.epoch_length,
            "learning_rate": self.learning_rate,
            "amp": self.amp,
            "seed": self.seed,
            "stage_seed": stage_seed(self.seed, "stwp"),  # also tells apart artifacts seeded otherwise
        }
        return StageArtifact(self.weights_path, settings)

    def run(self) -> nn.Module:
        """Run APPG, then train (or load) the static teacher; return it frozen.

        Under ``torch.distributed``, rank 0 does the work while the other ranks wait for its
        signal file (``work_dir/ready-<nonce>``, a nonce rank 0 broadcasts first), then all load.
        With no unlabelled images (``appg.image_count() == 0``) both stages are skipped with a warning
        and the network is returned untrained: the next stage then trains supervised only, as
        every semi-supervised bundle does without unlabelled data.
        """
        if self.appg.image_count() == 0:
            logger.warning(
                "no unlabelled images: APPG and the static-teacher warm-up are skipped (nothing to pseudo-label); "
                "training is supervised only"
            )
            self.digest = NO_UNLABELED_DIGEST
            return freeze(self.network)
        nonce = _broadcast_nonce()
        if is_rank0():
            self._make()
            if nonce is not None:
                self.work_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(self.work_dir / f"ready-{nonce}", "")
        else:
            signal = self.work_dir / f"ready-{nonce}"
            _wait_until(signal.exists, f"the APPG and static-teacher stages ({signal})")
        state = safe_torch_load(self.weights_path, "static teacher", "delete it and its .json manifest to retrain the warm-up")
        unwrap(self.network).load_state_dict(state)
        # one memory layout whether the warm-up trained here (its trainer made the network
        # channels-last) or was loaded: convolutions round differently in the two layouts, and a
        # restarted run's stage 3 would then drift from an uninterrupted one's
        self.network.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.digest = json.loads(self.weights_path.with_suffix(".json").read_text(encoding="utf-8"))["config_hash"]
        return freeze(self.network)

    @property
    def metrics_log(self) -> Path | None:
        """The warm-up's loss log (``work_dir/<hash prefix>/metrics.jsonl``) of the static teacher in use, once run."""
        return None if self.digest is None else self.work_dir / self.digest[:12] / "metrics.jsonl"

    def state_dict(self) -> dict[str, Any]:
        """The settings hash of the static teacher in use, for the next stage's resume checkpoint."""
        if self.digest is None:
            raise RuntimeError("StaticTeacherWarmup.run() has not been called: no static teacher to record")
        return {"config_hash": self.digest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse to resume a next stage that was trained from another static teacher."""
        if state.get("config_hash") != self.digest:
            raise RuntimeError(
                f"the resume checkpoint was trained from another static teacher (settings {str(state.get('config_hash'))[:12]}, "
                f"now {str(self.digest)[:12]} in {self.weights_path}): delete it or use another output_dir to start stage 3 afresh"
            )

    def _make(self) -> None:
        """APPG, then the warm-up unless a complete artifact from the same settings exists."""
        for path in (self.weights_path, self.weights_path.with_suffix(".json")):
            remove_stale_temps(path)  # left by a run killed while writing them
        with store_lock(self.appg.out_dir):  # the manifest read is the one this run wrote, not a concurrent run's
            manifest_path = self.appg.run()
            data = valid_pseudo_datalist(manifest_path)
            artifact = self._artifact(manifest_path, data)
        if not data:
            raise RuntimeError(
                f"APPG produced no valid pseudo-labels ({manifest_path}): the static teacher has nothing to train on; "
                "give unlabelled images, lower the validity threshold δ, or set use_static_teacher=false"
            )
        if artifact.is_complete():
            logger.info("static teacher %s is complete for this configuration: loading it", self.weights_path)
        else:
            self._train(data, artifact)

    def _train(self, data: list[dict[str, str]], artifact: StageArtifact) -> None:
        seed_stage(self.seed, "stwp")  # before the data loader draws its transforms' seed
        logger.info("static-teacher warm-up on %d valid pseudo-labels, %d epochs", len(data), self.max_epochs)
        dataset = CacheDataset(data, self.transform, cache_rate=1.0, progress=False)
        loader = DataLoader(
            dataset, batch_size=self.batch_size, shuffle=True, drop_last=len(dataset) > self.batch_size,
            num_workers=self.num_workers,
        )
        self.network.train()
        for p in self.network.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.learning_rate)
        trainer = SemiSupervisedTrainer(
            device=self.device,
            max_epochs=self.max_epochs,
            epoch_length=self.epoch_length,
            train_data_loader=loader,
            network=self.network,
            optimizer=optimizer,
            objective=SupervisedObjective(DiceCELoss(sigmoid=True)),
            amp=self.amp,
            channels_last=self.channels_last,
            decollate=False,
            optim_set_to_none=True,
        )
        work_dir = self.work_dir / artifact.digest[:12]
        MetricsLogger(work_dir / "metrics.jsonl", log_every=1).attach(trainer)  # the warm-up's losses, for training_curves.png
        ResumeCheckpoint(
            save_dir=str(work_dir), save_dict={"network": self.network, "optimizer": optimizer, "trainer": trainer}
        ).attach(trainer)
        if self.progress:
            from ignite.handlers import ProgressBar

            ProgressBar(desc="STWP", persist=True).attach(trainer, output_transform=lambda out: {"loss": float(out["loss"])})
        trainer.add_event_handler(
            Events.EPOCH_COMPLETED,
            lambda engine: logger.info("STWP epoch %d/%d loss %.4f", engine.state.epoch, engine.state.max_epochs, float(engine.state.output["loss"])),
        )
        for handler in self.handlers:
            handler.attach(trainer)
        start = time.perf_counter()
        trainer.run()
        atomic_torch_save(unwrap(self.network).state_dict(), self.weights_path)
        artifact.commit(
            {
                "stage": "stwp",
                "iterations": trainer.state.iteration,
                "final_loss": float(trainer.state.output["loss"]) if trainer.state.output else None,
                "seconds_this_run": time.perf_counter() - start,
            }
        )
        (work_dir / "resume.pt").unlink(missing_ok=True)  # the artifact is complete: its resume state is spent


def _describe_transform(transform: Any, depth: int = 2) -> Any:
    """A stable description of a (composed) transform: class names and scalar settings, nested
    ``depth`` levels (``repr`` would embed memory addresses and never match across runs)."""
    if isinstance(transform, _SCALARS):
        return transform
    if isinstance(transform, (list, tuple)):
        values = [_describe_transform(t, depth) for t in transform]
        return values if all(v is not None for v in values) else None
    if depth < 0:
        return None
    inner = getattr(transform, "transforms", None)
    out: dict[str, Any] = {"class": type(transform).__name__}
    if isinstance(inner, (list, tuple)):
        out["transforms"] = [_describe_transform(t, depth) for t in inner]
        return out
    for key, value in sorted(getattr(transform, "__dict__", {}).items()):
        if key.startswith("_") or callable(value) and not hasattr(value, "__dict__"):
            continue
        described = _describe_transform(value, depth - 1)
        if described is not None and described != {}:
            out[key] = described
    return out


def _broadcast_nonce() -> int | None:
    """Under ``torch.distributed``: a number rank 0 picks and every rank receives; else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    box = [time.time_ns() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _wait_until(done: Any, what: str, poll_seconds: float = 5.0) -> None:
    """Poll ``done()`` until true (ranks > 0 while rank 0 runs a stage), logging once a minute."""
    start = last_log = time.monotonic()
    while not done():
        if time.monotonic() - last_log > 60:
            logger.info("waiting for rank 0 to finish %s (%.0f s so far)", what, time.monotonic() - start)
            last_log = time.monotonic()
        time.sleep(poll_seconds)
