"""Whole-step CUDA-graph capture without ``torch.compile``: :class:`GraphedStep` (and
:class:`GraphedAccumulation` for gradient accumulation).

A pretraining step of a ViT-B with mimfast's Triton kernels is launch-bound on an H100/H200:
each op's Python wrapper and Triton launch costs tens to hundreds of microseconds on the host,
more than its kernel takes on the GPU. Captured once into a CUDA graph (PyTorch's "whole-network
capture" recipe, https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture), the
step's forward, backward and optimizer step replay as one launch.

The recipe, as :class:`GraphedStep` runs it:

1. warm-up iterations of the step on a side stream (Triton kernels compile, cuBLAS workspaces,
   autograd's streams and the optimizer's state are set up: nothing of that may happen during
   capture), each a real training step;
2. the gradients set to None, then one iteration captured on that same stream
   (``torch.cuda.graph``): the backward allocates the gradients from the graph's memory pool, and
   each replay writes them afresh (no accumulation);
3. each later call copies its inputs into the static input buffers, replays the graph and
   returns the static outputs (overwritten by the next call).

What the captured step needs, checked before capture (:func:`check_optimizer`, and
:func:`config_problems` for a training run's settings):

- the optimizer's state and step counters on the device: ``capturable=True`` on its parameter
  groups (set by :func:`make_capturable`; AdamW fused or not);
- the learning rate as a device tensor per group, changed in place between replays
  (:func:`set_lr_`): a float is baked into the graph at capture;
- no ``GradScaler`` (fp16 loss scaling reads the inf check on the host), one process (no DDP);
  gradient accumulation takes two graphs (:class:`GraphedAccumulation`: each micro-batch's
  forward and backward adding to the gradients in place, and the window's optimizer step);
- no host synchronisation inside the step: ``.item()``, ``.cpu()``, ``nonzero`` and boolean-mask
  indexing (``x[mask]``), Python branches on tensor values. Random numbers drawn with torch's
  CUDA generator (mask noise, drop path) are graph-safe: each replay draws new ones.

MAE's forward (``mimfast.models.mae``, ``mimfast.ops.masking``) has none of those. BEiT's
token-prediction forward gathers the masked tokens with ``x[bool_masked_pos]``, a ``nonzero``
that synchronises, unless it is told the fixed count of masked patches per image
(``model(imgs, masks, labels=tokens, num_masked=K)``: the blockwise generator masks exactly K),
which gathers them by index, found on the device.

Off CUDA, or with ``enabled=False``, :class:`GraphedStep` calls the step eagerly through the same
interface (gradients set to None before each call, the same input checks), so a training loop
has one code path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from mimfast.train.schedule import set_lr

__all__ = ["GraphedAccumulation", "GraphedStep", "check_optimizer", "config_problems", "make_capturable",
           "set_lr_", "skip_nonfinite_steps"]


def _param_device(optimizer: torch.optim.Optimizer) -> torch.device | None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return None


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Prepare ``optimizer`` for capture, in place (idempotent): ``capturable=True`` on every
    parameter group of an optimizer that has the option (AdamW, Adam, ...), and each group's
    learning rate a float32 tensor on the parameters' device (a float would be baked into the
    captured step). Change it between replays with :func:`set_lr_`, never by assigning
    ``group["lr"]``. Off CUDA only the learning rates become tensors (``capturable`` is for
    accelerators)."""
    device = _param_device(optimizer)
    if device is None:
        raise ValueError("the optimizer holds no parameters")
    if device.type == "cuda":
        if "capturable" not in optimizer.defaults:
            raise ValueError(f"{type(optimizer).__name__} has no capturable option: its step cannot be captured "
                             f"into a CUDA graph (AdamW / Adam can)")
        for group in optimizer.param_groups:
            group["capturable"] = True
    for group in optimizer.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != device or lr.dtype != torch.float32 or lr.numel() != 1:
                group["lr"] = lr.detach().to(device=device, dtype=torch.float32).reshape(())
        else:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)


