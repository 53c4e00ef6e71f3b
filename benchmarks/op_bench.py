#!/usr/bin/env python3
"""Op-level benchmark of condseg_ops.contrast_aggregate against the unfold/fold reference.

Per row (shape x dtype x pass x backend): median time, speedup over the reference measured in the
same run, achieved GB/s against the minimum bytes the pass must move (inputs read once, outputs
written once) and that rate as a share of a device-to-device copy measured in the same run, and the
peak memory of the pass (allocated during the pass, on top of its inputs) next to the reference's.
On CUDA the calls are issued back to back with one event between calls: a row is the GPU time of a
call while the host queues the next, as torch.utils.benchmark and Triton's do_bench time kernels (a
call timed alone after a synchronisation would also count the host's ~0.05 ms launch latency).

Shapes (C=128, heads=4, K=3 unless the grid says otherwise):
  main    ConDSeg's level-1 CDFA at 256x256 input: H=W=128, B=12 on CUDA, B=1 on CPU
  levels  ConDSeg's four levels at 256x256 input: H=W in 16, 32, 64, 128, B in 1, 12
  grid    roofline grid: B in 1, 4, 16 x C in 64..512 x H=W in 8..64
Passes: forward (under no_grad), backward (after an untimed forward), forward+backward.

Examples:
  python benchmarks/op_bench.py                      # CUDA: levels, every backend, fp32 + bf16
  python benchmarks/op_bench.py --device cpu         # CPU main row: cpu vs reference
  python benchmarks/op_bench.py --shapes grid --dtypes float32 --backends cuda,reference --quick
Rows go to benchmarks/results/<date>-<device>.jsonl (or --out) as JSON lines; a table and the
speed targets (README.md, "Status"; CUDA: main shape) are printed last. Every backend's results are
checked against the reference's in float64 once per shape and dtype (``max_err``; a row past the
tolerance is marked WRONG and counts toward no bar). Exit status 1 if any row failed or is WRONG.
"""
import argparse
import itertools
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import condseg_ops
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import condseg_ops
from condseg_ops.backends import unavailable_reason
from condseg_ops.reference import contrast_aggregate_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import max_diff, row_header, synchronize as sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PASSES = ("forward", "backward", "forward+backward")
BARS_CUDA = {  # issue 3, measured at the main shape, dual softmax, fp32 (bf16 for the last)
    "forward speedup >= 10x": 10.0,
    "forward+backward speedup >= 6x": 6.0,
    "forward >= 50% of copy bandwidth": 0.5,
    "forward+backward peak memory <= 1/5 of reference": 0.2,
    "bf16 forward >= 1.6x faster than fp32": 1.6,
}
BARS_TRITON = {  # issue 4, same shape, fp32
    "triton forward+backward speedup >= 4x": 4.0,
    "triton forward time <= 2x the cuda forward's": 2.0,
}
BARS_CPU = {"forward speedup >= 5x": 5.0, "forward+backward speedup >= 4x": 4.0}  # issue 2


def parse_args(argv=None):
    first, _, rest = __doc__.partition("\n\n")  # the epilog holds what the description does not
    p = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=rest)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--shapes", default=None, help="main | levels | grid | all (default: levels on CUDA, main on CPU)")
    p.add_argument("--batch", default=None, help="comma list: keep only these batch sizes")
    p.add_argument("--backends", default=None,
                   help="comma list of reference,cuda,triton,cpu (default: those that run on the device)")
    p.add_argument("--dtypes", default=None, help="comma list (default: float32,bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--passes", default=None, help="comma list of forward,backward,forward+backward "
                   "(default: all on CUDA, forward,forward+backward on CPU)")
    p.add_argument("--softmax", default="dual", help="comma list of dual,single (default: dual)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per row (default 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 3 CUDA, 1 CPU)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (5 timed, 1 warm-up)")
    p.add_argument("--max-ref-seconds", type=float, default=20.0,
                   help="skip reference rows whose estimated time per iteration exceeds this (CPU)")
    p.add_argument("--out", default=None, help="JSON lines file (default benchmarks/results/<date>-<device>.jsonl)")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    return p.parse_args(argv)


