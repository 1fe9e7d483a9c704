"""Dictionary transforms that check and normalise loaded cases, with errors that name the case.

Inside ``monai.transforms.Compose`` an exception is re-raised by MONAI as
``RuntimeError("applying transform ...")`` *from* the original error, so the
:class:`CaseError` message (with the case name) is the ``__cause__`` and is printed in the
traceback ("The above exception was the direct cause of ...").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ensure_tuple

from monai_ssl.data.readers import unreadable_reason

__all__ = [
    "BinarizeLabeld",
    "CaseError",
    "LoadImageCased",
    "MIN_IMAGE_SIZE_2D",
    "SqueezeSpatiald",
    "ToGrayscaled",
    "ValidateCased",
    "case_name",
]

#: Smallest side (pixels) of a 2D image or mask the 2D bundles accept. The chain resizes every
#: image to ``spatial_size`` (128-224 px), so a side under 16 px would be stretched more than
#: 8-14 times: the mask drawn on it would be invented, not segmented (and a 1-px-wide image
#: trained silently, then failed in MONAI's PNG writer at inference). No ultrasound, CT or
#: MRI slice is that small (the smallest of the 2233 BUSI/DDTI files in ../shared/data is
#: 156 px a side); such a file is a thumbnail, a 1-D profile or a broken export.
MIN_IMAGE_SIZE_2D = 16

#: ITU-R BT.601 luma weights (the same as PIL's "L" conversion).
_LUMA = (0.299, 0.587, 0.114)


class CaseError(ValueError):
    """A loaded case (image/label pair) is unusable; the message names the case."""


def case_name(data: Mapping[Hashable, Any], keys: Sequence[Hashable] = ("image", "label")) -> str:
    """Human-readable name of a case: ``case_id`` and/or the ``filename_or_obj`` of the first keyed MetaTensor."""
    filename = None
    for key in keys:
        value = data.get(key)
        if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
            filename = str(value.meta["filename_or_obj"])
            break
    case_id = data.get("case_id")
    if case_id is not None and filename is not None:
        return f"case {case_id!r} ({filename})"
    if case_id is not None:
        return f"case {case_id!r}"
    if filename is not None:
        return f"case {filename}"
    return "case <unnamed: no 'case_id' key and no filename_or_obj meta>"


def _as_tensor(value: Any, name: str, key: Hashable) -> torch.Tensor:
    """View ``value`` as a torch tensor, or raise a CaseError naming the case and key."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    raise CaseError(f"{name}: {key!r} must be a tensor or numpy array after loading, got {type(value).__name__}")


