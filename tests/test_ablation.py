"""The ablation's aggregation, table and chart (the full command runs in test_cli's demo test)."""

import json

import pytest

from train.ablation import aggregate, bar_chart, results_table
from train.config import AblationConfig, load_config
from train.errors import ConfigError


def _fake_eval(root, seed, variant, greedy, sc, asc):
    d = root / f"seed{seed}" / "eval" / variant
    d.mkdir(parents=True)
    metrics = {"questions": 10, "greedy": greedy, "sc": sc, "asc_score": asc, "pass_at_n": 50.0, "seconds": 1.0,
               "world_size": 1}
    (d / "DONE.json").write_text(json.dumps({"metrics": metrics}))


def test_mean_and_std_over_seeds_table_and_chart(tmp_path):
    _fake_eval(tmp_path, 0, "sft-pos", 10.0, 20.0, 30.0)
    _fake_eval(tmp_path, 1, "sft-pos", 20.0, 20.0, 10.0)
    _fake_eval(tmp_path, 0, "nat+nce", 30.0, 40.0, 50.0)
    _fake_eval(tmp_path, 1, "nat+nce", 30.0, 50.0, 50.0)
    results = aggregate(tmp_path, [0, 1], ["sft-pos", "nat+nce"])
    assert results["sft-pos"]["greedy"] == {"values": [10.0, 20.0], "mean": 15.0, "std": 5.0}
    assert results["nat+nce"]["sc"]["mean"] == 45.0 and "questions" not in results["nat+nce"]
    table = results_table(results, 8, True, 2, 1.5)
    assert "| variant | greedy | SC@8 | ASC@8 | pass@8 |" in table
    assert "| sft-pos | 15.0 ± 5.0 | 20.0 ± 0.0 | 20.0 ± 10.0 | 50.0 ± 0.0 |" in table
    assert "2 seed(s)" in table
    bar_chart(results, tmp_path / "chart.png", True)
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_variant_and_missing_paths_are_config_errors():
    with pytest.raises(ConfigError, match="ablation.variants"):
        load_config(AblationConfig, None, ["ablation.variants=[sft-pos,magic]", "ablation.base_model=b",
                                           "ablation.data=d", "ablation.test=t", "engine.output_dir=o"])
    with pytest.raises(ConfigError, match="base_model, data and test"):
        load_config(AblationConfig, None, ["engine.output_dir=o"])
