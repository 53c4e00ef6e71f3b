#!/usr/bin/env python
"""ConDSeg end-to-end speed: inference fps and training images/s, automatic condseg_ops backend
against the reference backend (the released code's unfold/fold), in one process, on the same
weights and the same inputs.

    python benchmarks/fps.py                      # CUDA when available: batch 1, batch 16, modes
    python benchmarks/fps.py --device cpu --quick
    python benchmarks/fps.py --train --json benchmarks/results/fps.jsonl --plot fps.png

Protocol (DESIGN.md section 5): inference only (no I/O, inputs made once), eval mode, auxiliary
head skipped; warm-up calls, then timed calls interleaved between the two backends (so drifting
machine load hits both alike), each bracketed by device synchronisation; median latency, fps =
batch / median. Outputs are checked twice (relative: max |difference| / max |output|): against
the other backend in the same mode (only the op differs: auto_vs_reference_rel_diff) and against
float32 eager (max_rel_diff). The random-weight network amplifies rounding strongly, so reduced
precision (TF32, bf16, fp16) moves its logits by up to their own scale; a difference above 2x the
scale marks the row WRONG and keeps it out of the best-mode figures. Modes (``--modes``; "+" marks what each adds):

    eager      float32, the model as trained (BatchNorm, NCHW): the released code's way
    fold       + BatchNorm folded into the convolutions
    fold-cl    + channels_last weights and input
    fold-wino  fold in NCHW, 3x3 convolutions through NNPACK's Winograd algorithm (CPU only):
               what ``condseg predict`` runs on a CPU
    wino       eager with those Winograd convolutions
    bf16/fp16  fold-cl with weights and input cast to bfloat16 / float16 (no autocast)
    compile    fold-cl, torch.compile (inductor, weights frozen)
    graph, bf16-graph, fp16-graph       fold-cl replayed as one CUDA graph (CUDA only)
    bf16-compile-graph                  torch.compile'd bf16 fold-cl in a CUDA graph (CUDA only)
    bf16-compile                        the same without the CUDA graph: what profile_model.py can see into
    bf16-graph-stack, bf16-compile-graph-stack
               + the fg and bg guidance branches side by side, as grouped convolutions (on request)

Training rows (``--train``, ``--train-modes``): ``train`` is the trainer's stage-2 step in NCHW,
``train-cl`` in channels_last (the trainer's default), ``train-graph`` and ``train-cl-graph`` those
steps captured whole as one CUDA graph and replayed (``condseg train --cuda-graph``; CUDA only),
``train-compile`` channels_last through torch.compile (``condseg train --compile``),
``train-compile-graph`` the same in torch.compile's reduce-overhead mode (CUDA graphs); the
compiles, minutes on a GPU, are timed apart.

On CUDA the order is: the batch-1 rows the bars need (eager, bf16-graph and its -stack twin, graph,
fold-cl), training rows, torch.compile rows (optional, slow to compile; with ``--budget`` they start
only while 45 s of it are left), the other batch-1 modes, throughput rows; each mode is built, timed
and freed in turn.
On CPU every batch-1 mode is built first and all are timed interleaved (a shared machine's load
then hits every mode alike), then training and throughput rows. Rows are printed as they
finish and appended to ``--json`` at once, so an interrupted run keeps what it measured; the table
and the speed-up summary come last, with issue 7's bars judged only for the network and input
they are defined for (the defaults: resnet50, decoder 128, 256x256).
"""
import argparse
import copy
import dataclasses
import math
import os
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

# Read by GNU OpenMP (torch's CPU threads) when torch loads, so set before the import. By default
# an OpenMP thread spins some 7 ms after each parallel region, on the cores that NNPACK's own
# threads (the fold-wino mode's convolutions) then need: 1.5x slower convolutions on 2 cores.
# 10000 spins still bridge the gap between two back-to-back OpenMP ops. An explicit setting wins.
# Where torch loaded first (fps imported as a module), the setting in force is the one it found.
GOMP_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT") if "torch" in sys.modules else \
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_jsonl, max_diff, row_header, summarize, synchronize, time_calls  # noqa: E402

try:
    import condseg
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import condseg

import condseg_ops  # noqa: E402
from condseg.engine.runtime import idle_cpus  # noqa: E402
from condseg.inference import prepare_for_inference, set_cdfa_backend  # noqa: E402

BENCH = "fps"
PAPER_FPS = 59.6  # RTX 4090, batch 1, 256x256 (paper)
# The network and input the paper's fps and issue 7's bars are defined for.
BAR_SETTING = {"model": "ConDSeg-resnet50", "decoder_channels": 128, "cdfa_variant": "paper", "size": 256}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    dtype: str = "float32"   # weights and input cast to this dtype
    fold: bool = False       # BatchNorm folded into convolutions
    channels_last: bool = False
    compile: bool = False
    graph: bool = False      # CUDA graph replay
    winograd: bool = False   # 3x3 convolutions through NNPACK's Winograd (condseg.inference.WinogradConv2d)
    stack: bool = False      # fg and bg guidance branches as grouped convolutions (condseg.inference.stack_guidance)
    cuda_only: bool = False
    cpu_only: bool = False


MODES = {m.name: m for m in (
    Mode("eager"),
    Mode("fold", fold=True),
    Mode("fold-cl", fold=True, channels_last=True),
    Mode("fold-wino", fold=True, winograd=True, cpu_only=True),
    Mode("wino", winograd=True, cpu_only=True),
    Mode("bf16", "bfloat16", True, True),
    Mode("fp16", "float16", True, True),
    Mode("compile", fold=True, channels_last=True, compile=True),
    Mode("graph", fold=True, channels_last=True, graph=True, cuda_only=True),
    Mode("bf16-graph", "bfloat16", True, True, graph=True, cuda_only=True),
    Mode("fp16-graph", "float16", True, True, graph=True, cuda_only=True),
    Mode("bf16-compile-graph", "bfloat16", True, True, compile=True, graph=True, cuda_only=True),
    Mode("bf16-compile", "bfloat16", True, True, compile=True, cuda_only=True),
    Mode("bf16-graph-stack", "bfloat16", True, True, graph=True, stack=True, cuda_only=True),
    Mode("bf16-compile-graph-stack", "bfloat16", True, True, compile=True, graph=True, stack=True, cuda_only=True),
)}

