"""Checkpoints: atomic, verified saves; safe loads; retention; finding the run a user means. Shared by the entry points.

A checkpoint is a plain dict of tensors, numbers and strings written with torch.save and read back with
`torch.load(weights_only=True)`, so loading one never runs code. Beside each file FILE.pt a manifest FILE.json
holds its sha256; a checkpoint counts only once its manifest exists and matches, so a save killed at any point
leaves no file that is trusted. A run folder checkpoints/<run>/ holds ckpt-<step>.pt files, last.pt and best.pt
(links to the newest and to the lowest validation loss), manifest.json, metrics.jsonl and loss.png.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from config import UserError, error_summary
from gptkit import atomic

CHECKPOINTS_ROOT = Path("checkpoints")
FORMAT = "gpt-checkpoint-1"
STEP_FILE = re.compile(r"ckpt-(\d+)\.pt")


class CorruptCheckpoint(UserError):
    """A checkpoint whose bytes do not match its manifest, or whose save never finished."""


class _HashingWriter:
    """A file wrapper that feeds every byte written through sha256, so hashing costs no second read."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, write) -> None:
    """atomic.write_atomic, with a full disk or a permission problem said as one line naming the file."""
    try:
        atomic.write_atomic(path, write)
    except OSError as err:
        raise UserError(f"could not save {path}: {err.strerror or err}; the previous checkpoint is untouched "
                        "(free some disk space, then continue with --resume)") from None


def manifest_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: Path, payload: dict, info: dict | None = None) -> Path:
    """Write payload to `path`, then its manifest (sha256, size, `info`): last, so that it vouches for a whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = {}

    def write(f):
        writer["w"] = _HashingWriter(f)
        torch.save({"format": FORMAT, **payload}, writer["w"])

    _write_atomic(path, write)
    manifest = {"file": path.name, "sha256": writer["w"].sha256.hexdigest(), "bytes": writer["w"].size,
                "format": FORMAT, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
    _write_atomic(manifest_path(path), lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode()))
    return path


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint; CorruptCheckpoint naming the file and the problem otherwise."""
    real = Path(path).resolve()
    if not real.is_file():
        raise UserError(f"checkpoint {path} does not exist; run `make train` first or pass --ckpt=PATH to a .pt file")
    try:
        manifest = json.loads(manifest_path(real).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} has no manifest {manifest_path(real).name}: its save never finished, or it "
                                "was not written by this project's train.py") from None
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"the manifest of {path} is unreadable ({err}); the checkpoint cannot be verified") \
            from None
    if not isinstance(manifest, dict) or "sha256" not in manifest:
        raise CorruptCheckpoint(f"the manifest of {path} has no sha256; it was not written by this project")
    sha256, size = hashlib.sha256(), 0
    with open(real, "rb") as f:
        while block := f.read(1 << 20):
            sha256.update(block)
            size += len(block)
    if size != manifest.get("bytes", size) or sha256.hexdigest() != manifest["sha256"]:
        raise CorruptCheckpoint(f"{path} is corrupt: {size} bytes with sha256 {sha256.hexdigest()[:12]}..., its "
                                f"manifest says {manifest.get('bytes')} bytes, {manifest['sha256'][:12]}... "
                                "(truncated or damaged; resume from an earlier checkpoint)")
    return manifest


def load_checkpoint(path: Path, verify: bool = True) -> dict:
    """Verify, then load onto the CPU as data only; anything that is not one of ours is a UserError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_in_run(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; run `make train` first or pass --ckpt=PATH to a .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"{path} is not a readable checkpoint ({error_summary(err)}); it may be truncated or "
                        "not a file written by train.py") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project's train.py (no '{FORMAT}' marker)")
    return payload


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's ckpt-<step>.pt files, newest step first."""
    found = [p for p in Path(run_dir).glob("ckpt-*.pt") if STEP_FILE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_FILE.fullmatch(p.name).group(1)), reverse=True)


def newest_valid_checkpoint(run_dir: Path, say=print) -> Path:
    """The newest checkpoint of a run that verifies, saying which newer ones were skipped and why."""
    candidates = step_checkpoints(run_dir)
    for name in ("last.pt", "best.pt"):  # runs saved without step files (or by hand)
        path = Path(run_dir) / name
        if path.is_file() and path.resolve() not in [c.resolve() for c in candidates]:
            candidates.append(path)
    for path in candidates:
        try:
            verify_checkpoint(path)
            return path
        except CorruptCheckpoint as err:
            say(f"skipping {path.name}: {err}")
    raise UserError(f"{run_dir} holds no checkpoint that verifies; start a new run (without --resume)")


def save_run_checkpoint(run_dir: Path, payload: dict, step: int, val_loss: float | None, is_best: bool,
                        keep_last: int) -> Path:
    """Save ckpt-<step>.pt, point last.pt (and best.pt when it is the best) at it, and prune old step files.

    Step files are never overwritten, so the previous checkpoint stays whole whatever happens to this save.
    """
    run_dir = Path(run_dir)
    path = run_dir / f"ckpt-{step:07d}.pt"
    if not _is_valid(path):  # the same step saved twice (an eval, then a stop signal): the first save stands
        save_checkpoint(path, payload, {"step": step, "val_loss": val_loss})
    _point(run_dir / "last.pt", path)
    if is_best:
        _point(run_dir / "best.pt", path)
    prune(run_dir, keep_last)
    return path


