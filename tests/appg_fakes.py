"""A cheap stand-in segmenter for the APPG tests (importable by APPG's worker processes, which unpickle it)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from monai_ssl.foundation.litemedsam import BoxSegmentation


class BoxFillSegmenter:
    """Fills each box. Predicted IoU: ``iou`` for every mask, or with ``iou=None`` one that grows
    with the mask's area (so that the candidate choice still varies)."""

    def __init__(self, iou: float | None = 0.5) -> None:
        self.iou = iou

    def segment_batch(self, images: Sequence[np.ndarray], boxes: Sequence) -> list[BoxSegmentation]:
        """One mask per box, the box filled; see the class docstring for the IoU."""
        results = []
        for image, box_set in zip(images, boxes):
            box_arr = np.asarray(box_set, dtype=int).reshape(-1, 4)
            masks = np.zeros((len(box_arr), *image.shape[:2]), dtype=bool)
            for mask, (x0, y0, x1, y1) in zip(masks, box_arr):
                mask[y0 : y1 + 1, x0 : x1 + 1] = True
            if self.iou is None:
                iou = np.array([0.3 + 0.5 * m.mean() for m in masks], dtype=np.float32)
            else:
                iou = np.full(len(box_arr), self.iou, dtype=np.float32)
            results.append(BoxSegmentation(masks, iou))
        return results


class SlowBoxFillSegmenter(BoxFillSegmenter):
    """:class:`BoxFillSegmenter` that sleeps ``delay`` seconds per ``segment_batch`` call, so that a
    test can act while an APPG run is mid-way."""

    def __init__(self, delay: float, iou: float | None = 0.5) -> None:
        super().__init__(iou)
        self.delay = delay

    def segment_batch(self, images: Sequence[np.ndarray], boxes: Sequence) -> list[BoxSegmentation]:
        """Sleep, then fill each box."""
        time.sleep(self.delay)
        return super().segment_batch(images, boxes)
