"""Which hyperparameters mattered: Optuna's fANOVA importance over a finished sweep's trials.

Each trial that reported the objective is one observation (its searched values, its best objective), put into
an in-memory Optuna study through Optuna's public API; fANOVA (a random forest's functional ANOVA) splits the
objective's variance among the searched keys. Trials are compared at equal data: each one's best value up to
the patches every trial reached (with ASHA, the first rung), since a trial the scheduler stopped early would
otherwise look worse for its shorter training rather than for its values. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

from sr_tune.study import Study
from sr_tune.summary import TrialRecord

MIN_TRIALS = 4  # below this a forest over the trials says nothing


@dataclass(frozen=True)
class Importance:
    shares: dict[str, float]  # searched key -> its share of the objective's variance, largest first; sum 1
    trials: int  # the trials it is computed over
    patches: int  # each trial's best value up to this many patches: as far as every trial got

    def line(self, metric: str) -> str:
        shares = ", ".join(f"{key} {share:.0%}" for key, share in self.shares.items())
        return f"what mattered for {metric} (fANOVA over {self.trials} trials at {self.patches:,} patches): {shares}"

    def csv(self) -> str:
        return "parameter,importance\n" + "".join(f"{key},{share:.6f}\n" for key, share in self.shares.items())

    def markdown(self, metric: str) -> str:
        rows = "".join(f"| `{key}` | {share:.0%} |\n" for key, share in self.shares.items())
        return (
            f"### What mattered for `{metric}`\n\n"
            f"fANOVA importance over {self.trials} trials, each at its best up to {self.patches:,} patches (as far "
            f"as every trial got): each key's share of the objective's variance.\n\n"
            f"| parameter | importance |\n|---|---|\n{rows}"
        )


def importance(study: Study, records: list[TrialRecord]) -> Importance | None:
    """The searched keys' importance for the objective; None with one key, fewer than ``MIN_TRIALS`` trials
    that reported it, or an objective that did not vary."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    metric = study.objective.metric
    reports = {
        record.trial_id: record.reports.dropna(subset=[metric])
        for record in records
        if record.error is None and record.reports is not None and metric in record.reports
    }
    reports = {trial_id: frame for trial_id, frame in reports.items() if not frame.empty}
    if len(study.search) < 2 or len(reports) < MIN_TRIALS:
        return None
    patches = int(min(frame["patches_seen"].max() for frame in reports.values()))
    values = {}
    for trial_id, frame in reports.items():
        reached = frame.loc[frame["patches_seen"] <= patches, metric]
        values[trial_id] = float(reached.max() if study.objective.mode == "max" else reached.min())
    if len(set(values.values())) < 2:
        return None
    params = {record.trial_id: record.params for record in records if record.trial_id in values}
    distributions = {
        key: dist.optuna(() if dist.type == "choice" else tuple(p[key] for p in params.values()))
        for key, dist in study.search.items()
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory", on the console
    try:
        record = optuna.create_study(direction="maximize" if study.objective.mode == "max" else "minimize")
        for trial_id, value in values.items():
            trial = optuna.trial.create_trial(params=params[trial_id], distributions=distributions, value=value)
            record.add_trial(trial)
        shares = optuna.importance.get_param_importances(record, evaluator=FanovaImportanceEvaluator(seed=0))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return Importance(dict(shares), len(values), patches)
