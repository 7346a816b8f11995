"""The views of a finished (or running) search: best.yaml and its retrain command, the
`results` report (leaderboard, importances, plots) and the dashboard. They read the run
directory and its study (search/rundir.py, search/study.py), never Ray; they import nothing
else of search/."""
