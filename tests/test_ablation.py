"""The ablation's aggregation, table and chart (the full command runs in test_cli's demo test)."""

import json
import math

import pytest

from train.ablation import aggregate, bar_chart, results_table
from train.config import AblationConfig, load_config
from train.errors import ConfigError


def _fake_eval(root, seed, variant, right: int, questions: int = 40):
    """predictions.jsonl of an eval whose first `right` questions are answered right (greedy, SC, ASC)."""
    d = root / f"seed{seed}" / "eval" / variant
    d.mkdir(parents=True)
    lines = [{"qid": f"q{i:02d}", "greedy": {"correct": i < right},
              "votes": {"sc": float(i < right), "asc_score": float(i < right), "pass_at_n": True},
              "samples": [{"finished": True}, {"finished": True}, {"finished": True}, {"finished": False}]}
             for i in range(questions)]
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_seeds_and_questions_pooled_with_bootstrap_cis_and_paired_differences(tmp_path):
    for seed in (0, 1):
        _fake_eval(tmp_path, seed, "sft-pos", 20)  # 50%
    _fake_eval(tmp_path, 0, "dpo", 24)  # 60%: 4 more questions right than sft-pos
    _fake_eval(tmp_path, 1, "dpo", 22)  # 55%
    results = aggregate(tmp_path, [0, 1], ["sft-pos", "dpo"])
    dpo = results["dpo"]["greedy"]
    assert dpo["values"] == [60.0, 55.0] and dpo["mean"] == 57.5
    assert dpo["std"] == pytest.approx(5 / math.sqrt(2))  # the sample std (n - 1) of the two seeds
    assert dpo["questions"] == 40 and dpo["seeds"] == 2 and dpo["ci"][0] < 57.5 < dpo["ci"][1]
    # the hierarchical CI also resamples the seeds, so it is at least as wide as the CI over questions alone
    width = dpo["ci"][1] - dpo["ci"][0]
    assert width >= dpo["ci_questions"][1] - dpo["ci_questions"][0]
    # paired: only 2-4 questions differ per seed, so the difference is known more tightly than either accuracy,
    # but the seeds' differences (10 and 5 points) stay in its CI
    diff = dpo["diff"]
    assert diff["mean"] == 7.5 and 0 <= diff["ci"][0] < 7.5 < diff["ci"][1] <= 20
    assert diff["ci"][1] - diff["ci"][0] < width
    assert "diff" not in results["sft-pos"]["greedy"] and results["sft-pos"]["sc"]["mean"] == 50.0
    assert results["dpo"]["unfinished"]["mean"] == 25.0 and "diff" not in results["dpo"]["unfinished"]
    table = results_table(results, 8, True, 2, 1.5)
    assert ("| variant | greedy | Δ greedy vs sft-pos | SC@8 | Δ SC@8 vs sft-pos | ASC@8 | Δ ASC@8 vs sft-pos "
            "| pass@8 | unfinished % |") in table
    assert f"| dpo | 57.5 [{dpo['ci'][0]:.1f}, {dpo['ci'][1]:.1f}] | +7.5 [" in table
    assert "40 test questions x 2 seed(s)" in table and "hierarchical bootstrap" in table
    assert table.splitlines()[-1].endswith("| 25.0 |")
    bar_chart(results, tmp_path / "chart.png", True)
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_hierarchical_ci_covers_the_mean_when_seeds_vary_and_the_question_ci_does_not():
    """Training seeds shift accuracy by a few points (as another machine does): a CI over questions alone
    misses that spread; resampling seeds, then questions, keeps the stated coverage."""
    import numpy as np

    from train.stats import bootstrap_ci, hierarchical_bootstrap_ci

    rng = np.random.default_rng(1)
    hierarchical = questions_only = 0
    for k in range(200):
        p = rng.uniform(0.2, 0.9, 500)  # each question's chance of being right
        shifts = rng.normal(0, 0.03, 3)  # 3 seeds, each 3 points up or down on every question
        x = 100 * (rng.random((3, 500)) < np.clip(p + shifts[:, None], 0, 1))
        lo, hi = hierarchical_bootstrap_ci(x, 500, seed=k)
        hierarchical += lo <= 100 * p.mean() <= hi
        lo, hi = bootstrap_ci(x.mean(0), 500, seed=k)
        questions_only += lo <= 100 * p.mean() <= hi
    assert hierarchical >= 180  # 95% nominal (measured 194 of 200)
    assert questions_only <= hierarchical - 15  # measured 166: the seeds' spread is missing


def test_bootstrap_ci_covers_the_true_rate_at_the_stated_level():
    import numpy as np

    from train.stats import bootstrap_ci

    rng = np.random.default_rng(1)
    covered = sum(lo <= 30 <= hi for lo, hi in (bootstrap_ci(100 * (rng.random(700) < 0.3), 500, seed=k)
                                                for k in range(200)))
    assert 180 <= covered <= 198  # 95% nominal over 200 draws of 700 questions


def test_unknown_variant_and_missing_paths_are_config_errors():
    with pytest.raises(ConfigError, match="ablation.variants"):
        load_config(AblationConfig, None, ["ablation.variants=[sft-pos,magic]", "ablation.base_model=b",
                                           "ablation.data=d", "ablation.test=t", "engine.output_dir=o"])
    with pytest.raises(ConfigError, match="base_model, data and test"):
        load_config(AblationConfig, None, ["engine.output_dir=o"])
