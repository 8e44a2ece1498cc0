"""Which hyperparameters mattered: Optuna's fANOVA importance over a finished sweep's trials.

Each trial that reported the objective is one observation (its searched values, its best objective), put into
an in-memory Optuna study through Optuna's public API; fANOVA (a random forest's functional ANOVA) splits the
objective's variance among the searched keys. Trials an early-stopping scheduler cut short count with the
best value they reached, so a key that decides how fast a trial learns weighs in too; the summary says how
many there were. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sr_tune.study import Study
from sr_tune.summary import TrialSummary

MIN_TRIALS = 4  # below this a forest over the trials says nothing


@dataclass(frozen=True)
class Importance:
    shares: dict[str, float]  # searched key -> its share of the objective's variance, largest first; sum 1
    trials: int  # the trials it is computed over
    stopped_early: int  # of them, cut short by the scheduler

    def line(self, metric: str) -> str:
        stopped = f", {self.stopped_early} stopped early" if self.stopped_early else ""
        shares = ", ".join(f"{key} {share:.0%}" for key, share in self.shares.items())
        return f"what mattered for {metric} (fANOVA over {self.trials} trials{stopped}): {shares}"

    def csv(self) -> str:
        return "parameter,importance\n" + "".join(f"{key},{share:.6f}\n" for key, share in self.shares.items())

    def markdown(self, metric: str) -> str:
        stopped = f"; {self.stopped_early} of them stopped early" if self.stopped_early else ""
        rows = "".join(f"| `{key}` | {share:.0%} |\n" for key, share in self.shares.items())
        return (
            f"### What mattered for `{metric}`\n\n"
            f"fANOVA importance over {self.trials} trials{stopped}: each key's share of the objective's variance.\n\n"
            f"| parameter | importance |\n|---|---|\n{rows}"
        )


def importance(study: Study, summaries: list[TrialSummary]) -> Importance | None:
    """The searched keys' importance for the objective; None with one key, fewer than ``MIN_TRIALS`` trials
    that reported it, or an objective that never varied."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    metric = study.objective.metric
    scored = [s for s in summaries if metric in s.best and s.error is None]
    if len(study.search) < 2 or len(scored) < MIN_TRIALS or len({s.best[metric] for s in scored}) < 2:
        return None
    distributions = {
        key: dist.optuna(() if dist.type == "choice" else tuple(s.params[key] for s in scored))
        for key, dist in study.search.items()
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory", on the console
    try:
        record = optuna.create_study(direction="maximize" if study.objective.mode == "max" else "minimize")
        for summary in scored:
            record.add_trial(
                optuna.trial.create_trial(
                    params={key: summary.params[key] for key in study.search},
                    distributions=distributions,
                    value=float(summary.best[metric]),
                )
            )
        shares = optuna.importance.get_param_importances(record, evaluator=FanovaImportanceEvaluator(seed=0))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return Importance(dict(shares), len(scored), sum(s.stopped_early for s in scored))
