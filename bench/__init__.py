"""Benchmarks of the batch pipeline against its targets and single-process
peers (TFDV's CSV statistics, pandas history features).

    python -m bench.run --rows 20000          # a quick check
    python -m bench.run                       # 100k and 1M
    python -m bench.run --big                 # adds 4M

See bench/RESULTS.md for the machine, the measured tables and the profile.
"""
