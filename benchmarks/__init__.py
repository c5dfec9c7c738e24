"""The benchmarks behind docs/performance.md, run as modules from the repository root.

    python -m benchmarks.run_all                                              # every one (make bench)
    python -m benchmarks.latency                                              # one that launches its own runs
    accelerate launch --multi_gpu --num_processes 2 -m benchmarks.overhead   # one that runs under the launcher

Run as modules, they import each other, train.py and the helpers they share
with the tests (testkit/) from the repository root, with no path set up by
hand. Every one takes ``--smoke``: a few steps, rounds and bytes, every arm
run end to end and its result checked, written to a temporary directory
(tests/test_benchmarks_smoke.py runs them all so in CI).
"""
