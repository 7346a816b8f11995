"""The benchmarks: each module measures one thing against a baseline measured in the same
run and prints the ratio. Run from the repository root as `python -m benchmarks.NAME`
(README: Performance); results go to benchmarks/results/ with the date and the machine."""
