"""Running a sweep's trials with Ray Tune: a new Tuner, or the restored one of an interrupted sweep."""

from __future__ import annotations

from typing import Any

from raytrain_app.observability.sweep_results import trial_dir_name
from raytrain_app.ray_adapter import ray_compat
from raytrain_app.ray_adapter.sweep_trial import TRIAL_DRIVER_CPUS, train_trial
from raytrain_app.storage.location import Location, parse_location

SWEEP_FILE = "sweep.json"  # the sweep's settings, so a re-run can tell it is the same sweep
BASE_FILE = "base_checkpoint.pt"  # the sweep's own copy of the base: every trial starts from these exact bytes


def _trial_dirname(trial: Any) -> str:
    return trial_dir_name(trial.trial_id)


def run_tuner(plan: Any, max_concurrent: int) -> Any:
    """Run (or resume) the sweep `plan` (a `raytrain_app.tune.SweepPlan`) with `max_concurrent` trials at once;
    Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sweep_dir, save_dir = plan.sweep_dir, parse_location(plan.cfg.save_dir)
    # What every trial shares. Bound to the trainable rather than put in each trial's config, so operational
    # settings given on a re-run (--max-failures, --keep-checkpoints) apply to the trials it resumes.
    spec = {
        "config": plan.cfg.to_dict(),
        "sweep_dir": sweep_dir.uri,
        "base": sweep_dir.join(BASE_FILE).uri,
        "sweep_name": plan.name,
        "lineage": plan.lineage,
    }
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=spec), {"cpu": TRIAL_DRIVER_CPUS})
    storage_fs = None if save_dir.is_local else save_dir.fs
    if tune.Tuner.can_restore(sweep_dir.path, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(sweep_dir.path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
        ray_compat.override_restored_tuner(tuner, max_concurrent_trials=max_concurrent,
                                           failure_config=tune.FailureConfig(max_failures=plan.cfg.max_failures))
        return tuner.fit()
    scheduler = None
    if plan.sweep.scheduler == "asha":
        # stop_last_trials=False: max_t only places the rungs; a trial that passed them all trains to --epochs.
        scheduler = ASHAScheduler(time_attr="steps_trained", max_t=plan.trial_steps, grace_period=plan.grace_period,
                                  reduction_factor=plan.sweep.reduction_factor, stop_last_trials=False)
    tuner = tune.Tuner(
        trainable,
        param_space={"lr": tune.grid_search(plan.learning_rates)},
        # ASHA and the ResultGrid rank trials by --select-metric.
        tune_config=tune.TuneConfig(metric=plan.cfg.select_metric, mode="max" if plan.cfg.selects_max else "min",
                                    scheduler=scheduler,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=save_dir.path,
            storage_filesystem=storage_fs,
            # A trial whose driver dies is run again; it continues its own Train run from its latest checkpoint.
            failure_config=tune.FailureConfig(max_failures=plan.cfg.max_failures),
            verbose=1,  # trial status tables; each trial's workers print one line per validation
        ),
    )
    return tuner.fit()


def ended_trials(sweep_dir: Location) -> set[str]:
    """Ids of the trials Tune ended (TERMINATED): finished, or stopped by ASHA. Ctrl-C makes Tune save its state
    and return with the others still running; those are unfinished. Read from the sweep's saved experiment
    state through Tune's public ExperimentAnalysis (the ResultGrid has only counts of these states)."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(sweep_dir.path, storage_filesystem=None if sweep_dir.is_local else sweep_dir.fs)
    return {t.trial_id for t in analysis.trials if t.status == "TERMINATED"}