# Default modes per device, and with --quick (a short GPU check: the modes the bars need plus the
# main variants).
DEFAULT_MODES = {
    "cuda": (["eager", "fold", "fold-cl", "bf16", "fp16", "graph", "bf16-graph", "fp16-graph"],
             ["eager", "fold-cl", "bf16", "graph", "bf16-graph", "fp16-graph"]),
    "cpu": (["eager", "fold", "fold-cl", "fold-wino"], ["eager", "fold", "fold-cl", "fold-wino"]),
}
COMPILE_MODES = {"cuda": ["bf16-compile-graph"], "cpu": ["compile"]}
DEFAULT_THROUGHPUT_MODES = {"cuda": (["eager", "bf16", "bf16-graph"], ["eager", "bf16-graph"]),
                            "cpu": (["eager", "fold-cl"], ["eager", "fold-cl"])}
# Run first (the bars need them, and bf16-graph-stack, when asked for, is bf16-graph's twin); then
# training, the torch.compile rows, the other modes.
CORE_MODES = ("eager", "bf16-graph", "bf16-graph-stack", "graph", "fold-cl")
COMPILE_RESERVE_S = 45  # with --budget, a compile row starts only with this much of it left

# (warmup, iters) per phase; --quick uses the second set. Quick training rows keep 12 steps: with 6,
# an H200 run's channels_last rows spread 15 ms between p10 and p90 of a 130 ms step.
ITERS = {
    "cuda": {"latency": ((20, 200), (10, 50)), "throughput": ((5, 30), (3, 10)), "train": ((3, 15), (3, 12))},
    "cpu": {"latency": ((1, 5), (1, 3)), "throughput": ((1, 3), (1, 2)), "train": ((1, 3), (1, 2))},
}

BACKENDS = ("auto", "reference")  # "auto" = condseg_ops' automatic choice for the device


def torch_dtype(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---- model -------------------------------------------------------------------------------------


def build_model(encoder="resnet50", decoder_channels=128, classes=1, variant="paper", device="cpu",
                in_channels=3, seed=0, size=64):
    """ConDSeg with deterministic random weights and calibrated BatchNorm statistics (one
    train-mode pass of a 2 x size x size batch sets every running mean and variance to batch
    statistics, so activations keep realistic scales at that size instead of shrinking towards
    denormals or growing), in eval mode on ``device``."""
    torch.manual_seed(seed)
    # Built and calibrated on the CPU (identical weights on every device), then moved.
    model = condseg.ConDSeg(encoder_name=encoder, in_channels=in_channels, classes=classes,
                            cdfa_variant=variant, decoder_channels=decoder_channels)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(2, in_channels, size, size), return_aux=True)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval().to(device)


def _in_channels(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def count_model(model, size, device):
    """Parameters (millions) and GMACs (FLOPs / 2, counted by FlopCounterMode at batch 1 on the
    reference backend, whose unfold/matmul form exposes the CDFA matmuls to the counter): for
    inference (auxiliary head skipped) and for the full model (auxiliary head included, the
    figure the paper and the released code report)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, _in_channels(model), size, size, device=device)
    counted = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
    with torch.no_grad(), condseg_ops.use_backend("reference"):
        for key, aux in (("gmacs", False), ("gmacs_with_aux", True)):
            counter = FlopCounterMode(display=False)
            with counter:
                model(x, return_aux=aux)
            counted[key] = round(counter.get_total_flops() / 2e9, 3)
    return counted


def resolved_backend(name, device):
    """The condseg_ops backend that actually runs for ``name`` ("auto" or a forced one)."""
    if name == "auto":
        return condseg_ops.backends.select_backend(torch.device(device).type)
    return name


def forced(name):
    return None if name == "auto" else name


# ---- runners -----------------------------------------------------------------------------------


def cuda_graph(fn, static_input, warmup=3):
    """Captures ``fn(static_input)`` in a CUDA graph after ``warmup`` calls on a side stream
    (cuDNN autotuning, Triton autotuning, lazy initialisation and torch.compile all happen
    there, outside the capture). Returns a callable that replays it and returns the static
    output; the graph reads ``static_input`` in place, so the callable keeps it alive (a freed
    input would be reused by the caching allocator and the replays would read garbage)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = fn(static_input)

    def replay():
        graph.replay()
        return static_output

    replay.graph, replay.static_input = graph, static_input
    return replay


def make_runner(base, mode, backend, x, device, compile_kwargs=None):
    """A zero-argument callable running one inference of ``base`` (left untouched) in ``mode`` on
    ``backend`` ("auto"/"reference") with the fixed input ``x``; returns (callable, info)."""
    device = torch.device(device)
    info = {}
    model = set_cdfa_backend(copy.deepcopy(base), forced(backend))
    # Reduced precision casts the weights once (no autocast): autocast without its weight cache
    # (which must not outlive a CUDA graph capture) re-casts every weight at every call, some 400
    # extra kernels per batch-1 inference, more GPU time than the convolutions themselves.
    dtype = torch_dtype(mode.dtype)
    # On CUDA trace the folding with the benchmark's own shape: cuDNN has tuned it already.
    example = x[:1] if device.type == "cuda" else None
    model = prepare_for_inference(model, fold_bn=mode.fold, channels_last=mode.channels_last,
                                  dtype=None if dtype == torch.float32 else dtype, example_input=example,
                                  winograd=mode.winograd, stack=mode.stack)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last if mode.channels_last else torch.contiguous_format)
    fn = model
    if mode.compile:
        fn = torch.compile(model, dynamic=False, **(compile_kwargs or {}))

    # no_grad for torch.compile (what inductor's freezing expects), inference_mode otherwise.
    grad_off = torch.no_grad if mode.compile else torch.inference_mode

    def forward(inp):
        with grad_off():
            return fn(inp)

    if mode.compile:  # the first call compiles; time it separately
        start = time.perf_counter()
        forward(x)
        synchronize(device)
        info["compile_s"] = round(time.perf_counter() - start, 2)
        info["compile_mode"] = (compile_kwargs or {}).get("mode", "default")
    call = cuda_graph(forward, x) if mode.graph else (lambda: forward(x))

    def run():
        run.last = call()
        return run.last

    run.model = model  # keeps the model alive with the runner
    return run, info


