"""`resnet-hpo ensemble`: the best trials of a search combined into one model, evaluated and
saved. May import search/rundir.py, search/study.py and search/views/ (the plots)."""
