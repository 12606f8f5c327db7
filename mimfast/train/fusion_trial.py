"""Choose the block form by timing the first training steps: :class:`FusionTrial`.

A model's blocks run two ways with the same parameters and results (:mod:`mimfast.nn.blocks`):
the residual adds fused into the LayerNorms after them (fewer passes over the activations, more
launches through Python) or as timm runs them. Which is faster depends on the GPU, the host and
the shapes: on the first H200 run the MAE ViT-B/16 step was faster unfused, on the second (after
the launches skipped the dispatcher) fused, as BEiT-B's was in both. The models default to what the
latest run measured; a training run can instead time a few of its own steps
each way and keep the faster (``mimfast pretrain --fusion-trial-steps N``, on by default where the
kernels run on Triton). The steps of the trial are ordinary training steps: the two forms compute
the same loss and gradients up to rounding.

The trial: ``warmup`` steps in the model's own form and one in the other, untimed (kernels
compile, launchers choose their tilings), then ``steps`` timed steps in each form, then the median
times compared; the other form is kept only if it is faster by more than ``margin``. With several processes the
times are averaged over them first (``mean``), so every rank keeps the same form.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Callable

__all__ = ["FusionTrial"]


class FusionTrial:
    """Times training steps in both block forms and keeps the faster.

    Args:
        model: a model with ``fused_norm`` and ``set_kernels`` (the MAE and BEiT models).
        steps: timed steps in each form (> 0).
        warmup: steps before the first timed one.
        margin: the other form must be faster by more than this fraction.
        mean: averages a float over the processes of the run (identity in one process).

    Call :meth:`before_step` before each training step and :meth:`after_step` with its duration
    (synchronised, data loading excluded) after it; :attr:`decided` tells when it is over.
    """

    def __init__(self, model, steps: int, warmup: int = 2, margin: float = 0.02,
                 mean: Callable[[float], float] = float) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if warmup < 0 or margin < 0:
            raise ValueError(f"warmup and margin must be >= 0, got {warmup}, {margin}")
        self.model = model
        self.steps, self.warmup, self.margin, self.mean = int(steps), int(warmup), float(margin), mean
        self.start = bool(model.fused_norm)
        other = not self.start
        # (form, timed) of each step of the trial
        self.schedule = ([(self.start, False)] * self.warmup + [(other, False)] + [(self.start, True)] * self.steps
                         + [(other, True)] * self.steps)
        self.times: dict[bool, list[float]] = {self.start: [], other: []}
        self.calls = 0
        self.decided = False
        self.choice = self.start

    def before_step(self) -> None:
        """Put the model in the form of the next step."""
        if not self.decided:
            self._set(self.schedule[self.calls][0])

    def after_step(self, seconds: float) -> str | None:
        """Record the step just run; returns a line saying the decision once it is made."""
        if self.decided:
            return None
        form, timed = self.schedule[self.calls]
        self.calls += 1
        if timed:
            self.times[form].append(self.mean(float(seconds)))
        if self.calls < len(self.schedule):
            return None
        mine, other = (statistics.median(self.times[f]) for f in (self.start, not self.start))
        self.choice = (not self.start) if other < mine * (1.0 - self.margin) else self.start
        self.decided = True
        self._set(self.choice)

        def name(fused):
            return "fused" if fused else "unfused"

        return (f"block form: {name(self.choice)} (median step {1e3 * min(mine, other):.1f} ms; "
                f"{name(self.start)} {1e3 * mine:.1f} ms, {name(not self.start)} {1e3 * other:.1f} ms "
                f"over {self.steps} steps each)")

    @contextlib.contextmanager
    def guard(self):
        """Around a step: an error raised while the trial runs the form the model was not built
        with says so, and how to train without the trial (the model's own form is unaffected)."""
        other = not self.decided and self.calls < len(self.schedule) and self.schedule[self.calls][0] != self.start
        try:
            yield
        except Exception as e:
            if not other:
                raise
            form = "fused" if not self.start else "unfused"
            raise RuntimeError(f"the block-form trial's step with the blocks {form} failed ({type(e).__name__}: "
                               f"{e}); train in the model's own form with --fusion-trial-steps 0 (or choose one "
                               f"with --fused-norm / --no-fused-norm)") from e

    def _set(self, fused: bool) -> None:
        if bool(self.model.fused_norm) != fused:
            self.model.set_kernels(self.model.kernels, fused_norm=fused)
