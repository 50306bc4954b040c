"""Test-wide settings: a derandomized hypothesis profile for CI, seeds, thread count."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI (and `make test`) must be reproducible: same examples every run. Set
# HYPOTHESIS_PROFILE=explore locally to search with fresh randomness and more examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("explore", deadline=None, max_examples=300,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train faster on one thread than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
