"""The Ray adapter: the only layer that talks to Ray. The driver side joins or starts a cluster, checks that a
run fits it and builds the TorchTrainer; the worker side restores, builds, runs, reports and finishes; the
control actor carries stop requests, divergence and progress between them; `run_record` repairs Ray Train's
record of a run; `sweep` and `sweep_trial` run Tune. Every non-public Ray API the package uses is reached
through `ray_compat`, which checks the installed Ray version at import."""
