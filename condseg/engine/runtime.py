"""Where and how training runs: device, mixed precision, seeding, RNG state, torchrun/DDP."""
import contextlib
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(device="auto"):
    """torch.device from "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a device name (auto, cpu, cuda, cuda:N): {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: condseg runs on cpu or cuda (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available in this torch build "
                         f"({torch.__version__}); use --device cpu")
    return device


def amp_dtype(amp, device):
    """The autocast dtype for ``amp`` in ("auto", "bf16", "fp16", "off"): None means float32.
    "auto" is bf16 (fp16 where bf16 is unsupported) on CUDA and float32 on CPU. "bf16" on a CPU
    is opt-in: it pays where the CPU has AMX or AVX512-BF16 units (on the 2-core dev CPU, a Xeon
    with AMX, a light Kvasir-SEG step ran 1.3-1.4x faster); elsewhere oneDNN emulates bf16."""
    if amp in (None, False, "off", "none", "fp32"):
        return None
    if amp not in ("auto", True, "bf16", "fp16"):
        raise ValueError(f"amp must be one of auto, bf16, fp16, off; got {amp!r}")
    if device.type != "cuda":
        if amp == "fp16":
            raise ValueError(f"amp='fp16' needs a CUDA device, got {device}; use 'bf16' or 'off'")
        return torch.bfloat16 if amp == "bf16" else None
    if amp in ("auto", True):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device, dtype, cache=True):
    """Autocast to ``dtype`` (None: off). ``cache=False`` re-casts the weights at every use, as
    PyTorch asks of autocast inside a CUDA-graph capture."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def flushing_denormals():
    """Whether this thread flushes denormal floats to zero (torch has no getter for it)."""
    return torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def denormals_flushed(device):
    """Flushes denormal floats to zero while CPU training runs, then restores the caller's mode.
    A network in training produces tiny values whose arithmetic x86 CPUs run in microcode: a light
    stage-2 step on Kvasir-SEG (2-core CPU, paired runs) took 626-694 ms with this against
    762-850 ms without. Values below 1.2e-38 become zero; nothing a float32 model learns from."""
    if device.type != "cpu":
        yield
        return
    previous = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def _cpu_times(stat_text):
    """(all, idle) jiffies from the aggregate "cpu" line of /proc/stat (idle counts iowait too)."""
    fields = [int(v) for v in stat_text.splitlines()[0].split()[1:8]]
    return sum(fields), fields[3] + fields[4]


def idle_cpus(seconds=0.25, stat="/proc/stat"):
    """How many of this process's CPUs other processes leave idle, sampled over ``seconds``
    (Linux; None where /proc/stat cannot be read)."""
    try:
        usable = len(os.sched_getaffinity(0))
        with open(stat) as f:
            total0, idle0 = _cpu_times(f.read())
        time.sleep(seconds)
        with open(stat) as f:
            total1, idle1 = _cpu_times(f.read())
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    busy = (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or usable)
    return min(usable, max(0.0, usable - busy))


def threads_for_idle_cpus(threads, idle):
    """Intra-op threads for a CPU job: no more than the idle CPUs (at least one). On a busy
    CPU, OpenMP threads wait for each other at every short parallel region: the demo took 543 s
    with 2 threads beside two busy processes on 2 cores, 34 s with 1 (38 s against 19 s beside one)."""
    return threads if idle is None else max(1, min(threads, round(idle)))


@contextlib.contextmanager
def threads_for_a_busy_cpu(device, echo, job):
    """On a CPU that other processes keep busy, fewer torch threads for ``job``'s duration (see
    threads_for_idle_cpus), said through ``echo``; OMP_NUM_THREADS, when set, is the user's choice
    and left alone, and so is any device other than the CPU."""
    before = torch.get_num_threads()
    if str(device) != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    idle = idle_cpus()
    threads = threads_for_idle_cpus(before, idle)
    if threads < before:
        echo(f"other processes keep this CPU busy (about {idle:.1f} of its cores idle): {job} runs on "
             f"{threads} thread(s) instead of {before} (set OMP_NUM_THREADS to choose)")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled, device):
    """Opt-in deterministic mode: deterministic algorithms (warning where none exists), no cuDNN
    autotuning. Off: cuDNN picks the fastest kernels."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = bool(enabled)
        torch.backends.cudnn.benchmark = not enabled


def rng_state():
    """All RNG states as checkpoint-safe values (tensors, ints, lists: loads with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(device):
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL for CUDA, gloo for
    CPU. Returns (DistContext, device), the device being this rank's GPU on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local, owns), device


def close_distributed(ctx):
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(ctx, value):
    """Rank 0's Python value on every rank."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ctx, value):
    """List of every rank's value (on every rank)."""
    if not ctx.enabled:
        return [value]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def any_rank(ctx, flag, device):
    """True on all ranks when ``flag`` is true on any rank."""
    if not ctx.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx):
    if ctx.enabled:
        dist.barrier()
