"""``denoiselab review --studies S [S ...]``: the trials of comparison studies grouped by arm.

A comparison study (``arms:`` plus the ``arm`` and ``seed`` spaces, ``search.spaces``) tags each
trial's MLflow run ``search.arm`` and ``search.seed``. This module reads those runs back from any
MLflow store and reduces them per arm to mean ± sample standard deviation over seeds: the final
evaluation metrics (``fd_<set>``, ``precision_<set>``, ``recall_<set>``), the per-interval training
loss (``interval/loss_k``, averaged over the last ``TAIL`` logged points of each run, since a
single step's interval losses rest on batch/K samples), the wall time of the run and its
training cost (forward FLOPs per image × 3 for forward + backward × steps × batch, from the
``cost.flops`` param every run logs).

A *claim* (``claims.yaml``) says that one arm beats another on a metric. Its verdict compares the
difference of the arm means with its standard error, ``se = sqrt(s_a²/n_a + s_b²/n_b)``:
``agrees`` when the difference lies in the claimed direction by more than ``Z`` standard errors,
``does not`` when it lies in the other direction by more than that, ``within noise`` otherwise.
With three seeds this is a coarse test, and the table says so; with one seed there is no noise
estimate and the verdict is ``too few seeds``.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from orchestrator.infra.tracking import RUN_NAME_TAG, STUDY_TAG
from trainers.errors import UserError

__all__ = ["ArmRun", "ArmSummary", "Claim", "Verdict", "collect_arm_runs", "summarize", "load_claims", "judge",
           "format_arms", "format_verdicts", "write_report", "study_parent", "TAIL", "Z"]

TAIL = 5                # logged points of interval/loss_k averaged per run
Z = 2.0                 # standard errors a difference must exceed to count


@dataclass
class ArmRun:
    study: str
    arm: str
    seed: Optional[int]
    run_name: str
    run_id: str
    metrics: dict[str, float]                 # final evaluation metrics, wall_s, cost_tflop, interval_loss_k


@dataclass
class ArmSummary:
    study: str
    arm: str
    n: int
    mean: dict[str, float]
    std: dict[str, float]                     # sample std over seeds (0 with one seed)
    runs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    paper: str
    says: str
    arm: str
    than: str
    metric: str = "fd_digits"
    better: str = "lower"                     # lower | higher

    def __post_init__(self) -> None:
        if self.better not in ("lower", "higher"):
            raise UserError(f"claims: better: {self.better!r} must be lower or higher ({self.says})")


@dataclass
class Verdict:
    claim: Claim
    verdict: str                              # agrees | does not | within noise | not measured | too few seeds
    difference: Optional[float] = None        # mean(arm) - mean(than)
    se: Optional[float] = None


# --------------------------------------------------------------------------------------------
# Reading the runs
# --------------------------------------------------------------------------------------------

def study_parent(client, study: str):
    """The newest parent run of study ``study`` in any experiment of the store."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{STUDY_TAG}` = '{study}'", max_results=5,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise UserError(f"--studies: no study {study!r} in this MLflow store; run `denoiselab search` first, or "
                        f"pass --tracking-uri (the store the study logged to)")
    return runs[0]


def _interval_tail(client, run) -> dict[str, float]:
    out = {}
    for key in run.data.metrics:
        if key.startswith("interval/loss_"):
            points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            tail = [v for _, v in points[-TAIL:] if math.isfinite(v)]
            if tail:
                out[f"interval_loss_{key.rsplit('_', 1)[1]}"] = statistics.fmean(tail)
    return out


def _cost_tflop(params: dict) -> Optional[float]:
    try:
        flops, steps, batch = float(params["cost.flops"]), int(params["train.steps"]), int(params["train.batch_size"])
    except (KeyError, ValueError):
        return None
    return 3.0 * flops * steps * batch / 1e12


def _set_cost_tflop(client, run) -> Optional[float]:
    """A MEME set's training cost: the sum over its experts (child runs of the set's run)."""
    experts = client.search_runs([run.info.experiment_id],
                                 filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=100)
    costs = [_cost_tflop(e.data.params) for e in experts]
    return sum(costs) if costs and None not in costs else None


