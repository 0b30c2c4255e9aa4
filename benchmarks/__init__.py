"""ssam_bench: the benchmark suite of ssam-kernels (the ``ssam-bench`` command).

Installed from the repository's ``benchmarks/`` folder. Each ``bench_<name>.py`` also runs on its
own (``python -m ssam_bench.bench_<name>``); ``ssam-bench`` runs them together.
"""
