"""Parallelism applied from the outside of the model: launch environment, layout (dp x tp, ep within dp), the
device mesh and its groups, and the expert-parallel all-to-all dispatcher. Model code never imports this package."""
