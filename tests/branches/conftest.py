"""Inputs shared by the branch tests: padded token ids, a sequence and a batch of images.

A test module sets its own image size by overriding the `image_shape` fixture.
"""

import pytest

from tests.branches.branch_checks import LENGTHS, VOCAB, padded_token_ids


@pytest.fixture
def ids(rng):
    return padded_token_ids(rng, LENGTHS, total=8, vocab_size=VOCAB)


@pytest.fixture
def seq(rng):
    return rng.normal(size=(4, 7, 3)).astype("float32")


@pytest.fixture
def image_shape():
    return (8, 8, 3)


@pytest.fixture
def images(rng, image_shape):
    return rng.normal(size=(4, *image_shape)).astype("float32")


@pytest.fixture
def inputs_by_kind(ids, seq, images):
    return {"tokens": ids, "sequence": seq, "image": images}
