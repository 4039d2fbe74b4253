"""Planning a layout before launch (`moe-train-plan`): per-rank memory from a fake-tensor profile plus each engine's
state arithmetic (profile.py, states.py, plan.py), and a dry run of every rank role on a fake process group
(dry_run.py). See docs/PARALLELISM.md."""
