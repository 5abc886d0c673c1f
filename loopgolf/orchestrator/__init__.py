"""Ray Tune + Optuna sweeps: spec, run, resume, status, results, and the CLI."""