def split(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def shape_list(which, device):
    main_b = 12 if device == "cuda" else 1
    main = [(main_b, 128, 128, 128, 4)]
    levels = [(b, 128, s, s, 4) for b in (1, 12) for s in (16, 32, 64, 128)]
    grid = [(b, c, s, s, 4) for b in (1, 4, 16) for c in (64, 128, 256, 512) for s in (8, 16, 32, 64)]
    table = {"main": main, "levels": levels, "grid": grid, "all": levels + grid}
    if which not in table:
        raise SystemExit(f"--shapes must be one of {sorted(table)}, got {which!r}")
    return table[which]


class Timer:
    """Times one region: CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.end.record()
        else:
            self.ms_value = (time.perf_counter() - self.t0) * 1e3

    def ms(self):
        if self.device == "cuda":
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return self.ms_value


def make_inputs(B, C, H, W, heads, K, dual, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    k2 = K * K
    value = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=gen)
    fg = torch.randn(B, H, W, heads, k2, k2, device=device, dtype=dtype, generator=gen)
    bg = torch.randn(B, H, W, heads, k2, k2, device=device, dtype=dtype, generator=gen) if dual else None
    grad = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=gen)
    return value, fg, bg, grad


def op_for(backend, K, scale):
    if backend == "reference":
        return lambda v, f, b: contrast_aggregate_reference(v, f, b, K, 1, scale)
    return lambda v, f, b: condseg_ops.contrast_aggregate(v, f, b, K, 1, scale, backend=backend)


def min_bytes(pass_name, B, C, H, W, heads, K, dual, itemsize):
    """Bytes a pass must move at least: every input read once, every output written once."""
    planes = B * C * H * W
    attn = (2 if dual else 1) * B * H * W * heads * K ** 4
    forward = 2 * planes + attn              # read value, logits; write out
    backward = 3 * planes + 2 * attn         # read grad_out, value, logits; write their gradients
    return itemsize * {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_name]


def measure(fn, inputs, grad, pass_name, device, warmup, iters):
    """(median ms, peak MB above the inputs) of one pass."""
    value, fg, bg = inputs

    def leaves():
        return [t.detach().requires_grad_() for t in (value, fg, bg) if t is not None]

    def call(ls):
        return fn(ls[0], ls[1], ls[2] if bg is not None else None)

    def once():
        if pass_name == "forward":
            with torch.no_grad(), Timer(device) as t:
                call([value, fg, bg])
            return t
        ls = leaves()
        if pass_name == "backward":
            out = call(ls)
            with Timer(device) as t:
                out.backward(grad)
            return t
        with Timer(device) as t:
            call(ls).backward(grad)
        return t

    for _ in range(warmup):
        once()
    sync(device)
    peak_mb = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    timers = [once() for _ in range(iters)]  # back to back: no synchronisation between calls
    times = [t.ms() for t in timers]
    if device == "cuda":
        sync(device)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak_mb


# Largest error allowed against the reference in float64 on the same (rounded) inputs, relative to
# the largest magnitude of each tensor compared (tests/test_cuda.py's gradient tolerances).
MAX_ERROR = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def results(fn, inputs, grad, with_grads):
    """The output of one call and, with_grads, the gradients of value, attn_fg (and attn_bg)."""
    leaves = [None if t is None else t.detach().requires_grad_(with_grads) for t in inputs]
    with torch.set_grad_enabled(with_grads):
        out = fn(*leaves)
        if not with_grads:
            return [out]
        out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


def max_error(got, expected):
    """Largest |got - expected| over each tensor pair, relative to that tensor's largest |expected|;
    NaN when any is (Python's max would drop it)."""
    errors = [max_diff(a, b)[1] for a, b in zip(got, expected) if b.numel()]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)


def copy_gbps(device, nbytes, iters):
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    nbytes = int(min(max(nbytes, 64 << 20), 2 << 30))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    timers = []
    for _ in range(max(iters, 5)):  # back to back, as the op's calls are timed
        with Timer(device) as t:
            dst.copy_(src)
        timers.append(t)
    times = [t.ms() for t in timers]
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def reference_estimate(B, C, H, W, heads, K, dual, itemsize, pass_name):
    """Rough bytes the reference allocates in a pass (unfold windows dominate) and its CPU time."""
    windows = B * C * K * K * H * W * itemsize
    attn = (2 if dual else 1) * B * H * W * heads * K ** 4 * itemsize
    factor = 4 if pass_name == "forward" else 9
    return factor * windows + 3 * attn, factor * windows / 1.5e9


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def measure_rows(base, shapes, dtypes, softmaxes, passes, backends, device, warmup, iters, bandwidth,
                 max_ref_seconds):
    """One row per (shape, dtype, softmax form, pass, backend), the reference first: each row's
    speedup is against the reference measured just before it. ``base`` holds the run's fields.
    Each backend's output (and gradients, when a pass has a backward) is checked once per shape
    and dtype against the reference's in float64: ``max_err``, and a note "WRONG" past MAX_ERROR."""
    on_cuda = device == "cuda"
    with_grads = any(p != "forward" for p in passes)
    for (B, C, H, W, heads), dtype_name, softmax in itertools.product(shapes, dtypes, softmaxes):
        dual, dtype = softmax == "dual", DTYPES[dtype_name]
        K, scale = 3, (C // heads) ** -0.5
        try:
            value, fg, bg, grad = make_inputs(B, C, H, W, heads, K, dual, dtype, device)
        except torch.cuda.OutOfMemoryError:
            print(f"# {B}x{C}x{H}x{W}: inputs do not fit, skipped")
            continue
        expected, errors = None, {}  # the float64 reference's results; each backend's max_error
        for pass_name in passes:
            ref_ms = ref_peak = None
            ref_note = ""
            for backend in backends:
                row = {**base, "backend": backend, "dtype": dtype_name, "pass": pass_name, "B": B, "C": C, "H": H,
                       "W": W, "heads": heads, "K": K, "dual": dual, "ms": None, "ref_ms": None, "speedup": None,
                       "gbps": None, "pct_of_copy": None, "peak_mem_mb": None, "ref_peak_mem_mb": None, "max_err": None,
                       "note": ""}
                if backend == "reference":
                    est_bytes, est_s = reference_estimate(B, C, H, W, heads, K, dual, dtype.itemsize, pass_name)
                    if on_cuda and est_bytes > 0.9 * torch.cuda.mem_get_info()[0]:
                        ref_note = f"reference skipped: needs ~{est_bytes / 2**30:.1f} GiB"
                    elif not on_cuda and est_s > max_ref_seconds:
                        ref_note = f"reference skipped: ~{est_s:.0f} s per iteration"
                    if ref_note:
                        yield dict(row, note=ref_note)
                        continue
                try:
                    ms, peak = measure(op_for(backend, K, scale), (value, fg, bg), grad, pass_name, device, warmup,
                                       iters)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if backend == "reference":
                        ref_note = "reference out of memory"
                    yield dict(row, note="out of memory")
                    continue
                except Exception as error:  # noqa: BLE001 - record and go on
                    row["note"] = f"error: {str(error).splitlines()[0][:300]}"
                    print(f"# FAILED {backend} {dtype_name} {pass_name} {B}x{C}x{H}x{W}: {row['note']}")
                    yield row
                    continue
                try:  # the check must not stop the timings: a failure leaves the row unchecked
                    if backend == "reference" and expected is None:  # it fits and ran: so does float64
                        wide = [None if x is None else x.double() for x in (value, fg, bg, grad)]
                        expected = results(op_for(backend, K, scale), wide[:3], wide[3], with_grads)
                    elif backend != "reference" and expected is not None and backend not in errors:
                        errors[backend] = max_error(results(op_for(backend, K, scale), (value, fg, bg), grad,
                                                            with_grads), expected)
                except Exception as error:  # noqa: BLE001 - out of memory, above all
                    print(f"# not checked: {backend} {dtype_name} {B}x{C}x{H}x{W}: {str(error).splitlines()[0][:200]}")
                    if on_cuda:
                        torch.cuda.empty_cache()
                if backend == "reference":
                    ref_ms, ref_peak = ms, peak
                err = errors.get(backend)
                note = ref_note if backend != "reference" else ""
                if err is not None and not err <= MAX_ERROR[dtype]:  # NaN too
                    note = f"WRONG: max error {err:.2g} of the reference's scale (allowed {MAX_ERROR[dtype]:g})"
                gbps = min_bytes(pass_name, B, C, H, W, heads, K, dual, dtype.itemsize) / (ms * 1e-3) / 1e9
                yield dict(row, ms=round(ms, 4), ref_ms=None if ref_ms is None else round(ref_ms, 4),
                           speedup=None if ref_ms is None else round(ref_ms / ms, 2),
                           gbps=round(gbps, 1), pct_of_copy=round(gbps / bandwidth, 3),
                           peak_mem_mb=None if peak is None else round(peak, 1),
                           ref_peak_mem_mb=None if ref_peak is None else round(ref_peak, 1),
                           max_err=None if err is None else float(f"{err:.3g}"), note=note)
        del value, fg, bg, grad, expected
        if on_cuda:
            torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    on_cuda = device == "cuda"
    shapes = shape_list(args.shapes or ("levels" if on_cuda else "main"), device)
    if args.batch:
        keep = {int(b) for b in split(args.batch)}
        shapes = [s for s in shapes if s[0] in keep]
    dtypes = split(args.dtypes or ("float32,bfloat16" if on_cuda else "float32"))
    passes = split(args.passes or (",".join(PASSES) if on_cuda else "forward,forward+backward"))
    softmaxes = split(args.softmax)
    backends = split(args.backends or ("reference,cuda,triton" if on_cuda else "reference,cpu"))
    iters = 5 if args.quick else (args.iters or (20 if on_cuda else 5))
    warmup = 1 if args.quick else (args.warmup if args.warmup is not None else (3 if on_cuda else 1))
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    for name in passes:
        if name not in PASSES:
            raise SystemExit(f"unknown pass {name!r}; choose from {PASSES}")
    if "reference" not in backends:
        backends = ["reference"] + backends  # speedups need it
    skipped_backends = {b: unavailable_reason(b, device) for b in backends}
    for name, why in skipped_backends.items():
        if why:
            print(f"# backend {name} skipped: {why}")
    backends = [b for b in backends if not skipped_backends[b]]

    header = row_header("op", device, script="benchmarks/op_bench.py", argv=argv)  # UTC date, cuda version
    dev_name = header["device"]
    out_path = Path(args.out) if args.out else \
        RESULTS / f"{header['date'][:10]}-{re.sub(r'[^A-Za-z0-9]+', '-', dev_name).strip('-')}.jsonl"
    print(f"# {dev_name}, torch {torch.__version__}, condseg_ops backends {condseg_ops.available_backends(device)}")
    if condseg_ops.build_info():
        print(f"# build_info {condseg_ops.build_info()}")
    largest = max(min_bytes("forward", *s, 3, True, 4) for s in shapes)
    bandwidth = copy_gbps(device, largest, iters)
    print(f"# device-to-device copy: {bandwidth:.0f} GB/s")

    rows, interrupted = [], False
    if not args.no_save:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    base = {**header, "iters": iters, "copy_gbps": round(bandwidth, 1),
            # CUDA: calls back to back, an event between calls; CPU: each call timed alone
            "timing": "back-to-back" if device == "cuda" else "per-call"}
    try:
        for row in measure_rows(base, shapes, dtypes, softmaxes, passes, backends, device, warmup, iters,
                                bandwidth, args.max_ref_seconds):
            rows.append(row)
            if not args.no_save:  # row by row: a run cut short keeps what it measured
                with out_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    except KeyboardInterrupt:  # a time limit: report what was measured
        interrupted = True
        print(f"# interrupted after {len(rows)} rows")
    failures = sum(row["note"].startswith(("error:", "WRONG")) for row in rows)
    print_table(rows)
    print_bars(rows, on_cuda)
    if not args.no_save:
        print(f"# {len(rows)} rows appended to {out_path}")
    return 130 if interrupted else 1 if failures else 0


def print_table(rows):
    header = ("shape BxCxHxW/heads", "dtype", "sm", "pass", "backend", "ms", "ref ms", "speedup", "GB/s",
              "%copy", "peak MB", "ref MB", "max err", "note")
    lines = [header]
    for r in rows:
        lines.append((f"{r['B']}x{r['C']}x{r['H']}x{r['W']}/{r['heads']}", r["dtype"], "2" if r["dual"] else "1",
                      r["pass"], r["backend"], fmt(r["ms"], ".3f"), fmt(r["ref_ms"], ".3f"),
                      fmt(r["speedup"], ".1f"), fmt(r["gbps"], ".3g"),
                      fmt(None if r["pct_of_copy"] is None else 100 * r["pct_of_copy"], ".0f"),
                      fmt(r["peak_mem_mb"], ".0f"), fmt(r["ref_peak_mem_mb"], ".0f"), fmt(r.get("max_err"), ".1e"),
                      r["note"][:40]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def find(rows, **keys):
    """The first timed row with these fields; a WRONG row never counts toward a bar."""
    for r in rows:
        if all(r.get(k) == v for k, v in keys.items()) and r["ms"] is not None and \
                not r.get("note", "").startswith("WRONG"):
            return r
    return None


def print_bars(rows, on_cuda):
    main = dict(C=128, H=128, W=128, heads=4, dual=True, B=12 if on_cuda else 1)
    backend = "cuda" if on_cuda else "cpu"
    fwd = find(rows, backend=backend, dtype="float32", **{"pass": "forward"}, **main)
    both = find(rows, backend=backend, dtype="float32", **{"pass": "forward+backward"}, **main)
    print(f"\n# bars at B={main['B']}, C=128, 128x128, heads=4, K=3, dual softmax ({backend} backend):")
    checks = []
    if on_cuda:
        bf16 = find(rows, backend=backend, dtype="bfloat16", **{"pass": "forward"}, **main)
        mem = None if both is None or not both["ref_peak_mem_mb"] else both["peak_mem_mb"] / both["ref_peak_mem_mb"]
        values = [fwd and fwd["speedup"], both and both["speedup"], fwd and fwd["pct_of_copy"], mem,
                  None if fwd is None or bf16 is None else fwd["ms"] / bf16["ms"]]
        tri_fwd = find(rows, backend="triton", dtype="float32", **{"pass": "forward"}, **main)
        tri_both = find(rows, backend="triton", dtype="float32", **{"pass": "forward+backward"}, **main)
        values += [tri_both and tri_both["speedup"],
                   None if fwd is None or tri_fwd is None else tri_fwd["ms"] / fwd["ms"]]
        for (name, bar), value in zip({**BARS_CUDA, **BARS_TRITON}.items(), values):
            ok = None if value is None else (value <= bar if "<=" in name else value >= bar)
            checks.append((name, value, ok))
    else:
        for (name, bar), row in zip(BARS_CPU.items(), (fwd, both)):
            value = row and row["speedup"]
            checks.append((name, value, None if value is None else value >= bar))
    for name, value, ok in checks:
        verdict = "not measured" if ok is None else ("PASS" if ok else "FAIL")
        print(f"#   {name:<50} {fmt(value, '.3g'):>8}  {verdict}")
    if fwd and both:
        print(f"# {backend} vs reference: forward {fwd['speedup']}x, forward+backward {both['speedup']}x")


if __name__ == "__main__":
    sys.exit(main())
