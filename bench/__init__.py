"""tidings benchmarks: ``python bench/run.py`` (see bench/README.md).

    harness.py    server, load generators, publisher and wrk processes; CPU pinning, RPS on lo, /proc samples
    stats.py      percentiles, rates, CPU per operation, loss, spreads, merged reports (pure)
    scenarios.py  the table of scenarios and the runners they share
    report.py     result rows and the Markdown written to bench/results/
    cli.py        the command line of run.py
    wrk-publish.lua  wrk's script for the HTTP publish scenarios (filled in by harness.write_wrk_script)

publisher.py, procstat.py and write_floor.py are scripts of their own that the modules above also import.
"""
