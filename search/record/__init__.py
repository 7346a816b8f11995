"""The Ray Tune callbacks that record a search as it runs: the progress lines, trials.parquet
and epochs.parquet, TensorBoard. They may import search/rundir.py, search/study.py and
search/views/ (what a search searched)."""
