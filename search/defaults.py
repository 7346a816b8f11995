"""The defaults of `resnet-hpo search` that the CLI's help shows and a request applies, each
in one place, in a module the CLI imports without torch, Ray or Optuna."""

DEFAULT_TRIALS = 16  # of a search given neither --trials nor --budget
DEFAULT_WARM_START_TOP = 4  # --warm-start: how many of the earlier run's best configs go first
DEFAULT_CONFIRM_SEEDS = 2  # --confirm: new seeds per confirmed config, none a trial used
DEFAULT_KEEP_CHECKPOINTS = 10  # finished trials whose checkpoints a search keeps, the best
