"""APPG worker processes: chunks of images computed in spawned processes, the parent the only writer.

Worker processes: with ``workers > 1`` the images are split into chunks that ``workers``
processes (``spawn`` start method, ``threads_per_worker`` torch threads each) propose, segment
and choose masks for, each with its own unpickled copy of the proposer and segmenter
(precision wrappers such as ``AutocastSegmenter`` included, so they run exactly as in-process).
The parent process stays the only writer of the store (masks, journal, manifest, report): a
worker sends each chunk's masks back as PNG bytes, and the parent writes and journals them as
they come back, so resuming works as with one process. Workers die with the parent (Linux
``PR_SET_PDEATHSIG``, and a check before each image), so a killed run leaves no process behind
that computes or writes into a store a restarted run is using. The outputs do
not depend on ``workers``, which is therefore not part of the config hash. On this project's
2-core CPU, 2 workers x 1 thread beat 1 process x 2 intra-op threads (the models' kernels do not
scale well over 2 threads). Worker processes return freed memory to the system lazily (glibc
``mallopt``: no ``mmap`` for large blocks, a high trim threshold): re-faulting the encoder's
32 MiB activations on every call cost about a fifth of its time.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_ssl.foundation.appearance import BoxProposal
from monai_ssl.foundation.interfaces import BoxProposer, PromptableSegmenter
from monai_ssl.pseudo.selection import ChunkJob
from monai_ssl.utils import atomic_write

__all__ = ["default_workers", "run_in_workers", "tune_malloc_for_inference"]

#: one log channel for all of APPG (run, store, selection, workers, report)
logger = logging.getLogger("monai_ssl.pseudo.appg")

def default_workers(device: str | torch.device = "cpu") -> int:
    """APPG worker processes to use by default: 1 on a GPU (one process keeps it busy), else one
    per CPU core up to 4 (each then gets ``torch.get_num_threads() // workers`` threads)."""
    return 1 if torch.device(device).type == "cuda" else min(4, os.cpu_count() or 1)


def tune_malloc_for_inference() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the system at once.

    ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not from fresh ``mmap`` pages)
    and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``. PyTorch's CPU tensors are plain ``malloc`` blocks,
    so without this every activation above glibc's mmap threshold (LiteMedSAM's encoder makes
    32 MiB ones at 256 x 256) is mapped, page-faulted and unmapped on every call: about a fifth
    of the encoder's time on this project's CPU. Process-wide and irreversible, so call it only in
    processes that do inference (APPG's workers, ``scripts/run_appg.py``). Returns False where
    ``mallopt`` does not exist (not glibc) or refuses; nothing changes then.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own symbols, libc's among them (no ldconfig subprocess)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


#: What a worker process runs (``exec``, the target of a spawned process). ``import monai_ssl``
#: imports every sub-package and MONAI (about 7 s of CPU here), while a worker needs only the APPG
#: modules, the foundation models and what the pickled proposer and segmenter import: so unless the
#: parent's main module has imported it already, ``monai_ssl`` is registered as a bare package
#: (its ``__init__`` not run) and its sub-modules are imported on demand as usual (about 3 s).
_WORKER_BOOTSTRAP = """
import sys, types
if "monai_ssl" not in sys.modules:
    package = types.ModuleType("monai_ssl", "monai_ssl without its __init__ (an APPG worker process)")
    package.__path__ = [PACKAGE_DIR]
    package.__file__ = PACKAGE_DIR + "/__init__.py"
    sys.modules["monai_ssl"] = package
from monai_ssl.pseudo.workers import _worker_main
_worker_main(*WORKER_ARGS)
"""
#: seconds a worker waits for a task before checking that its parent still lives
_WORKER_POLL_SECONDS = 5.0
#: ``prctl`` option (Linux ``<sys/prctl.h>``): the signal a process gets when its parent dies
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die with its parent: on Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (the
    kernel kills it when the parent's process, strictly the thread that started it, ends, even by
    SIGKILL); then exit at once if the parent is gone already (it died before the ``prctl``).
    Elsewhere only the checks of :func:`_exit_if_orphaned` between images apply."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                logger.warning("APPG worker: prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass
    _exit_if_orphaned(parent_pid)


def _exit_if_orphaned(parent_pid: int) -> None:
    """End this worker process now (no cleanup, nothing more sent or written) when the process that
    started it is gone: a dead parent's children are re-parented, so ``os.getppid()`` changes."""
    if os.getppid() != parent_pid:
        os._exit(1)


class _ParentCheckedProposer:
    """A worker's view of the proposer: checks before each image that the parent still lives."""

    def __init__(self, proposer: BoxProposer, parent_pid: int) -> None:
        self.proposer, self.parent_pid = proposer, parent_pid

    def propose(self, image: np.ndarray, prompts: Sequence[str], top_k: int) -> Sequence[BoxProposal]:
        """The wrapped proposer's boxes for ``image``, unless the parent is gone (then exit)."""
        _exit_if_orphaned(self.parent_pid)
        return self.proposer.propose(image, prompts, top_k)


def _staged_masks(staging: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, bytes]:
    """The PNG bytes of each record's mask that a worker wrote under ``staging`` (its own folder,
    outside the store); the files are removed, so it holds at most one chunk's masks at a time."""
    masks = {}
    for record in records:
        path = staging / record["mask"]
        masks[record["mask"]] = path.read_bytes()
        path.unlink()
    return masks


def _worker_error(err: BaseException, chunk: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """Message (naming the case ids) and traceback text of an exception raised in a worker."""
    message = str(err)
    if not message.startswith("APPG case"):
        message = f"APPG case {', '.join(case_id for case_id, _ in chunk)}: {type(err).__name__}: {err}"
    return message, "".join(traceback.format_exception(err))


def _worker_main(
    index: int,
    payload: bytes,
    threads: int,
    tasks: Any,
    results: Any,
    parent_pid: int,
    staging: str,
) -> None:
    """Body of an APPG worker process: unpickle the job and models, then run chunks until told to stop.

    Messages on ``results``: ``("ok", index, number, (records, masks))`` per chunk (``masks``: the
    PNG bytes of each record's mask, by its relative path; the parent writes them into the store,
    which a worker never touches), ``("error", index, number, (message, traceback))`` for a failed
    chunk (the worker then stops) and ``("init_error", index, None, (message, traceback))`` when the
    models cannot be restored. Ctrl-C is left to the parent, which terminates the workers. A worker
    dies with its parent (:func:`_die_with_parent`) and checks before each task and image that the
    parent still lives, so a killed run leaves no worker computing for nobody. ``staging`` is this
    worker's own folder (outside the store) for the masks of the chunk it is computing.
    """
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent loaded these models already and said once how (e.g. the timm stand-in warning)
    logging.getLogger("monai_ssl.foundation").setLevel(logging.ERROR)
    try:
        tune_malloc_for_inference()
        torch.set_num_threads(threads)
        job, proposer, segmenter = pickle.loads(payload)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        results.put(("init_error", index, None, (f"{type(err).__name__}: {err}", "".join(traceback.format_exception(err)))))
        return
    del payload
    proposer = _ParentCheckedProposer(proposer, parent_pid)
    job = replace(job, out_dir=Path(staging))
    while True:
        try:
            task = tasks.get(timeout=_WORKER_POLL_SECONDS)
        except queue.Empty:
            _exit_if_orphaned(parent_pid)
            continue
        _exit_if_orphaned(parent_pid)
        if task is None:
            return
        number, chunk = task
        try:
            records = job.run(chunk, proposer, segmenter)
            masks = _staged_masks(Path(staging), records)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
            results.put(("error", index, number, _worker_error(err, chunk)))
            return
        _exit_if_orphaned(parent_pid)
        results.put(("ok", index, number, (records, masks)))


def run_in_workers(
    chunks: Sequence[Sequence[tuple[str, str]]],
    job: ChunkJob,
    proposer: BoxProposer,
    segmenter: PromptableSegmenter,
    workers: int,
    threads: int,
    consume: Callable[[list[dict]], None],
) -> None:
    """Compute ``chunks`` in ``workers`` spawned processes; as each chunk finishes, this process
    writes its masks into ``job.out_dir`` and ``consume`` gets its records. A worker's error is
    raised here as a RuntimeError naming the case ids; on any error or interrupt the workers are
    terminated and joined (no orphans); workers die with this process if it is killed."""
    try:
        payload = pickle.dumps((job, proposer, segmenter), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        raise ValueError(
            f"APPG with workers={workers} sends the proposer ({type(proposer).__name__}) and segmenter "
            f"({type(segmenter).__name__}) to worker processes, but they do not pickle ({type(err).__name__}: {err}); "
            "use workers=1"
        ) from err
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pool has run can hang
    tasks, results = context.Queue(), context.Queue()
    for number, chunk in enumerate(chunks):
        tasks.put((number, list(chunk)))
    for _ in range(workers):
        tasks.put(None)
    package = Path(__file__).resolve().parents[1]
    staging = Path(tempfile.mkdtemp(prefix="appg-workers-"))  # the workers' masks before this process writes them
    processes = [
        context.Process(
            target=exec,
            args=(
                _WORKER_BOOTSTRAP,
                {
                    "__name__": "__appg_worker__",
                    "PACKAGE_DIR": str(package),
                    "WORKER_ARGS": (i, payload, threads, tasks, results, os.getpid(), str(staging / str(i))),
                },
            ),
            name=f"appg-worker-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    del payload
    finished = False
    try:
        for process in processes:
            process.start()
        remaining = len(chunks)
        while remaining:
            try:
                kind, index, _, content = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead or all(p.exitcode == 0 for p in processes):
                    codes = ", ".join(f"{p.name} exit code {p.exitcode}" for p in processes)
                    raise RuntimeError(f"APPG worker process ended without finishing its images ({codes})") from None
                continue
            if kind == "ok":
                records, masks = content
                for relative, data in masks.items():  # this process is the store's only writer
                    atomic_write(job.out_dir / relative, data)
                consume(records)
                remaining -= 1
            elif kind == "init_error":
                message, trace = content
                raise RuntimeError(f"APPG worker {index} could not restore the proposer and segmenter: {message}") from RuntimeError(trace)
            else:
                message, trace = content
                raise RuntimeError(message) from RuntimeError(f"worker {index} traceback:\n{trace}")
        finished = True
    finally:
        for process in processes:
            if process.pid is None:
                continue
            if not finished and process.is_alive():
                process.terminate()
            process.join(timeout=30.0)
            if process.is_alive():  # pragma: no cover - a worker stuck in a system call
                process.kill()
                process.join()
        for q in (tasks, results):
            q.close()
            q.cancel_join_thread()
        shutil.rmtree(staging, ignore_errors=True)
