"""Shared by the benchmark scripts: device description, timing, JSON-lines results.

Results format (benchmarks/results/*.jsonl): one JSON object per line and per measured row, each
with ``bench``, ``device``, ``date`` (UTC, ISO 8601), ``torch``, ``command`` (the exact command
line), ``backend``, ``dtype`` and the figures of that row.
"""
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    """A human-readable name of the device the figures belong to."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_name()} ({cores} cores, {torch.get_num_threads()} threads)"


def synchronize(device):
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row_header(bench, device, script=None, argv=None):
    """The fields every results row starts with. ``script`` and ``argv`` name the command when a
    benchmark's main() is called with its own arguments (default: this process's command line)."""
    command = [sys.argv[0]] + sys.argv[1:] if argv is None else [script or sys.argv[0]] + list(argv)
    header = {
        "bench": bench,
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in ["python"] + command),
    }
    if torch.device(device).type == "cuda":
        header["cuda"] = torch.version.cuda
    else:
        header["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return header


def append_jsonl(path, rows):
    """Appends ``rows`` (dicts) to the JSON-lines file ``path`` (created with its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")


def max_diff(got, expected):
    """(max |got - expected|, that relative to max |expected|; the absolute one where expected is 0),
    in float64."""
    diff = (got.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    return diff, diff / scale if scale else diff


def summarize(seconds, batch=1):
    """Median / p10 / p90 latency in ms and images per second from per-call times in seconds."""
    ms = sorted(1000.0 * s for s in seconds)

    def pct(q):
        return ms[min(len(ms) - 1, max(0, round(q * (len(ms) - 1))))]

    median = statistics.median(ms)
    return {"median_ms": round(median, 4), "p10_ms": round(pct(0.1), 4), "p90_ms": round(pct(0.9), 4),
            "iters": len(ms), "images_per_s": round(1000.0 * batch / median, 3)}


def time_calls(fns, iters, warmup, device, launches=None):
    """Times each callable of the dict ``fns`` ``iters`` times, interleaved (one call of each in
    turn, so drifting machine load hits all of them alike), after ``warmup`` untimed calls of
    each. Every timed call is bracketed by device synchronisation. Returns {name: [seconds]}.
    ``launches``, a dict, receives {name: [seconds until the call returned]}: on CUDA, when that
    is close to the synchronised time, the call is bound by the host (kernel launches)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    if launches is not None:
        launches.update({name: [] for name in fns})
    for _ in range(iters):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            returned = time.perf_counter()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if launches is not None:
                launches[name].append(returned - start)
    return times
