"""`denoiselab review --studies`: per-arm reduction (mean ± sample std over seeds) and the claims'
verdicts (difference of means against Z standard errors), on hand-made runs; the report files."""
from __future__ import annotations

import json
import math

import pytest

from orchestrator.review.arms import ArmRun, Claim, Z, format_arms, judge, load_claims, summarize, write_report
from trainers.errors import UserError


def _runs(arm: str, fds: list[float], study: str = "s") -> list[ArmRun]:
    return [ArmRun(study, arm, seed, f"{arm}-{seed}", f"id-{arm}-{seed}",
                   {"fd_digits": fd, "interval_loss_0": 0.1 * (seed + 1), "wall_s": 10.0})
            for seed, fd in enumerate(fds)]


def test_arms_reduce_to_mean_and_sample_std_in_first_seen_order():
    summaries = summarize(_runs("b", [10.0, 12.0, 14.0]) + _runs("a", [20.0]))
    assert [(s.arm, s.n) for s in summaries] == [("b", 3), ("a", 1)]
    b, a = summaries
    assert b.mean["fd_digits"] == pytest.approx(12.0) and b.std["fd_digits"] == pytest.approx(2.0)
    assert b.mean["interval_loss_0"] == pytest.approx(0.2) and a.std["fd_digits"] == 0.0
    table = format_arms(summaries)
    assert "| s | b | 3 | 12.00 ± 2.00 |" in table and "0.2 ± 0.1" in table


@pytest.mark.parametrize("method, control, better, verdict", [
    ([10.0, 11.0, 12.0], [20.0, 21.0, 22.0], "lower", "agrees"),
    ([20.0, 21.0, 22.0], [10.0, 11.0, 12.0], "lower", "does not"),
    ([20.0, 21.0, 22.0], [10.0, 11.0, 12.0], "higher", "agrees"),
    ([10.0, 14.0, 18.0], [12.0, 16.0, 20.0], "lower", "within noise"),
    ([10.0, 10.0, 10.0], [10.0, 10.0, 10.0], "lower", "within noise"),
])
def test_a_claim_agrees_only_beyond_z_standard_errors(method, control, better, verdict):
    summaries = summarize(_runs("m", method) + _runs("c", control))
    (v,) = judge([Claim("P", "m beats c", "m", "c", better=better)], summaries)
    assert v.verdict == verdict
    assert v.difference == pytest.approx(sum(method) / 3 - sum(control) / 3)
    sd = lambda xs: math.sqrt(sum((x - sum(xs) / 3) ** 2 for x in xs) / 2)          # noqa: E731
    assert v.se == pytest.approx(math.sqrt(sd(method) ** 2 / 3 + sd(control) ** 2 / 3))
    if verdict != "within noise":
        assert abs(v.difference) > Z * v.se


def test_an_arm_that_was_not_run_is_not_measured_and_bad_claims_fail_with_one_line(tmp_path):
    (v,) = judge([Claim("P", "x beats c", "x", "c")], summarize(_runs("c", [1.0, 2.0])))
    assert v.verdict == "not measured" and v.difference is None
    (v,) = judge([Claim("P", "x beats c", "x", "c")], summarize(_runs("c", [1.0, 2.0]) + _runs("x", [0.5])))
    assert v.verdict == "too few seeds"
    path = tmp_path / "claims.yaml"
    path.write_text("claims:\n  - {paper: P, says: s, arm: a, than: b, better: smaller}\n")
    with pytest.raises(UserError, match=r"claims: better: 'smaller' must be lower or higher"):
        load_claims(str(path))
    path.write_text("claims: []\n")
    with pytest.raises(UserError, match=r"expected `claims:` with a list"):
        load_claims(str(path))


def test_the_report_writes_tables_json_and_plots(tmp_path):
    runs = _runs("m", [10.0, 11.0]) + _runs("c", [20.0, 22.0], study="t")
    summaries = summarize(runs)
    verdicts = judge([Claim("P", "m beats c", "m", "c")], summaries)
    paths = write_report(str(tmp_path / "r"), runs, summaries, verdicts)
    text = paths["markdown"].read_text()
    assert "| P | m beats c | fd_digits |" in text and "Seed-to-seed spread of FD" in text
    body = json.loads(paths["json"].read_text())
    assert len(body["runs"]) == 4 and body["verdicts"][0]["verdict"] in ("agrees", "within noise")
    for key in ("arms_eval", "arms_interval_loss"):
        assert paths[key].stat().st_size > 5000
