"""What a search samples first and how: the samplers by name, the guides' recipes (priors)
and --warm-start's configs from an earlier run. May import search/rundir.py and
search/study.py only."""
