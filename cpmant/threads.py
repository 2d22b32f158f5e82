"""OpenMP settings for a CPU shared with other work: defaults for the environment, set before torch starts.

torch's CPU kernels run on libgomp (GNU OpenMP). By default a libgomp thread that finishes its share of a
parallel region spins (busy-waits, 300,000 iterations by default) for the next region before it sleeps. On a
quiet machine that saves a wake-up per region; on a machine where another process is busy on the same cores the
spinning threads take the cores that the thread they wait for needs, and the tiny preset's training step (hundreds
of small parallel regions per step) collapses: the loop's tokens/s fell from about 12k to 300-3,000.

Measured with bench/bench_threads.py (the tiny preset's training step, 16 x 128 rows, bf16 autocast, each setting
in a fresh process of 10 steps or a few seconds), 2-core AMD EPYC, on a machine shared with other people's test
runs (preliminary; the lead reruns them quiet). tokens/s; "contended": one busy-looping process per core beside
the step; each figure in a cell is a separate run (four runs, load average 1.7-2.7; last column load 4.5-8.7):

    2 threads, setting          quiet-ish              contended                     heavy load quiet / contended
    spin (libgomp default)      6,283  9,424           1,087  2,962                  388 / 226
    OMP_WAIT_POLICY=PASSIVE     4,664  5,897  6,390    2,730  2,222  4,549  4,348    2,417 / 1,471
    GOMP_SPINCOUNT=1000         6,411  4,212           2,789  3,371  2,993          -
    GOMP_SPINCOUNT=10000        6,661  6,632  9,233    2,787  2,291  2,950  2,850    1,078 / 648
    (1 thread)                  4,872  5,358           3,524  3,421                  3,313 / 804

The default spin-wait collapses whenever another process wants the cores (to 0.17-0.31 of its quiet speed, and
to a few hundred tokens/s at load 5-8). PASSIVE (sleep at once) was the best or near the best in every contended
run (1.5-6x the default), and costs 6-32% when the cores are free (each of the step's hundreds of parallel regions
then pays a futex wake-up). Short spin counts sat in between, with results that varied from run to run more than
the differences measured.

Quiet rerun (bench_threads.py full, 30 steps each, load 1.1): spin 8,370 quiet / 2,887 beside two busy loops;
PASSIVE 7,156 / 3,526; GOMP_SPINCOUNT=10000 7,948 / 3,329; GOMP_SPINCOUNT=100000 8,387 / 3,767. And in the real
loop (`cpmant pretrain --max-steps 120`, fresh homes, quiet, load 1.1-1.5): ACTIVE 14,263 tokens/s, spincount
100000 12,218, PASSIVE 6,648 and 9,778 (its futex wake-ups between the loop's Python work cost up to half); beside
two busy loops (40 steps): PASSIVE 6,134, spincount 100000 4,527, ACTIVE 3,395. So the CLI sets
GOMP_SPINCOUNT=100000 (a third of libgomp's default spin before a thread sleeps): as fast as the default when the
cores are free (0.86-1.0x) and 1.3x it beside busy processes; PASSIVE wins more under contention but costs
30-50% of the common, quiet case. Unless the user's environment tunes the waiting itself (OMP_WAIT_POLICY,
GOMP_SPINCOUNT or KMP_BLOCKTIME set: theirs wins, and none is added); OMP_WAIT_POLICY=PASSIVE is the setting for a
machine that is always busy. Thread counts are left to torch (one per
core): 2 threads beat 1 when the cores were free, 1 did as well beside the busy loops; torchrun's workers get
OMP_NUM_THREADS=1 each (tasks/pretrain.py) and inherit the wait policy.

This module imports nothing heavy: the defaults must be in os.environ before `import torch` (libgomp reads them
once, when torch loads it).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# variable -> default; a user's own value (or a related variable, see below) wins
THREAD_ENV_DEFAULTS = {"GOMP_SPINCOUNT": "100000"}
# the user's own setting of one of these means they tuned the waiting themselves: add nothing
_WAIT_TUNING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def thread_env_defaults(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The defaults that `env` (default os.environ) lacks: {} when the user tuned the waiting themselves."""
    env = os.environ if env is None else env
    if any(k in env for k in _WAIT_TUNING):
        return {}
    return {k: v for k, v in THREAD_ENV_DEFAULTS.items() if k not in env}


def apply_thread_env_defaults(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the missing defaults in `env` (default os.environ); returns what was set. Effective only if torch has
    not been imported yet in this process (child processes started afterwards inherit them either way)."""
    env = os.environ if env is None else env
    added = thread_env_defaults(env)
    env.update(added)
    return added


def worker_env(num_threads: int, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process running `num_threads` torch threads (e.g. one torchrun worker per
    core): `env` (default os.environ) with the thread defaults added and OMP_NUM_THREADS set."""
    out = dict(os.environ if env is None else env)
    apply_thread_env_defaults(out)
    out["OMP_NUM_THREADS"] = str(num_threads)
    return out
