"""The training loop and its parts: optimizer and schedule, loggers, metrics."""