SUSPECT_REL_DIFF = 2.0


def _suspect(row):
    """A row whose output is not finite, or differs from the other backend's or from float32
    eager by more than twice the output's scale: more than rounding can explain. (A random-weight
    network amplifies rounding a lot: TF32 or bfloat16 convolutions alone can move the logits by
    their own scale, i.e. rel diff ~1; beyond 2 the output is wrong, not merely rounded.)"""
    return (not row.get("finite", True) or row.get("max_rel_diff", 0) > SUSPECT_REL_DIFF
            or row.get("auto_vs_reference_rel_diff", 0) > SUSPECT_REL_DIFF)


def check_output(out, reference):
    """Difference to ``reference`` (the float32 eager output of the automatic backend)."""
    diff, rel = max_diff(out.float(), reference)
    return {"max_abs_diff": diff, "max_rel_diff": rel, "finite": bool(torch.isfinite(out).all())}


# ---- phases ------------------------------------------------------------------------------------


class Budget:
    """Soft wall-clock budget: optional rows are skipped once it is spent."""

    def __init__(self, seconds):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self):
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)


def _is_oom(error):
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(error, oom) or "out of memory" in str(error).lower()


def _failed(error, fields, device, emit, log, backends=BACKENDS):
    """Logs a failed row and emits one error row per backend (``fields`` + the error)."""
    oom = _is_oom(error)
    message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
    log(f"  FAILED {fields['kind']} {fields['mode']}: {message}")
    if not oom:
        traceback.print_exc(limit=4)
    rows = []
    for backend in backends:
        row = dict(fields, backend=resolved_backend(backend, device), backend_choice=backend,
                   error=message, oom=oom)
        rows.append(row)
        emit(row)
    return rows


def _free(device):
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def inference_rows(base, modes, batch, size, device, warmup, iters, kind, budget, emit,
                   compile_kwargs=None, log=print, backends=BACKENDS, interleave=None,
                   compile_backends=BACKENDS):
    """Times every mode for ``backends`` (``compile_backends`` for the torch.compile modes) at
    ``batch``; calls ``emit(row)`` per row.

    ``interleave`` (default: on CPU) builds every mode first and interleaves the timed calls of
    all modes and backends, so that the cross-mode ratios (best mode vs reference eager) see the
    same machine load too; otherwise (CUDA) each mode is built, timed and freed in turn."""
    device = torch.device(device)
    interleave = device.type == "cpu" if interleave is None else interleave
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, _in_channels(base), size, size, generator=gen).to(device)
    with torch.inference_mode():
        reference_out = base.eval()(x).float()
    rows, built = [], []

    def fields(name):
        return {"kind": kind, "mode": name, "dtype": MODES[name].dtype, "batch": batch, "size": size}

    def measure(group):
        """Times the runners of ``group`` [(name, runners, infos)] together and emits rows."""
        runners = {(name, b): run for name, runs, _ in group for b, run in runs.items()}
        try:
            launches = {}
            times = time_calls(runners, iters, warmup, device, launches)
        except Exception as error:  # one failing mode must not cost the rest of the run
            for name, runs, _ in group:
                rows.extend(_failed(error, fields(name), device, emit, log, list(runs)))
            return
        for name, runs, infos in group:
            mode = MODES[name]
            # The same mode on the other backend differs only in the op: the sharpest check.
            pair = None
            if "auto" in runs and "reference" in runs:
                pair = check_output(runs["auto"].last, runs["reference"].last.float())["max_rel_diff"]
            for backend in runs:
                row = dict(fields(name), backend=resolved_backend(backend, device), backend_choice=backend,
                           bn_folded=mode.fold, channels_last=mode.channels_last, compiled=mode.compile,
                           cuda_graph=mode.graph, stacked_guidance=mode.stack, warmup=warmup,
                           interleaved=len(group) > 1)
                row.update(summarize(times[name, backend], batch))
                if device.type == "cuda":  # host time to queue the work; ~median_ms = launch-bound
                    row["launch_ms"] = round(1000 * statistics.median(launches[name, backend]), 4)
                row.update(infos[backend])
                row.update(check_output(runs[backend].last, reference_out))
                if pair is not None:
                    row["auto_vs_reference_rel_diff"] = pair
                row["suspect"] = _suspect(row)
                rows.append(row)
                emit(row)

    for name in modes:
        mode = MODES[name]
        if mode.cuda_only and device.type != "cuda":
            log(f"  skip {name}: needs CUDA")
            continue
        if mode.cpu_only and device.type != "cpu":
            log(f"  skip {name}: a CPU mode")
            continue
        if budget.left() < (COMPILE_RESERVE_S if mode.compile else 0):
            log(f"  skip {kind} {name}: --budget spent")
            continue
        names = compile_backends if mode.compile else backends
        try:
            runners, infos = {}, {}
            for backend in names:
                runners[backend], infos[backend] = make_runner(base, mode, backend, x, device, compile_kwargs)
            built.append((name, runners, infos))
        except Exception as error:  # one failing mode must not cost the rest of the run
            rows.extend(_failed(error, fields(name), device, emit, log, names))
        if not interleave and built:
            measure(built)
            built = []
        runners = None
        _free(device)
    if built:
        measure(built)
    built = None
    _free(device)
    return rows


@dataclasses.dataclass(frozen=True)
class TrainMode:
    channels_last: bool
    compile: str = None   # torch.compile's mode ("default", "reduce-overhead"), None: eager
    graph: bool = False   # the whole step (forward, loss, backward, Adam) replayed as one CUDA graph


