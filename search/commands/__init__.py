"""`resnet-hpo train` and `resnet-hpo predict`: one model trained, or one used. May import
search/run/ (a request's checks) and what it imports."""
