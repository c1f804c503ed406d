"""`lstm-serve bench`: a perf_analyzer-style benchmark of the classify and stream workloads."""
