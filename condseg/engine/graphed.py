"""A training step captured whole as one CUDA graph and replayed.

A ConDSeg training step issues some 4,000 kernels (forward, loss, backward, Adam). Eagerly the
host queues each one, and on an H200 that took 124 ms of a 127 ms step at batch 12: the GPU
waited on Python. A replayed graph launches them all at once.
"""
import warnings

import torch


def make_capturable(optimizer):
    """Readies a fused Adam for capture: step counters stay on the device (``capturable``), and it
    skips, on the device, any step whose loss :func:`train_step` flags as not finite (the fused
    kernel's ``found_inf``, as for a gradient scaler). Returns the flag tensor."""
    if not all(group.get("fused") for group in optimizer.param_groups):
        raise ValueError(f"the optimizer must be fused (torch.optim.Adam(..., fused=True)) for a CUDA-graph "
                         f"training step, got {type(optimizer).__name__} without it")
    for group in optimizer.param_groups:
        group["capturable"] = True
    device = optimizer.param_groups[0]["params"][0].device
    # 0-dim float32, as a gradient scaler's: the fused kernel reads it as a float
    optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=device)
    return optimizer.found_inf


def train_step(compute_loss, optimizer, inputs, set_to_none=True):
    """One step as a CUDA graph can hold it: no host reads. ``compute_loss(*inputs)`` gives (loss,
    parts); a loss that is not finite sets the optimizer's ``found_inf`` (see
    :func:`make_capturable`), so the update is skipped: the weights and Adam's state stay as they
    were (BatchNorm's running statistics took the forward's batch, as in any training step).
    ``set_to_none=False`` zeroes the existing gradients in place instead of dropping them.
    Returns (loss, parts), detached."""
    optimizer.zero_grad(set_to_none=set_to_none)
    loss, parts = compute_loss(*inputs)
    loss.backward()
    optimizer.found_inf.copy_(~torch.isfinite(loss.detach()))
    with warnings.catch_warnings():  # warm-up and odd-sized steps run uncaptured on purpose
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
        optimizer.step()
    return loss.detach(), {name: value.detach() for name, value in parts.items()}


class GraphedTrainStep:
    """``step(*inputs)`` trains one step on ``inputs`` (tensors: a batch and its targets) and
    returns ``compute_loss(*inputs)``'s (loss, parts), as tensors.

    ``compute_loss`` runs the network and the loss under autocast without its weight-cast cache
    (``torch.autocast(..., cache_enabled=False)``, as PyTorch asks of autocast in CUDA graphs).
    The first ``warmup`` calls run eagerly on a side stream, so that cuDNN's autotuning, Adam's
    state and other lazy set-up stay out of the capture; the next call captures the step (its
    inputs' shapes become the graph's), and from then on every call copies its inputs into the
    graph's own and replays it. The tensors it returns are the graph's: the next replay
    overwrites them. Inputs of other shapes or memory layouts (say, a smaller last batch; the
    trainer drops those) train eagerly, into the graph's gradient tensors.

    The optimizer must be a fused Adam (``condseg.engine.builders.make_optimizer`` makes one on
    CUDA; see :func:`make_capturable`): a step whose loss is not finite leaves the weights and
    Adam's state as they were, so the caller can read the loss after the step and stop. Learning
    rates are read at the capture: build a new step after a scheduler changes them (the trainer
    builds one per epoch) and :meth:`close` the old one.
    """

    def __init__(self, compute_loss, optimizer, warmup=3):
        devices = {p.device for group in optimizer.param_groups for p in group["params"]}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"GraphedTrainStep: CUDA graphs need the parameters on one CUDA device, "
                             f"got {sorted(map(str, devices))}")
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup must be at least 1, got {warmup}")
        self.compute_loss, self.optimizer, self.warmup = compute_loss, optimizer, warmup
        self.device = next(iter(devices))
        self._was_capturable = [group.get("capturable", False) for group in optimizer.param_groups]
        self.found_inf = make_capturable(optimizer)
        self.graph, self.static_inputs, self.static_outputs, self.calls = None, None, None, 0
        self._side = None  # the warm-up's stream

    @staticmethod
    def _layout(inputs):
        return [(t.shape, t.stride(), t.dtype) for t in inputs]

    def __call__(self, *inputs):
        self.calls += 1
        with torch.cuda.device(self.device):  # the capture runs on the current device's streams
            return self._step(inputs)

    def _step(self, inputs):
        if self.graph is None and self.calls <= self.warmup:
            self._side = self._side or torch.cuda.Stream(self.device)
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                out = train_step(self.compute_loss, self.optimizer, inputs)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            return out
        if self.graph is None:
            self._capture(inputs)
        if self._layout(inputs) != self._layout(self.static_inputs):
            return train_step(self.compute_loss, self.optimizer, inputs, set_to_none=False)
        for static, new in zip(self.static_inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return self.static_outputs

    def _capture(self, inputs):
        self.static_inputs = [torch.empty_like(t).copy_(t) for t in inputs]  # keeps channels_last
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them in its pool
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks, for the graph's private pool
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread allocating pinned buffers meanwhile must
        # neither break the capture nor be refused (the default, global mode does both).
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device),
                              capture_error_mode="thread_local"):
            self.static_outputs = train_step(self.compute_loss, self.optimizer, self.static_inputs)

    def close(self):
        """Frees the graph and hands the optimizer back as it was (its ``capturable`` setting, no
        ``found_inf``); the gradients go too (they lived in the graph's memory)."""
        self.optimizer.zero_grad(set_to_none=True)
        for group, capturable in zip(self.optimizer.param_groups, self._was_capturable):
            group["capturable"] = capturable
        if getattr(self.optimizer, "found_inf", None) is self.found_inf:
            del self.optimizer.found_inf
        self.graph = self.static_inputs = self.static_outputs = None
