"""The tables of `benchmarks/run.py`, one module each.

Each module names its table (`NAME`, its key in results.json), times it with
`measure(rounds, steps, done)` (`done`: the results of the tables timed before it) and writes
its part of RESULTS.md with `markdown(result)`. `NEEDS` lists tables whose results it reads;
`LAST` marks one the runner times after all the others.
"""
