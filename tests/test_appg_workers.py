"""APPG with worker processes: the same records and masks as in-process, resume, error propagation
with the case id and no processes left behind (also when the parent is killed with SIGKILL); the exact-output speed-ups of LiteMedSAM (ConvGELU,
the contiguous mask decoder, pickling) against the original computations."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from appg_fakes import BoxFillSegmenter
from monai_ssl.data.datalist import load_datalist
from monai_ssl.data.synthetic import synthetic_dataset
from monai_ssl.foundation.appearance import AppearanceBoxProposer
from monai_ssl.foundation.litemedsam import BoxSegmentation, ConvGELU
from monai_ssl.pseudo.appg import default_workers, run_appg, tune_malloc_for_inference


class FailingSegmenter(BoxFillSegmenter):
    """Raises on images whose top-left pixel is 7 (the test writes one such image)."""

    def segment_batch(self, images: Sequence[np.ndarray], boxes: Sequence) -> list[BoxSegmentation]:
        if any(int(np.asarray(image)[0, 0]) == 7 for image in images):
            raise ValueError("this image is cursed")
        return super().segment_batch(images, boxes)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """10 synthetic unlabelled ultrasound-like images and a constant one (no box)."""
    root = tmp_path_factory.mktemp("data")
    dataset = Path(synthetic_dataset("us2d", root=root, n_labeled=1, n_unlabeled=10, n_validation=1, n_test=1, size=96))
    entries = load_datalist(dataset / "datalist.json", dataset, "unlabeled")
    blank = dataset / "images" / "blank.png"
    Image.fromarray(np.full((80, 90), 120, dtype=np.uint8)).save(blank)
    return entries + [{"image": str(blank), "case_id": "blank"}]


def _run(images: list[dict], out: Path, segmenter=None, **kwargs) -> dict:
    path = run_appg(
        images, out, AppearanceBoxProposer(), segmenter or BoxFillSegmenter(iou=None), top_k=3, overlay_count=0,
        encoder_batch_size=2, progress=False, config={"proposer": "appearance", "segmenter": "boxfill"}, **kwargs,
    )
    return json.loads(path.read_text())


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _masks(out: Path, manifest: dict) -> dict[str, bytes]:
    return {r["case_id"]: (out / r["mask"]).read_bytes() for r in manifest["images"]}


def test_workers_give_the_same_manifest_and_masks_and_resume(images, tmp_path) -> None:
    one = _run(images, tmp_path / "one")
    two = _run(images, tmp_path / "two", workers=2, threads_per_worker=1)
    assert multiprocessing.active_children() == []
    assert two["config_hash"] == one["config_hash"]  # workers is not a setting of the results
    assert _without_seconds(two["images"]) == _without_seconds(one["images"])
    assert _masks(tmp_path / "two", two) == _masks(tmp_path / "one", one)
    assert two["counts"] == one["counts"] and one["counts"]["invalid"]["no_box"] == 1
    assert one["timing"]["workers_this_run"] == 1 and two["timing"]["workers_this_run"] == 2
    assert one["timing"]["threads_per_process_this_run"] == torch.get_num_threads()
    assert two["timing"]["threads_per_process_this_run"] == 1
    assert two["timing"]["wall_images_per_second_this_run"] > 0
    journal = (tmp_path / "two" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + len(images)  # the parent journalled every image once

    # a run killed after 4 images (the 5th journal line half written) resumes with workers
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", out)
    (out / "manifest.json").unlink()
    lines = (out / "journal.jsonl").read_text().splitlines()
    (out / "journal.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    resumed = _run(images, out, workers=2, threads_per_worker=1)
    assert resumed["timing"]["computed_this_run"] == len(images) - 4
    assert _without_seconds(resumed["images"]) == _without_seconds(one["images"])
    assert _masks(out, resumed) == _masks(tmp_path / "one", one)
    # complete with the same settings: nothing to do, whatever the workers
    mtime = (out / "manifest.json").stat().st_mtime_ns
    _run(images, out, workers=3)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_worker_errors_name_the_case_and_leave_no_process(images, tmp_path) -> None:
    cursed = images[3]
    array = np.array(Image.open(cursed["image"]).convert("L"))
    array[0, 0] = 7
    bad = tmp_path / "cursed.png"
    Image.fromarray(array).save(bad)
    entries = images[:3] + [{"image": str(bad), "case_id": "cursed"}] + images[4:8]
    with pytest.raises(RuntimeError, match="APPG case .*cursed.*ValueError: this image is cursed"):
        _run(entries, tmp_path / "out", segmenter=FailingSegmenter(), workers=2, threads_per_worker=1)
    assert multiprocessing.active_children() == []
    # what finished before the error is journalled: a rerun without the bad image reuses it
    header, *records = (tmp_path / "out" / "journal.jsonl").read_text().splitlines()
    assert "cursed" not in {json.loads(r)["case_id"] for r in records}

    missing = [{"image": str(tmp_path / "nope.png"), "case_id": "nope"}] + images[:3]
    with pytest.raises(RuntimeError, match="APPG case nope: cannot read image"):
        _run(missing, tmp_path / "missing", workers=2, threads_per_worker=1)
    assert multiprocessing.active_children() == []


def test_workers_are_checked_and_unpicklable_models_are_refused(images, tmp_path) -> None:
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        _run(images[:2], tmp_path / "a", workers=0)
    with pytest.raises(ValueError, match="threads_per_worker"):
        _run(images[:2], tmp_path / "b", workers=2, threads_per_worker=0)

    class LocalSegmenter(BoxFillSegmenter):  # a local class does not pickle
        pass

    with pytest.raises(ValueError, match="do not pickle"):
        _run(images[:4], tmp_path / "c", segmenter=LocalSegmenter(), workers=2)
    assert isinstance(tune_malloc_for_inference(), bool)
    assert default_workers("cuda") == 1 and default_workers("cpu") == min(4, os.cpu_count() or 1)


_KILLED_PARENT = """
import json, sys
from appg_fakes import SlowBoxFillSegmenter
from monai_ssl.foundation.appearance import AppearanceBoxProposer
from monai_ssl.pseudo.appg import run_appg

