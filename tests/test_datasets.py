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


# ---------------------------------------------------------------------------- UCR / UEA
UCR_SETS = {
    # name: (train rows, test rows, longest length, channels, classes, equal length)
    "GunPoint": (50, 150, 150, 1, 2, True),
    "ItalyPowerDemand": (67, 1029, 24, 1, 2, True),
    "BasicMotions": (40, 40, 100, 6, 4, True),
    "JapaneseVowels": (270, 370, 29, 12, 9, False),
}


def _no_network(*args, **kwargs):
    raise AssertionError("kfusion.datasets tried to open a network connection")


@pytest.fixture(scope="module")
def ucr_sets():
    """The four sets, loaded (aeon imported too, if it was not yet) with sockets refused."""
    pytest.importorskip("aeon")
    import socket

    with pytest.MonkeyPatch.context() as patch:
        for target, attr in (
            (socket.socket, "connect"),
            (socket.socket, "connect_ex"),
            (socket, "create_connection"),
            (socket, "getaddrinfo"),
        ):
            patch.setattr(target, attr, _no_network)
        return {name: datasets.ucr(name) for name in UCR_SETS}


@pytest.mark.parametrize("name", sorted(UCR_SETS))
def test_ucr_shapes_labels_and_masks(ucr_sets, name):
    n_train, n_test, length, channels, num_classes, equal = UCR_SETS[name]
    data = ucr_sets[name]
    assert data["name"] == name and len(data["classes"]) == num_classes
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        mask, lengths = data[f"mask_{split}"], data[f"lengths_{split}"]
        assert (x.shape, x.dtype) == ((n, length, channels), np.float32)
        assert (y.shape, y.dtype, lengths.dtype) == ((n,), np.int32, np.int32)
        assert (mask.shape, mask.dtype) == ((n, length), np.bool_)
        assert sorted(set(y.tolist())) == list(range(num_classes))  # every class present
        np.testing.assert_array_equal(mask.sum(1), lengths)
        np.testing.assert_array_equal(mask, np.arange(length)[None, :] < lengths[:, None])
        assert np.all(x[~mask] == 0.0) and np.isfinite(x).all()
        if equal:
            assert lengths.min() == length
    if not equal:
        lengths = np.concatenate([data["lengths_train"], data["lengths_test"]])
        assert lengths.max() == length and lengths.min() < length  # really ragged
        assert lengths.min() == 7  # JapaneseVowels' shortest utterance


def test_ucr_class_names_keep_the_archive_spelling(ucr_sets):
    assert ucr_sets["BasicMotions"]["classes"] == ["Badminton", "Running", "Standing", "Walking"]
    assert ucr_sets["JapaneseVowels"]["classes"] == [str(i) for i in range(1, 10)]
    # UCR's GunPoint labels are "1" and "2": class id = label - 1, file order kept
    gunpoint = ucr_sets["GunPoint"]
    assert gunpoint["classes"] == ["1", "2"] and gunpoint["y_train"][:3].tolist() == [1, 1, 0]
    assert np.bincount(ucr_sets["JapaneseVowels"]["y_train"]).tolist() == [30] * 9


def test_ucr_values_match_aeons_reader(ucr_sets):
    from aeon.datasets import load_gunpoint, load_japanese_vowels

    x, _ = load_gunpoint(split="train")
    np.testing.assert_allclose(ucr_sets["GunPoint"]["x_train"], x.transpose(0, 2, 1), rtol=1e-6)
    series, _ = load_japanese_vowels(split="test")
    data = ucr_sets["JapaneseVowels"]
    for i in (0, 100, 369):
        steps = series[i].shape[1]
        assert data["lengths_test"][i] == steps
        np.testing.assert_allclose(data["x_test"][i, :steps], series[i].T, rtol=1e-6)


