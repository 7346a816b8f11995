"""The search driver: CLI, Tuner construction, results."""
