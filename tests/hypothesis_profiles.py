"""How hard the property tests try: two Hypothesis profiles, picked by HYPOTHESIS_PROFILE.

- ``fast`` (the default, so ``make test-fast`` and a bare ``pytest``): a tenth of each test's
  examples (at least 10), so the fast tier stays fast.
- ``thorough`` (``make test``, hence CI; ``HYPOTHESIS_PROFILE=thorough make test-fast``, or
  pytest's ``--hypothesis-profile=thorough``): the full count written in each test,
  Hypothesis's standard 100 for a test that names none.

A test names its thorough count with ``@settings(max_examples=examples(300))``; the active
profile scales it. Both profiles keep whatever else Hypothesis would use here (its ``ci``
profile under CI: derandomized, no database, no deadline). tests/conftest.py imports this
module first, so the profile is loaded before any test module is.
"""

from __future__ import annotations

import os

from hypothesis import settings

STANDARD = 100  # Hypothesis's own max_examples: the thorough profile's
FAST = 10  # a tenth of it
MIN_FAST = 10  # ... but no test runs fewer examples than this (or its own count, if smaller)

_base = settings()  # what Hypothesis would use without these profiles
settings.register_profile("thorough", _base, max_examples=STANDARD)
settings.register_profile("fast", _base, max_examples=FAST)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def examples(thorough: int) -> int:
    """max_examples of a test that tries `thorough` examples in the thorough profile, scaled
    to the active one (read when the test module is imported)."""
    scaled = round(thorough * settings().max_examples / STANDARD)
    return max(scaled, min(thorough, MIN_FAST))
