"""What a sweep shows on the console: one live view of its trials, with Ray's and Tune's own output in a file.

``SweepView`` holds the state of every trial (status, step, patches seen, objective, gain over bicubic) and
draws it: on a terminal as one table redrawn in place, elsewhere (a pipe, a Ray job's log) as plain lines
at trial events plus a progress line every ``interval_s``. It knows nothing of Ray: ``sweep.driver`` feeds it
from a Tune callback, and tests feed it by hand. ``ray_output_to`` sends everything else the process and
Ray's log forwarding write to stdout/stderr (file descriptors 1 and 2, so C++ logs too) into a log file,
while the view keeps a handle on the real console.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sr_tune.credentials import redacted_command
from sr_tune.results import TrialProgress
from sr_tune.study import Study

# Short names for run names and table columns; other keys show their last part.
SHORT_NAMES = {
    "optimizer.lr": "lr",
    "optimizer.weight_decay": "wd",
    "optimizer.momentum": "mom",
    "optimizer.ema_decay": "ema",
    "optimizer.grad_clip_norm": "clip",
    "optimizer.discriminator_lr": "d_lr",
    "optimizer.name": "opt",
    "data.batch_size": "bs",
    "data.augment_strength": "aug",
    "data.lr_patch_size": "patch",
    "loss.pixel_weight": "w_pix",
    "loss.perceptual_weight": "w_vgg",
    "loss.adversarial_weight": "w_adv",
}


def short_name(key: str) -> str:
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    """2.1e-3 for small and large floats, 0.25 for the rest; ints and names as they are."""
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e3:
            mantissa, exponent = f"{value:.1e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.3g}"
    return str(value)


def trial_label(name: str, params: dict[str, Any]) -> str:
    """A trial's name (``t03``) with its searched values, as its MLflow run is called: ``t03 lr=2.1e-3 bs=16``."""
    return " ".join([name, *(f"{short_name(k)}={format_value(v)}" for k, v in params.items())])


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class TrialState:
    name: str  # t03
    params: dict[str, Any]
    status: str = "pending"  # pending, running, done, stopped, failed
    step: int = 0
    patches: int = 0
    value: float | None = None  # the objective at the last report
    gain: float | None = None  # PSNR over bicubic at the last report
    best: float | None = None  # the trial's best objective so far
    best_gain: float | None = None