class LoadImageCased(LoadImaged):
    """``LoadImaged`` whose failure raises :class:`CaseError` naming the case, the key and the file.

    The message says the file is not a readable image and why (missing, empty, truncated, not
    an image: :func:`monai_ssl.data.readers.unreadable_reason`), instead of MONAI's "cannot
    find a suitable reader ... install the reader libraries". Every ``LoadImaged`` argument works.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        """Load every key as ``LoadImaged`` does; a failing key raises a CaseError naming its file."""
        try:
            return super().__call__(data, reader)
        except Exception as err:
            d = dict(data)
            case_id = d.get("case_id")
            for key in self.key_iterator(d):
                try:
                    self._loader(d[key], reader)
                except Exception as key_err:  # noqa: BLE001 - re-raised with the file and the reason
                    who = f"case {case_id!r}: " if case_id is not None else ""
                    error = CaseError(
                        f"{who}{key!r} file {d[key]} is not a readable image: {unreadable_reason(d[key], key_err)}"
                    )
                    # MONAI's "cannot find a suitable reader ... install the reader libraries" only misleads
                    generic = "cannot find a suitable reader" in str(key_err)
                    raise error from (None if generic else key_err)
            raise err


class ValidateCased(MapTransform):
    """Check a loaded, channel-first case and raise :class:`CaseError` naming it when it is unusable.

    Checks: all present keys share the same spatial size; labels (``label_keys``) of a binary
    task have one channel (an RGB mask is refused) and at most two distinct values; no key
    holds NaN/Inf (``check_finite``); the spatial size is at least ``min_spatial_size``
    (``-1``/``None`` entries are not checked), else the error ends with ``min_size_hint``.
    Place it after ``LoadImaged`` + ``EnsureChannelFirstd`` and before ``BinarizeLabeld``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        binary_label: bool = True,
        check_finite: bool = True,
        min_spatial_size: Sequence[int | None] | None = None,
        allow_missing_keys: bool = True,
        label_keys: KeysCollection = ("label",),
        min_size_hint: str = "pad it (e.g. SpatialPadd before cropping) or use a smaller crop/ROI size",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size_hint = min_size_hint
        self.binary_label = binary_label
        self.check_finite = check_finite
        self.min_spatial_size = None if min_spatial_size is None else tuple(min_spatial_size)
        self.label_keys = set(ensure_tuple(label_keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return ``data`` unchanged (as a dict) if the case passes every check."""
        d = dict(data)
        name = case_name(d, self.keys)
        reference: tuple[Hashable, tuple[int, ...]] | None = None
        for key in self.key_iterator(d):
            t = _as_tensor(d[key], name, key)
            if t.ndim < 2:
                raise CaseError(f"{name}: {key!r} has shape {tuple(t.shape)}; expected channel-first (C, spatial...)")
            spatial = tuple(int(s) for s in t.shape[1:])
            if reference is None:
                reference = (key, spatial)
            elif spatial != reference[1]:
                raise CaseError(
                    f"{name}: spatial size mismatch: {reference[0]!r} is {reference[1]} but {key!r} is {spatial} "
                    f"(full shapes {tuple(_as_tensor(d[reference[0]], name, reference[0]).shape)} and {tuple(t.shape)})"
                )
            if self.check_finite and t.is_floating_point():
                n_bad = int((~torch.isfinite(t)).sum())
                if n_bad:
                    n_nan = int(torch.isnan(t).sum())
                    raise CaseError(
                        f"{name}: {key!r} has {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} Inf) "
                        f"out of {t.numel()}"
                    )
            if self.binary_label and key in self.label_keys and t.shape[0] != 1:
                source = t.meta.get("filename_or_obj") if isinstance(t, MetaTensor) else None
                raise CaseError(
                    f"{name}: {key!r}{f' ({source})' if source else ''} has {t.shape[0]} channels (shape "
                    f"{tuple(t.shape)}); a binary mask must be a single-channel image (e.g. an 8-bit gray PNG "
                    "with 0 = background), not RGB/RGBA"
                )
            if self.binary_label and key in self.label_keys:
                values = torch.unique(t.detach().reshape(-1))
                if values.numel() > 2:
                    shown = ", ".join(f"{v:g}" for v in values[:5].tolist())
                    more = f", ... ({values.numel()} distinct values)" if values.numel() > 5 else ""
                    raise CaseError(
                        f"{name}: {key!r} has more than two distinct values in a binary task: {shown}{more} "
                        "(is it a multi-class or interpolated mask?)"
                    )
            if self.min_spatial_size is not None:
                _check_min_size(name, key, spatial, self.min_spatial_size, self.min_size_hint)
        return d


def _check_min_size(
    name: str, key: Hashable, spatial: tuple[int, ...], min_size: tuple[int | None, ...], hint: str
) -> None:
    """Raise a CaseError when ``spatial`` is smaller than ``min_size`` in a checked dim (-1/None: unchecked)."""
    if len(min_size) != len(spatial):
        raise CaseError(
            f"{name}: min_spatial_size {min_size} has {len(min_size)} dims but {key!r} has {len(spatial)} "
            f"spatial dims {spatial}"
        )
    if any(m is not None and m > 0 and s < m for s, m in zip(spatial, min_size)):
        raise CaseError(
            f"{name}: {key!r} spatial size {spatial} is smaller than the required {min_size}; {hint}"
        )


class BinarizeLabeld(MapTransform):
    """Map a label to float32 {0, 1}: any nonzero value becomes 1 (use after :class:`ValidateCased`)."""

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with each key binarised (MetaTensor meta is kept)."""
        d = dict(data)
        name = case_name(d, self.keys)
        for key in self.key_iterator(d):
            d[key] = (_as_tensor(d[key], name, key) != 0).to(torch.float32)
        return d


class ToGrayscaled(MapTransform):
    """Convert a channel-first RGB/RGBA image to one luminance channel (BT.601 weights; alpha ignored).

    One-channel images pass unchanged; any other channel count raises :class:`CaseError`.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with each key reduced to one channel (float32 when converted)."""
        d = dict(data)
        name = case_name(d, self.keys)
        for key in self.key_iterator(d):
            t = _as_tensor(d[key], name, key)
            channels = int(t.shape[0]) if t.ndim >= 3 else -1
            if channels == 1:
                continue
            if channels not in (3, 4):
                raise CaseError(
                    f"{name}: {key!r} has shape {tuple(t.shape)}; expected a channel-first 2D/3D image with "
                    "1, 3 (RGB) or 4 (RGBA) channels (did EnsureChannelFirstd run?)"
                )
            weights = torch.tensor(_LUMA, dtype=torch.float32).reshape(3, *([1] * (t.ndim - 1)))
            d[key] = (t[:3].to(torch.float32) * weights).sum(dim=0, keepdim=True)
        return d


class SqueezeSpatiald(MapTransform):
    """Drop trailing singleton spatial axes so a 2D pipeline accepts 2D images stored as 3D.

    A 2D DICOM or NIfTI file often loads as ``(C, H, W, 1)``; this returns ``(C, H, W)`` (with the
    affine updated by MONAI's ``SqueezeDim``). A volume with more than one slice raises
    :class:`CaseError` naming the case, since a 2D bundle cannot segment it.
    """

    def __init__(self, keys: KeysCollection = "image", spatial_dims: int = 2, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with each key reduced to ``spatial_dims`` spatial axes."""
        from monai.transforms import SqueezeDim

        d = dict(data)
        name = case_name(d, self.keys)
        for key in self.key_iterator(d):
            while d[key].ndim - 1 > self.spatial_dims:
                if d[key].shape[-1] != 1:
                    raise CaseError(
                        f"{name}: {key!r} has spatial shape {tuple(d[key].shape[1:])}; a {self.spatial_dims}D "
                        "bundle needs single 2D images (split the volume into slices first)"
                    )
                d[key] = SqueezeDim(dim=-1)(d[key])
                meta = getattr(d[key], "meta", None)
                if meta is not None and len(np.atleast_1d(meta.get("spatial_shape", []))) > self.spatial_dims:
                    meta["spatial_shape"] = np.asarray(meta["spatial_shape"])[: d[key].ndim - 1]
        return d
