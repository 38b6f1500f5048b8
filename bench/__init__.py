"""Benchmarks for cni-ipam (issue 7): run with `make bench` or `python -m bench`."""
