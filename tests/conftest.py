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