def test_ucr_names_and_unknown_name():
    pytest.importorskip("aeon")
    names = datasets.ucr_names()
    assert set(UCR_SETS) <= set(names) and names == sorted(names)
    assert not {"Airline", "Covid3Month", "CardanoSentiment"} & set(names)  # not classification
    with pytest.raises(ValueError, match=r"name='NoSuchSet'.*GunPoint"):
        datasets.ucr("NoSuchSet")
    with pytest.raises(ValueError, match=r"Did you mean 'GunPoint'\?.*name='gunpoint'"):
        datasets.ucr("gunpoint")
    with pytest.raises(ValueError, match="name=3"):
        datasets.ucr(3)


def test_ucr_without_aeon_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setattr(datasets, "_bundled_sets", datasets._bundled_sets.__wrapped__)
    for module in [m for m in sys.modules if m == "aeon" or m.startswith("aeon.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "aeon", None)  # `import aeon` raises ImportError
    with pytest.raises(ImportError, match="pip install aeon"):
        datasets.ucr("GunPoint")
    with pytest.raises(ImportError, match="pip install aeon"):
        datasets.ucr_names()


# ------------------------------------------------------------------------------ padding
def test_pad_sequences_round_trips():
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(t, 3)) for t in (5, 1, 0, 8)]
    x, mask = datasets.pad_sequences(seqs, value=-1.0)
    assert (x.shape, x.dtype, mask.shape) == ((4, 8, 3), np.float32, (4, 8))
    assert mask.sum(1).tolist() == [5, 1, 0, 8]
    assert np.all(x[~mask] == -1.0)
    for seq, row, m in zip(seqs, x, mask):
        np.testing.assert_allclose(row[m], seq.astype("float32"))
    x, mask = datasets.pad_sequences([[3, 4], [5]], max_length=4, value=0, dtype="int32")
    assert x.dtype == np.int32 and x.tolist() == [[3, 4, 0, 0], [5, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    x, mask = datasets.pad_sequences([np.arange(6.0).reshape(3, 2)], max_length=2, truncate=True)
    assert x.tolist() == [[[0.0, 1.0], [2.0, 3.0]]] and mask.all()


BAD_PAD = [
    ({"sequences": []}, "sequences=\\[\\]"),
    ({"sequences": np.zeros(3)}, "sequences\\[0\\] of shape \\(\\)"),
    ({"sequences": [np.zeros((2, 3)), np.zeros((2, 4))]}, r"\(T_i, 3\).*sequences\[1\] of shape"),
    ({"sequences": [np.zeros((2, 3)), np.zeros(2)]}, r"sequences\[1\] of shape \(2,\)"),
    ({"sequences": [np.zeros((2, 2, 2))]}, r"sequences\[0\] of shape \(2, 2, 2\)"),
    ({"sequences": [["a", "b"]]}, r"sequences\[0\]=\['a', 'b'\]"),
    ({"max_length": 2}, "max_length=2"),  # the sequences have 3 steps: no silent cut
    ({"max_length": 0}, "max_length=0"),
    ({"value": "pad"}, "value='pad'"),
    ({"value": 0.5, "dtype": "int32"}, "value=0.5"),
    ({"dtype": "str"}, "dtype="),
    ({"dtype": "nonsense"}, "dtype='nonsense'"),
    ({"truncate": "yes"}, "truncate='yes'"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD_PAD)
def test_pad_sequences_bad_arguments(kwargs, pattern):
    kwargs = {"sequences": [np.zeros((3, 2)), np.zeros((1, 2))], **kwargs}
    with pytest.raises(ValueError, match=pattern):
        datasets.pad_sequences(**kwargs)


# ---------------------------------------------------------------------------- splitting
def test_split_is_stratified_on_class_sorted_data(ucr_sets):
    data = ucr_sets["JapaneseVowels"]  # 270 rows sorted by class, 30 per class
    x, y = data["x_train"], data["y_train"]
    assert np.all(np.diff(y) >= 0)  # the file is sorted: the last rows hold one class
    (x_tr, y_tr), (x_val, y_val) = datasets.train_validation_split(x, y, validation_split=0.2)
    assert len(y_val) == 54 and len(y_tr) == 216
    assert np.bincount(y_val).tolist() == [6] * 9 and np.bincount(y_tr).tolist() == [24] * 9
    assert np.any(np.diff(y_tr) < 0)  # shuffled, not left in class order
    # rows travel with their labels, and no row is lost or repeated
    rows = {x[i].tobytes(): y[i] for i in range(len(y))}
    seen = [r.tobytes() for r in np.concatenate([x_tr, x_val])]
    assert sorted(seen) == sorted(rows)
    assert all(rows[r.tobytes()] == label for r, label in zip(x_val, y_val))


def test_split_keeps_every_class_in_both_parts():
    # unbalanced and class-sorted, string labels, a dict of inputs
    y = np.array(["a"] * 40 + ["b"] * 6 + ["c"] * 2 + ["d"])
    x = {"signal": np.arange(len(y) * 2.0).reshape(-1, 2), "id": np.arange(len(y))}
    (x_tr, y_tr), (x_val, y_val) = datasets.train_validation_split(x, y, validation_split=0.1)
    assert set(x_tr) == {"signal", "id"} and len(x_tr["id"]) == len(y_tr)
    assert set(y_val) == {"a", "b", "c"} and set(y_tr) == {"a", "b", "c", "d"}  # "d": 1 row
    assert len(y_val) == 5  # round(0.1 * 49)
    np.testing.assert_array_equal(x_val["signal"][:, 0], 2.0 * x_val["id"])
    np.testing.assert_array_equal(y[x_val["id"]], y_val)


def test_split_is_reproducible_and_seeded():
    x, y = np.arange(100.0)[:, None], np.repeat(np.arange(4), 25)
    split = lambda seed: datasets.train_validation_split(x, y, seed=seed)  # noqa: E731
    (a_tr, _), (a_val, _) = split(3)
    (b_tr, _), (b_val, _) = split(3)
    (c_tr, _), (c_val, _) = split(4)
    np.testing.assert_array_equal(a_val, b_val)
    np.testing.assert_array_equal(a_tr, b_tr)
    assert set(a_val.ravel()) != set(c_val.ravel())


def test_split_falls_back_to_a_plain_shuffle():
    x = np.arange(50.0)[:, None]
    # float labels (regression), several label columns, stratify=False
    for y, kwargs in (
        (np.linspace(0.0, 1.0, 50), {}),
        (np.repeat(np.eye(2, dtype="int32"), 25, axis=0), {}),
        (np.repeat(np.arange(2), 25), {"stratify": False}),
    ):
        (x_tr, y_tr), (x_val, y_val) = datasets.train_validation_split(x, y, 0.3, **kwargs)
        assert len(y_val) == 15 and len(y_tr) == 35 and y_val.shape[1:] == y.shape[1:]
        np.testing.assert_array_equal(y[x_val[:, 0].astype(int)], y_val)
        assert sorted(np.concatenate([x_tr, x_val]).ravel().tolist()) == x.ravel().tolist()


BAD_SPLIT = [
    ({"validation_split": 0.0}, "validation_split=0.0"),
    ({"validation_split": 1}, "validation_split=1"),
    ({"validation_split": "0.2"}, "validation_split='0.2'"),
    ({"seed": -1}, "seed=-1"),
    ({"stratify": 1}, "stratify=1"),
    ({"y": np.zeros(1)}, "at least 2 rows.*y of shape \\(1,\\)"),
    ({"y": 3}, "y=array\\(3\\)"),
    ({"x": np.zeros((9, 2))}, r"10 rows.*x of shape \(9, 2\)"),
    ({"x": {"a": np.zeros((10, 2)), "b": np.zeros(4)}}, r"x\['b'\] of shape \(4,\)"),
    ({"x": {}}, "x={}"),
]


@pytest.mark.parametrize("kwargs, pattern", BAD_SPLIT)
def test_split_bad_arguments(kwargs, pattern):
    kwargs = {"x": np.zeros((10, 2)), "y": np.arange(10) % 2, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        datasets.train_validation_split(**kwargs)
