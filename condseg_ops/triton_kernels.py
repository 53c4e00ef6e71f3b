"""Triton backend of ``condseg_ops.contrast_aggregate`` (DESIGN.md section 2).

Notation: K odd, R = K // 2, K2 = K * K, slot p has offset off(p) = dilation * (p // K - R, p % K - R).
Per pixel q and head g, M_q = softmax(scale * attn_fg) @ softmax(scale * attn_bg) (K2 x K2, row =
destination slot, column = source slot; P_bg = I without attn_bg). Because q + off(s) = r + d with
r = q + off(p) and d = off(s) - off(p), the op is a gather over the (2K-1)^2 offsets d:

    out[c, r] = sum_d Wt_r[d] * V[c, r + d],   Wt_r[d] = sum_{p, s: off(s) - off(p) = d} M_{r - off(p)}[p, s]

Kernels (deterministic, no atomics; fp32 accumulation, fp64 for fp64 inputs), each program one
block of pixels of one (batch, head):
  _mix_rows_kernel     M = P_fg @ P_bg with one pixel per thread: each row a tuple of K2 per-pixel
                       vectors, so softmaxes and the product stay inside the thread (no padding, no
                       shuffles). K <= 3 (P_bg's K2^2 entries live in registers) on Triton >= 3.3
                       (tuples). Stored planar as scratch Mt[b, g, p*K2 + s, q]
  _mix_kernel          the same M for any K and Triton version (batched tl.dot on padded
                       [pixels, K2P, K2P] tiles: for K = 3 about ten times the issued instructions)
  _weight_kernel       Wt[b, g, d, r] from the K2 neighbours' rows of Mt (one pixel per thread)
  _mixed_apply_kernel  the forward's weight and apply in one: each Wt_t[d] summed from Mt where used
  _mixed_apply_rows_kernel  the same with one pixel per thread: its weights summed once, then
                       applied to each channel of the head in turn. K <= 3 on Triton >= 3.3
  _apply_kernel        out[c, t] = sum_d Wt_t[d] V[c, t + d]; TRANSPOSED gives
                       grad_value[c, t] = sum_d Wt_{t-d}[d] G[c, t - d] (a gather too)
  _grad_weight_kernel  gWt[b, g, d, r] = sum_{c in head g} G[c, r] V[c, r + d]
  _softmax_bwd_kernel  gM_q[p, s] = gWt_{q+off(p)}[off(s) - off(p)] (0 outside the image),
                       gP_fg = gM P_bg^T, gP_bg = P_fg^T gM, gA = scale P (gP - rowsum(gP P))
Forward: mix, mixed_apply_rows for K <= 3 (Triton >= 3.3); else mix, mixed_apply for 4- and 8-byte
types and mix, weight, apply for 2-byte types; mix, weight, apply with FUSED_FORWARD off. Backward
(only the inputs are saved): mix, weight, apply(transposed), grad_weight, softmax_bwd. Scratch: Mt
(B*heads*H*W*K^4 accumulator floats, freed after use); the split forward and the backward add Wt,
the backward gWt too (B*heads*H*W*(2K-1)^2 each).

Registration: on a GPU the op is a ``torch.library.triton_op`` (kernels launched through
``wrap_triton``, so torch.compile sees them, no graph break). Under the Triton interpreter
(TRITON_INTERPRET=1, CPU tensors) ``wrap_triton`` cannot trace kernels, so the same op names are
registered with ``torch.library.custom_op`` + ``register_fake`` instead (opaque to the compiler, but
torch.compile and opcheck still work). Importing this module never fails: without triton,
``TRITON_AVAILABLE`` is False and ``TRITON_UNAVAILABLE_REASON`` says why.
"""
import os
from typing import Optional

import torch

OP_NAME = "condseg_ops::contrast_aggregate_triton"
BACKWARD_OP_NAME = "condseg_ops::contrast_aggregate_triton_backward"

TRITON_AVAILABLE = False
TRITON_UNAVAILABLE_REASON: Optional[str] = None
TRITON_VERSION: Optional[tuple] = None  # (major, minor) of the triton imported
INTERPRET = False

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # optional dependency
    TRITON_UNAVAILABLE_REASON = f"triton is not installed (pip install triton): {exc}"
else:
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        TRITON_UNAVAILABLE_REASON = (
            f"torch {torch.__version__} lacks torch.library.triton_op/wrap_triton (needs torch >= 2.6)"
        )
    else:
        TRITON_AVAILABLE = True
        TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
        try:
            from triton import knobs as _knobs

            INTERPRET = bool(_knobs.runtime.interpret)
        except (ImportError, AttributeError):
            INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