# The compiled modes take minutes to set up, so they run only on request. reduce-overhead replays
# the compiled forward and backward as CUDA graphs (torch.compile's cudagraph trees; the Adam step
# stays outside them); the graph modes capture the eager step whole, in seconds.
TRAIN_MODES = {"train": TrainMode(False), "train-cl": TrainMode(True),
               "train-graph": TrainMode(False, graph=True), "train-cl-graph": TrainMode(True, graph=True),
               "train-compile": TrainMode(True, "default"),
               "train-compile-graph": TrainMode(True, "reduce-overhead")}
DEFAULT_TRAIN_MODES = {"cuda": ["train", "train-cl", "train-graph", "train-cl-graph"], "cpu": ["train"]}


def train_batch(base, batch, size, device, channels_last):
    """A fixed random batch (images, binary masks) for the training rows."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, _in_channels(base), size, size, generator=gen).to(device)
    y = (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_amp(device):
    """The training rows' autocast dtype (None on CPU) and its name: the engine's choice, bfloat16
    where the GPU supports it, else float16."""
    from condseg.engine.runtime import amp_dtype
    amp = amp_dtype("auto", torch.device(device))
    return amp, str(amp).replace("torch.", "") if amp else "float32"


def make_train_step(base, backend, x, y, channels_last, compile_mode=None, graph=False):
    """One stage-2 training step of a copy of ``base`` on ``backend`` as a callable: forward with
    the auxiliary head, stage-2 loss, backward, Adam step with the engine's stage-2 learning rates;
    autocast with :func:`train_amp`'s dtype (float16 with a gradient scaler); with a
    ``compile_mode``, the network's forward and backward through torch.compile in that mode
    ("default" is what ``condseg train --compile`` does). With ``graph`` (CUDA, not float16) the
    step is ``condseg train --cuda-graph``'s: :class:`~condseg.engine.graphed.GraphedTrainStep`,
    captured here after its warm-up steps, replayed at each call.
    ``step.loss`` holds the last loss (a tensor: reading it later keeps the step free of host
    syncs)."""
    from condseg.engine.builders import make_optimizer
    from condseg.engine.graphed import GraphedTrainStep
    from condseg.engine.loops import loss_function

    device = x.device
    amp, _ = train_amp(device)
    if graph and amp == torch.float16:  # (a CPU model: GraphedTrainStep refuses it)
        raise ValueError("make_train_step: graph=True needs bfloat16 autocast: float16's gradient scaler "
                         "reads its overflow flag on the host at every step")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    model = set_cdfa_backend(copy.deepcopy(base), forced(backend)).train().requires_grad_(True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=1e-4, encoder_lr=1e-5)
    forward = model
    if compile_mode:
        forward = torch.compile(model, dynamic=False, **({} if compile_mode == "default" else {"mode": compile_mode}))

    # the trainer's stage-2 objective (no weight-cast cache inside a CUDA-graph capture)
    stage2 = loss_function(forward, 2, None, device, amp, cache=not graph)

    def compute(inp, target):
        return stage2(inp, None, target)  # the None: stage 1's foreground target

    if graph:
        graphed = GraphedTrainStep(compute, optimizer)

        def step():
            step.loss = graphed(x, y)[0]

        for _ in range(graphed.warmup + 1):  # eager warm-up steps, then the capture and its first replay
            step()
        return step

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = compute(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step.loss = loss.detach()

    step.loss = None
    return step


def train_rows(base, batch, size, device, warmup, iters, emit, log=print, mode="train"):
    """images/s of one stage-2 training step (:func:`make_train_step`) at ``batch`` for both
    backends, in one of :data:`TRAIN_MODES`: "train" is the engine's step in NCHW; "train-cl" the
    same in channels_last; "train-graph" and "train-cl-graph" those replayed as one CUDA graph;
    "train-compile" channels_last through torch.compile, "train-compile-graph" also replayed as
    CUDA graphs (for those two the first step, which compiles, is timed apart as compile_s)."""
    spec = TRAIN_MODES[mode]
    compiled = spec.compile is not None
    device = torch.device(device)
    _, dtype = train_amp(device)
    if spec.graph and device.type != "cuda":
        log(f"  skip train {mode}: needs CUDA")
        return []
    x, y = train_batch(base, batch, size, device, spec.channels_last)
    steps, compile_s, rows = {}, {}, []
    try:
        for backend in BACKENDS:
            steps[backend] = make_train_step(base, backend, x, y, spec.channels_last, spec.compile, spec.graph)
            if compiled:  # the first call compiles the forward and the backward
                start = time.perf_counter()
                steps[backend]()
                synchronize(device)
                compile_s[backend] = round(time.perf_counter() - start, 2)
        launches = {}
        times = time_calls(steps, iters, warmup, device, launches)
        for backend in BACKENDS:
            row = {"kind": "train", "mode": mode, "backend": resolved_backend(backend, device),
                   "backend_choice": backend, "dtype": dtype, "channels_last": spec.channels_last,
                   "compiled": compiled, "graph": spec.graph, "amp": dtype != "float32", "batch": batch,
                   "size": size, "warmup": warmup, "loss": round(float(steps[backend].loss), 5)}
            if compiled:
                row["compile_s"], row["compile_mode"] = compile_s[backend], spec.compile
            row.update(summarize(times[backend], batch))
            if device.type == "cuda":
                # host time to queue a step; ~median_ms = bound by launches, not by the GPU
                row["launch_ms"] = round(1000 * statistics.median(launches[backend]), 4)
            if device.type == "cuda" and not spec.graph:  # a replay allocates nothing
                # activation memory of one step (beyond weights and Adam state)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                steps[backend]()
                torch.cuda.synchronize()
                row["step_peak_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
            rows.append(row)
            emit(row)
    except Exception as error:
        rows += _failed(error, {"kind": "train", "mode": mode, "dtype": dtype, "batch": batch,
                                "size": size}, device, emit, log)
    finally:
        steps = None
        _free(device)
    return rows


# ---- report ------------------------------------------------------------------------------------


_KIND_ORDER = {"latency": 0, "throughput": 1, "train": 2}
_MODE_ORDER = {name: i for i, name in enumerate([*MODES, *TRAIN_MODES])}


def _pairs(rows):
    """{(kind, mode, batch): {backend_choice: row}} for rows without errors, in table order."""
    table = {}
    for row in rows:
        if "error" in row:
            continue
        table.setdefault((row["kind"], row["mode"], row["batch"]), {})[row["backend_choice"]] = row
    return dict(sorted(table.items(), key=lambda item: (_KIND_ORDER.get(item[0][0], 9),
                                                         _MODE_ORDER.get(item[0][1], 99), item[0][2])))


def _ratio(pair):
    return pair["auto"]["images_per_s"] / pair["reference"]["images_per_s"]


def summary(rows, device_type):
    """Speed-up lines and the bar verdicts of issue 7 (text lines), and a dict of the ratios:
    eager_ratio (float32 eager, only the op differs), fp32_eager_best_ratio (best float32 eager
    automatic mode, no CUDA graph or compile, vs reference float32 eager), best_fps and
    best_vs_reference_eager (best automatic mode; float32 only on CPU, where the bar is a
    float32 one), train_ratio (best training mode, only the op differs)."""
    pairs = _pairs(rows)
    # rows without these fields (made by hand) are taken to be of the bars' setting
    bar_setting = all(r.get(k, v) == v for r in rows for k, v in BAR_SETTING.items())
    both = {k: v for k, v in pairs.items() if "auto" in v and "reference" in v}
    latency = {k: v for k, v in pairs.items() if k[0] == "latency"}
    ref_eager = next((v["reference"] for k, v in latency.items() if k[1] == "eager" and "reference" in v), None)
    lines, result = [], {}
    eager = next((v for k, v in both.items() if k[:2] == ("latency", "eager")), None)
    if eager:
        result["eager_ratio"] = _ratio(eager)
        lines.append(f"same mode, only the op differs (float32 eager, batch {eager['auto']['batch']}): automatic "
                     f"({eager['auto']['backend']}) {eager['auto']['images_per_s']:.2f} img/s / reference "
                     f"{eager['reference']['images_per_s']:.2f} img/s = {result['eager_ratio']:.2f}x")
    same = [(k[1], _ratio(v)) for k, v in both.items() if k[0] == "latency"]
    if same:
        batches = sorted({k[2] for k, v in both.items() if k[0] == "latency"})
        lines.append(f"same mode, only the op differs, every batch-{'/'.join(map(str, batches))} mode: "
                     + ", ".join(f"{mode} {r:.2f}x" for mode, r in same))

    def best_auto(keep):  # rows with wrong outputs (see _suspect) do not count
        autos = [v["auto"] for k, v in latency.items()
                 if "auto" in v and keep(MODES[k[1]]) and not v["auto"].get("suspect")]
        return max(autos, key=lambda r: r["images_per_s"]) if autos else None

    if ref_eager:
        ref_fps = ref_eager["images_per_s"]
        fp32_eager = best_auto(lambda m: m.dtype == "float32" and not m.graph and not m.compile)
        if fp32_eager:
            result["fp32_eager_best_ratio"] = fp32_eager["images_per_s"] / ref_fps
            lines.append(f"best float32 eager automatic mode (no CUDA graph, no compile) vs reference float32 "
                         f"eager: {fp32_eager['mode']} {fp32_eager['images_per_s']:.2f} / {ref_fps:.2f} img/s = "
                         f"{result['fp32_eager_best_ratio']:.2f}x")
        best = best_auto(lambda m: device_type == "cuda" or m.dtype == "float32")
        if best:
            result["best_fps"] = best["images_per_s"]
            result["best_vs_reference_eager"] = best["images_per_s"] / ref_fps
            lines.append(f"best automatic {'' if device_type == 'cuda' else 'float32 '}mode vs reference float32 "
                         f"eager: {best['mode']} ({best['dtype']}) {best['images_per_s']:.2f} / {ref_fps:.2f} "
                         f"img/s = {result['best_vs_reference_eager']:.2f}x"
                         + (f" ({best['images_per_s'] / PAPER_FPS:.2f}x the paper's {PAPER_FPS} fps on an RTX 4090)"
                            if best["batch"] == 1 and bar_setting else ""))
    for (kind, mode, batch), pair in both.items():
        if kind == "throughput":
            lines.append(f"throughput batch {batch}, {mode}: automatic {pair['auto']['images_per_s']:.1f} / "
                         f"reference {pair['reference']['images_per_s']:.1f} img/s = {_ratio(pair):.2f}x")
        if kind == "train":
            lines.append(f"training step batch {batch}, {mode} ({pair['auto']['dtype']}): automatic "
                         f"{pair['auto']['images_per_s']:.1f} / reference {pair['reference']['images_per_s']:.1f} "
                         f"img/s = {_ratio(pair):.2f}x")
            if "launch_ms" in pair["auto"]:
                a = pair["auto"]
                lines.append(f"training step {mode} automatic: host {a['launch_ms']:.1f} ms to queue a step of "
                             f"{a['median_ms']:.1f} ms (close = bound by launches)")
            if _ratio(pair) > result.get("train_ratio", 0):
                result["train_ratio"], result["train_mode"] = _ratio(pair), mode
    if device_type == "cuda" and eager and "launch_ms" in eager["auto"]:
        a = eager["auto"]
        lines.append(f"float32 eager automatic: host {a['launch_ms']:.2f} ms to queue a forward of "
                     f"{a['median_ms']:.2f} ms (close = bound by kernel launches, which both backends share)")
        graph = both.get(("latency", "graph", eager["auto"]["batch"]))
        if graph:  # the same float32 network without launch costs: what eager could reach at best
            lines.append(f"float32 without launch costs (graph: fold-cl replayed as one CUDA graph): automatic / "
                         f"reference = {_ratio(graph):.2f}x; launch-bound float32 eager stays below this")
    suspect = [f"{r['kind']} {r['mode']} {r['backend']} (rel diff {r.get('max_rel_diff', float('nan')):.3g} vs "
               f"float32 eager, {r.get('auto_vs_reference_rel_diff', float('nan')):.3g} vs the other backend)"
               for r in rows if r.get("suspect")]
    if suspect:
        result["suspect"] = suspect
        lines.append("WRONG OUTPUT (not counted as best mode): " + "; ".join(suspect))
    bars = []
    if device_type == "cuda":
        if "best_fps" in result and best["batch"] == 1:  # the bar is a batch-1 latency
            bars.append(("best mode >= 500 fps (batch 1)", result["best_fps"] >= 500, f"{result['best_fps']:.0f} fps"))
            bars.append(("best mode >= 4x reference float32 eager", result["best_vs_reference_eager"] >= 4,
                         f"{result['best_vs_reference_eager']:.2f}x"))
        if "eager_ratio" in result:
            bars.append(("float32 eager automatic >= 1.5x reference (same mode)", result["eager_ratio"] >= 1.5,
                         f"{result['eager_ratio']:.2f}x; best float32 eager mode "
                         f"{result.get('fp32_eager_best_ratio', float('nan')):.2f}x"))
        if "train_ratio" in result:
            bars.append(("training step >= 1.5x reference (same mode)", result["train_ratio"] >= 1.5,
                         f"{result['train_ratio']:.2f}x, {result['train_mode']}"))
    elif "best_vs_reference_eager" in result:
        bars.append(("CPU: best float32 automatic mode >= 1.7x reference float32 eager",
                     result["best_vs_reference_eager"] >= 1.7, f"{result['best_vs_reference_eager']:.2f}x"))
    if bars and not bar_setting:
        setting = ", ".join(f"{k} {v}" for k, v in BAR_SETTING.items())
        lines.append(f"bars: not judged: they are defined for {setting} (the defaults)")
        bars = []
    for text, ok, value in bars:
        lines.append(f"bar: {text}: {'PASS' if ok else 'FAIL'} ({value})")
    return lines, result


def format_table(rows):
    pairs = _pairs(rows)
    head = f"{'kind':<10} {'mode':<19} {'dtype':<8} {'batch':>5}  {'auto backend':>12} {'ms':>9} {'img/s':>9}  " \
           f"{'reference ms':>12} {'img/s':>9}  {'speed-up':>8}  {'a-vs-r':>7} {'vs-fp32':>7}"
    lines = [head, "-" * len(head)]
    for (kind, mode, batch), pair in pairs.items():
        a, r = pair.get("auto"), pair.get("reference")
        first = a or r
        speed = f"{a['images_per_s'] / r['images_per_s']:.2f}x" if a and r else "-"
        pair_diff = first.get("auto_vs_reference_rel_diff")
        diff = max((p.get("max_rel_diff", 0.0) for p in (a, r) if p), default=0.0) if kind != "train" else None
        flag = " WRONG" if any(p.get("suspect") for p in (a, r) if p) else ""
        lines.append(
            f"{kind:<10} {mode:<19} {first['dtype']:<8} {batch:>5}  {(a or {}).get('backend', '-'):>12} "
            f"{a['median_ms'] if a else float('nan'):>9.3f} {a['images_per_s'] if a else float('nan'):>9.2f}  "
            f"{r['median_ms'] if r else float('nan'):>12.3f} {r['images_per_s'] if r else float('nan'):>9.2f}  "
            f"{speed:>8}  {'' if pair_diff is None else f'{pair_diff:7.1e}'} "
            f"{'' if diff is None else f'{diff:7.1e}'}{flag}")
    lines.append("a-vs-r: automatic vs reference backend in the same mode (only the op differs); vs-fp32: "
                 "against float32 eager; both max |diff| / max |output|; WRONG: above 2")
    for row in rows:
        if "error" in row and row["backend_choice"] == "auto":
            lines.append(f"{row['kind']:<10} {row['mode']:<19} failed: {row['error'][:90]}")
    return "\n".join(lines)


def plot(rows, path, title, paper_line=True):
    """Bar chart of images/s per mode and backend, one panel per kind of row; ``paper_line``
    marks the paper's 59.6 fps (RTX 4090) on the batch-1 panel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written",
              file=sys.stderr)
        return False
    pairs = _pairs(rows)
    kinds = [k for k in ("latency", "throughput", "train") if any(key[0] == k for key in pairs)]
    if not kinds:
        return False
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 + 4 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        keys = [key for key in pairs if key[0] == kind]
        labels = [f"{mode}\nb{batch}" for _, mode, batch in keys]
        width = 0.4
        for i, backend in enumerate(BACKENDS):
            values = [pairs[key].get(backend, {}).get("images_per_s", 0.0) for key in keys]
            name = next((pairs[key][backend]["backend"] for key in keys if backend in pairs[key]), backend)
            label = f"automatic ({name})" if backend == "auto" else "reference (unfold/fold)"
            bars = ax.bar([j + (i - 0.5) * width for j in range(len(keys))], values, width, label=label)
            if backend == "auto":
                for bar, key in zip(bars, keys):
                    if "reference" in pairs[key] and "auto" in pairs[key]:
                        ratio = pairs[key]["auto"]["images_per_s"] / pairs[key]["reference"]["images_per_s"]
                        ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                    ha="center", va="bottom", fontsize=8)
        if kind == "latency" and paper_line:
            ax.axhline(PAPER_FPS, color="grey", linestyle="--", linewidth=1, label=f"paper {PAPER_FPS} fps (RTX 4090)")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title({"latency": "inference, batch 1", "throughput": "inference throughput",
                      "train": "training step"}[kind])
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    p.add_argument("--size", type=int, default=256, help="image side (multiple of 16); default 256")
    p.add_argument("--batch", type=int, default=1, help="latency batch (default 1)")
    p.add_argument("--modes", help=f"comma-separated latency modes from {', '.join(MODES)} "
                                   "(default: all that apply to the device; compile modes with --compile)")
    p.add_argument("--compile", nargs="?", const="both", choices=("both", "auto"),
                   help="add the torch.compile modes (slow to compile), for both backends or, with "
                        "'--compile auto', for the automatic backend only (half the compile time)")
    p.add_argument("--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode for the compile rows; max-autotune-no-cudagraphs times "
                        "convolution and matmul kernels while compiling (minutes on a GPU)")
    p.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                   help="set a torch._inductor.config option for the compiled rows (repeatable), e.g. "
                        "conv_1x1_as_mm=True or coordinate_descent_tuning=True; recorded in every row")
    p.add_argument("--throughput-batch", type=int, default=None,
                   help="batch of the throughput rows (default 16 on CUDA, 0 = none on CPU); halved on OOM")
    p.add_argument("--throughput-modes", help="comma-separated modes of the throughput rows")
    p.add_argument("--train", action="store_true", help="also time one stage-2 training step per backend")
    p.add_argument("--train-batch", type=int, default=12)
    p.add_argument("--train-modes", help=f"comma-separated from {', '.join(TRAIN_MODES)} "
                                         "(default: train, train-cl and the two graph modes on CUDA, train on CPU; "
                                         "the train-compile modes compile for minutes)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (fits a short GPU check)")
    p.add_argument("--warmup", type=int, help="untimed calls per row (default by device and --quick)")
    p.add_argument("--iters", type=int, help="timed calls per latency row")
    p.add_argument("--throughput-iters", type=int)
    p.add_argument("--train-iters", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--encoder", default="resnet50")
    p.add_argument("--decoder-channels", type=int, default=128)
    p.add_argument("--variant", default="paper", choices=("paper", "official"))
    p.add_argument("--budget", type=float, help="soft wall-clock limit in seconds: later optional rows "
                                                "(compile modes, throughput, training) are skipped once spent")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cuDNN autotuning off")
    p.add_argument("--json", help="append one JSON object per row to this JSON-lines file")
    p.add_argument("--plot", help="write a bar chart (PNG) of images/s per mode and backend")
    return p.parse_args(argv)


class Interrupted(BaseException):
    """Raised by SIGTERM; a BaseException so that the per-row error handling lets it through."""


def _interrupt(signum, frame):
    raise Interrupted(f"signal {signum}")


def _main_thread():
    return threading.current_thread() is threading.main_thread()


def busy_cpu_warning(threads, load_avg, idle):
    """A warning when other processes keep too many of this process's cores busy for ``threads``
    OpenMP threads, else None. ``idle``: the cores other processes leave idle now (sampled; None
    where it cannot be read), which counts; the 1-minute load average also counts jobs that just
    ended, so it is only the fallback."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = cores - idle if idle is not None else (load_avg or 0.0)
    if threads <= 1 or busy + threads <= cores + 0.5:
        return None
    seen = f"{busy:.1f} of {cores} cores busy" if idle is not None else f"load average {load_avg} on {cores} cores"
    return (f"WARNING: {seen}: {threads} OpenMP threads will be descheduled at every barrier, which can slow "
            "every op several-fold; measure on an idle machine or with --threads 1")


def _resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available in this torch ({torch.__version__})")
    return device


def _split(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    return names


def set_inductor_options(settings):
    """Applies ``["name=value", ...]`` to torch._inductor.config (values read as Python literals,
    else kept as strings) and returns them as a dict; an unknown name is an error that says so."""
    if not settings:
        return {}
    import ast

    import torch._inductor.config as inductor_config
    options = {}
    for setting in settings:
        name, sep, text = setting.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SystemExit(f"--inductor {setting!r}: expected NAME=VALUE, e.g. conv_1x1_as_mm=True")
        if not hasattr(inductor_config, name):
            raise SystemExit(f"--inductor {setting!r}: torch._inductor.config has no option {name!r} "
                             f"(torch {torch.__version__})")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        setattr(inductor_config, name, value)
        options[name] = value
    return options


def _flags():
    flags = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            flags["tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
            flags["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:  # pragma: no cover - future torch without the old flags
            pass
    flags["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return flags


def main(argv=None):
    args = parse_args(argv)
    device = _resolve_device(args.device)
    kind = device.type
    if args.threads:
        torch.set_num_threads(args.threads)
    if kind == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    quick = 1 if args.quick else 0
    iters = {phase: ITERS[kind][phase][quick] for phase in ("latency", "throughput", "train")}
    if args.warmup is not None:
        iters = {phase: (args.warmup, n) for phase, (_, n) in iters.items()}
    for phase, value in (("latency", args.iters), ("throughput", args.throughput_iters),
                         ("train", args.train_iters)):
        if value is not None:
            iters[phase] = (iters[phase][0], value)
    train_modes = [m.strip() for m in args.train_modes.split(",") if m.strip()] if args.train_modes \
        else DEFAULT_TRAIN_MODES[kind]
    unknown = [m for m in train_modes if m not in TRAIN_MODES]
    if unknown:
        raise SystemExit(f"unknown train mode(s) {unknown}; choose from {list(TRAIN_MODES)}")
    modes = _split(args.modes) if args.modes else \
        DEFAULT_MODES[kind][quick] + (COMPILE_MODES[kind] if args.compile else [])
    tp_batch = args.throughput_batch if args.throughput_batch is not None else (16 if kind == "cuda" else 0)
    tp_modes = _split(args.throughput_modes) if args.throughput_modes else DEFAULT_THROUGHPUT_MODES[kind][quick]
    budget = Budget(args.budget)
    if any(MODES[m].compile for m in modes + (tp_modes if tp_batch else [])) or \
            (args.train and any(TRAIN_MODES[m].compile for m in train_modes)):
        import torch._dynamo.config as dynamo_config
        for limit in ("cache_size_limit", "recompile_limit"):  # one entry per model copy and mode
            if hasattr(dynamo_config, limit):
                setattr(dynamo_config, limit, max(64, getattr(dynamo_config, limit)))
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True  # constant weights: folded casts, prepacked for oneDNN on CPU
    inductor_options = set_inductor_options(args.inductor)

    header = row_header(BENCH, device, "benchmarks/fps.py", argv)
    if inductor_options:
        header["inductor_options"] = inductor_options
    header.update(_flags() if kind == "cuda" else {"threads": torch.get_num_threads(),
                                                   "gomp_spincount": GOMP_SPINCOUNT})
    info = condseg_ops.build_info() or {}
    header["ops_compiled"] = ",".join(info.get("backends", [])) or "none"
    header.update({"model": f"ConDSeg-{args.encoder}", "decoder_channels": args.decoder_channels,
                   "cdfa_variant": args.variant})
    base = build_model(args.encoder, args.decoder_channels, variant=args.variant, device=device, size=args.size)
    try:
        header.update(count_model(base, args.size, device))
    except Exception as error:  # the counts must not cost the timings
        print(f"WARNING: could not count parameters/GMACs: {type(error).__name__}: {error}", file=sys.stderr)
        header.update({"params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 3),
                       "gmacs": None, "gmacs_with_aux": None})
    auto_backend = resolved_backend("auto", device)
    print(f"fps.py: {header['device']}, torch {header['torch']}, condseg_ops build {info or 'none'}")
    print(f"model {header['model']} (decoder {args.decoder_channels}, CDFA {args.variant}): "
          f"{header['params_m']} M parameters, {header['gmacs']} GMACs inference "
          f"({header['gmacs_with_aux']} with the auxiliary head) at 1x3x{args.size}x{args.size}")
    print(f"automatic backend on {kind}: {auto_backend!r}; reference: 'reference' (unfold/fold)")
    if auto_backend == "reference":
        print("WARNING: the automatic backend is the reference here (no compiled kernels for this "
              "device): both columns measure the same thing", file=sys.stderr)
    if kind == "cpu":
        print(f"CPU threads {torch.get_num_threads()}, load average {header.get('load_avg_1m')}, "
              f"GOMP_SPINCOUNT {header['gomp_spincount']}")
        warning = busy_cpu_warning(torch.get_num_threads(), header.get("load_avg_1m"), idle_cpus(0.5))
        if warning:
            print(warning, file=sys.stderr)

    rows = []

    def emit(row):
        full = dict(header)
        full.update(row)
        rows.append(full)
        if args.json:
            append_jsonl(args.json, [full])
        if "error" not in row:
            print(f"  {row['kind']:<10} {row['mode']:<19} {row['backend']:<9} {row['dtype']:<8} batch "
                  f"{row['batch']:>2}: {row['median_ms']:9.3f} ms  {row['images_per_s']:9.2f} img/s"
                  + (f"  compile {row['compile_s']} s" if "compile_s" in row else ""), flush=True)

    # Order, so that a run cut short keeps what the bars need: the core batch-1 modes, training,
    # the torch.compile rows (slow to set up; see --budget), the other batch-1 modes, throughput.
    core = [m for m in modes if m in CORE_MODES]
    compiled = [m for m in modes if MODES[m].compile]
    rest = [m for m in modes if m not in core and m not in compiled]

    compile_backends = ("auto",) if args.compile == "auto" else BACKENDS
    compile_kwargs = {} if args.compile_mode == "default" else {"mode": args.compile_mode}

    def latency(names):
        print(f"latency: batch {args.batch}, {args.size}x{args.size}, warm-up {iters['latency'][0]}, "
              f"{iters['latency'][1]} timed calls per backend, modes {', '.join(names)}"
              + (" (interleaved)" if kind == "cpu" else ""), flush=True)
        inference_rows(base, names, args.batch, args.size, device, *iters["latency"], "latency", budget, emit,
                       compile_kwargs=compile_kwargs, compile_backends=compile_backends)

    def train():
        if budget.left() <= 0:
            print("  skip train: --budget spent")
            return
        print(f"train: batch {args.train_batch}, {args.size}x{args.size}, warm-up {iters['train'][0]}, "
              f"{iters['train'][1]} timed steps per backend, modes {', '.join(train_modes)}", flush=True)
        for name in train_modes:
            if TRAIN_MODES[name].compile and budget.left() < COMPILE_RESERVE_S:
                print(f"  skip train {name}: --budget spent")
                continue
            train_rows(base, args.train_batch, args.size, device, *iters["train"], emit, mode=name)

    def throughput():
        batch = tp_batch
        while batch >= 1:
            if budget.left() <= 0:
                print("  skip throughput: --budget spent")
                return
            print(f"throughput: batch {batch}, modes {', '.join(tp_modes)}", flush=True)
            new = inference_rows(base, tp_modes, batch, args.size, device, *iters["throughput"], "throughput",
                                 budget, emit, compile_kwargs=compile_kwargs)
            if not any(r.get("oom") for r in new) or batch == 1:
                return
            batch //= 2
            print(f"  out of memory: retrying throughput at batch {batch}")

    # SIGTERM (e.g. from `timeout`) ends the measuring, not the report: the table still prints.
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        if kind == "cpu":  # no time limit to respect: every mode in one interleaved group
            latency(modes)
        else:
            if core:
                latency(core)
            if args.train:
                train()
            if compiled:
                latency(compiled)
            if rest:
                latency(rest)
        if kind == "cpu" and args.train:
            train()
        if tp_batch > 0:
            throughput()
    except (Interrupted, KeyboardInterrupt) as stop:
        print(f"\nINTERRUPTED ({type(stop).__name__} {stop}): the report covers the rows measured so far")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    title = f"ConDSeg-{args.encoder} {args.size}x{args.size}, {header['device']}, torch {header['torch']}"
    if args.plot:
        try:
            if plot(rows, args.plot, title, paper_line=kind == "cuda"):
                print(f"plot written to {args.plot}")
        except Exception as error:  # a plotting problem must not hide the table
            print(f"--plot {args.plot} failed: {type(error).__name__}: {error}", file=sys.stderr)
    lines, result = summary(rows, kind)
    print()
    print(f"== ConDSeg end-to-end speed: {title}")
    print(f"   {header['params_m']} M parameters, {header['gmacs']} GMACs inference, "
          f"{header['gmacs_with_aux']} GMACs with the auxiliary head (counted)")
    if kind == "cpu":
        print(f"   CPU threads {torch.get_num_threads()}, load average at start {header.get('load_avg_1m')}, "
              f"now {round(os.getloadavg()[0], 2)}")
    print(format_table(rows))
    for line in lines:
        print(line)
    return rows, result


if __name__ == "__main__":
    main()
