"""benchmarks/fps.py and condseg.inference: the benchmark's code paths on a small model (no timing
asserted), BatchNorm folding, channels_last and compiled variants against eager."""
import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import condseg
from condseg.inference import (StackedGuidance, WinogradConv2d, fold_batchnorm, prepare_for_inference,
                               set_cdfa_backend, stack_branches, use_winograd_convolutions)
from condseg.models.blocks import Upsample
from conftest import load_benchmark, requires_cuda, requires_nnpack

REPO = Path(__file__).resolve().parents[1]


fps = load_benchmark("fps")

SMALL = dict(encoder="resnet18", decoder_channels=16)


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: on a shared, loaded machine OpenMP barriers make small models far slower
    with more threads (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_model(dtype=torch.float32):
    """Small ConDSeg with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(0)
    model = condseg.ConDSeg("resnet18", decoder_channels=16).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return model.to(dtype)


def _batchnorms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


# ---- BatchNorm folding ---------------------------------------------------------------------------


def test_fold_batchnorm_is_exact_in_float64():
    model = _small_model(torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    folded = fold_batchnorm(model, example_input=x[:1])
    assert folded is not model and not folded.training
    assert len(_batchnorms(model)) > 100 and _batchnorms(folded) == []  # aux head included
    with torch.no_grad():
        ref, out = model(x, return_aux=True), folded(x, return_aux=True)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    assert len(_batchnorms(model)) > 100  # the original is untouched


def test_fold_batchnorm_float32_error_is_float32_rounding():
    """Folded float32 is as close to the float64 truth as unfolded float32 (small multiple)."""
    model = _small_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.double())
        eager_err = (model(x).double() - truth).abs().max().item()
        fold_err = (fold_batchnorm(model)(x).double() - truth).abs().max().item()
    assert fold_err <= 4 * eager_err + 1e-6 * truth.abs().max().item()


class _Tricky(nn.Module):
    """Pairs that must not be folded: conv output read twice, conv called twice, BN after a
    non-conv op; and one pair that must be."""

    def __init__(self):
        super().__init__()
        self.fanout_conv, self.fanout_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared_conv, self.shared_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.relu_bn = nn.BatchNorm2d(4)
        self.ok = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.fanout_conv(x)
        x = self.fanout_bn(y) + y
        x = self.shared_bn(self.shared_conv(x)) + self.shared_conv(x)
        x = self.relu_bn(torch.relu(x))
        return self.ok(x)


def test_fold_batchnorm_follows_the_data_flow():
    torch.manual_seed(0)
    model = _Tricky().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(model)
    assert sorted(_batchnorms(folded)) == ["fanout_bn", "relu_bn", "shared_bn"]
    assert isinstance(folded.ok[1], nn.Identity) and folded.ok[0].bias is not None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _HeadFirst(nn.Module):
    """Registers its 16-channel head before the 3-channel encoder that reads the input."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(16, 1, 1)
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        return self.head(self.enc(x))


def test_fold_batchnorm_asks_for_an_example_when_its_guess_fails():
    torch.manual_seed(0)
    model = _HeadFirst().eval()
    with pytest.raises(ValueError, match="example_input"):
        fold_batchnorm(model)
    x = torch.randn(1, 3, 8, 8)
    folded = fold_batchnorm(model, example_input=x)
    assert isinstance(folded.enc[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_prepare_for_inference_channels_last_and_dtype():
    model = _small_model()
    x = torch.randn(1, 3, 32, 32)
    prepared = prepare_for_inference(model, channels_last=True)
    assert not any(p.requires_grad for p in prepared.parameters())
    conv = prepared.encoder.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = prepared(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    half = prepare_for_inference(model, dtype=torch.float64)
    assert half.encoder.conv1.weight.dtype == torch.float64


# ---- Stacked guidance branches -------------------------------------------------------------------


def _branch(channels, with_conv_bias=False):
    """A guidance-like branch: CBR, x2 up, CBR (eval, random BatchNorm statistics)."""
    def cbr():
        bn = nn.BatchNorm2d(channels)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=with_conv_bias), bn, nn.ReLU(inplace=True))
    return nn.Sequential(cbr(), nn.Sequential(Upsample(2), cbr())).double().eval()


@pytest.mark.parametrize("shared_input", [False, True])
def test_stacked_branches_compute_each_branch(shared_input):
    """One grouped module on the stacked inputs = the branches one by one, concatenated (float64)."""
    torch.manual_seed(0)
    branches = [_branch(6, with_conv_bias=i == 1) for i in range(3)]
    stacked = stack_branches(branches, shared_input=shared_input)
    inputs = [torch.randn(2, 6, 5, 7, dtype=torch.float64) for _ in branches]
    if shared_input:
        inputs = inputs[:1] * len(branches)
    with torch.no_grad():
        expected = torch.cat([branch(x) for branch, x in zip(branches, inputs)], dim=1)
        out = stacked(inputs[0] if shared_input else torch.cat(inputs, dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    convs = [m for m in stacked.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and convs[1].groups == 3 and convs[0].groups == (1 if shared_input else 3)


def test_branches_that_cannot_be_stacked_give_none():
    torch.manual_seed(0)
    a, b = _branch(6), _branch(6)
    assert stack_branches([a, _branch(8)]) is None                     # other widths
    assert stack_branches([a, nn.Sequential(*list(a)[:1])]) is None    # other depth
    b[1][0].scale = 4
    assert stack_branches([a, b]) is None                             # other upsampling
    assert stack_branches([a, nn.Sequential(nn.Tanh())]) is None
    assert stack_branches([a, _branch(6)]) is not None
    grouped = nn.Sequential(nn.Conv2d(6, 6, 3, groups=2))
    assert stack_branches([grouped, grouped], shared_input=True) is None


@pytest.mark.parametrize("fold_bn, channels_last", [(False, False), (True, True)])
def test_stacked_guidance_model_matches_the_model(fold_bn, channels_last):
    """prepare_for_inference(stack=True): the same outputs as the model (return_aux too), 13 fewer
    convolutions (decoupling 6 -> 3, guidance 20 -> 10), as many parameters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountConvs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountConvs.count += func is torch.ops.aten.convolution.default
            return func(*args, **(kwargs or {}))

    model = _small_model(torch.float64)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain = prepare_for_inference(model, fold_bn=fold_bn, channels_last=channels_last, example_input=x)
    stacked = prepare_for_inference(model, fold_bn=fold_bn, channels_last=channels_last, example_input=x,
                                    stack=True)
    assert isinstance(stacked.stacked_guidance, StackedGuidance) and model.stacked_guidance is None
    counts = []
    with torch.no_grad():
        for prepared in (plain, stacked):
            CountConvs.count = 0
            with CountConvs():
                out = prepared(x.contiguous(memory_format=fmt))
            counts.append(CountConvs.count)
            torch.testing.assert_close(out, model(x), rtol=1e-10, atol=1e-10)
        for a, b in zip(stacked(x, return_aux=True), model(x, return_aux=True)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert counts[0] - counts[1] == 13
    count = lambda m, kind: sum(isinstance(x, kind) for x in m.modules())  # noqa: E731
    assert count(plain, nn.Conv2d) - count(stacked, nn.Conv2d) == 13
    assert sum(p.numel() for p in stacked.parameters()) == sum(p.numel() for p in plain.parameters())
    assert condseg.inference.stack_guidance(stacked).stacked_guidance is stacked.stacked_guidance  # once only
    with pytest.warns(UserWarning, match="branches stay separate"):
        assert condseg.inference.stack_guidance(copy.deepcopy(model).train()).stacked_guidance is None
    with pytest.raises(ValueError, match="stack=True needs a ConDSeg"):
        prepare_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1)), stack=True)


def _conv64(conv, x):
    """conv's convolution of x in float64: the expectation."""
    x, padding = x.double(), conv.padding
    if conv.padding_mode != "zeros":
        x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return nn.functional.conv2d(x, conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                                conv.stride, padding, conv.dilation, conv.groups)


def _assert_near(out, truth, tol):
    """out within tol of truth's scale (float32 rounding: 1e-6 direct, 1e-5 Winograd)."""
    scale = truth.abs().max().item() if truth.numel() else 0.0
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=tol * scale)


@requires_nnpack
@pytest.mark.parametrize("shape, padding, bias, channels_last", [
    ((2, 5, 64, 70), 1, True, False),
    ((1, 16, 66, 66), 0, False, False),
    ((1, 8, 64, 64), (2, 1), True, True),
])
def test_winograd_conv_matches_the_float64_convolution(nnpack_calls, shape, padding, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 7, 3, padding=padding, bias=bias)
    weight = conv.weight
    assert WinogradConv2d.from_conv(conv) is conv and type(conv) is WinogradConv2d and conv.weight is weight
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = conv(x)
    assert nnpack_calls == [(1,) + shape[1:]] * shape[0]  # one image at a time
    _assert_near(out, _conv64(conv, x), 1e-4)  # Winograd: about 1e-5 of the scale


@requires_nnpack
def test_winograd_conv_falls_back_where_nnpack_does_not_apply(nnpack_calls):
    torch.manual_seed(0)
    conv = WinogradConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    small, large = torch.randn(1, 4, 32, 32), torch.randn(1, 4, 64, 64, requires_grad=True)
    checks = [(conv, small), (conv, torch.randn(0, 4, 64, 64))]  # output below MIN_PIXELS; no image
    checks.append((copy.deepcopy(conv).double(), large.detach().double()))  # not float32
    # built directly with shapes NNPACK has no Winograd path for
    checks += [(WinogradConv2d(4, 4, 3, **kw), large.detach()) for kw in (
        dict(stride=2, padding=1), dict(dilation=2, padding=2), dict(padding=1, padding_mode="reflect"),
        dict(padding=3), dict(padding=1, groups=2), dict(padding="same"))]
    with torch.no_grad():
        for module, x in checks:
            _assert_near(module(x), _conv64(module, x), 1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(large.detach()).dtype == torch.bfloat16
    out = conv(large)  # a gradient is wanted
    out.sum().backward()
    assert large.grad is not None and nnpack_calls == []
    for other in (nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 4, 1),
                  nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=3)):
        assert type(WinogradConv2d.from_conv(other)) is nn.Conv2d


@requires_nnpack
def test_winograd_conv_keeps_hooks_and_compiles(nnpack_calls):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    conv.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    WinogradConv2d.from_conv(conv)
    x = torch.randn(1, 2, 64, 64)
    with torch.no_grad():
        out = conv(x)
        assert nnpack_calls
        _assert_near(out, _conv64(conv, 2 * x), 1e-4)
        compiled = torch.compile(conv, backend="eager")  # traced through the ordinary convolution
        _assert_near(compiled(x), _conv64(conv, 2 * x), 1e-5)


@requires_nnpack
def test_winograd_conv_takes_the_direct_path_once_nnpack_refuses(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    torch.manual_seed(0)
    conv = WinogradConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 64, 64)
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", refuse)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="NNPACK refused a \\(1, 4, 64, 64\\) input"):
            _assert_near(conv(x), _conv64(conv, x), 1e-5)
        _assert_near(conv(x), _conv64(conv, x), 1e-5)
    assert attempts == [1]


@requires_nnpack
def test_winograd_model_matches_eager_and_keeps_its_state_dict(nnpack_calls):
    model = _small_model()
    x = torch.randn(1, 3, 128, 128)
    fast = prepare_for_inference(model, winograd=True)
    folded = prepare_for_inference(model)
    assert fast.state_dict().keys() == folded.state_dict().keys()
    assert sum(isinstance(m, WinogradConv2d) for m in fast.modules()) > 10
    assert not any(isinstance(m, WinogradConv2d) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        ref = model(x)
        out = fast(x)
    assert nnpack_calls  # the 64x64 and 128x128 maps take the Winograd path
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3 * ref.abs().max().item())
    with pytest.raises(ValueError, match="winograd=True runs float32 NCHW"):
        prepare_for_inference(model, winograd=True, channels_last=True)


def test_winograd_without_nnpack_warns_and_keeps_the_convolutions(monkeypatch):
    monkeypatch.setattr("condseg.inference.nnpack_ready", lambda: False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.warns(UserWarning, match="no NNPACK"):
        kept = use_winograd_convolutions(model)
    assert type(kept[0]) is nn.Conv2d


@requires_nnpack
def test_winograd_conv_initialises_nnpack_in_a_fresh_process():
    """NNPACK's convolution fails ("SpatialConvolution_updateOutput failed") until
    torch.backends.nnpack.is_available() has run once in the process: the layer sees to it."""
    import subprocess
    import sys
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import torch; from torch import nn; from condseg.inference import WinogradConv2d\n"
            "real, ran = torch._nnpack_spatial_convolution, []\n"
            "def counted(*a): out = real(*a); ran.append(1); return out\n"
            "torch._nnpack_spatial_convolution = counted\n"
            "conv = WinogradConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1)); x = torch.randn(1, 2, 64, 64)\n"
            "with torch.no_grad(): d = (conv(x) - nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max()\n"
            "assert ran and d < 1e-4, (ran, d); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_set_cdfa_backend():
    model = _small_model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        auto = model(x)
        forced = set_cdfa_backend(copy.deepcopy(model), "reference")
        layers = [m for m in forced.modules() if isinstance(m, condseg_ops_layer())]
        assert layers and all(m.backend == "reference" for m in layers)
        torch.testing.assert_close(forced(x), auto, rtol=1e-4, atol=1e-4 * auto.abs().max().item())
    with pytest.raises(ValueError, match="set_cdfa_backend: unknown backend 'nope'"):
        set_cdfa_backend(model, "nope")


def condseg_ops_layer():
    import condseg_ops
    return condseg_ops.ContrastAggregation


# ---- benchmark code paths ------------------------------------------------------------------------


def test_runner_modes_match_eager_on_cpu(nnpack_calls):
    base = fps.build_model(**SMALL)
    x = torch.randn(1, 3, 64, 64)  # 64x64: the output convolution has a Winograd path
    with torch.no_grad():
        ref = base(x)
    for name in ("eager", "fold", "fold-cl", "fold-wino", "wino"):
        for backend in fps.BACKENDS:
            before = len(nnpack_calls)
            run, _ = fps.make_runner(base, fps.MODES[name], backend, x, "cpu")
            check = fps.check_output(run(), ref)
            assert check["finite"] and check["max_rel_diff"] < 1e-3, (name, backend, check)
            assert (len(nnpack_calls) > before) == fps.MODES[name].winograd, (name, backend)


def test_stack_modes_reach_the_stacked_guidance():
    """The -stack modes run the model prepared with stack=True (CUDA only: here the CPU twin of
    one) and give eager's output."""
    import dataclasses

    assert all(fps.MODES[name].stack and fps.MODES[name].cuda_only
               for name in ("bf16-graph-stack", "bf16-compile-graph-stack"))
    base = fps.build_model(**SMALL)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)
    run, _ = fps.make_runner(base, dataclasses.replace(fps.MODES["fold-cl"], stack=True), "auto", x, "cpu")
    assert run.model.stacked_guidance is not None
    check = fps.check_output(run(), ref)
    assert check["finite"] and check["max_rel_diff"] < 1e-3, check


def test_busy_cpu_warning_trusts_the_sampled_idle_cores_over_the_load_average(monkeypatch):
    monkeypatch.setattr(fps.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # a high load average left by jobs that just ended: no warning while both cores are idle now
    assert fps.busy_cpu_warning(2, 1.6, 2.0) is None
    assert "1.5 of 2 cores busy" in fps.busy_cpu_warning(2, 0.1, 0.5)
    assert fps.busy_cpu_warning(1, 1.6, 0.5) is None                      # one thread waits for no one
    assert "load average 1.6 on 2 cores" in fps.busy_cpu_warning(2, 1.6, None)  # no /proc/stat
    assert fps.busy_cpu_warning(2, None, None) is None


def test_fps_main_smoke(tmp_path, capsys):
    out_json, out_png = tmp_path / "fps.jsonl", tmp_path / "fps.png"
    rows, result = fps.main([
        "--device", "cpu", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "32",
        "--threads", "1", "--warmup", "0", "--iters", "1", "--throughput-batch", "2", "--throughput-iters", "1",
        "--train", "--train-batch", "2", "--train-iters", "1", "--modes", "eager,fold-cl",
        "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert "same mode, only the op differs" in text and "bars: not judged" in text  # resnet18 at 32x32
    assert not [r for r in rows if "error" in r]
    kinds = {(r["kind"], r["mode"], r["backend_choice"]) for r in rows}
    assert kinds == {(k, m, b) for k, m in (("latency", "eager"), ("latency", "fold-cl"),
                                             ("throughput", "eager"), ("throughput", "fold-cl"),
                                             ("train", "train")) for b in ("auto", "reference")}
    lines = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert len(lines) == len(rows)
    for row in lines:
        for key in ("bench", "device", "date", "torch", "command", "backend", "dtype", "median_ms",
                    "images_per_s", "params_m", "gmacs", "threads"):
            assert key in row, key
        assert row["bench"] == "fps" and row["images_per_s"] > 0
    assert {r["backend"] for r in lines} == {"cpu", "reference"}
    assert lines[0]["gmacs"] > 0 and lines[0]["gmacs_with_aux"] > lines[0]["gmacs"]
    assert {"eager_ratio", "best_vs_reference_eager", "train_ratio"} <= set(result)
    try:
        import matplotlib  # noqa: F401
        assert out_png.stat().st_size > 0
    except ImportError:
        assert not out_png.exists()


def test_fps_sigterm_still_reports(monkeypatch, capsys):
    """`timeout` sends SIGTERM: measuring stops, the rows so far are still reported."""
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fps, "train_rows", killed)
    previous = signal.getsignal(signal.SIGTERM)
    rows, _ = fps.main(["--device", "cpu", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "32",
                        "--warmup", "0", "--iters", "1", "--modes", "eager", "--train"])
    text = capsys.readouterr().out
    assert "INTERRUPTED" in text and "same mode, only the op differs" in text
    assert {r["kind"] for r in rows} == {"latency"}
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.mark.slow
def test_count_model_resnet50_matches_the_released_model():
    """45.55 M parameters and about 101 GMACs with the auxiliary head (DESIGN 4.6)."""
    torch.manual_seed(0)
    model = condseg.ConDSeg().eval()
    counted = fps.count_model(model, 256, "cpu")
    assert abs(counted["params_m"] - 45.55) < 0.01 * 45.55
    assert abs(counted["gmacs_with_aux"] - 101) < 0.02 * 101
    assert counted["gmacs"] < counted["gmacs_with_aux"]


def _row(kind, mode, backend, fps_value, dtype="float32", batch=1):
    return {"kind": kind, "mode": mode, "backend_choice": backend, "backend": backend if backend != "auto" else "cuda",
            "dtype": dtype, "batch": batch, "images_per_s": fps_value, "median_ms": 1000 * batch / fps_value,
            "max_rel_diff": 0.0}


def test_summary_ratios_and_bars():
    rows = [_row("latency", "eager", "auto", 300), _row("latency", "eager", "reference", 150),
            _row("latency", "bf16-graph", "auto", 900, "bfloat16"),
            _row("latency", "bf16-graph", "reference", 400, "bfloat16"),
            _row("train", "train", "auto", 140, "bfloat16", 12),
            _row("train", "train", "reference", 100, "bfloat16", 12),
            _row("train", "train-cl", "auto", 160, "bfloat16", 12),
            _row("train", "train-cl", "reference", 100, "bfloat16", 12)]
    lines, result = fps.summary(rows, "cuda")
    assert result["eager_ratio"] == pytest.approx(2.0)
    assert result["best_vs_reference_eager"] == pytest.approx(6.0)
    assert result["train_ratio"] == pytest.approx(1.6) and result["train_mode"] == "train-cl"
    text = "\n".join(lines)
    assert "bar: best mode >= 500 fps (batch 1): PASS" in text
    assert "bar: training step >= 1.5x reference (same mode): PASS" in text
    assert "bar: float32 eager automatic >= 1.5x reference (same mode): PASS" in text
    # A row with a wrong output is reported and does not count as the best mode.
    wrong = rows + [_row("latency", "graph", "auto", 2000), _row("latency", "graph", "reference", 1000)]
    wrong[-2].update(auto_vs_reference_rel_diff=300.0, suspect=True)
    lines, flagged = fps.summary(wrong, "cuda")
    assert flagged["best_fps"] == 900 and "WRONG OUTPUT" in "\n".join(lines)
    assert "WRONG" in fps.format_table(wrong)
    # On CPU the bar is a float32 one: bf16 rows do not count as the best mode.
    _, cpu = fps.summary(rows, "cpu")
    assert cpu["best_vs_reference_eager"] == pytest.approx(2.0)
    assert "bf16-graph" in fps.format_table(rows)
    # --batch 4: the rows are called batch-4, and neither the paper's batch-1 fps nor the batch-1
    # bar is applied to them.
    batch4 = [_row("latency", "eager", "auto", 1200, batch=4), _row("latency", "eager", "reference", 600, batch=4)]
    lines, result = fps.summary(batch4, "cuda")
    text = "\n".join(lines)
    assert "every batch-4 mode: eager 2.00x" in text and "batch-1" not in text
    assert "RTX 4090" not in text and "500 fps" not in text and result["best_fps"] == 1200
    # A smaller network or input than the bars' (resnet50, decoder 128, 256x256): no verdicts.
    small = [dict(r, model="ConDSeg-resnet18", size=64) for r in rows]
    text = "\n".join(fps.summary(small, "cuda")[0])
    assert "bar:" not in text and "RTX 4090" not in text
    assert "bars: not judged: they are defined for model ConDSeg-resnet50" in text


def test_summary_names_what_bounds_float32_eager_and_training():
    """The launch-bound diagnosis: host time against step time for training rows, and the
    float32 graph ratio (no launch costs) as the ceiling of the float32 eager ratio."""
    rows = [_row("latency", "eager", "auto", 60), _row("latency", "eager", "reference", 50),
            _row("latency", "graph", "auto", 300), _row("latency", "graph", "reference", 240),
            _row("train", "train-cl", "auto", 120, "bfloat16", 12),
            _row("train", "train-cl", "reference", 80, "bfloat16", 12)]
    rows[0]["launch_ms"], rows[4]["launch_ms"] = 15.9, 42.0
    text = "\n".join(fps.summary(rows, "cuda")[0])
    assert "host 15.90 ms to queue a forward of 16.67 ms" in text
    assert "(graph: fold-cl replayed as one CUDA graph): automatic / reference = 1.25x" in text
    assert "training step train-cl automatic: host 42.0 ms to queue a step of 100.0 ms" in text
    # Without the graph pair or the host times, no such lines.
    plain = [dict(r) for r in rows if r["mode"] != "graph"]
    for r in plain:
        r.pop("launch_ms", None)
    text = "\n".join(fps.summary(plain, "cuda")[0])
    assert "without launch costs" not in text and "to queue a step" not in text


@pytest.mark.slow
def test_compiled_runner_matches_eager_on_cpu():
    """Inductor on the automatic backend: the condseg_ops op inside a frozen, BN-folded,
    channels-last graph. The reference backend's graph is plain PyTorch ops; compiling it as well
    would double the minute of cold C++ code generation (it runs in the CUDA smoke test)."""
    base = fps.build_model(**SMALL)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)
    run, info = fps.make_runner(base, fps.MODES["compile"], "auto", x, "cpu")
    check = fps.check_output(run(), ref)
    assert check["finite"] and check["max_rel_diff"] < 1e-3, check
    assert info["compile_s"] > 0


def test_compile_mode_reaches_torch_compile_and_the_rows(monkeypatch):
    """--compile-mode goes to torch.compile for the compile rows (torch.compile stubbed: no inductor
    run here) and each of those rows records it."""
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(fps.torch, "compile", fake_compile)
    common = ["--device", "cpu", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "32",
              "--threads", "1", "--warmup", "0", "--iters", "1", "--throughput-batch", "0",
              "--modes", "eager,compile", "--compile", "auto"]
    rows, _ = fps.main([*common, "--compile-mode", "max-autotune-no-cudagraphs"])
    assert calls == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    compiled = [r for r in rows if r["mode"] == "compile"]
    assert [r["compile_mode"] for r in compiled] == ["max-autotune-no-cudagraphs"]
    assert all("compile_mode" not in r for r in rows if r["mode"] == "eager")

    calls.clear()
    rows, _ = fps.main(common)
    assert calls == [{"dynamic": False}]
    assert [r["compile_mode"] for r in rows if r["mode"] == "compile"] == ["default"]


def test_inductor_options_are_set_and_recorded(monkeypatch):
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(fps.torch, "compile", lambda model, **kwargs: model)
    # the config module's own patch restores the options (pytest's monkeypatch would delete them:
    # a deleted inductor option stays hidden, and every later compile in the process fails)
    with inductor_config.patch(conv_1x1_as_mm=False, coordinate_descent_tuning=False):
        rows, _ = fps.main(["--device", "cpu", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "32",
                            "--threads", "1", "--warmup", "0", "--iters", "1", "--throughput-batch", "0",
                            "--modes", "compile", "--inductor", "conv_1x1_as_mm=True",
                            "--inductor", "coordinate_descent_tuning = True"])
        assert inductor_config.conv_1x1_as_mm is True and inductor_config.coordinate_descent_tuning is True
    assert inductor_config.conv_1x1_as_mm is False and inductor_config.coordinate_descent_tuning is False
    assert all(r["inductor_options"] == {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True} for r in rows)
    for bad, message in (("no_such_option=1", "has no option 'no_such_option'"), ("conv_1x1_as_mm", "NAME=VALUE")):
        with pytest.raises(SystemExit, match=message):
            fps.main(["--device", "cpu", "--modes", "compile", "--inductor", bad])


def test_train_compile_mode_compiles_both_backends_and_times_the_compile_apart(monkeypatch):
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(fps.torch, "compile", fake_compile)
    rows, _ = fps.main(["--device", "cpu", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "32",
                        "--threads", "1", "--warmup", "0", "--iters", "1", "--throughput-batch", "0",
                        "--modes", "eager", "--train", "--train-batch", "2", "--train-iters", "1",
                        "--train-modes", "train,train-compile,train-compile-graph"])
    # one model per backend and compiled mode; the plain train rows stay eager
    assert calls == [{"dynamic": False}] * 2 + [{"dynamic": False, "mode": "reduce-overhead"}] * 2
    train = {(r["mode"], r["backend_choice"]): r for r in rows if r["kind"] == "train"}
    assert set(train) == {(m, b) for m in ("train", "train-compile", "train-compile-graph")
                          for b in ("auto", "reference")}
    for backend in ("auto", "reference"):
        for mode, compile_mode in (("train-compile", "default"), ("train-compile-graph", "reduce-overhead")):
            row = train[mode, backend]
            assert row["compiled"] and row["channels_last"] and row["compile_mode"] == compile_mode
            assert row["compile_s"] > 0
        assert "compile_s" not in train["train", backend] and not train["train", backend]["compiled"]
    with pytest.raises(SystemExit, match="unknown train mode"):
        fps.main(["--device", "cpu", "--train", "--train-modes", "train-fast"])


@requires_cuda
def test_cuda_graph_runner_keeps_its_input_alive():
    """The graph reads its input tensor in place: the channels-last copy make_runner makes must
    outlive make_runner, or the allocator hands its memory to the next tensors and replays read
    garbage (the cause of fps.py's wrong CUDA-graph rows on the H200)."""
    base = fps.build_model(**SMALL).cuda()
    x = torch.randn(1, 3, 64, 64, device="cuda")
    eager, _ = fps.make_runner(base, fps.MODES["fold-cl"], "auto", x, "cuda")  # same model, no graph
    ref = eager().float().clone()
    run, _ = fps.make_runner(base, fps.MODES["graph"], "auto", x, "cuda")
    junk = [torch.full((1, 3, 64, 64), 1e4, device="cuda") for _ in range(16)]  # reuses freed blocks
    check = fps.check_output(run(), ref)
    del junk
    assert check["finite"] and check["max_rel_diff"] < 1e-2, check


@requires_cuda
def test_fps_main_cuda_smoke(tmp_path):
    """Every CUDA mode (bf16/fp16 casts, CUDA graphs, torch.compile in a CUDA graph) on a small model."""
    rows, result = fps.main([
        "--device", "cuda", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "64",
        "--warmup", "1", "--iters", "3", "--throughput-batch", "2", "--throughput-iters", "2",
        "--train", "--train-batch", "2", "--train-iters", "2", "--compile", "auto",
        "--json", str(tmp_path / "fps.jsonl")])
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    assert {r["mode"] for r in rows if r["kind"] == "latency"} >= {"graph", "bf16-graph", "bf16-compile-graph"}
    stacked = fps.main(["--device", "cuda", "--encoder", "resnet18", "--decoder-channels", "16", "--size", "64",
                        "--warmup", "1", "--iters", "3", "--throughput-batch", "0", "--modes", "bf16-graph-stack"])[0]
    assert {r["mode"] for r in stacked} == {"bf16-graph-stack"}
    assert all(r["stacked_guidance"] and not r["suspect"] for r in stacked), stacked
    rows += stacked
    for r in rows:  # the automatic and the reference backend agree in every mode
        if r["kind"] != "train":
            assert r["finite"] and not r["suspect"], r
            if "auto_vs_reference_rel_diff" in r and r["dtype"] == "float32":
                assert r["auto_vs_reference_rel_diff"] < 5e-2, r


def test_profile_model_names_the_op_on_cpu(tmp_path):
    profile_model = load_benchmark("profile_model")
    out = tmp_path / "profile.txt"
    text = profile_model.main(["--device", "cpu", "--mode", "fold", "--encoder", "resnet18",
                               "--decoder-channels", "16", "--size", "32", "--iters", "1", "--top", "200",
                               "--shapes", "--out", str(out)])
    assert out.read_text() == text
    assert "condseg_ops::contrast_aggregate" in text  # the compiled op ran (and was profiled)
    assert "aten::batch_norm" not in text  # folded away by --mode fold
    by_shape = text.split("layer ops by input shape")[1]
    # the stem convolution, named with its input and weight shapes
    assert "aten::convolution [[1, 3, 32, 32], [64, 3, 7, 7]" in by_shape


def test_profile_model_profiles_a_training_step_on_cpu(tmp_path):
    """--train profiles fps.py's training step: backward ops appear, and the title says what was
    profiled; an inference --mode with it is an error, not silently ignored."""
    profile_model = load_benchmark("profile_model")
    text = profile_model.main(["--device", "cpu", "--train", "--batch", "2", "--encoder", "resnet18",
                               "--decoder-channels", "16", "--size", "32", "--iters", "1", "--top", "300",
                               "--shapes"])
    assert "training step (float32, channels_last)" in text and "batch 2" in text
    assert "contrast_aggregate_backward" in text and "aten::convolution_backward" in text
    assert "ms per step" in text.split("layer ops by input shape")[1]
    with pytest.raises(SystemExit, match="--mode is for inferences"):
        profile_model.main(["--device", "cpu", "--train", "--mode", "fold"])


def test_make_train_step_trains_the_chosen_backend():
    base = fps.build_model(**SMALL)
    x, y = fps.train_batch(base, 2, 32, torch.device("cpu"), channels_last=False)
    losses = {}
    for backend in ("auto", "reference"):
        step = fps.make_train_step(base, backend, x, y, channels_last=False)
        step()
        first = float(step.loss)
        for _ in range(3):
            step()
        losses[backend] = (first, float(step.loss))
        assert losses[backend][1] < losses[backend][0], losses  # Adam steps lower the loss on one batch
    # Both backends compute the same network from the same weights: the same first loss.
    assert losses["auto"][0] == pytest.approx(losses["reference"][0], rel=1e-4)
    assert all(p.grad is None for p in base.parameters())  # the base model is left untouched


def test_train_graph_modes_are_cuda_only():
    base = fps.build_model(**SMALL)
    rows = fps.train_rows(base, 2, 32, "cpu", 0, 1, emit=lambda row: None, log=lambda line: None,
                          mode="train-graph")
    assert rows == []
    x, y = fps.train_batch(base, 2, 32, torch.device("cpu"), channels_last=False)
    with pytest.raises(ValueError, match="CUDA graphs need the parameters on one CUDA device, got \\['cpu'\\]"):
        fps.make_train_step(base, "auto", x, y, channels_last=False, graph=True)


@requires_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_train_graph_step_replays_what_the_eager_step_computes(channels_last):
    """fps's graph step (make_train_step took four steps: three eager warm-up steps, then the
    capture and its first replay) against the eager step of the same copy of the weights: the
    losses of the following steps agree, and replays train."""
    base = fps.build_model(**SMALL).cuda()
    x, y = fps.train_batch(base, 2, 64, torch.device("cuda"), channels_last)
    torch.manual_seed(0)
    eager = fps.make_train_step(base, "auto", x, y, channels_last)
    graphed = fps.make_train_step(base, "auto", x, y, channels_last, graph=True)
    eager_losses = []
    for _ in range(7):
        eager()
        eager_losses.append(float(eager.loss))
    graph_losses = []
    for _ in range(3):
        graphed()
        graph_losses.append(float(graphed.loss))
    assert graph_losses[-1] < graph_losses[0]
    assert graph_losses == pytest.approx(eager_losses[4:], rel=2e-2), (graph_losses, eager_losses)


def test_op_calls_runs_every_pass_on_cpu(capsys):
    load_benchmark("op_calls").main(["--device", "cpu", "--size", "6", "--backends", "cpu,reference",
                                     "--dtypes", "float32"])
    assert capsys.readouterr().out.split() == ["cpu", "float32", "ok", "reference", "float32", "ok"]


def test_op_calls_times_each_kernel(capsys):
    # --kernels: the profiled time of each kernel (on a CPU: each top-level op) of both passes.
    load_benchmark("op_calls").main(["--device", "cpu", "--size", "6", "--backends", "reference",
                                     "--dtypes", "float32", "--kernels", "--iters", "2"])
    out = capsys.readouterr().out
    forward = out[out.index("  forward:"):out.index("  forward+backward:")]
    assert "aten::col2im" in forward and "Backward" not in forward  # the reference's fold
    assert "Col2ImBackward0" in out[out.index("  forward+backward:"):]
    total = float(forward.split()[1])
    parts = [float(line.split()[0]) for line in forward.splitlines()[1:]]
    # each figure is printed rounded to 0.001 ms: the sum may be off by half of that per figure
    assert total > 0 and total == pytest.approx(sum(parts), abs=0.0005 * (len(parts) + 1) + 1e-9)
