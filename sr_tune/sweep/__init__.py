"""Hyperparameter sweeps: a study file -> a Ray Tune ``Tuner`` whose trials each train one config.

One module per concern, so that a trial's process loads only what a trial runs:

- ``layout``: where a sweep keeps what it writes (one storage root), ``--restart`` and the checks before a
  sweep starts or resumes;
- ``search``: the study as Tune and Optuna take it (searcher, scheduler, trial names, folders, resources);
- ``trial``: what runs in a trial's process, in it or through Ray Train workers, reporting to Tune;
- ``cpu_shares``: the CPUs of ended trials handed to the last ones on this machine;
- ``tracker``: the sweep's MLflow runs (a parent, a nested run per trial), seen from the driver;
- ``driver``: the Tuner run with its callback (console, runs closed as trials end) and the results published.

Search: Optuna (TPE multivariate, QMC, random, grid) under a concurrency limit, its study stored with the
sweep (``<root>/<study>/optuna.db`` on a local root), so that a sweep started over (``--restart``) starts its
searcher over too; with ASHA stopping on the objective; or PBT (Ray refuses it with a search algorithm),
which samples start points at random and perturbs lr, L2, augmentation strength and loss weights. Time is
counted in patches seen.

MLflow: one parent run per sweep, one nested run per trial, named after the trial and its values
(``t03 lr=2.1e-3 wd=3.8e-5 bs=16``). Its rank-0 worker logs metrics and grids there, and the driver closes
it the moment Tune stops or finishes the trial, with its curves, best checkpoint and ``best_*`` metrics. At
the end the parent gets the best trial's values under the trials' own keys, a markdown description with the
top trials, the results table, plots, and the best model in the registry (alias ``best``).
"""
