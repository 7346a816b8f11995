"""What the Tune adapter reports beyond an epoch's metrics, and the trial states of
trials.parquet: named once here, read by the callbacks that record a run and by the views of
a finished one. The states are Ray Tune's own names (ray.tune.experiment.Trial's, checked by
a test), kept here so that the views need not import Ray."""

DIVERGED = "diverged"  # the one-line reason an epoch's loss was not finite; the trial ends
CHECKPOINT_WRITTEN = "checkpoint_written"  # when the epoch's checkpoint was written (time.time)
STARTUP = "startup"  # a trial's start-up events in its process, with its first report

PENDING = "PENDING"
RUNNING = "RUNNING"
TERMINATED = "TERMINATED"
ERROR = "ERROR"
ENDED = (TERMINATED, ERROR)
