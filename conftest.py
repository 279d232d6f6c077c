"""How `pytest --nbval` shares the machine (pytest.ini runs it with `-n auto --dist loadfile`, pytest-xdist).

Each worker process takes whole files, a notebook's cells in order in one kernel, so the lessons run side by side, one
per worker. On 2 cores two workers at 1 thread each do more than one process at 2 threads: the fresh-clone suite
took 1,067 s against 1,237 s in one process (2026-12-01, README). Two processes at 2 threads each would thrash, so
every worker (and every notebook kernel it starts) gets cpus // workers threads through OMP_NUM_THREADS, unless it is
already set.
`pytest -n 0` runs everything in one process, as before.
"""
import os

from vapt_min.grid import usable_cpus


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per usable CPU, at most 4 (each notebook kernel holds the ViT and its data: ~1-2 GB)."""
    return max(1, min(usable_cpus(), 4))


def pytest_configure(config):
    workers = getattr(config.option, "numprocesses", None)
    if workers and "PYTEST_XDIST_WORKER" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // workers))  # inherited by workers and kernels