def _arm_run(client, study: str, run) -> ArmRun:
    from orchestrator.jobs.evaluation import is_eval_metric
    tags, params = run.data.tags, run.data.params
    metrics = {k: v for k, v in run.data.metrics.items() if is_eval_metric(k)}
    metrics.update(_interval_tail(client, run))
    if run.info.end_time and run.info.start_time:
        metrics["wall_s"] = (run.info.end_time - run.info.start_time) / 1000.0
    cost = _set_cost_tflop(client, run) if tags.get("denoiselab.kind") == "expert_set" else _cost_tflop(params)
    if cost is not None:
        metrics["cost_tflop"] = cost
    seed = tags.get("search.seed")
    return ArmRun(study, tags["search.arm"], int(seed) if seed and seed.lstrip("-").isdigit() else None,
                  tags.get(RUN_NAME_TAG, run.info.run_name), run.info.run_id, metrics)


def _arm_order(client, parent) -> list[str]:
    """The arms in the order the study file defines them (its ``study.yaml`` on the parent run)."""
    import tempfile
    import yaml
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent.info.run_id, "study.yaml", tmp)
            with open(path) as fh:
                return list((yaml.safe_load(fh) or {}).get("arms") or {})
    except Exception:  # noqa: BLE001 - no study file (an older study): trial order instead
        return []


def collect_arm_runs(client, parents: dict) -> list[ArmRun]:
    """Every finished, arm-tagged child run of the studies (name -> parent run, see
    `study_parent`), in study order, then arm order (as the study defines its arms), then seed."""
    out: list[ArmRun] = []
    for study, parent in parents.items():
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                      max_results=10000)
        armed = [r for r in children if "search.arm" in r.data.tags and r.info.status == "FINISHED"]
        if not armed:
            raise UserError(f"--studies: study {study!r} has no finished runs tagged search.arm; it is not a "
                            f"comparison study (arms: + space arm) or it has not finished")
        order = _arm_order(client, parent)
        armed.sort(key=lambda r: (order.index(r.data.tags["search.arm"]) if r.data.tags["search.arm"] in order
                                  else len(order), r.data.tags.get("search.seed", ""), r.info.start_time))
        out += [_arm_run(client, study, r) for r in armed]
    return out


# --------------------------------------------------------------------------------------------
# Reducing and judging
# --------------------------------------------------------------------------------------------

def summarize(runs: list[ArmRun]) -> list[ArmSummary]:
    """Mean ± sample std per (study, arm), arms in first-seen order."""
    groups: dict[tuple[str, str], list[ArmRun]] = {}
    for run in runs:
        groups.setdefault((run.study, run.arm), []).append(run)
    out = []
    for (study, arm), members in groups.items():
        keys = sorted({k for m in members for k in m.metrics})
        mean, std = {}, {}
        for key in keys:
            values = [m.metrics[key] for m in members if key in m.metrics and math.isfinite(m.metrics[key])]
            if values:
                mean[key] = statistics.fmean(values)
                std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(ArmSummary(study, arm, len(members), mean, std, sorted(m.run_name for m in members)))
    return out


def load_claims(path: str) -> list[Claim]:
    from orchestrator.infra.config_io import read_yaml
    from trainers.configlib import from_dict
    data = read_yaml(path)
    items = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected `claims:` with a list of {{paper, says, arm, than, metric, better}}")
    return [from_dict(Claim, item) for item in items]


