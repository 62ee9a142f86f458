"""Where and how the work runs: device, dtype, autocast, GradScaler and DDP, decided once in setup_runtime().

Shared by train.py, generate.py, evaluate.py and bench.py; also the stop signal that DDP ranks agree on, and how
a rank that lost its peers says so. Also measures the machine's matmul peak, the
denominator of MFU (a datasheet number means nothing on a CPU).
Try it: python -c "import runtime; print(runtime.setup_runtime('auto', 'auto').describe())"
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import UserError

DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the autocast dtype; float32 means autocast is off
    reason: str  # one line saying why this device and dtype were chosen
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed precision for the forward pass; a no-op in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; bf16 and float32 do not need it (disabled scaler)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def synchronize(self) -> None:
        synchronize(self.device)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Move a batch; on CUDA through pinned memory with a non-blocking copy, so the copy overlaps compute."""
        if self.device_type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def describe(self) -> str:
        where = f"{self.device}" + (f", rank {self.rank} of {self.world_size}" if self.distributed else "")
        return f"device {where}, dtype {str(self.dtype).removeprefix('torch.')}: {self.reason}"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings need it); on the CPU every op is done when it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: matmuls in bf16 run natively (about twice float32's peak, `make bench`); without them bf16
    is emulated, slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device={requested} but no CUDA GPU is visible; use --device=cpu or --device=auto")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"device={requested} but MPS is not available; use --device=cpu or --device=auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    if requested != "auto":
        if requested == "float16" and device.type == "cpu":
            raise UserError("dtype=float16 is not supported for training on the CPU; use --dtype=bfloat16 or float32")
        return DTYPE_BY_NAME[requested], f"--dtype={requested} was asked for"
    if device.type == "cuda":
        # Without including_emulation=False torch answers yes on pre-Ampere GPUs (V100, T4) too, whose bf16 is
        # emulated and slow, and the fp16 + GradScaler path meant for them would never be taken.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "bf16 autocast: this GPU supports bfloat16"
        return torch.float16, "fp16 autocast with a GradScaler: this GPU has no bfloat16"
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16, "bf16 autocast: this CPU has native bfloat16 matmuls (AVX512-BF16/AMX)"
    return torch.float32, f"float32: no fast half precision on this {device.type}"


def usable_cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's or taskset's limit), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Let the C allocator keep memory a training step frees, for the next step, instead of returning it to the OS.

    glibc's malloc gives back freed memory above a threshold that moves with use, so every step of a large-vocabulary
    model got fresh pages from the kernel for its big tensors and page-faulted on each of them again. Fixing the
    thresholds (allocations of up to 32 MB from the heap, which is never trimmed) keeps them; docs/performance.md
    has the measured step times. Disabling mmap altogether was faster still, but its peak RSS
    grew step after step (fragmentation). Linux with glibc only; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    mallopt(m_trim_threshold, 2**31 - 1)
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value


def setup_runtime(device: str = "auto", dtype: str = "auto", ddp_timeout_s: float = 300.0) -> Runtime:
    """Pick device and dtype; under torchrun (WORLD_SIZE > 1) also join the process group, one GPU per process.

    More processes on a node than GPUs is an error (two ranks on one GPU only contend for its memory). On the CPU more
    processes than cores is allowed, with a warning: the ranks time-share the cores, so it is useful for testing only.
    """
    keep_freed_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    chosen = pick_device(device)
    if world_size > 1:
        if chosen.type == "cuda":
            gpus = torch.cuda.device_count()
            if local_world_size > gpus or local_rank >= gpus:
                raise UserError(f"{local_world_size} processes on this node but only {gpus} GPU(s) are visible; "
                                f"use --nproc_per_node={gpus} (make train-ddp NPROC={gpus})")
            chosen = torch.device("cuda", local_rank)
            torch.cuda.set_device(chosen)
        elif chosen.type == "mps":
            raise UserError("DDP needs CUDA GPUs or the CPU; MPS has no distributed backend: use --device=cpu")
        elif local_rank == 0 and local_world_size > usable_cpu_cores():
            print(f"warning: {local_world_size} processes on {usable_cpu_cores()} CPU cores: they take turns on the "
                  "cores, so each step is slower than with fewer processes; fine for testing DDP", file=sys.stderr)
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        # A finite timeout turns a dead or stuck rank into an error on the others instead of a hang
        # (--ddp_timeout_s; torch's own default is 30 minutes).
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=ddp_timeout_s))
    torch_dtype, reason = pick_dtype(dtype, chosen)
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores; ~10 bits of mantissa suffice
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=chosen, dtype=torch_dtype, reason=reason, rank=rank, local_rank=local_rank,
                   world_size=world_size)


class StopRequest:
    """SIGINT/SIGTERM: finish the current step, save, exit 0. A second Ctrl-C exits at once."""

    def __init__(self):
        self.requested = False  # set by the handler, on this rank only, at any moment
        self.agreed = False     # set by stop_agreed: every rank stops at the same step
        self.signal_name = ""

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            print("\nsecond Ctrl-C: exiting now without saving", file=sys.stderr)
            os._exit(130)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: finishing this step and saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr)


def stop_agreed(stop: StopRequest, runtime: Runtime) -> bool:
    """Has a stop been requested, on any rank? A signal reaches the ranks at slightly different moments; a rank that
    stopped alone would enter the checkpoint's collectives while the others enter the next step's: a hang.

    The answer is the all-reduced flag, never this rank's own: a signal that lands after the all_reduce is seen by
    every rank at the next step, not by this one alone now.
    """
    if not runtime.distributed:
        stop.agreed = stop.requested
        return stop.agreed
    requested = torch.tensor(float(stop.requested), device=runtime.device)
    dist.all_reduce(requested, op=dist.ReduceOp.MAX)
    if requested.item():
        stop.agreed = True
        if not stop.requested:
            stop.requested, stop.signal_name = True, "a signal to another rank"
    return stop.agreed


LOST_RANK_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "nccl",
                     "broken pipe")


def is_lost_rank_error(err: RuntimeError) -> bool:
    """A collective that failed because another rank died or stopped answering (not a bug in this rank's code)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(marker in text for marker in LOST_RANK_MARKERS)


def explain_lost_ranks(main: Callable[[], object]) -> Callable[[], object]:
    """Wrap an entry point so a collective that times out or loses its peers ends this rank with a one-line UserError.

    The rank that failed first prints its own error (a traceback for a bug); the others then report here instead of
    hanging (the process-group timeout) or printing a C++ traceback. torchrun exits non-zero either way.
    """
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RuntimeError as err:  # dist.DistError is one; gloo reports a dead peer as a plain RuntimeError
            if not (dist.is_available() and dist.is_initialized()) or not is_lost_rank_error(err):
                raise
            rank = dist.get_rank()
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = next((line for line in lines if "timed out" in line.lower() or "timeout" in line.lower()),
                          lines[0] if lines else type(err).__name__)
            raise UserError(f"rank {rank}: lost contact with the other processes ({detail[:300]}); another rank "
                            "crashed (see its error above) or stopped for longer than --ddp_timeout_s. Fix that, "
                            "then relaunch with --resume to continue from the last checkpoint") from None
    return wrapped


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 0, seconds: float = 0.3) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the ceiling MFU is measured against."""
    size = size or (4096 if device.type == "cuda" else 1024)
    generator = torch.Generator(device).manual_seed(0)  # leave the global RNG alone: a resumed run relies on it
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):  # warm up: allocation, kernel selection, thread pool start
        a @ b
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best
