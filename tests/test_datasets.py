import numpy as np
import pytest

from kfusion import datasets


def test_shapes_dtypes_and_seeds():
    x, y = datasets.sequence_classification(n=12, length=8, features=2, num_classes=4, seed=1)
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((12, 8, 2), np.float32, (12,), np.int32)
    assert sorted(set(y.tolist())) == [0, 1, 2, 3]
    again, _ = datasets.sequence_classification(n=12, length=8, features=2, num_classes=4, seed=1)
    np.testing.assert_array_equal(x, again)
    x, y = datasets.multimodal_classification(n=9, image_size=4, length=6, label_from=["text"])
    assert x["image"].shape == (9, 4, 4, 1) and x["text"].shape == (9, 6)
    assert x["text"].dtype == np.int32 and x["text"].max() < 20 and y.shape == (9,)
    x, y = datasets.digits(image=True, seed=3)
    assert x.shape == (1797, 8, 8, 1) and 0.0 <= x.min() and x.max() <= 1.0


BAD_SEQUENCE = [
    ({"n": 0}, "n=0"),
    ({"n": 2.5}, "n=2.5"),
    ({"length": 0}, "length=0"),
    ({"features": 0}, "features=0"),
    ({"num_classes": 0}, "num_classes=0"),
    ({"num_classes": 1}, "num_classes=1"),
    ({"seed": -1}, "seed=-1"),
]
BAD_MULTIMODAL = [
    ({"n": -3}, "n=-3"),
    ({"image_size": 1}, "image_size=1"),
    ({"length": 0}, "length=0"),
    ({"vocab_size": 4}, "vocab_size=4"),  # ids 4 and up are the random tokens
    ({"seed": "0"}, "seed='0'"),
    ({"label_from": ()}, r"label_from=\(\)"),
    ({"label_from": "image"}, "label_from='image'"),
    ({"label_from": ["image", "audio"]}, r"label_from=\['image', 'audio'\]"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD_SEQUENCE)
def test_sequence_classification_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        datasets.sequence_classification(**kwargs)


@pytest.mark.parametrize("kwargs, pattern", BAD_MULTIMODAL)
def test_multimodal_classification_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        datasets.multimodal_classification(**kwargs)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="image='no'"):
        datasets.digits(image="no")
    with pytest.raises(ValueError, match="seed=-1"):
        datasets.digits(seed=-1)
