"""Progress without a terminal (SLURM logs): one line per logged step, with an ETA."""

from __future__ import annotations

import io
import re

from qtrain.train.progress import Progress, format_eta


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_tty_each_logged_step_is_one_line_with_an_eta():
    stream = io.StringIO()
    progress = Progress(total=10, initial=0, enabled=True, stream=stream)
    progress._times = [2.0, 2.0, 4.0]  # three steps timed: median 2 s
    progress.done = 3
    progress.line({"step": 3, "loss": 1.23456, "lr": 1e-3})
    progress.line({"step": 4, "loss": 1.0, "lr": 1e-3, "skipped": "nonfinite"})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train: step 3/10 (30%) loss 1.2346 lr 1.00e-03 eta 0:00:14"
    assert lines[1].endswith("(skipped: nonfinite)")


def test_on_a_tty_the_bar_shows_the_remaining_time_and_no_lines():
    stream = Tty()
    progress = Progress(total=5, initial=1, enabled=True, stream=stream)
    progress.update(1.0, 1e-3)
    progress.line({"step": 2, "loss": 1.0, "lr": 1e-3})
    progress.close()
    text = stream.getvalue()
    assert "train:" in text and "2/5" in text
    assert re.search(r"<\d\d:\d\d", text)  # tqdm's remaining-time field
    assert "train: step" not in text


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    progress = Progress(total=5, initial=0, enabled=False, stream=stream)
    progress.update(1.0, 1e-3)
    progress.line({"step": 1, "loss": 1.0, "lr": 1e-3})
    progress.close()
    assert stream.getvalue() == ""
    assert format_eta(3725.4) == "1:02:05"