def judge(claims: list[Claim], summaries: list[ArmSummary], z: float = Z) -> list[Verdict]:
    by_arm = {s.arm: s for s in summaries}
    out = []
    for claim in claims:
        a, b = by_arm.get(claim.arm), by_arm.get(claim.than)
        if a is None or b is None or claim.metric not in a.mean or claim.metric not in b.mean:
            out.append(Verdict(claim, "not measured"))
            continue
        if a.n < 2 or b.n < 2:
            out.append(Verdict(claim, "too few seeds"))                 # no spread, no noise estimate
            continue
        diff = a.mean[claim.metric] - b.mean[claim.metric]
        se = math.sqrt(a.std[claim.metric] ** 2 / a.n + b.std[claim.metric] ** 2 / b.n)
        gain = -diff if claim.better == "lower" else diff
        if abs(diff) <= z * se or diff == 0:
            verdict = "within noise"
        else:
            verdict = "agrees" if gain > 0 else "does not"
        out.append(Verdict(claim, verdict, diff, se))
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _pm(summary: ArmSummary, key: str, spec: str = ".2f") -> str:
    if key not in summary.mean:
        return "-"
    return f"{summary.mean[key]:{spec}} ± {summary.std[key]:{spec}}"


def _eval_keys(summaries: list[ArmSummary]) -> list[str]:
    keys = {k for s in summaries for k in s.mean if k.startswith(("fd_", "fid", "precision_", "recall_"))}
    order = {"fd": 0, "fid": 0, "precision": 1, "recall": 2}
    return sorted(keys, key=lambda k: (order.get(k.split("_")[0], 3), k))


def format_arms(summaries: list[ArmSummary]) -> str:
    """A Markdown table: one row per arm, mean ± std over seeds."""
    keys = _eval_keys(summaries)
    head = ["study", "arm", "seeds", *keys, "interval loss (first / last)", "wall s", "train TFLOP"]
    rows = []
    for s in summaries:
        intervals = sorted((k for k in s.mean if k.startswith("interval_loss_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        iv = f"{_pm(s, intervals[0], '.3g')} / {_pm(s, intervals[-1], '.3g')}" if intervals else "-"
        rows.append([s.study, s.arm, str(s.n), *(_pm(s, k, ".3f" if not k.startswith("fd") else ".2f") for k in keys),
                     iv, _pm(s, "wall_s", ".0f"), _pm(s, "cost_tflop", ".3g")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_verdicts(verdicts: list[Verdict]) -> str:
    head = ["paper", "claim", "metric", "difference (arm - control)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in verdicts:
        diff = "-" if v.difference is None else f"{v.difference:+.2f} ± {v.se:.2f} (se)"
        lines.append(f"| {v.claim.paper} | {v.claim.says} | {v.claim.metric} | {diff} | {v.verdict} |")
    return "\n".join(lines)


def write_report(out_dir: str, runs: list[ArmRun], summaries: list[ArmSummary],
                 verdicts: list[Verdict]) -> dict[str, Path]:
    """``arms.md`` (both tables), ``arms.json`` (every run and summary) and the plots."""
    from orchestrator.review.arm_plots import arm_bars, arm_interval_losses
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "arms.md", "json": out / "arms.json"}
    spread = [s.std[k] for s in summaries for k in s.std if k.startswith("fd_") and s.n > 1]
    text = ["# Arms: mean ± std over seeds\n", format_arms(summaries), ""]
    if spread:
        text.append(f"Seed-to-seed spread of FD (std per arm): median {statistics.median(spread):.2f}, "
                    f"max {max(spread):.2f}.\n")
    if verdicts:
        text += ["# Claims\n", f"A verdict needs |difference| > {Z:g} standard errors of the difference "
                 f"(about a 95 % two-sided test, coarse with few seeds).\n", format_verdicts(verdicts), ""]
    paths["markdown"].write_text("\n".join(text))
    body = {"runs": [asdict(r) for r in runs], "arms": [asdict(s) for s in summaries],
            "verdicts": [{**asdict(v.claim), "verdict": v.verdict, "difference": v.difference, "se": v.se}
                         for v in verdicts]}
    paths["json"].write_text(json.dumps(body, indent=1))
    for name, fig in (("arms_eval", arm_bars(summaries, _eval_keys(summaries))),
                      ("arms_interval_loss", arm_interval_losses(summaries))):
        if fig is not None:
            paths[name] = out / f"{name}.png"
            fig.savefig(paths[name], dpi=110)
    return paths

