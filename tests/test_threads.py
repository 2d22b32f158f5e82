"""OpenMP defaults for a shared CPU (cpmant/threads.py): set by the CLI's configure_environment before torch starts,
and never over a user's own setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpmant.threads import THREAD_ENV_DEFAULTS, apply_thread_env_defaults, thread_env_defaults, worker_env
from cpmant_cli.env import configure_environment

pytestmark = pytest.mark.unit

TUNING = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CPMANT_HOME", str(tmp_path))
    for k in (*TUNING, "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_configure_environment_sets_passive_wait(clean_env):
    configure_environment()
    assert THREAD_ENV_DEFAULTS == {"GOMP_SPINCOUNT": "100000"}
    assert os.environ["GOMP_SPINCOUNT"] == "100000"
    assert "OMP_WAIT_POLICY" not in os.environ
    assert "OMP_NUM_THREADS" not in os.environ  # thread counts stay torch's choice


def test_a_users_value_wins(clean_env):
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_environment()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("var,value", [("OMP_WAIT_POLICY", "PASSIVE"), ("KMP_BLOCKTIME", "0")])
def test_a_users_own_spin_tuning_is_left_alone(clean_env, var, value):
    clean_env.setenv(var, value)
    configure_environment()
    assert "GOMP_SPINCOUNT" not in os.environ  # our spin count would override their own tuning
    assert os.environ[var] == value


def test_helpers_work_on_a_given_mapping():
    env = {"PATH": "/bin"}
    assert thread_env_defaults(env) == {"GOMP_SPINCOUNT": "100000"}
    assert apply_thread_env_defaults(env) == {"GOMP_SPINCOUNT": "100000"}
    assert apply_thread_env_defaults(env) == {}  # idempotent
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": "100000"}
    assert worker_env(1, {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "8"}) == {
        "OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert worker_env(1, {}) == {"GOMP_SPINCOUNT": "100000", "OMP_NUM_THREADS": "1"}


def test_the_cli_sets_it_before_torch_is_imported(clean_env):
    """The setting only takes effect if torch (libgomp) has not been loaded when configure_environment runs."""
    code = ("import sys\nimport cpmant_cli.main as m\nassert 'torch' not in sys.modules, 'torch imported early'\n"
            "from cpmant_cli.env import configure_environment\nconfigure_environment()\n"
            "assert 'torch' not in sys.modules, 'configure_environment imported torch'\n"
            "import os\nprint(os.environ['GOMP_SPINCOUNT'])\n")
    env = {k: v for k, v in os.environ.items() if k not in TUNING}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "100000"