if TRITON_AVAILABLE:

    # ------------------------------------------------------------------------------------------
    # Launch configurations. QS is the element budget of one [BLOCK_Q, K2P, K2P] tile:
    # BLOCK_Q = max(1, QS // K2P^2), so K = 3 gets 4..16 pixels per program and K = 7 one or two.
    # The GPU lists keep every variant free of register spills at K = 3 (tests/test_triton.py
    # compiles them for sm_89/sm_90 and reads ptxas' usage). Under the interpreter exactly one
    # config, with large blocks (its cost is per program). CONDSEG_TRITON_AUTOTUNE=0 keeps the first
    # GPU config of each list (no autotuning: fewer compiles, e.g. for a quick GPU test run).
    # ------------------------------------------------------------------------------------------
    GPU_CONFIGS = {
        "mix_rows": [  # one pixel per thread: BLOCK_Q = 32 * num_warps
            triton.Config({"BLOCK_Q": 128}, num_warps=4),
            triton.Config({"BLOCK_Q": 64}, num_warps=2),
            triton.Config({"BLOCK_Q": 256}, num_warps=8),
        ],
        "mix": [
            triton.Config({"QS": 2048}, num_warps=4),
            triton.Config({"QS": 4096}, num_warps=4),
            triton.Config({"QS": 4096}, num_warps=8),
        ],
        "softmax_bwd": [
            triton.Config({"QS": 1024}, num_warps=4),
            triton.Config({"QS": 2048}, num_warps=4),
            triton.Config({"QS": 2048}, num_warps=8),
        ],
        "apply": [  # 8 or 16 elements per thread (more loads in flight, fewer programs)
            triton.Config({"BLOCK_C": 16, "BLOCK_P": 64}, num_warps=4),
            triton.Config({"BLOCK_C": 8, "BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_C": 16, "BLOCK_P": 128}, num_warps=8),
            triton.Config({"BLOCK_C": 32, "BLOCK_P": 64}, num_warps=8),
            triton.Config({"BLOCK_C": 16, "BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_C": 32, "BLOCK_P": 128}, num_warps=8),
        ],
        "weight": [  # one pixel per thread (BLOCK_P = 32 * num_warps), or 2 and 4 for more loads in flight
            triton.Config({"BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_P": 64}, num_warps=2),
            triton.Config({"BLOCK_P": 256}, num_warps=8),
            triton.Config({"BLOCK_P": 256}, num_warps=4),
            triton.Config({"BLOCK_P": 512}, num_warps=4),
        ],
        # BLOCK_C comes from the host (the head's channels, up to 64). At Cg = 32 in float32: 16
        # elements per thread (first three) or 8; 32 spill on sm_90.
        "mixed_apply": [
            triton.Config({"BLOCK_P": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 128}, num_warps=8),
            triton.Config({"BLOCK_P": 32}, num_warps=2),
            triton.Config({"BLOCK_P": 32}, num_warps=4),
            triton.Config({"BLOCK_P": 64}, num_warps=8),
        ],
        "mixed_apply_rows": [  # one pixel per thread (BLOCK_P = 32 * num_warps), or 2
            triton.Config({"BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_P": 64}, num_warps=2),
            triton.Config({"BLOCK_P": 256}, num_warps=8),
            triton.Config({"BLOCK_P": 256}, num_warps=4),
        ],
        "grad_weight": [
            triton.Config({"BLOCK_P": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_P": 256}, num_warps=8),
        ],
    }
    if INTERPRET:
        _CONFIGS = {
            "mix_rows": [triton.Config({"BLOCK_Q": 1024}, num_warps=4)],
            "mix": [triton.Config({"QS": 8192}, num_warps=4)],
            "softmax_bwd": [triton.Config({"QS": 8192}, num_warps=4)],
            "apply": [triton.Config({"BLOCK_C": 64, "BLOCK_P": 128}, num_warps=4)],
            "weight": [triton.Config({"BLOCK_P": 128}, num_warps=4)],
            "mixed_apply": [triton.Config({"BLOCK_P": 128}, num_warps=4)],
            "mixed_apply_rows": [triton.Config({"BLOCK_P": 128}, num_warps=4)],
            "grad_weight": [triton.Config({"BLOCK_P": 128}, num_warps=4)],
        }
    elif os.environ.get("CONDSEG_TRITON_AUTOTUNE", "1") == "0":
        _CONFIGS = {name: configs[:1] for name, configs in GPU_CONFIGS.items()}
    else:
        _CONFIGS = GPU_CONFIGS

    # Where nothing can be timed (the interpreter, or no GPU: ahead-of-time compiles) each kernel
    # runs with one fixed config, FIXED_CONFIGS[name] (tests swap it), instead of an autotuner:
    # older Triton (3.2, torch 2.6's) asks the GPU driver for a benchmarker as soon as a kernel is
    # decorated, and fails on a machine without one.
    FIXED_CONFIGS = {name: configs[0] for name, configs in _CONFIGS.items()}
    AUTOTUNED = not INTERPRET and torch.cuda.is_available()

    # The forward sums each weight where the apply uses it (Wt never reaches global memory, one
    # launch fewer): _mixed_apply_rows_kernel where K <= ROWS_MAX_K, else _mixed_apply_kernel for
    # 4- and 8-byte types. 2-byte types keep the backward's separate weight and apply kernels for
    # the tile form: their 16-byte vectors give each thread 8 pixel columns, whose weights it all
    # sums, and Triton 3.6 spills that kernel. So does CONDSEG_TRITON_FUSED_FORWARD=0 for every case
    # (benchmarks/op_calls.py times both).
    FUSED_FORWARD = os.environ.get("CONDSEG_TRITON_FUSED_FORWARD", "1") != "0"

    def _tuned(name, key):
        if AUTOTUNED:
            return triton.autotune(configs=_CONFIGS[name], key=key)
        return triton.heuristics({arg: (lambda args, arg=arg: FIXED_CONFIGS[name].kwargs[arg])
                                  for arg in FIXED_CONFIGS[name].kwargs})

    # Triton 3.2 (torch 2.6's) aborts the process (an LLVM assertion) compiling a batched fp32
    # tl.dot in "ieee" precision; "tf32x3" (three tf32 products, close to fp32) compiles there.
    _FP32_DOT = tl.constexpr("ieee" if TRITON_VERSION >= (3, 3) else "tf32x3")

    @triton.jit
    def _acc(x, FP64: tl.constexpr):
        """Upcast right after loading: fp64 stays fp64, everything else computes in fp32."""
        if FP64:
            return x.to(tl.float64)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _mm(a, b, FP64: tl.constexpr):
        """Batched [BQ, K2P, K2P] matrix product in full precision (no plain tf32). tf32x3 was
        slower than "ieee" on an H100 at the benchmark shape (forward 1.97 ms in op_bench.py,
        against 1.24 ms of kernel time by ncu), so it is used only where "ieee" breaks."""
        if FP64:  # a sum of outer products: Triton 3.2 has no fp64 dot (fp64 is for gradcheck)
            n: tl.constexpr = a.shape[2]
            j = tl.arange(0, n)
            out = tl.zeros([a.shape[0], a.shape[1], n], dtype=tl.float64)
            for k in range(n):
                column = tl.sum(tl.where(j[None, None, :] == k, a, 0.0), axis=2)
                row = tl.sum(tl.where(j[None, :, None] == k, b, 0.0), axis=1)
                out += column[:, :, None] * row[:, None, :]
            return out
        else:
            return tl.dot(a, b, input_precision=_FP32_DOT)

    @triton.jit
    def _softmax_tile(A, base, qmask, scale, K2: tl.constexpr, K2P: tl.constexpr, FP64: tl.constexpr):
        """Row softmax of scale * A[base + p*K2 + s] -> [BQ, K2P, K2P]; padded rows/columns are 0."""
        p = tl.arange(0, K2P)[None, :, None]
        s = tl.arange(0, K2P)[None, None, :]
        valid = (p < K2) & (s < K2)
        a = _acc(tl.load(A + (base[:, None, None] + (p * K2 + s)), mask=qmask[:, None, None] & valid, other=0.0), FP64)
        # Back to the accumulator type: torch.compile may pass scale as an fp64 scalar.
        a = tl.where(s < K2, _acc(a * scale, FP64), float("-inf"))  # column 0 always valid: no -inf row
        e = tl.exp(a - tl.max(a, axis=2)[:, :, None])
        prob = e / tl.sum(e, axis=2)[:, :, None]
        return tl.where(p < K2, prob, 0.0)

    @triton.jit
    def _tile_pixels(HW, heads, K2: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Program -> (batch*heads index bg, its pixels q, their mask, offset of attn[b, q, g])."""
        pid = tl.program_id(0)
        n_qb = tl.cdiv(HW, BLOCK_Q)
        bg = pid // n_qb
        q = (pid % n_qb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        base = (((bg // heads).to(tl.int64) * HW + q) * heads + bg % heads) * (K2 * K2)
        return bg, q, q < HW, base

    @triton.jit
    def _pixel_block(HW, W, BLOCK_P: tl.constexpr):
        """Program -> (index along the rest of the grid, its pixels r, their mask, rows, columns)."""
        pid = tl.program_id(0)
        n_pb = tl.cdiv(HW, BLOCK_P)
        r = (pid % n_pb) * BLOCK_P + tl.arange(0, BLOCK_P)
        return pid // n_pb, r, r < HW, r // W, r % W

    @triton.jit
    def _channel_block_rows(rest, C, HW, heads, Cg, BLOCK_C: tl.constexpr):
        """rest (from _pixel_block) -> (batch*heads index bg, [BLOCK_C, 1] mask of the head's
        channels in this channel block, their element offsets c * HW in a (B, C, H, W) tensor)."""
        n_cb = tl.cdiv(Cg, BLOCK_C)
        bg = rest // n_cb
        cl = (rest % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = ((bg // heads).to(tl.int64) * C + (bg % heads) * Cg + cl[:, None]) * HW
        return bg, cl[:, None] < Cg, rows

    # Tuples (of per-pixel vectors, indexed by constexpr) arrived in Triton 3.3.
    ROWS_MAX_K = 3 if TRITON_VERSION >= (3, 3) else 0

    @triton.jit
    def _load_row(A, base, row, qmask, K2: tl.constexpr, FP64: tl.constexpr):
        """Row `row` of each pixel's K2 x K2 logits: a tuple of K2 vectors (one per column)."""
        out = ()
        for s in tl.static_range(K2):
            out = out + (_acc(tl.load(A + (base + (row * K2 + s)), mask=qmask, other=0.0), FP64),)
        return out

    @triton.jit
    def _exp_scale(scale, FP64: tl.constexpr):
        """What the logits are multiplied by before the exponential: fp64 uses exp, the others
        exp2, since exp(x) = exp2(x * log2(e)) saves a multiply per entry. In the accumulator
        type: torch.compile may pass scale as an fp64 scalar."""
        if FP64:
            return tl.cast(scale, tl.float64)
        else:
            return tl.cast(scale * 1.4426950408889634, tl.float32)

    @triton.jit
    def _softmax_row(logits, exp_scale, K2: tl.constexpr, FP64: tl.constexpr):
        """softmax(scale * row) of a row held as a tuple; the sums stay inside each thread."""
        x = ()
        for s in tl.static_range(K2):
            x = x + (logits[s] * exp_scale,)
        top = x[0]
        for s in tl.static_range(1, K2):
            top = tl.maximum(top, x[s])
        e = ()
        total = tl.zeros_like(top)
        for s in tl.static_range(K2):
            if FP64:
                v = tl.exp(x[s] - top)
            else:
                v = tl.exp2(x[s] - top)
            total += v
            e = e + (v,)
        inv = 1.0 / total
        out = ()
        for s in tl.static_range(K2):
            out = out + (e[s] * inv,)
        return out

    @_tuned("mix_rows", key=["HW", "K", "DUAL"])
    @triton.jit
    def _mix_rows_kernel(
        A_fg, A_bg, Mt, HW, heads, scale,
        K: tl.constexpr, DUAL: tl.constexpr, FP64: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        K2: tl.constexpr = K * K
        bg, q, qmask, base = _tile_pixels(HW, heads, K2, BLOCK_Q)
        hw = bg.to(tl.int64) * 0 + HW  # int64 plane stride (HW may arrive as a constexpr 1)
        out = Mt + (bg.to(tl.int64) * (K2 * K2) * HW + q)
        c = _exp_scale(scale, FP64)
        if DUAL:
            p_bg = ()  # all K2 x K2 entries, row-major
            for k in tl.static_range(K2):
                p_bg = p_bg + _softmax_row(_load_row(A_bg, base, k, qmask, K2, FP64), c, K2, FP64)
        # A runtime loop over the rows of P_fg: unrolled, Triton's coalescing pass takes about
        # 30 s on the kernel's 243 memory operations.
        for p in range(K2):
            p_fg = _softmax_row(_load_row(A_fg, base, p, qmask, K2, FP64), c, K2, FP64)
            for s in tl.static_range(K2):
                if DUAL:
                    m = p_fg[0] * p_bg[s]
                    for k in tl.static_range(1, K2):
                        m += p_fg[k] * p_bg[k * K2 + s]
                else:
                    m = p_fg[s]
                tl.store(out + (p * K2 + s) * hw, m, mask=qmask)

    @_tuned("mix", key=["HW", "K", "DUAL"])
    @triton.jit
    def _mix_kernel(
        A_fg, A_bg, Mt, HW, heads, scale,
        K: tl.constexpr, K2P: tl.constexpr, DUAL: tl.constexpr, FP64: tl.constexpr, QS: tl.constexpr,
    ):
        K2: tl.constexpr = K * K
        BLOCK_Q: tl.constexpr = (QS + K2P * K2P - 1) // (K2P * K2P)  # max(1, QS // K2P^2), powers of 2
        bg, q, qmask, base = _tile_pixels(HW, heads, K2, BLOCK_Q)
        prob = _softmax_tile(A_fg, base, qmask, scale, K2, K2P, FP64)
        if DUAL:
            prob = _mm(prob, _softmax_tile(A_bg, base, qmask, scale, K2, K2P, FP64), FP64)
        p = tl.arange(0, K2P)[None, :, None]
        s = tl.arange(0, K2P)[None, None, :]
        offs = (bg.to(tl.int64) * (K2 * K2) + (p * K2 + s)) * HW + q[:, None, None]
        tl.store(Mt + offs, prob, mask=qmask[:, None, None] & (p < K2) & (s < K2))

    @triton.jit
    def _offset_weight(m_ptr, hw, y, x, mask, H, W, dil, dyi, dxi, K: tl.constexpr):
        """Wt_r[d] at the pixels r = (y, x) (0 where mask is off), d = (dyi - (K-1), dxi - (K-1)) *
        dil: the sum over slots p, s with s = p + d of M_{r - off(p)}[p, s], read from Mt (at
        m_ptr: planes p * K2 + s of stride hw). Only the slots p for which p + d is a slot are
        loaded; dyi and dxi may be runtime values."""
        R: tl.constexpr = K // 2
        K2: tl.constexpr = K * K
        total = tl.zeros(y.shape, dtype=m_ptr.dtype.element_ty)
        # Constexpr expressions stay inline: a plain assignment would make them runtime values,
        # an annotated one cannot repeat in static_range.
        for py in tl.static_range(K):
            if (py + dyi >= K - 1) & (py + dyi < 2 * K - 1):  # s = p + d is a slot along y
                qy = y - dil * (py - R)  # window centre q = r - off(p)
                row_ok = mask & (qy >= 0) & (qy < H)
                for px in tl.static_range(K):
                    if (px + dxi >= K - 1) & (px + dxi < 2 * K - 1):  # and along x
                        qx = x - dil * (px - R)
                        # Mt plane of (p, s) is p * K2 + s, and s = p + (d_y * K + d_x)
                        plane = (py * K + px) * (K2 + 1) + (dyi - (K - 1)) * K + (dxi - (K - 1))
                        total += tl.load(m_ptr + (plane * hw + (qy * W + qx)),
                                         mask=row_ok & (qx >= 0) & (qx < W), other=0.0)
        return total

    @_tuned("weight", key=["HW", "K"])
    @triton.jit
    def _weight_kernel(Mt, Wt, H, W, HW, dil, K: tl.constexpr, BLOCK_P: tl.constexpr):
        """Wt[b, g, d, r] = sum_p M_{r - off(p)}[p, p + d], one pixel r per thread: the sum over
        slots p stays inside the thread (a [slots, pixels] tile summed over slots needed shared
        memory and barriers)."""
        K2: tl.constexpr = K * K
        D: tl.constexpr = (2 * K - 1) * (2 * K - 1)
        bg, r, rmask, y, x = _pixel_block(HW, W, BLOCK_P)
        hw = bg.to(tl.int64) * 0 + HW  # int64 plane stride (HW may arrive as a constexpr 1)
        m_ptr = Mt + bg.to(tl.int64) * (K2 * K2) * HW
        w_ptr = Wt + bg.to(tl.int64) * D * HW + r
        # A runtime loop over the rows of offsets d (unrolled, K = 7 would be (2K-1)^2 copies:
        # slow to compile), unrolled along each row.
        for dyi in range(2 * K - 1):
            for dxi in tl.static_range(2 * K - 1):
                total = _offset_weight(m_ptr, hw, y, x, rmask, H, W, dil, dyi, dxi, K)
                tl.store(w_ptr + (dyi * (2 * K - 1) + dxi) * hw, total, mask=rmask)

    @_tuned("apply", key=["HW", "Cg", "K", "TRANSPOSED"])
    @triton.jit
    def _apply_kernel(
        X, Wt, Out, C, H, W, HW, heads, Cg, dil,
        K: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Forward: Out[c, t] = sum_d Wt_t[d] * X[c, t + d].
        Transposed (grad of value): Out[c, t] = sum_d Wt_{t-d}[d] * X[c, t - d]."""
        D: tl.constexpr = (2 * K - 1) * (2 * K - 1)
        rest, t, tmask, y, x = _pixel_block(HW, W, BLOCK_P)
        bg, cmask, rows = _channel_block_rows(rest, C, HW, heads, Cg, BLOCK_C)
        x_ptr = X + rows
        hw = bg.to(tl.int64) * 0 + HW
        w_ptr = Wt + bg.to(tl.int64) * D * HW
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=Wt.dtype.element_ty)
        # A runtime loop over the rows of offsets: fully unrolled, the compiler hoists all
        # (2K-1)^2 channel-tile loads and spills (and K = 7 compiles slowly).
        for dyi in range(2 * K - 1):
            if TRANSPOSED:
                sy = y - dil * (dyi - (K - 1))
            else:
                sy = y + dil * (dyi - (K - 1))
            sy_ok = tmask & (sy >= 0) & (sy < H)
            for dxi in tl.static_range(2 * K - 1):
                if TRANSPOSED:
                    sx = x - dil * (dxi - (K - 1))
                else:
                    sx = x + dil * (dxi - (K - 1))
                smask = sy_ok & (sx >= 0) & (sx < W)
                src = sy * W + sx
                if TRANSPOSED:
                    w = tl.load(w_ptr + ((dyi * (2 * K - 1) + dxi) * hw + src), mask=smask, other=0.0)
                else:
                    w = tl.load(w_ptr + ((dyi * (2 * K - 1) + dxi) * hw + t), mask=smask, other=0.0)
                v = tl.load(x_ptr + src[None, :], mask=cmask & smask[None, :], other=0.0)
                acc += w[None, :] * v.to(acc.dtype)  # no jit helper call in the loop: slow when interpreted
        tl.store(Out + (rows + t[None, :]), acc.to(Out.dtype.element_ty), mask=cmask & tmask[None, :])

    @_tuned("mixed_apply", key=["HW", "Cg", "K"])
    @triton.jit
    def _mixed_apply_kernel(
        X, Mt, Out, C, H, W, HW, heads, Cg, dil,
        K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """The forward's weight and apply steps in one: Out[c, t] = sum_d Wt_t[d] X[c, t + d] with
        each Wt_t[d] summed from Mt where it is used (_offset_weight), so Wt never reaches global
        memory. The host gives BLOCK_C >= Cg where it can (one channel block per head), else every
        channel block sums the weights again."""
        K2: tl.constexpr = K * K
        rest, t, tmask, y, x = _pixel_block(HW, W, BLOCK_P)
        bg, cmask, rows = _channel_block_rows(rest, C, HW, heads, Cg, BLOCK_C)
        x_ptr = X + rows
        hw = bg.to(tl.int64) * 0 + HW
        m_ptr = Mt + bg.to(tl.int64) * (K2 * K2) * HW
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=Mt.dtype.element_ty)
        # Runtime loops over both coordinates of the offsets: with the columns unrolled (as in
        # _apply_kernel), Triton 3.6 hoists the weights' loads of a whole row and spills.
        for dyi in range(2 * K - 1):
            sy = y + dil * (dyi - (K - 1))
            sy_ok = tmask & (sy >= 0) & (sy < H)
            for dxi in range(2 * K - 1):
                sx = x + dil * (dxi - (K - 1))
                smask = sy_ok & (sx >= 0) & (sx < W)
                src = sy * W + sx
                # weights only where the value they multiply lies inside the image
                w = _offset_weight(m_ptr, hw, y, x, smask, H, W, dil, dyi, dxi, K)
                v = tl.load(x_ptr + src[None, :], mask=cmask & smask[None, :], other=0.0)
                acc += w[None, :] * v.to(acc.dtype)
        tl.store(Out + (rows + t[None, :]), acc.to(Out.dtype.element_ty), mask=cmask & tmask[None, :])

    @triton.jit
    def _apply_to_channels(X, Out, plane, hw, w, tmask, row_ok, col_ok, W, dil, Cg,
                           K: tl.constexpr, ROWS_INSIDE: tl.constexpr):
        """Out[c, t] = sum_d w[d] X[c, t + d] for each channel c of the head, one pixel t per thread
        (plane: the offsets of channel 0; tmask: the pixels in the image). ROWS_INSIDE: every source
        row lies in the image, so the loads need only the columns' 5 masks, which stay in predicate
        registers (25 do not)."""
        D1: tl.constexpr = 2 * K - 1
        for c in range(Cg):
            x_ptr = X + (plane + c * hw)
            acc = tl.zeros_like(w[0])
            for dyi in tl.static_range(D1):
                row_ptr = x_ptr + dil * (dyi - (K - 1)) * W  # then the columns at constant offsets
                for dxi in tl.static_range(D1):
                    if ROWS_INSIDE:
                        inside = col_ok[dxi]
                    else:
                        inside = row_ok[dyi] & col_ok[dxi]
                    v = tl.load(row_ptr + dil * (dxi - (K - 1)), mask=inside, other=0.0)
                    acc += w[dyi * D1 + dxi] * v.to(acc.dtype)
            tl.store(Out + (plane + c * hw), acc.to(Out.dtype.element_ty), mask=tmask)

    @_tuned("mixed_apply_rows", key=["HW", "Cg", "K"])
    @triton.jit
    def _mixed_apply_rows_kernel(
        X, Mt, Out, C, H, W, HW, heads, Cg, dil,
        K: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """_mixed_apply_kernel with one pixel per thread: its (2K-1)^2 weights are summed from Mt
        once, into a tuple of per-pixel vectors, and then applied to each channel of the head in
        turn. The tile form shares a pixel's weights only among the few channels one thread holds
        (4 of 32 in float32 on sm_90: about 25 instructions per output and offset, against 4 here,
        5 in blocks on the image's border). K <= 3 on Triton >= 3.3 (tuples)."""
        K2: tl.constexpr = K * K
        D1: tl.constexpr = 2 * K - 1
        bg, t, tmask, y, x = _pixel_block(HW, W, BLOCK_P)
        hw = bg.to(tl.int64) * 0 + HW
        m_ptr = Mt + bg.to(tl.int64) * (K2 * K2) * HW
        # Which rows and columns of the source window lie inside the image.
        row_ok = ()
        col_ok = ()
        for i in tl.static_range(D1):
            sy = y + dil * (i - (K - 1))
            sx = x + dil * (i - (K - 1))
            row_ok = row_ok + (tmask & (sy >= 0) & (sy < H),)
            col_ok = col_ok + ((sx >= 0) & (sx < W),)
        w = ()  # weights only where the value they multiply lies inside the image
        for dyi in tl.static_range(D1):
            for dxi in tl.static_range(D1):
                w = w + (_offset_weight(m_ptr, hw, y, x, row_ok[dyi] & col_ok[dxi], H, W, dil, dyi, dxi, K),)
        plane = ((bg // heads).to(tl.int64) * C + (bg % heads) * Cg) * HW + t  # channel 0 of the head
        # Blocks without a pixel past the image's last, whose source rows all lie in the image
        # (most blocks), load under the column masks alone.
        first = (tl.program_id(0) % tl.cdiv(HW, BLOCK_P)) * BLOCK_P
        last = first + BLOCK_P - 1
        if (last < HW) & (first // W >= dil * (K - 1)) & (last // W + dil * (K - 1) < H):
            _apply_to_channels(X, Out, plane, hw, w, tmask, row_ok, col_ok, W, dil, Cg, K, True)
        else:
            _apply_to_channels(X, Out, plane, hw, w, tmask, row_ok, col_ok, W, dil, Cg, K, False)

    @_tuned("grad_weight", key=["HW", "Cg", "K"])
    @triton.jit
    def _grad_weight_kernel(
        G, V, GW, C, H, W, HW, heads, Cg, dil,
        K: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_CB: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """GW[b, g, d, r] = sum_{c in head g} G[c, r] * V[c, r + d] (accumulated in GW's dtype)."""
        D: tl.constexpr = (2 * K - 1) * (2 * K - 1)
        bg, r, rmask, y, x = _pixel_block(HW, W, BLOCK_P)
        cl = tl.arange(0, BLOCK_C)
        hw = bg.to(tl.int64) * 0 + HW
        crow = ((bg // heads).to(tl.int64) * C + (bg % heads) * Cg + cl[:, None]) * HW  # channel row offsets
        gw_base = GW + bg.to(tl.int64) * D * HW + r
        if SINGLE_CB:
            cmask = cl[:, None] < Cg
            gt = tl.load(G + (crow + r[None, :]), mask=cmask & rmask[None, :], other=0.0).to(GW.dtype.element_ty)
        for dyi in range(2 * K - 1):  # runtime loop over rows of offsets, as in _weight_kernel
            sy = y + dil * (dyi - (K - 1))
            sy_ok = rmask & (sy >= 0) & (sy < H)
            for dxi in tl.static_range(2 * K - 1):
                sx = x + dil * (dxi - (K - 1))
                smask = sy_ok & (sx >= 0) & (sx < W)
                src = (sy * W + sx)[None, :]
                if SINGLE_CB:
                    v = tl.load(V + (crow + src), mask=cmask & smask[None, :], other=0.0)
                    total = tl.sum(gt * v.to(gt.dtype), axis=0)
                else:
                    total = tl.zeros([BLOCK_P], dtype=GW.dtype.element_ty)
                    for c0 in range(0, Cg, BLOCK_C):
                        cm = (c0 + cl[:, None]) < Cg
                        rows = crow + c0 * hw
                        gblk = tl.load(G + (rows + r[None, :]), mask=cm & rmask[None, :], other=0.0)
                        v = tl.load(V + (rows + src), mask=cm & smask[None, :], other=0.0)
                        total += tl.sum(gblk.to(total.dtype) * v.to(total.dtype), axis=0)
                tl.store(gw_base + (dyi * (2 * K - 1) + dxi) * hw, total, mask=rmask)

    @_tuned("softmax_bwd", key=["HW", "K", "DUAL"])
    @triton.jit
    def _softmax_bwd_kernel(
        A_fg, A_bg, GW, GA_fg, GA_bg, H, W, HW, heads, dil, scale,
        K: tl.constexpr, K2P: tl.constexpr, DUAL: tl.constexpr, FP64: tl.constexpr, QS: tl.constexpr,
    ):
        R: tl.constexpr = K // 2
        K2: tl.constexpr = K * K
        D: tl.constexpr = (2 * K - 1) * (2 * K - 1)
        BLOCK_Q: tl.constexpr = (QS + K2P * K2P - 1) // (K2P * K2P)
        bg, q, qmask, base = _tile_pixels(HW, heads, K2, BLOCK_Q)
        p = tl.arange(0, K2P)[None, :, None]
        s = tl.arange(0, K2P)[None, None, :]
        valid = qmask[:, None, None] & (p < K2) & (s < K2)
        # gM[q, p, s] = gWt[d(p, s), q + off(p)] where q + off(p) lies inside the image
        py = p // K
        px = p % K
        ry = (q // W)[:, None, None] + dil * (py - R)
        rx = (q % W)[:, None, None] + dil * (px - R)
        d = (s // K - py + (K - 1)) * (2 * K - 1) + (s % K - px + (K - 1))
        inside = valid & (ry >= 0) & (ry < H) & (rx >= 0) & (rx < W)
        hw = bg.to(tl.int64) * 0 + HW  # int64 plane stride (HW may arrive as a constexpr 1)
        gm = tl.load(GW + (bg.to(tl.int64) * D * HW + d * hw + (ry * W + rx)), mask=inside, other=0.0)
        p_fg = _softmax_tile(A_fg, base, qmask, scale, K2, K2P, FP64)
        offs = base[:, None, None] + (p * K2 + s)
        if DUAL:
            p_bg = _softmax_tile(A_bg, base, qmask, scale, K2, K2P, FP64)
            g_fg = _mm(gm, tl.permute(p_bg, (0, 2, 1)), FP64)
            g_bg = _mm(tl.permute(p_fg, (0, 2, 1)), gm, FP64)
            ga_bg = scale * p_bg * (g_bg - tl.sum(g_bg * p_bg, axis=2)[:, :, None])
            tl.store(GA_bg + offs, ga_bg.to(GA_bg.dtype.element_ty), mask=valid)
        else:
            g_fg = gm
        ga_fg = scale * p_fg * (g_fg - tl.sum(g_fg * p_fg, axis=2)[:, :, None])
        tl.store(GA_fg + offs, ga_fg.to(GA_fg.dtype.element_ty), mask=valid)

    # ------------------------------------------------------------------------------------------
    # Host side
    # ------------------------------------------------------------------------------------------
    def _launch(kernel):
        return kernel if INTERPRET else torch.library.wrap_triton(kernel)

    def _pixel_grid(n_bg, HW):
        return lambda meta: (n_bg * triton.cdiv(HW, meta["BLOCK_P"]),)

    def _rows_grid(n_bg, HW):
        return lambda meta: (n_bg * triton.cdiv(HW, meta["BLOCK_Q"]),)

    def _tile_grid(n_bg, HW, K2P):
        return lambda meta: (n_bg * triton.cdiv(HW, triton.cdiv(meta["QS"], K2P * K2P)),)

    def _k2p(kernel_size):
        return max(16, triton.next_power_of_2(kernel_size * kernel_size))  # tl.dot needs dims >= 16

    def _channel_block(cg):
        return max(1, min(triton.next_power_of_2(cg), 64))

    def _acc_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def _mix(attn_fg, attn_bg, B, H, W, kernel_size, scale):
        """Mt (B, heads, K^4, H*W) in the accumulator dtype: every pixel's M = P_fg @ P_bg."""
        heads, HW, k2 = attn_fg.shape[3], H * W, kernel_size * kernel_size
        dtype = _acc_dtype(attn_fg.dtype)
        mt = torch.empty((B, heads, k2 * k2, HW), dtype=dtype, device=attn_fg.device)
        args = (attn_fg, attn_fg if attn_bg is None else attn_bg, mt, HW, heads, scale)
        flags = dict(K=kernel_size, DUAL=attn_bg is not None, FP64=dtype == torch.float64)
        if kernel_size <= ROWS_MAX_K:
            _launch(_mix_rows_kernel)[_rows_grid(B * heads, HW)](*args, **flags)
        else:
            K2P = _k2p(kernel_size)
            _launch(_mix_kernel)[_tile_grid(B * heads, HW, K2P)](*args, K2P=K2P, **flags)
        return mt

    def _weights(attn_fg, attn_bg, B, H, W, kernel_size, dilation, scale):
        """Wt (B, heads, (2K-1)^2, H*W) in the accumulator dtype, through Mt (:func:`_mix`)."""
        heads, HW = attn_fg.shape[3], H * W
        mt = _mix(attn_fg, attn_bg, B, H, W, kernel_size, scale)
        wt = mt.new_empty((B, heads, (2 * kernel_size - 1) ** 2, HW))
        _launch(_weight_kernel)[_pixel_grid(B * heads, HW)](mt, wt, H, W, HW, dilation, K=kernel_size)
        return wt

    def _apply(x, weights, kernel_size, dilation, transposed=False, fused=False):
        """_apply_kernel on Wt (TRANSPOSED: the gradient of value), or with ``fused`` the forward's
        _mixed_apply_rows_kernel (K <= ROWS_MAX_K) or _mixed_apply_kernel on Mt, the latter with
        one channel block per head where it fits."""
        B, C, H, W = x.shape
        heads = weights.shape[1]
        HW = H * W
        cg = C // heads
        out = torch.empty_like(x)
        if fused and kernel_size <= ROWS_MAX_K:
            _launch(_mixed_apply_rows_kernel)[_pixel_grid(B * heads, HW)](x, weights, out, C, H, W, HW, heads, cg,
                                                                          dilation, K=kernel_size)
            return out
        if fused:
            kernel, flags = _mixed_apply_kernel, dict(BLOCK_C=_channel_block(cg))
        else:
            kernel, flags = _apply_kernel, dict(TRANSPOSED=transposed)

        def grid(meta):
            return (B * heads * triton.cdiv(cg, meta["BLOCK_C"]) * triton.cdiv(HW, meta["BLOCK_P"]),)

        _launch(kernel)[grid](x, weights, out, C, H, W, HW, heads, cg, dilation, K=kernel_size, **flags)
        return out

    def _scale_in_float64(attn_fg, attn_bg, scale):
        """Triton passes float scalars as fp32, which would cost fp64 logits their precision: scale
        fp64 logits here and hand the kernels 1.0 (returns logits and the kernels' scale)."""
        if attn_fg.dtype != torch.float64 or scale == 1.0:
            return attn_fg, attn_bg, scale
        return attn_fg * scale, None if attn_bg is None else attn_bg * scale, 1.0

    def _forward_impl(value, attn_fg, attn_bg, kernel_size, dilation, scale):
        value = value.contiguous()
        if value.numel() == 0:
            return torch.empty_like(value)
        B, C, H, W = value.shape
        attn_fg = attn_fg.contiguous()
        attn_bg = None if attn_bg is None else attn_bg.contiguous()
        attn_fg, attn_bg, scale = _scale_in_float64(attn_fg, attn_bg, scale)
        if FUSED_FORWARD and (kernel_size <= ROWS_MAX_K or value.element_size() >= 4):
            return _apply(value, _mix(attn_fg, attn_bg, B, H, W, kernel_size, scale), kernel_size, dilation,
                          fused=True)
        wt = _weights(attn_fg, attn_bg, B, H, W, kernel_size, dilation, scale)
        return _apply(value, wt, kernel_size, dilation, transposed=False)

    def _backward_impl(grad_out, value, attn_fg, attn_bg, kernel_size, dilation, scale):
        grad_out = grad_out.contiguous()
        value = value.contiguous()
        attn_fg = attn_fg.contiguous()
        attn_bg = None if attn_bg is None else attn_bg.contiguous()
        B, C, H, W = value.shape
        heads = attn_fg.shape[3]
        HW = H * W
        grad_bg_shape = (0,) if attn_bg is None else attn_bg.shape
        if value.numel() == 0:  # no pixels or no channels: nothing reaches the logits
            return (torch.zeros_like(value), torch.zeros_like(attn_fg),
                    attn_fg.new_zeros(grad_bg_shape))
        user_scale = scale
        attn_fg, attn_bg, scale = _scale_in_float64(attn_fg, attn_bg, scale)
        grad_value = _apply(grad_out, _weights(attn_fg, attn_bg, B, H, W, kernel_size, dilation, scale),
                            kernel_size, dilation, transposed=True)

        cg = C // heads
        block_c = _channel_block(cg)
        n_d = (2 * kernel_size - 1) ** 2
        acc_dtype = _acc_dtype(value.dtype)
        gw = torch.empty((B, heads, n_d, HW), dtype=acc_dtype, device=value.device)
        _launch(_grad_weight_kernel)[_pixel_grid(B * heads, HW)](
            grad_out, value, gw, C, H, W, HW, heads, cg, dilation,
            K=kernel_size, BLOCK_C=block_c, SINGLE_CB=cg <= block_c,
        )

        grad_fg = torch.empty_like(attn_fg)
        grad_bg = attn_fg.new_empty(grad_bg_shape)
        K2P = _k2p(kernel_size)
        _launch(_softmax_bwd_kernel)[_tile_grid(B * heads, HW, K2P)](
            attn_fg, attn_fg if attn_bg is None else attn_bg, gw, grad_fg, grad_bg, H, W, HW, heads, dilation, scale,
            K=kernel_size, K2P=K2P, DUAL=attn_bg is not None, FP64=acc_dtype == torch.float64,
        )
        if scale != user_scale:  # the chain rule through the fp64 pre-scaling
            grad_fg.mul_(user_scale)
            grad_bg.mul_(user_scale)
        return grad_value, grad_fg, grad_bg

    # ------------------------------------------------------------------------------------------
    # Registration
    # ------------------------------------------------------------------------------------------
    if INTERPRET:
        _register = torch.library.custom_op
    else:
        _register = torch.library.triton_op

    @_register(OP_NAME, mutates_args=())
    def _forward_op(
        value: torch.Tensor, attn_fg: torch.Tensor, attn_bg: Optional[torch.Tensor], kernel_size: int,
        dilation: int, scale: float,
    ) -> torch.Tensor:
        return _forward_impl(value, attn_fg, attn_bg, kernel_size, dilation, scale)

    @_register(BACKWARD_OP_NAME, mutates_args=())
    def _backward_op(
        grad_out: torch.Tensor, value: torch.Tensor, attn_fg: torch.Tensor, attn_bg: Optional[torch.Tensor],
        kernel_size: int, dilation: int, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (grad_value, grad_attn_fg, grad_attn_bg); grad_attn_bg is empty without attn_bg."""
        return _backward_impl(grad_out, value, attn_fg, attn_bg, kernel_size, dilation, scale)

    if INTERPRET:  # triton_op derives its fake kernel from the function itself

        @_forward_op.register_fake
        def _(value, attn_fg, attn_bg, kernel_size, dilation, scale):
            return torch.empty_like(value, memory_format=torch.contiguous_format)

        @_backward_op.register_fake
        def _(grad_out, value, attn_fg, attn_bg, kernel_size, dilation, scale):
            return (
                torch.empty_like(value, memory_format=torch.contiguous_format),
                torch.empty_like(attn_fg, memory_format=torch.contiguous_format),
                attn_fg.new_empty((0,) if attn_bg is None else attn_bg.shape),
            )

    def _setup_context(ctx, inputs, output):
        value, attn_fg, attn_bg, kernel_size, dilation, scale = inputs
        ctx.has_bg = attn_bg is not None
        ctx.save_for_backward(value, attn_fg, attn_bg if ctx.has_bg else None)
        ctx.args = (kernel_size, dilation, scale)

    def _autograd_backward(ctx, grad_out):
        value, attn_fg, attn_bg = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: these kernels' backward is not differentiable
            from condseg_ops.reference import reference_vjp  # here: this module also loads on its own

            grad_value, grad_fg, grad_bg = reference_vjp(grad_out, value, attn_fg, attn_bg, *ctx.args)
            return grad_value, grad_fg, grad_bg, None, None, None
        grad_value, grad_fg, grad_bg = _backward_op(grad_out, value, attn_fg, attn_bg, *ctx.args)
        return grad_value, grad_fg, grad_bg if ctx.has_bg else None, None, None, None

    _forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def contrast_aggregate_triton(value, attn_fg, attn_bg=None, kernel_size=3, dilation=1, scale=1.0):
    """Triton forward of ``contrast_aggregate`` (inputs already validated by the public API).

    Differentiable with respect to value, attn_fg and attn_bg; deterministic. Runs on CUDA tensors,
    or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, slow: for tests).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"the triton backend is unavailable: {TRITON_UNAVAILABLE_REASON}")
    return torch.ops.condseg_ops.contrast_aggregate_triton(
        value, attn_fg, attn_bg, int(kernel_size), int(dilation), float(scale)
    )
