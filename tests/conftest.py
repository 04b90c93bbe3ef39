"""pytest configuration shared by every test module.

- tests/ is on sys.path (pytest's default "prepend" import mode), so modules import ``from helpers import ...``.
- Hypothesis: no per-example deadline (the first call of a shape pays for torch's warm-up), failing examples
  printed with a reproduction blob. Under CI (CI=true) the "ci" profile derandomizes, so a CI run is
  reproducible; set HYPOTHESIS_PROFILE to pick a profile explicitly.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", parent=settings.get_profile("dev"), derandomize=True, database=None
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# --- the kernel cache ---------------------------------------------------------------------------------------
#
# Compiled kernels are cached on disk under a key that hashes the spec, the target and the compute/schedule
# sources, so a stale kernel can never be picked up. The suite still builds into a cache of its own, fresh for
# each session (a cold-cache run is what CI sees, and it never touches the user's ~/.cache/bla_tvm);
# BLA_TVM_TEST_CACHE_DIR names a folder to reuse across runs instead (faster local iteration).
# Set in os.environ, not with monkeypatch, so that subprocesses started by tests find the same kernels.

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def bla_tvm_cache_dir(tmp_path_factory):
    """The folder BLA_TVM_CACHE_DIR points at for the whole session (restored afterwards)."""
    explicit = os.environ.get("BLA_TVM_TEST_CACHE_DIR")
    path = explicit if explicit else str(tmp_path_factory.mktemp("bla_tvm_kernels"))
    previous = os.environ.get("BLA_TVM_CACHE_DIR")
    os.environ["BLA_TVM_CACHE_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("BLA_TVM_CACHE_DIR", None)
    else:
        os.environ["BLA_TVM_CACHE_DIR"] = previous