images, out = json.loads(sys.argv[1]), sys.argv[2]
run_appg(images, out, AppearanceBoxProposer(), SlowBoxFillSegmenter(delay=1.0), top_k=3, overlay_count=0,
         encoder_batch_size=1, progress=False, config={"proposer": "appearance", "segmenter": "slow"},
         workers=2, threads_per_worker=1)
"""


def _children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` (``/proc``): pid -> start time (tells a reused pid apart)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
            if int(fields[1]) == pid and fields[0] not in "ZX":
                found[int(entry.name)] = fields[19]
    return found


def _alive(pid: int, start_time: str) -> bool:
    """Whether process ``pid`` (started at ``start_time``) still runs (zombies count as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in "ZX" and fields[19] == start_time


def _store_files(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_workers_die_with_a_killed_parent_and_write_nothing_after(images, tmp_path) -> None:
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, json.dumps(images), str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: dict[int, str] = {}
    try:
        deadline = time.time() + 120
        while not list((out / "masks").glob("*.png")):  # mid-APPG: the first images are done
            assert parent.poll() is None, f"APPG ended before any mask was written: {parent.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no mask within 120 s"
            time.sleep(0.05)
        workers = _children(parent.pid)  # the two workers and multiprocessing's resource tracker
        assert len(workers) >= 2, workers
        os.kill(parent.pid, signal.SIGKILL)  # the parent only: its workers get no signal from here
        parent.wait()
        before = _store_files(out)
        assert len(list((out / "masks").glob("*.png"))) < len(images), "the run was not mid-way when killed"
        deadline = time.time() + 5
        while any(_alive(pid, start) for pid, start in workers.items()) and time.time() < deadline:
            time.sleep(0.1)
        alive = [pid for pid, start in workers.items() if _alive(pid, start)]
        assert not alive, f"processes of the killed APPG run still alive 5 s after the kill: {alive}"
        time.sleep(2.0)  # a live worker would have finished two more images by now (1 s each)
        assert _store_files(out) == before, "files in the store changed after the parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid, start in workers.items():  # never leave this test's processes behind, even when it fails
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("groups, kernel", [(1, 1), (32, 3)])
def test_conv_gelu_matches_conv_then_gelu(groups: int, kernel: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, kernel, padding=kernel // 2, groups=groups).eval()
    x = torch.randn(2, 32, 20, 24).contiguous(memory_format=torch.channels_last)
    fused = ConvGELU(conv).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.nn.functional.gelu(conv(x)), atol=1e-5, rtol=1e-5)
        bf16 = ConvGELU(torch.nn.Conv2d(32, 32, 1).to(torch.bfloat16))
        y = x.to(torch.bfloat16)
        reference = torch.nn.functional.gelu(bf16.conv(y).float())
        assert (bf16(y).float() - reference).abs().max() <= 0.02 * reference.abs().max()


def test_litemedsam_decoder_and_pickling_match_the_original() -> None:
    from monai_ssl.foundation.litemedsam import LiteMedSAMPredictor, decode_masks

    predictor = LiteMedSAMPredictor()
    model = predictor.model
    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.tensor([[[10.0, 20.0, 100.0, 120.0]], [[50.0, 60.0, 150.0, 200.0]]])
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        for multimask in (False, True):
            expected = model.mask_decoder(
                image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            )
            got = decode_masks(model.mask_decoder, embedding, predictor._dense_pe(), sparse, dense, multimask)
            torch.testing.assert_close(got[0], expected[0], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)

    image = np.zeros((90, 110), dtype=np.uint8)
    image[30:60, 40:80] = 200
    box = np.array([[38, 28, 82, 62]], dtype=np.float32)
    copy = pickle.loads(pickle.dumps(predictor))
    a, b = predictor.segment(image, box), copy.segment(image, box)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.iou, b.iou)
