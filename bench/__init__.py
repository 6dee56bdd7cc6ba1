"""Benchmarks (issue 6): each module runs with `python -m bench.<name>` and ends with `ratio=X`."""
