"""fused_optim benchmarks. `python -m bench`: step and kernel microbenchmarks against peers on the
device at hand (CSV + PNG under bench/results/); `python -m bench.convergence`: training curves.

Importing this package is free (no torch): `bench.convergence` and the CLI import what they need.
"""
