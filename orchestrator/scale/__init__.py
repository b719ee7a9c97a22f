"""`vsva scale`: multi-VM experiments (docs/design.md §8) as sweeps of points, with results and plots.

sweep        sweep files (TOML): the runner, fixed and varied parameters, metrics, plots
experiments  the point runners (vms, policies, noisy, iotlb): one host stack each
runner       every point and repeat from a clean state to its audit, resume, Ctrl-C
stacks       one stack in process, several at once (`hosts = H`), the residue check
cluster      the stacks as Ray tasks, one whole node each (`--cluster`, optional extra)
results      the results directory: points.jsonl, points.csv, summary.md, command.txt
plots        PNG plots (matplotlib, optional extra)
progress     progress on stderr
builtin/     the built-in experiments, TOML files that ship with the package
"""
