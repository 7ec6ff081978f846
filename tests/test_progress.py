"""Progress output: tqdm's meter as plain lines when stderr is a file (Slurm logs)."""

import io

from train.progress import LineProgress, progress


def _run(interval: float, steps: int = 5) -> list[str]:
    out = io.StringIO()
    bar = LineProgress(steps, "neg", "step", interval=interval, file=out)
    for i in range(steps):
        bar.set_postfix(loss=f"{1.0 / (i + 1):.4f}")
        bar.update(1)
    bar.close()
    return out.getvalue().splitlines()


def test_lines_are_throttled_but_the_first_and_last_always_appear():
    lines = _run(interval=3600)
    assert len(lines) == 2
    assert "1/5" in lines[0] and "loss=1.0000" in lines[0]
    assert "5/5" in lines[1] and "100%" in lines[1] and "loss=0.2000" in lines[1]


def test_every_update_is_a_line_when_the_interval_is_zero_and_close_adds_none():
    lines = _run(interval=0)
    assert [f"{i}/5" in line for i, line in enumerate(lines, 1)] == [True] * 5


def test_a_resumed_bar_counts_from_where_it_resumed():
    out = io.StringIO()
    bar = LineProgress(10, "nat", "step", initial=7, interval=0, file=out)
    bar.update(1)
    assert "8/10" in out.getvalue()


def test_disabled_progress_prints_nothing(capsys):
    bar = progress(5, "neg", "step", enabled=False)
    bar.update(5)
    bar.close()
    assert capsys.readouterr() == ("", "")
