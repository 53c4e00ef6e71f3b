"""The op as a torch custom op: backend dispatch, opcheck, torch.compile, autocast."""
import logging
import threading

import pytest
import torch

import condseg_ops
from condseg_ops import backends, contrast_aggregate, contrast_aggregate_reference
from op_cases import grads, make_inputs


# --- dispatch ----------------------------------------------------------------------------------------

def test_automatic_choice_on_cpu_is_the_compiled_kernel():
    assert backends.select_backend("cpu") == "cpu"


def test_forcing_precedence(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select_backend("cpu") == "reference"
    with condseg_ops.use_backend("cpu"):
        assert backends.select_backend("cpu") == "cpu"  # context beats the environment
        assert backends.select_backend("cpu", "reference") == "reference"  # argument beats both
        with condseg_ops.use_backend(None):
            assert backends.select_backend("cpu") == "reference"  # None defers to the environment
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.select_backend("cpu") == "cpu"


def test_use_backend_is_per_thread(monkeypatch):
    # Another thread's block neither leaks into this one's automatic choice nor, exiting while this
    # thread is inside its own block, pops this thread's choice (both happened with a global stack).
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with condseg_ops.use_backend("reference"):
            entered.set()
            release.wait(30)
            seen["other"] = backends.select_backend("cpu")

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(30)
    seen["main"] = backends.select_backend("cpu")
    with condseg_ops.use_backend("cpu"):
        release.set()
        thread.join(30)
        seen["main, after the other block ended"] = backends.select_backend("cpu")
    assert seen == {"other": "reference", "main": "cpu", "main, after the other block ended": "cpu"}


def test_environment_variable_ignores_case_and_spaces(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, " Reference\n")
    assert backends.select_backend("cpu") == "reference"


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    with pytest.raises(RuntimeError, match=r"'cuda' \(forced by the backend= argument\).*CUDA"):
        contrast_aggregate(*make_inputs(1, 4, 3, 3, 1, 3), backend="cuda")
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(RuntimeError, match="CONDSEG_OPS_BACKEND.*unknown backend 'nonsense'"):
        contrast_aggregate(*make_inputs(1, 4, 3, 3, 1, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        with condseg_ops.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="contrast_aggregate: unknown backend 'gpu'"):  # as use_backend's
        contrast_aggregate(*make_inputs(1, 4, 3, 3, 1, 3), backend="gpu")


def test_missing_backend_falls_back_and_logs(monkeypatch, caplog):
    monkeypatch.setattr(backends, "COMPILED", None)
    monkeypatch.setattr(backends, "COMPILED_ERROR", "not built in this test")
    backends._log_fallback_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="condseg_ops"):
        assert backends.select_backend("cpu") == "reference"
    assert "not built in this test" in caplog.text
    assert caplog.records[-1].levelno == logging.WARNING  # the slow reference: shown by default
    assert "cpu" not in condseg_ops.available_backends("cpu")


def test_a_source_folder_hiding_the_installed_build_is_named(monkeypatch, tmp_path):
    # Python run from a checkout imports its condseg_ops (no _C there) instead of the installed one.
    installed = tmp_path / "site-packages" / "condseg_ops"
    installed.mkdir(parents=True)
    (installed / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")

    class Distribution:  # the checkout's own egg-info first, then the installed package
        def __init__(self, folder):
            self.folder, self.metadata = folder, {"Name": "condseg"}

        def locate_file(self, name):
            return self.folder / name

    def no_extension(name):
        raise ImportError(f"No module named {name!r}")

    checkout = tmp_path / "checkout"  # a source tree with no built extension
    (checkout / "condseg_ops").mkdir(parents=True)
    monkeypatch.setattr(backends.importlib.metadata, "distributions",
                        lambda: [Distribution(checkout), Distribution(tmp_path / "site-packages")])
    monkeypatch.setattr(backends.importlib, "import_module", no_extension)
    module, reason = backends._load_compiled(checkout / "condseg_ops")
    assert module is None and f"hides the installed build in {installed}" in reason
    assert "build_ext --inplace" in reason and "No module named" in reason
    # an extension that is there but fails to load is that error, not a shadowing
    (checkout / "condseg_ops" / "_C.so").write_bytes(b"")
    assert "not built" in backends._load_compiled(checkout / "condseg_ops")[1]


def test_available_backends_lists_what_runs_here():
    names = condseg_ops.available_backends()
    assert names[0] == "reference" and "cpu" in names
    assert ("cuda" in names) == (torch.cuda.is_available() and "cuda" in condseg_ops.build_info()["backends"])



def test_triton_that_fails_to_load_is_a_reason_not_a_crash(monkeypatch):
    """Triton 3.2 (torch 2.6's) raises a RuntimeError while its kernels are decorated on a machine
    without a GPU driver: the backend is then unavailable, with that reason."""
    def broken_import(name):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    backends._load_triton.cache_clear()
    monkeypatch.setattr(backends.importlib, "import_module", broken_import)
    try:
        assert "RuntimeError: 0 active drivers" in backends.unavailable_reason("triton", "cuda")
        assert "triton" not in condseg_ops.available_backends("cuda")
        with pytest.raises(RuntimeError, match="'triton' .*could not be loaded"):
            contrast_aggregate(*make_inputs(1, 4, 3, 3, 1, 3), backend="triton")
    finally:
        backends._load_triton.cache_clear()  # the next call loads the real module again

# --- custom-op machinery -------------------------------------------------------------------------

@pytest.mark.parametrize("dual", [True, False])
def test_opcheck(dual):
    value, attn_fg, attn_bg = make_inputs(2, 6, 5, 4, 2, 3, dual=dual, requires_grad=True)
    torch.library.opcheck(torch.ops.condseg_ops.contrast_aggregate.default,
                          (value, attn_fg, attn_bg, 3, 1, 0.5))
    grad_out = torch.randn(2, 6, 5, 4)
    torch.library.opcheck(torch.ops.condseg_ops.contrast_aggregate_backward.default,
                          (grad_out, value.detach(), attn_fg.detach(),
                           None if attn_bg is None else attn_bg.detach(), 3, 1, 0.5))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    def fn(value, attn_fg, attn_bg):
        return torch.tanh(contrast_aggregate(value * 2, attn_fg, attn_bg, 3, 1, 0.5, backend="cpu"))

    inputs = make_inputs(2, 6, 7, 5, 2, 3, requires_grad=True)
    grad_out = torch.randn(2, 6, 7, 5)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    expected, expected_grads = grads(fn, inputs, grad_out)
    out, got_grads = grads(compiled, inputs, grad_out)
    torch.testing.assert_close(out, expected)
    for got, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["paper", "official"])
def test_torch_compile_of_the_layer(variant):
    torch.manual_seed(0)
    layer = condseg_ops.ContrastAggregation(8, num_heads=2, guide_dim=6, variant=variant)
    x, f_fg, f_bg = torch.randn(2, 8, 6, 5), torch.randn(2, 6, 6, 5), torch.randn(2, 6, 6, 5)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, f_fg, f_bg), layer(x, f_fg, f_bg))
    compiled(x, f_fg, f_bg).sum().backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x, f_fg, f_bg).sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, expected[name])


# --- autocast ------------------------------------------------------------------------------------------

def test_autocast_runs_in_the_autocast_dtype():
    value, attn_fg, attn_bg = make_inputs(1, 8, 6, 6, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contrast_aggregate(value, attn_fg.bfloat16(), attn_bg, backend="cpu")
    assert out.dtype == torch.bfloat16
    expected = contrast_aggregate_reference(value, attn_fg.bfloat16().float(), attn_bg)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="attn_fg has dtype"):  # outside autocast: no silent casts
        contrast_aggregate(value, attn_fg.bfloat16(), attn_bg)


def test_autocast_leaves_float64_as_matmul_does():
    value, attn_fg, attn_bg = make_inputs(1, 8, 6, 6, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (value @ value.transpose(-1, -2)).dtype == torch.float64
        out = contrast_aggregate(value, attn_fg, attn_bg, backend="cpu")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, contrast_aggregate_reference(value, attn_fg, attn_bg), rtol=1e-12, atol=1e-12)