def _is_valid(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except UserError:
        return False


def _point(link: Path, target: Path) -> None:
    """Atomically make `link` a relative symlink to `target` (a reader sees the old target or the new one)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the keep_last newest step checkpoints plus the one best.pt points to; remove stale temp files."""
    run_dir = Path(run_dir)
    keep = {p.resolve() for p in step_checkpoints(run_dir)[:keep_last]}
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).exists():
            keep.add((run_dir / name).resolve())
    for path in step_checkpoints(run_dir):
        if path.resolve() not in keep:
            manifest_path(path).unlink(missing_ok=True)  # manifest first: a half-removed pair reads as incomplete
            path.unlink(missing_ok=True)
    clean_stale_temp_files(run_dir)


def clean_stale_temp_files(run_dir: Path) -> list[Path]:
    """Temp files left by a save that was killed: never trusted, removed on the next start."""
    stale = list(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def checkpoint_in_run(run_dir: Path, prefer: str = "best") -> Path:
    """The best checkpoint of a run (or the last one when no eval has produced a best yet)."""
    order = ("best.pt", "last.pt") if prefer == "best" else ("last.pt", "best.pt")
    for name in order:
        if (run_dir / name).is_file():
            return run_dir / name
    steps = step_checkpoints(run_dir)
    if steps:
        return steps[0]
    raise UserError(f"run folder {run_dir} holds no checkpoint yet; run `make train` first")


# What kind of run a folder holds, as its manifest.json says: "pretrain" (a language model trained on raw text, by
# train.py), "classifier" or "instruct" (the fine-tuning scripts). A folder whose manifest names no kind, or that has
# none, holds a language model trained on raw text: train.py recorded no kind before 2026-12.
PRETRAIN_KIND = "pretrain"


def holds_run(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("last.pt", "best.pt")) or bool(step_checkpoints(folder))


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a folder that holds one (a best.pt alone counts): it would overwrite it."""
    if any((run_dir / name).exists() for name in ("last.pt", "best.pt")) or step_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume --out_dir={run_dir}, "
                        "or pick another --out_dir/--run_name")


def run_kind(run_dir: Path) -> str:
    try:
        kind = json.loads((Path(run_dir) / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    return kind or PRETRAIN_KIND


def latest_run(root: Path = CHECKPOINTS_ROOT, kinds: tuple[str, ...] = (), exclude_kinds: tuple[str, ...] = ()) -> Path:
    """The run folder under `root` whose checkpoint was written most recently, among the runs of one of `kinds`
    (any kind when empty) and of none of `exclude_kinds`: e.g. kinds=("pretrain",) for train.py --resume, which
    cannot continue the classifier run that `make classify` has just written."""
    runs = [d for d in Path(root).glob("*") if d.is_dir() and holds_run(d)]
    if not runs:
        raise UserError(f"no checkpoint found under {root}/; run `make train` first")
    usable = [d for d in runs if (not kinds or run_kind(d) in kinds) and run_kind(d) not in exclude_kinds]
    if not usable:
        wanted = f"{'/'.join(kinds)} run" if kinds else f"run other than {'/'.join(exclude_kinds)}"
        found = "/".join(sorted({run_kind(d) for d in runs}))
        raise UserError(f"no {wanted} under {root}/ (it holds only {found} runs)")
    return max(usable, key=lambda d: max(p.stat().st_mtime for p in d.glob("*.pt") if p.is_file()))


def resolve_checkpoint(ckpt: str = "", run: str = "", root: Path = CHECKPOINTS_ROOT, prefer: str = "best",
                       kinds: tuple[str, ...] = (), exclude_kinds: tuple[str, ...] = ()) -> Path:
    """--ckpt=PATH (a file or a run folder), else --run=NAME under root, else the most recent run (of `kinds`, not of
    `exclude_kinds`: see latest_run)."""
    if ckpt:
        path = Path(ckpt)
        if not path.exists():
            raise UserError(f"--ckpt={ckpt} does not exist; give a .pt file or a run folder under {root}/")
        return checkpoint_in_run(path, prefer) if path.is_dir() else path
    if run:
        run_dir = Path(root) / run
        if not run_dir.is_dir():
            known = sorted(d.name for d in Path(root).glob("*") if d.is_dir())
            raise UserError(f"--run={run}: no folder {run_dir}; runs here: {', '.join(known) or 'none'}")
        return checkpoint_in_run(run_dir, prefer)
    return checkpoint_in_run(latest_run(root, kinds, exclude_kinds), prefer)


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Drop `_orig_mod.` (torch.compile) and `module.` (DDP) so a checkpoint loads the same whatever wrote it."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = value
    return clean


# ----------------------------------------------------------------------------------------------------------------
# Random number generators: saved with each checkpoint so that a resumed run draws the same dropout masks


def rng_state() -> dict:
    """The global RNGs (dropout, anything random) as tensors and plain values, which weights_only loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": _python_rng_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_to_tensor(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss if gauss is not None else float("nan")}


def set_rng_state(state: dict) -> None:
    python = state["python"]
    gauss = None if math.isnan(python["gauss"]) else python["gauss"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it; torch fails on an index past this machine's GPUs, so a
        # run saved on 8 GPUs and resumed on 1 restores the GPUs this machine has.
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and numpy's global RNGs (numpy takes 32 bits)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def restore_rank_rng(saved: dict, rank: int, seed: int, step: int) -> None:
    """Each rank takes back its own RNG (dropout masks). A rank the saved run did not have (it ran on fewer
    processes) gets a fresh seed from (seed, rank, step) instead of a copy of another rank's stream."""
    per_rank = saved.get("rng_per_rank") or [saved["rng"]]
    if rank < len(per_rank):
        set_rng_state(per_rank[rank])
        return
    seed_everything(seed + 1_000_003 * step + rank)