# every group's learning rate set in place where it is a tensor: the schedule's own setter
set_lr_ = set_lr


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A float32 device flag that makes a fused AdamW / Adam step a no-op while it holds 1 (the
    protocol ``GradScaler`` uses: the optimizer reads its ``found_inf`` attribute; the step
    counters are put back too). The step function sets it from the loss inside the graph
    (``flag.copy_(~torch.isfinite(loss))``), so a non-finite loss skips the update without a host
    round trip, as an eager loop that checks the loss first does. Fused optimizers only (the
    others refuse ``found_inf``)."""
    if not all(group.get("fused") for group in optimizer.param_groups):
        raise ValueError("skipping non-finite steps on the device needs a fused optimizer (fused=True)")
    flag = torch.zeros((), dtype=torch.float32, device=_param_device(optimizer))
    optimizer.found_inf = flag
    return flag


def check_optimizer(optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Raise ``ValueError`` if the step of ``optimizer`` cannot be captured as it stands (see
    :func:`make_capturable`): a group not capturable, a learning rate that is not a tensor on
    the parameters' device, a step counter or moment on another device, or an enabled
    ``GradScaler``."""
    device = _param_device(optimizer)
    name = type(optimizer).__name__
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        raise ValueError("a GradScaler (fp16 loss scaling) synchronises with the host at each step: it cannot be "
                         "captured into a CUDA graph; train in bf16 (or fp32)")
    for i, group in enumerate(optimizer.param_groups):
        if device is not None and device.type == "cuda" and not group.get("capturable", False):
            raise ValueError(f"{name} parameter group {i} has capturable=False: its step counters stay on the host "
                             f"(call make_capturable(optimizer), or build it with capturable=True)")
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor) or lr.device != device:
            raise ValueError(f"{name} parameter group {i}: the learning rate must be a tensor on {device} (a float "
                             f"would be baked into the graph; call make_capturable(optimizer) and set it with "
                             f"set_lr_), got {lr!r}")
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.device != p.device:
                    raise ValueError(f"{name} state {key!r} of a parameter is on {value.device}, the parameter on "
                                     f"{p.device}: a captured step needs it on the device (capturable or fused)")


def config_problems(*, world_size: int = 1, precision: str = "bf16", compile: bool = False,
                    grad_checkpointing: bool = False, random_blocks: bool = True) -> list[str]:
    """What in a training run's settings rules out capturing its step (``mimfast pretrain
    --cuda-graph``), one line per conflicting option; [] when none. Off CUDA nothing conflicts:
    the step then runs eagerly (:class:`GraphedStep`'s fallback). ``random_blocks``: whether the
    model's blocks draw random numbers (:func:`mimfast.nn.blocks.draws_random`): checkpointed,
    only those need the device's random state saved, which a capture cannot do."""
    problems = []
    if world_size > 1:
        problems.append(f"--cuda-graph runs one process; this run has {world_size} (DDP / FSDP all-reduces are "
                        f"not captured)")
    if precision == "fp16":
        problems.append("--cuda-graph cannot capture fp16's GradScaler (its inf check reads the GPU from the host): "
                        "use --precision bf16")
    if compile:
        problems.append("--cuda-graph and --compile both set up the step (use --compile --compile-mode "
                        "reduce-overhead for torch.compile's CUDA graphs, or --cuda-graph alone)")
    if grad_checkpointing and random_blocks:
        problems.append("--cuda-graph cannot capture --grad-checkpointing of blocks that draw random numbers (drop "
                        "path, dropout): the checkpoint saves the device's random state for the recompute, which a "
                        "capture does not allow (pytorch/pytorch#162504); --drop-path 0 lifts it")
    return problems


def _signature(inputs: Sequence) -> list[tuple]:
    sig = []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"GraphedStep inputs must be tensors; input {i} is a {type(t).__name__}")
        sig.append((tuple(t.shape), t.dtype, t.device))
    return sig


def _outputs_are_tensors(out) -> bool:
    if out is None or isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)