@dataclass
class SweepView:
    """The sweep's console: ``started`` / ``reported`` / ``ended`` per trial, ``tick`` between events."""

    study: Study
    out: TextIO
    live: bool  # redraw one table in place (a terminal) instead of printing lines
    interval_s: float = 30.0  # between progress lines when not live
    now: Callable[[], float] = time.monotonic
    trials: dict[str, TrialState] = field(default_factory=dict)  # by Tune trial id, in start order
    _started_at: float = field(init=False)
    _drawn_lines: int = field(default=0, init=False)
    _last_output: float = field(init=False)

    def __post_init__(self) -> None:
        self._started_at = self._last_output = self.now()
        budget = self.study.budget
        self._write(
            f"study {self.study.name}: {self.study.sampler.name} + {self.study.scheduler.name}, "
            f"{budget.num_samples} trial(s) of up to {budget.max_steps} steps, "
            f"{self.study.objective.mode} {self.study.objective.metric}"
        )

    # events -------------------------------------------------------------------------------------------
    def started(self, trial_id: str, name: str, params: dict[str, Any]) -> None:
        state = self.trials.setdefault(trial_id, TrialState(name=name, params=params))
        state.status = "running"
        if not self.live:
            self._write(f"{self._elapsed()} {trial_label(state.name, state.params)} started")
        self._redraw()

    def reported(self, trial_id: str, metrics: dict[str, Any]) -> None:
        state = self.trials.get(trial_id)
        if state is None:
            return
        state.status = "running"
        self._update(state, metrics)
        self._redraw()

    def restored(self, trial_id: str, name: str, params: dict[str, Any], status: str, best: dict[str, Any]) -> None:
        """A trial that ended before this process watched it (a resumed sweep): counted, not announced."""
        if trial_id not in self.trials:
            self.trials[trial_id] = state = TrialState(name=name, params=params, status=status)
            self._update(state, best)

    def _update(self, state: TrialState, metrics: dict[str, Any]) -> None:
        metric, sign = self.study.objective.metric, 1 if self.study.objective.mode == "max" else -1
        progress = TrialProgress.of(metrics)
        state.step, state.patches = progress.step, progress.patches_seen
        state.value, state.gain = metrics.get(metric), metrics.get("psnr_gain")
        if state.value is not None and (state.best is None or sign * state.value > sign * state.best):
            state.best, state.best_gain = state.value, state.gain

    def ended(self, trial_id: str, status: str, error: str | None = None) -> None:
        """``status``: done, stopped or failed (with the error's last line)."""
        state = self.trials.get(trial_id)
        if state is None:
            return
        state.status = status
        line = f"{self._elapsed()} {trial_label(state.name, state.params)} {status} at step {state.step}"
        if state.best is not None:
            line += f": best {self.study.objective.metric} {state.best:.4f}{_gain(state.best_gain)}"
        if error:
            line += f"\n    {error}"
        self.message(line)

    def message(self, text: str) -> None:
        """Lines that stay on the console (warnings, errors, trial ends), above the live table."""
        self._clear()
        self._write(text)
        self._redraw(force=True)

    def tick(self) -> None:
        if self.live:
            self._redraw()
        elif self.now() - self._last_output >= self.interval_s:
            self._write(self.progress_line())

    def close(self) -> None:
        if self.live:
            self._redraw(force=True)
        else:
            self._write(self.progress_line())

    # rendering ----------------------------------------------------------------------------------------
    def progress_line(self) -> str:
        counts: dict[str, int] = {}
        for state in self.trials.values():
            counts[state.status] = counts.get(state.status, 0) + 1
        waiting = self.study.budget.num_samples - len(self.trials)
        if waiting > 0:
            counts["pending"] = counts.get("pending", 0) + waiting
        order = ("running", "done", "stopped", "failed", "pending")
        parts = [", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))]
        best = self._best()
        if best is not None:
            metric = self.study.objective.metric
            parts.append(f"best {best.name} {metric} {best.best:.4f}{_gain(best.best_gain)}")
        running = [s for s in self.trials.values() if s.status == "running" and s.step]
        if running and not self.live:
            parts.append("running " + ", ".join(f"{s.name} step {s.step}" for s in running))
        parts.append(f"elapsed {self._elapsed()}")
        eta = self._eta()
        if eta is not None:
            parts.append(f"ETA <= {clock(eta)}")
        return " | ".join(parts)

    def table(self) -> list[str]:
        metric = self.study.objective.metric
        keys = list(self.study.search)
        trials = list(self.trials.values())
        shown = [{k: format_value(state.params[k]) for k in keys if k in state.params} for state in trials]
        # Each searched column as wide as its name and its longest value (num_blocks, charbonnier), at least 8.
        widths = {k: max(8, len(short_name(k)), *(len(values.get(k, "")) for values in shown)) for k in keys}
        header = f"{'trial':<6}{'status':<9}{'step':>7}{'patches':>10}{metric:>11}{'vs bicubic':>12}  " + "  ".join(
            f"{short_name(k):>{widths[k]}}" for k in keys
        )
        lines = [header]
        for state, values in zip(trials, shown):
            value = f"{state.value:.4f}" if state.value is not None else "-"
            gain = f"{state.gain:+.2f} dB" if state.gain is not None else "-"
            params = "  ".join(f"{values[k]:>{widths[k]}}" for k in keys if k in values)
            lines.append(
                f"{state.name:<6}{state.status:<9}{state.step:>7}{state.patches:>10,}{value:>11}{gain:>12}  {params}"
            )
        return [*lines, self.progress_line()]

    def _best(self) -> TrialState | None:
        scored = [s for s in self.trials.values() if s.best is not None]
        if not scored:
            return None
        sign = 1 if self.study.objective.mode == "max" else -1
        return max(scored, key=lambda s: sign * s.best)

    def _eta(self) -> float | None:
        """Seconds left if every unfinished trial runs its whole budget (early stops only shorten it), at the
        rate the sweep has trained so far."""
        budget = self.study.patches(self.study.budget.max_steps)
        done = sum(s.patches for s in self.trials.values())
        ended = [s for s in self.trials.values() if s.status in ("done", "stopped", "failed")]
        planned = sum(s.patches for s in ended) + budget * (self.study.budget.num_samples - len(ended))
        elapsed = self.now() - self._started_at
        if done <= 0 or elapsed <= 0:
            return None
        return max(planned - done, 0) / (done / elapsed)

    def _elapsed(self) -> str:
        return clock(self.now() - self._started_at)

    def _write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
        self._last_output = self.now()

    def _clear(self) -> None:
        if self._drawn_lines:
            # Cursor to the start of the table's first line, then erase to the end of the screen.
            self.out.write(f"\x1b[{self._drawn_lines}F\x1b[J")
            self._drawn_lines = 0

    def _redraw(self, force: bool = False) -> None:
        if not self.live or not (force or self.now() - self._last_output >= 0.5 or not self._drawn_lines):
            return
        self._clear()
        lines = self.table()
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._drawn_lines, self._last_output = len(lines), self.now()


def _gain(gain: float | None) -> str:
    return f" ({gain:+.2f} dB vs bicubic)" if gain is not None else ""


@contextmanager
def ray_output_to(log_file: Path) -> Iterator[TextIO]:
    """Send whatever this process writes to stdout and stderr (Python, C++ and Ray's forwarded worker logs)
    to ``log_file`` (appended) for the duration; yields a stream on the real console for the view."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:  # never through a link: the log may lie in a shared temp folder (a remote-storage sweep's scratch)
        descriptor = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise FileExistsError(
            f"{log_file}: cannot open the sweep's log ({error.strerror}; a link is refused)"
        ) from None
    console = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(descriptor, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {redacted_command()}\n".encode())
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)
        console.close()
