"""The CUDA backend's kernels, run on the CPU through the fiber emulation in tests/cuda_emulation.

CI has no GPU, so tests/test_cuda.py skips there; these tests run the same kernel sources (fused
K = 3 and generic) with their real tiling, staging and barriers, and compare them with the float64
reference. They check the kernels' logic, not their speed or the GPU memory model: the GPU tests
still have the last word. The first run compiles the emulated backend (about 40 s).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

from test_cuda import AWKWARD, TOLERANCES, assert_close_all, assert_same_bits, make_inputs, rel_err, run_reference

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulation uses ucontext fibers")


@pytest.fixture(scope="module")
def emulated():
    from cuda_emulation import build

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return build.load(root / "condseg_cuda_emulated")


@pytest.fixture(autouse=True)
def fused_forward(monkeypatch):
    # The emulated device has an H200's 132 SMs, where every test shape here is a small grid that the
    # automatic choice would give to the split kernels: the tests below are about the fused ones.
    # The split kernels' own tests set CONDSEG_CUDA_SPLIT_FORWARD themselves.
    monkeypatch.setenv("CONDSEG_CUDA_SPLIT_FORWARD", "0")


def run_emulated(module, value, fg, bg, grad_out, kernel_size=3, dilation=1, scale=1.0):
    """(output, grad_value, grad_fg, grad_bg) of the emulated CUDA backend."""
    out = module.forward(value, fg, bg, kernel_size, dilation, scale)
    grad_value, grad_fg, grad_bg = module.backward(grad_out, value, fg, bg, kernel_size, dilation, scale)
    return out, grad_value, grad_fg, grad_bg if bg is not None else None


def cpu_inputs(*args, **kwargs):
    return make_inputs(*args, device="cpu", **kwargs)


def offset_by(t, elements=1):
    """A copy of t whose data starts `elements` elements into its storage (a misaligned pointer)."""
    flat = torch.empty(t.numel() + elements, dtype=t.dtype)
    flat[elements:] = t.reshape(-1)
    return flat[elements:].view(t.shape)


@pytest.mark.parametrize("dual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_reference(emulated, dtype, dual):
    # 19 x 37 spans 2 x 2 forward tiles and 3 x 2 backward tiles with ragged edges; Cg = 8.
    inputs = cpu_inputs(2, 24, 19, 37, 3, dual=dual, dtype=dtype)
    got = run_emulated(emulated, *inputs, scale=0.6)
    assert_close_all(got, run_reference(*inputs, scale=0.6), dtype, f"{dtype} dual={dual}")


@pytest.mark.parametrize("heads, dtype", [(3, torch.float32), (4, torch.float32), (4, torch.bfloat16)])
def test_copies_landing_when_issued(emulated, heads, dtype, monkeypatch):
    # A GPU may land a cp.async as soon as it is issued: the kernels must not refill a buffer
    # before every thread has read it. With the copies landing at issue (the emulation's other
    # extreme), the results are the same bits. Word (heads = 3) and vector (heads = 4) staging.
    inputs = cpu_inputs(2, 8 * heads, 19, 40, heads, dtype=dtype, seed=15)
    late = run_emulated(emulated, *inputs, scale=0.5)
    monkeypatch.setenv("CONDSEG_EMU_EAGER_COPIES", "1")
    assert_same_bits(run_emulated(emulated, *inputs, scale=0.5), late)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generic_kernels_match_reference(emulated, dtype, monkeypatch):
    # Cg = 10 leaves a partial chunk of the fused kernels' 8-channel value stages.
    inputs = cpu_inputs(2, 20, 14, 35, 2, dtype=dtype, seed=3)
    fused = run_emulated(emulated, *inputs, scale=0.4)
    monkeypatch.setenv("CONDSEG_CUDA_GENERIC", "1")
    generic = run_emulated(emulated, *inputs, scale=0.4)
    expected = run_reference(*inputs, scale=0.4)
    assert_close_all(fused, expected, dtype, "fused")
    assert_close_all(generic, expected, dtype, "generic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_value_chunks(emulated, dtype):
    # Cg = 36: five 8-channel value chunks through three rotating stage buffers, the last partial.
    inputs = cpu_inputs(1, 72, 14, 35, 2, dtype=dtype, seed=5)
    got = run_emulated(emulated, *inputs, scale=0.5)
    assert_close_all(got, run_reference(*inputs, scale=0.5), dtype, f"{dtype} Cg=36")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C, W", [(24, 72), (72, 40), (12, 36)])
def test_vector_value_stage(emulated, dtype, C, W):
    # W a multiple of 8 (4 for float32 at W = 36): the fused forward copies value in 16-byte vectors,
    # zeros outside the image and past the head's channels coming from the copies. 72 = two whole
    # x tiles and a partial one; C = 72 (Cg = 36) ends on a partial 8-channel chunk.
    inputs = cpu_inputs(2 if C == 24 else 1, C, 19, W, 2 if C == 72 else 3, dtype=dtype, seed=W + C)
    got = run_emulated(emulated, *inputs, scale=0.5)
    assert_close_all(got, run_reference(*inputs, scale=0.5), dtype, f"{dtype} C={C} W={W}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_value_takes_element_copies(emulated, dtype):
    # A value tensor that is not 16-byte aligned is staged element by element: the same result,
    # bit for bit, as the vector copies of an aligned one.
    value, fg, bg, grad_out = cpu_inputs(1, 16, 13, 40, 2, dtype=dtype, seed=8)
    shifted = offset_by(value)
    assert shifted.data_ptr() % 16 != 0
    aligned = emulated.forward(value, fg, bg, 3, 1, 0.5)
    assert torch.equal(emulated.forward(shifted, fg, bg, 3, 1, 0.5), aligned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dual", [True, False])
def test_vector_logit_staging(emulated, dtype, dual, monkeypatch):
    # With heads = 4 the fused kernels copy the logits in granules of 4 elements, whose rows start at
    # a phase of (g + 9 row0) mod 4 inside them: every phase occurs, and the granules reach into the
    # neighbouring matrices (the emulation checks that none reads outside the tensors). The
    # arithmetic is the word staging's: the results must be equal bit for bit, and match the reference.
    inputs = cpu_inputs(2, 32, 19, 37, 4, dual=dual, dtype=dtype, seed=11)
    assert emulated.logit_staging(*inputs[:3]) == "vectors"
    vectors = run_emulated(emulated, *inputs, scale=0.6)
    monkeypatch.setenv("CONDSEG_CUDA_WORD_STAGING", "1")
    assert emulated.logit_staging(*inputs[:3]) == "words"
    words = run_emulated(emulated, *inputs, scale=0.6)
    assert_same_bits(vectors, words)
    assert_close_all(vectors, run_reference(*inputs, scale=0.6), dtype, f"{dtype} dual={dual}")


def test_vector_logit_staging_eight_heads(emulated):
    # heads = 8, Cg = 3: each phase occurs twice per pixel, and the value stage is one partial chunk.
    inputs = cpu_inputs(1, 24, 14, 33, 8, dtype=torch.float32, seed=12)
    assert emulated.logit_staging(*inputs[:3]) == "vectors"
    got = run_emulated(emulated, *inputs, scale=0.8)
    assert_close_all(got, run_reference(*inputs, scale=0.8), torch.float32, "heads=8")


def test_logit_staging_choice(emulated, monkeypatch):
    # Vector staging needs heads a multiple of 4, logits aligned to a granule (16 bytes in fp32, 8
    # in 2-byte types) and its shared memory: 111.5 KB in fp32, more than the 99 KB of an RTX 30/40.
    def staging(heads=4, dtype=torch.float32, fg_offset=0, bg_offset=0):
        value, fg, bg, _ = cpu_inputs(1, 4 * heads, 6, 8, heads, dtype=dtype)
        return emulated.logit_staging(value, offset_by(fg, fg_offset), offset_by(bg, bg_offset))

    assert staging() == staging(heads=8) == staging(dtype=torch.bfloat16) == "vectors"
    assert staging(heads=2) == staging(heads=3) == staging(heads=6) == "words"
    assert staging(fg_offset=1) == staging(fg_offset=2) == staging(bg_offset=1) == "words"
    assert staging(dtype=torch.float16, fg_offset=2) == "words"
    assert staging(fg_offset=4) == staging(dtype=torch.bfloat16, bg_offset=4) == "vectors"
    monkeypatch.setenv("CONDSEG_EMU_SHARED_OPTIN_KB", "99")
    assert staging() == "words" and staging(dtype=torch.bfloat16) == "vectors"
    monkeypatch.setenv("CONDSEG_CUDA_GENERIC", "1")
    assert staging() == "generic"


@pytest.mark.parametrize("scale", [-0.7, 0.0])
def test_scales_other_than_positive_run_the_generic_kernels(emulated, scale):
    # The fused softmaxes scale the row maximum instead of every logit, which needs scale > 0.
    inputs = cpu_inputs(1, 8, 9, 12, 4, seed=14)
    assert emulated.logit_staging(*inputs[:3], scale=scale) == "generic"
    assert emulated.logit_staging(*inputs[:3], scale=0.3) == "vectors"
    got = run_emulated(emulated, *inputs, scale=scale)
    assert_close_all(got, run_reference(*inputs, scale=scale), torch.float32, f"scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_logits_take_word_staging(emulated, dtype):
    # Logits one element off a granule (heads = 4) are staged in words: the same bits as vectors.
    inputs = cpu_inputs(1, 16, 13, 20, 4, dtype=dtype, seed=13)
    value, fg, bg, grad_out = inputs
    assert emulated.logit_staging(value, offset_by(fg), offset_by(bg)) == "words"
    got = run_emulated(emulated, value, offset_by(fg), offset_by(bg), grad_out)
    assert_same_bits(got, run_emulated(emulated, *inputs))


@pytest.mark.parametrize("B, C, H, W, heads, K, dilation, dual", AWKWARD)
def test_awkward_sizes(emulated, B, C, H, W, heads, K, dilation, dual):
    inputs = cpu_inputs(B, C, H, W, heads, K=K, dual=dual, dtype=torch.float32, seed=H * W)
    got = run_emulated(emulated, *inputs, kernel_size=K, dilation=dilation, scale=0.9)
    expected = run_reference(*inputs, kernel_size=K, dilation=dilation, scale=0.9)
    assert_close_all(got, expected, torch.float32, f"{(B, C, H, W, heads, K, dilation, dual)}")


@pytest.mark.parametrize("dtype, B, C, H, W, heads, K, dilation, dual", [
    (torch.bfloat16, 1, 6, 12, 33, 1, 3, 1, True),  # one head
    (torch.float64, 1, 4, 6, 7, 2, 5, 2, True),     # generic kernels in float64
    (torch.float64, 1, 2, 4, 5, 1, 7, 1, False),
])
def test_other_dtypes_and_windows(emulated, dtype, B, C, H, W, heads, K, dilation, dual):
    inputs = cpu_inputs(B, C, H, W, heads, K=K, dual=dual, dtype=dtype, seed=H * W + K)
    got = run_emulated(emulated, *inputs, kernel_size=K, dilation=dilation, scale=0.7)
    expected = run_reference(*inputs, kernel_size=K, dilation=dilation, scale=0.7)
    assert_close_all(got, expected, dtype, f"{dtype} {(B, C, H, W, heads, K, dilation, dual)}")


def test_odd_storage_offsets_half(emulated):
    # 2-byte tensors whose data pointer is not 4-byte aligned: the fused kernels stage them through
    # 4-byte words and must neither lose nor read past an element at either end.
    inputs = cpu_inputs(1, 6, 14, 35, 2, dtype=torch.float16, seed=4)
    assert_same_bits(run_emulated(emulated, *(offset_by(t) for t in inputs)), run_emulated(emulated, *inputs))


def test_huge_logits_stay_finite(emulated):
    value, fg, bg, grad_out = cpu_inputs(1, 8, 10, 40, 2, logit_std=1.0)
    fg, bg = fg.sign() * 1e4, -bg.sign() * 1e4
    for dtype in (torch.float32, torch.bfloat16):
        for t in run_emulated(emulated, *(t.to(dtype) for t in (value, fg, bg, grad_out))):
            assert torch.isfinite(t).all()
    expected = run_reference(value, fg, bg, grad_out)
    assert rel_err(run_emulated(emulated, value, fg, bg, grad_out)[0], expected[0]) <= TOLERANCES[torch.float32][0]


def test_copies_from_outside_the_inputs_are_refused(emulated):
    # The emulation lets cp.async read only the call's input tensors (a read past a tensor's end
    # may fault on a GPU); every forward and backward above ran under that check.
    t = torch.zeros(8)
    emulated.copy_word_at(t, 28)  # the last word
    for offset in (32, -4):
        with pytest.raises(RuntimeError, match="outside every input tensor"):
            emulated.copy_word_at(t, offset)


def test_writes_past_shared_memory_are_refused(emulated):
    # A guard zone follows each block's shared memory; every kernel above ran under that check.
    emulated.write_shared_at(64, 63)  # the last byte
    with pytest.raises(RuntimeError, match="wrote past its 64 bytes of shared memory"):
        emulated.write_shared_at(64, 64)


SPLIT_CASES = [
    # (B, C, H, W, heads, dual): ragged 12 x 32 tiles whose window centres fall in both passes of
    # the fused kernel; heads = 4 (vector staging in the fused path) and 3; Cg = 10 and 36 leave
    # partial 8-channel groups; 1 x 1 and images narrower than the window.
    (2, 24, 19, 37, 3, True),
    (1, 40, 27, 70, 4, True),
    (2, 12, 14, 35, 3, False),
    (1, 72, 13, 16, 2, True),
    (1, 2, 1, 1, 1, True),
    (1, 6, 2, 3, 2, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, H, W, heads, dual", SPLIT_CASES)
def test_split_forward_gives_the_fused_bits(emulated, dtype, B, C, H, W, heads, dual, monkeypatch):
    # The split kernels do the fused kernels' float operations in the same order: the output and all
    # three gradients (the backward's Wt comes from them too) are the same bits, whichever runs.
    inputs = cpu_inputs(B, C, H, W, heads, dual=dual, dtype=dtype, seed=H * W + C)
    fused = run_emulated(emulated, *inputs, scale=0.45)
    monkeypatch.setenv("CONDSEG_CUDA_SPLIT_FORWARD", "1")
    assert emulated.forward_kernels(*inputs[:3], scale=0.45) == "split"
    split = run_emulated(emulated, *inputs, scale=0.45)
    assert_same_bits(split, fused)
    assert_close_all(split, run_reference(*inputs, scale=0.45), dtype, f"{dtype} {(B, C, H, W, heads, dual)}")


def test_split_forward_choice(emulated, monkeypatch):
    # Automatic: the split kernels where the fused forward's grid is under one full wave of two blocks
    # per SM. 32 x 64 at 4 heads is 3 x 2 tiles per head: 24 fused blocks, a wave of 12 SMs.
    monkeypatch.delenv("CONDSEG_CUDA_SPLIT_FORWARD")
    inputs = cpu_inputs(1, 16, 32, 64, 4, seed=2)

    def kernels(sms, **kwargs):
        monkeypatch.setenv("CONDSEG_EMU_SMS", str(sms))
        return emulated.forward_kernels(*inputs[:3], **kwargs)

    assert kernels(13) == kernels(132) == "split"
    assert kernels(12) == kernels(4) == "fused"
    assert kernels(132, scale=-1.0) == "generic"
    monkeypatch.setenv("CONDSEG_CUDA_SPLIT_FORWARD", "0")
    assert kernels(132) == "fused"
    monkeypatch.setenv("CONDSEG_CUDA_SPLIT_FORWARD", "1")
    assert kernels(4) == "split"
    monkeypatch.setenv("CONDSEG_CUDA_GENERIC", "1")
    assert kernels(132) == "generic"
