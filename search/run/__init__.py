"""A search run: the request checked from the flags, the Ray cluster, the Tuner with our
searcher on the run's study, the budget and its stopper, the confirm stage, and Tune's saved
state for --resume. May import every other part of search/ but commands/ and cli.py."""
