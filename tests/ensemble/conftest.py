import keras
import pytest

from tests.ensemble import ensemble_data as data


@pytest.fixture(scope="session")
def split():
    """Feature-subset data: members train, ensembles fit on the holdout, all score on test."""
    x, y = data.subset_data(1000, seed=3)
    return {
        "train": (x[:400], y[:400]),
        "holdout": (x[400:600], y[400:600]),
        "test": (x[600:], y[600:]),
    }


@pytest.fixture(scope="session")
def members(split):
    """Three trained feature-subset members (tests only predict with them)."""
    keras.utils.set_random_seed(7)
    return data.trained_members(*split["train"], epochs=5)
