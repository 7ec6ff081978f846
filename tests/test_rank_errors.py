"""Failure markers of multi-rank runs: one per launch, swept away once stale, never piling up in /tmp."""

from __future__ import annotations

import os
import tempfile
import time

from train.engine import rank_errors


def test_a_new_marker_sweeps_stale_ones_and_keeps_recent_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    stale, recent, other = (tmp_path / "tdg-failed-0000", tmp_path / "tdg-reported-1111", tmp_path / "tdg-other")
    for f in (stale, recent, other):
        f.touch()
    old = time.time() - rank_errors.STALE_SECONDS - 60
    for f in (stale, other):
        os.utime(f, (old, old))
    assert rank_errors.first_to_report("error: x") is True
    assert rank_errors.first_to_report("error: x") is False  # the same launch reports one message once
    left = {f.name for f in tmp_path.iterdir()}
    assert stale.name not in left and {recent.name, other.name} <= left
    assert sum(name.startswith("tdg-failed-") for name in left) == 1  # this launch's own marker
    assert sum(name.startswith("tdg-reported-") for name in left) == 2