class GraphedStep:
    """A training step ``fn(*inputs)`` (forward, backward, optimizer step; returns tensors, e.g.
    the loss, detached) captured into a CUDA graph and replayed at each call.

    Args:
        fn: the step. It must not zero the gradients (each call's gradients start from None, set
            here) nor accumulate them over several backward passes.
        example_inputs: tensors shaped as every call's inputs. Given, on CUDA: the warm-up
            iterations run now on copies of them (real optimizer steps) and the step is captured;
            the first call replays (off CUDA nothing runs before the first call). None: the
            first ``warmup`` calls run eagerly (on the side stream) with their own inputs, and the
            next call captures and replays: every call is one training step,
            as without the graph (what a training loop wants).
        optimizer: the step's optimizer; prepared with :func:`make_capturable` and checked
            (:func:`check_optimizer`) before capture.
        warmup: eager iterations before capture (at least 1: the optimizer's state must exist).
        enabled: False (or a non-CUDA input) calls ``fn`` eagerly; None: capture where the inputs
            are on CUDA.
        scaler: a GradScaler in use (refused when enabled).
        pool: a memory pool handle to share with other graphs (``torch.cuda.graph_pool_handle()``).
        capture_error_mode: ``torch.cuda.graph``'s; "thread_local" (default) lets other threads (a
            DataLoader's pin-memory thread) allocate during capture.

    A call returns the static outputs: tensors the next call overwrites (clone to keep one). The
    inputs of every call must match the first's shapes, dtypes and devices (``ValueError``
    otherwise, on every path). Change the learning rate with :func:`set_lr_`; the optimizer's
    state tensors (checkpoints) are the ones the graph updates in place, so load a checkpoint
    before the capture, not after.
    """

    def __init__(self, fn: Callable, example_inputs: Sequence[torch.Tensor] | None = None, *,
                 optimizer: torch.optim.Optimizer, warmup: int = 3, enabled: bool | None = None, scaler=None,
                 pool=None, capture_error_mode: str = "thread_local") -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer's state is created by a first eager step), got "
                             f"{warmup}")
        self.fn = fn
        self.optimizer = optimizer
        self.warmup = int(warmup)
        self.enabled = enabled
        self.scaler = scaler
        self.pool = pool
        self.capture_error_mode = capture_error_mode
        self.graph = None
        self.static_inputs: list[torch.Tensor] | None = None
        self.static_outputs = None
        self.calls = 0  # calls so far (warm-up ones included)
        self._signature: list[tuple] | None = None
        self._stream = None
        self._lrs: list = []
        if example_inputs is not None:
            self._signature = _signature(example_inputs)
            if self._graphed(example_inputs):
                self._prepare()
                self.static_inputs = [t.detach().clone() for t in example_inputs]
                for _ in range(self.warmup):
                    self._eager(self.static_inputs, side=True)
                self._capture()

    # --- what runs
    def _graphed(self, inputs) -> bool:
        on_cuda = bool(inputs) and all(t.is_cuda for t in inputs)
        if self.enabled is None:
            return on_cuda
        if self.enabled and inputs and not on_cuda:
            raise ValueError("GraphedStep(enabled=True) needs its inputs on a CUDA device")
        return bool(self.enabled)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _check(self, inputs) -> None:
        sig = _signature(inputs)
        if self._signature is None:
            self._signature = sig
            return
        if len(sig) != len(self._signature):
            raise ValueError(f"GraphedStep takes {len(self._signature)} inputs (as captured), got {len(sig)}")
        for i, (got, want) in enumerate(zip(sig, self._signature)):
            if got != want:
                raise ValueError(f"GraphedStep input {i} is {_describe(got)}; the step was set up for "
                                 f"{_describe(want)} (a CUDA graph replays on fixed shapes, dtypes and devices)")

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _prepare(self) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(f"GraphedStep captures a single process's step: a process group of "
                             f"{dist.get_world_size()} is initialised (DDP is not captured)")
        make_capturable(self.optimizer)
        check_optimizer(self.optimizer, self.scaler)
        self._lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self._stream is None:
            self._stream = torch.cuda.Stream()

    def _eager(self, inputs, side: bool = False):
        self._zero_grad()
        return self._on_side_stream(self.fn, inputs) if side else self.fn(*inputs)

    def _on_side_stream(self, fn: Callable, inputs):
        """``fn(*inputs)`` run eagerly on the capture's stream (where the warm-up must run)."""
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            out = fn(*inputs)
        current.wait_stream(self._stream)
        return out

    def _captured(self, fn: Callable, inputs):
        """(graph, outputs) of ``fn(*inputs)`` captured on the side stream, after the checks a
        capture needs (the optimizer's state exists once the warm-up ran)."""
        check_optimizer(self.optimizer, self.scaler)
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            raise ValueError(f"{type(self).__name__} captured under an enclosing autocast with its weight cache on: "
                             f"enter autocast inside the step function (or use cache_enabled=False)")
        return _capture_graph(fn, inputs, self._stream, self.pool, self.capture_error_mode)

    def _capture(self) -> None:
        self._zero_grad()
        self.graph, self.static_outputs = self._captured(self.fn, self.static_inputs)

    # --- a call
    def __call__(self, *inputs: torch.Tensor):
        self._check(inputs)
        self.calls += 1
        if not self._graphed(inputs):
            return self._eager(inputs)
        if self.graph is None:
            if not self._lrs:
                self._prepare()
            if self.calls <= self.warmup:
                return self._eager(inputs, side=True)
            self.static_inputs = [t.detach().clone() for t in inputs]
            self._capture()
        else:
            for static, t in zip(self.static_inputs, inputs):
                static.copy_(t, non_blocking=True)
        if any(g["lr"] is not lr for g, lr in zip(self.optimizer.param_groups, self._lrs)):
            raise ValueError("an optimizer group's lr was replaced after GraphedStep set it up: the graph reads the "
                             "original tensor; change it in place with set_lr_(optimizer, lr)")
        self.graph.replay()
        return self.static_outputs

    def reset(self) -> None:
        """Drop the graph and its memory pool; the next call warms up and captures again."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.static_inputs = self.static_outputs = None
        self.calls = 0


class GraphedAccumulation(GraphedStep):
    """Gradient accumulation in two CUDA graphs: each micro-batch's forward and backward
    (``micro_fn``, its gradients added to the parameters' ``.grad`` in place) and the optimizer
    step that ends a window of ``accum_iter`` micro-batches (``step_fn``), each captured after
    the warm-up and replayed.

    Args:
        micro_fn: one micro-batch's forward and backward (``loss / accum_iter`` backpropagated);
            returns tensors (the loss, detached). It must not zero the gradients.
        step_fn: the window's optimizer step, no inputs. It must leave every gradient zero in place
            (``torch._foreach_zero_``), never None: the captured backward adds to those tensors.
        optimizer, enabled, pool, capture_error_mode: as for :class:`GraphedStep`.
        accum_iter: micro-batches a window.
        warmup: whole windows run eagerly on the side stream before the captures (at least 1: the
            gradients and the optimizer's state must exist before the micro-batch graph is taken).

    Call :meth:`__call__` once per micro-batch and :meth:`step` after every ``accum_iter``-th. The
    first micro-batch after the warm-up captures ``micro_fn`` (gradients exist and are zero then,
    so the captured backward accumulates in place: autograd adds to an existing ``.grad`` without
    reallocating it), the first :meth:`step` after that captures ``step_fn``. Off CUDA (or with
    ``enabled=False``) both run eagerly, the gradients accumulating as in a plain loop.
    """

    def __init__(self, micro_fn: Callable, step_fn: Callable, *, optimizer: torch.optim.Optimizer,
                 accum_iter: int, warmup: int = 1, enabled: bool | None = None, pool=None,
                 capture_error_mode: str = "thread_local") -> None:
        if isinstance(accum_iter, bool) or not isinstance(accum_iter, int) or accum_iter < 1:
            raise ValueError(f"accum_iter must be a positive int, got {accum_iter!r}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 whole window (the gradients and the optimizer's state are "
                             f"created by eager ones), got {warmup}")
        super().__init__(micro_fn, optimizer=optimizer, warmup=warmup * accum_iter, enabled=enabled, pool=pool,
                         capture_error_mode=capture_error_mode)
        self.step_fn = step_fn
        self.accum_iter = accum_iter
        self.windows = 0  # step() calls so far
        self.step_graph = None
        self.step_outputs = None

    def _zero_grad(self) -> None:
        pass  # the gradients persist across micro-batches: step_fn zeroes them in place

    @property
    def captured(self) -> bool:
        return self.graph is not None and self.step_graph is not None

    def step(self):
        """The window's optimizer step: eager while the micro-batches run eagerly, captured at the
        first call after the micro-batch graph was, replayed after. Returns ``step_fn``'s outputs."""
        if self.calls != (self.windows + 1) * self.accum_iter:
            raise RuntimeError(f"GraphedAccumulation.step() after {self.calls} micro-batches: each window is "
                               f"{self.accum_iter} micro-batches, then one step() ({self.windows} done)")
        self.windows += 1
        if self.graph is None:  # this window's micro-batches ran eagerly (warm-up, or not on CUDA)
            return self.step_fn() if self._stream is None else self._on_side_stream(self.step_fn, ())
        if self.step_graph is None:
            self.step_graph, self.step_outputs = self._captured(self.step_fn, ())
        self.step_graph.replay()
        return self.step_outputs

    def reset(self) -> None:
        """Drop both graphs and their memory pools; the next micro-batch warms up again (the
        gradients are left as they are: zero between windows)."""
        if self.step_graph is not None:
            self.step_graph.reset()
        self.step_graph = self.step_outputs = None
        self.windows = 0
        super().reset()


def _describe(sig: tuple) -> str:
    shape, dtype, device = sig
    return f"{list(shape)} {str(dtype).replace('torch.', '')} on {device}"


def _capture_graph(fn: Callable, inputs: Sequence, stream, pool, capture_error_mode: str):
    """(graph, outputs): ``fn(*inputs)`` captured on ``stream`` (nothing of it runs). A failed
    capture puts the device's random generator back and raises RuntimeError saying what a captured
    step may not do; outputs that are not tensors raise TypeError."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    prev = torch.cuda.current_stream()
    kw = {} if pool is None else {"pool": pool}
    rng = _saved_generator_state()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode=capture_error_mode, **kw):
            out = fn(*inputs)
    except Exception as e:
        torch.cuda.set_stream(prev)  # a failing capture_end skips the stream context's exit
        _restore_generator_state(rng)
        try:
            graph.reset()
        except Exception:
            pass
        raise RuntimeError(
            f"the step could not be captured into a CUDA graph ({type(e).__name__}: {e}). Inside a captured "
            f"step nothing may synchronise with the host: no .item() / .cpu() / .tolist(), no nonzero or "
            f"boolean-mask indexing (x[mask]), no Python branch on a tensor's value, no GradScaler, no "
            f"collective (DDP)") from e
    if not _outputs_are_tensors(out):
        graph.reset()
        raise TypeError(f"a captured step must return tensors (or a tuple / list of them), got {type(out).__name__}")
    return graph, out


def _saved_generator_state():
    """The current device's default CUDA generator and a clone of its state, taken before a capture.

    ``torch.cuda.graph`` puts that generator in capture mode and takes it out in ``capture_end``; a
    capture that fails there (a host read inside the step invalidates it) leaves it in capture mode,
    and every later random draw on the device raises "Offset increment outside graph capture
    encountered unexpectedly": an eager fall-back with dropout or drop-path, the next model's
    initialisation. (None, None) where this torch has no graph-safe generator states."""
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    try:
        return gen, gen.clone_state()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None, None


def _restore_generator_state(saved) -> None:
    """Put the generator back as it was before the failed capture (nothing of the capture ran, so its
    offset is the one saved)."""
    gen, state = saved
    if gen is not None:
        gen.graphsafe_set_state(state)
