"""Benchmarks (``make bench``) and the soak test (``make soak``) of the project against the local stack.

Every figure is measured side by side with a baseline in the same run and reported as a ratio:
absolute times depend on the machine, ratios much less so.  Each contender runs in its own fresh
process (``python -m bench.worker``) so its caches, connections and CPU time are its own.
"""
