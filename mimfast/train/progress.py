"""A one-line progress display: step, loss, lr, images/s, data time vs step time, ETA."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Redraws one line on a terminal; prints a line every ``every`` steps otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0, every: int = 10, stream=None, enabled=True):
        self.total = total_steps
        self.start_step = start_step
        self.every = max(1, every)
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.t0 = time.time()

    def update(self, step: int, **fields) -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = step - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        width = 20
        filled = int(width * step / max(1, self.total))
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total}"]
        for k, v in fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"eta {_fmt_time(eta)}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
