"""Small datasets made in code or bundled with a dependency: no network, real signal.

Every generator is seeded and returns NumPy arrays; labels depend on the inputs through a
rule the models have to learn, so accuracy well above chance means the model learned it.
`ucr` reads the public UCR/UEA time-series classification sets that the `aeon` package
ships inside its wheel (`pip install aeon`), with their official train/test split.
`pad_sequences` and `train_validation_split` prepare such data for `fit`.
"""

import functools
import numbers
import os

import numpy as np

from kfusion import _checks

MODALITIES = ("image", "text", "tabular")

__all__ = [
    "digits",
    "multimodal_classification",
    "pad_sequences",
    "sequence_classification",
    "train_validation_split",
    "ucr",
    "ucr_names",
]


def sequence_classification(n=240, length=16, features=4, num_classes=3, seed=0):
    """Noisy sinusoids whose frequency is the class.

    Channel 0 of each sequence is `sin(2 pi (k + 1) t / length + phase)` plus noise, for
    class `k`; the other channels are noise. CNNs (local shape), RNNs (order) and
    Transformers (relations between steps) can all learn it.

    Args:
        n: int >= 1, number of samples.
        length: int >= 1, time steps.
        features: int >= 1, channels per step.
        num_classes: int >= 2, number of frequencies/classes.
        seed: int >= 0, NumPy seed.

    Returns:
        `(x, y)`: float32 `(n, length, features)` and int32 `(n,)`.

    Raises:
        ValueError: for a bad argument, naming it and its value.

    Example:

    >>> from kfusion.datasets import sequence_classification
    >>> x, y = sequence_classification(n=10)
    >>> x.shape, y.shape
    ((10, 16, 4), (10,))
    """
    n = _checks.check_int("n", n)
    length = _checks.check_int("length", length)
    features = _checks.check_int("features", features)
    num_classes = _checks.check_int("num_classes", num_classes, minimum=2)
    seed = _checks.check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % num_classes).astype("int32")
    rng.shuffle(y)
    t = np.arange(length, dtype="float32")
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    x = rng.normal(scale=0.3, size=(n, length, features)).astype("float32")
    x[:, :, 0] += np.sin(2 * np.pi * (y[:, None] + 1) * t[None, :] / length + phase)
    return x.astype("float32"), y


def multimodal_classification(
    n=256, image_size=8, length=10, vocab_size=20, seed=0, label_from=("image", "text", "tabular")
):
    """Image + token text + tabular inputs, each carrying part of a binary label.

    The label is `y = [s_image + s_text + s_tab > 0]` (the sum over `label_from`) for
    three independent standard normal scores: the image holds `s_image` as the brightness
    of its top-left quadrant minus its bottom-right one, the text holds `s_text` through
    how many (about 3|s|) "positive" (id 2) versus "negative" (id 3) tokens it has among
    random ones (right-padded with id 0 to variable lengths), and the table holds `s_tab`
    in column 0. No modality alone gives
    the label: reading one of three scores gives about 70% accuracy at best, all three
    close to 100%.

    Args:
        n: int >= 1, number of samples.
        image_size: int >= 2, height and width of the grey images.
        length: int >= 1, maximum text length.
        vocab_size: int >= 5, token vocabulary (ids 0 .. vocab_size - 1; 0 is padding,
            2 and 3 carry the signal, 4 and up are random).
        seed: int >= 0, NumPy seed.
        label_from: a non-empty list of the modalities whose scores make the label,
            from "image", "text" and "tabular".

    Returns:
        `(x, y)`: a dict with `"image"` float32 `(n, s, s, 1)`, `"text"` int32
        `(n, length)`, `"tabular"` float32 `(n, 5)`, and int32 labels `(n,)`.

    Raises:
        ValueError: for a bad argument, naming it and its value.

    Example:

    >>> from kfusion.datasets import multimodal_classification
    >>> x, y = multimodal_classification(n=6)
    >>> sorted(x), x["text"].shape
    (['image', 'tabular', 'text'], (6, 10))
    """
    n = _checks.check_int("n", n)
    image_size = _checks.check_int("image_size", image_size, minimum=2)
    length = _checks.check_int("length", length)
    vocab_size = _checks.check_int("vocab_size", vocab_size, minimum=5)
    seed = _checks.check_int("seed", seed, minimum=0)
    if (
        not isinstance(label_from, (list, tuple))
        or not label_from
        or any(name not in MODALITIES for name in label_from)
    ):
        raise ValueError(
            f"`label_from` must be a non-empty list of modalities from {list(MODALITIES)}. "
            f"Received: label_from={label_from!r}"
        )
    rng = np.random.default_rng(seed)
    s_img, s_txt, s_tab = rng.normal(size=(3, n))
    scores = {"image": s_img, "text": s_txt, "tabular": s_tab}
    y = (sum(scores[name] for name in label_from) > 0).astype("int32")
    half = image_size // 2
    image = rng.normal(scale=0.3, size=(n, image_size, image_size, 1)).astype("float32")
    image[:, :half, :half, 0] += s_img[:, None, None]
    image[:, half:, half:, 0] -= s_img[:, None, None]
    text = np.zeros((n, length), dtype="int32")
    for i in range(n):
        steps = int(rng.integers(length // 2, length + 1))
        tokens = rng.integers(4, vocab_size, size=steps)
        signal = int(np.clip(round(abs(s_txt[i]) * 3), 0, steps))
        tokens[:signal] = 2 if s_txt[i] > 0 else 3
        rng.shuffle(tokens)
        text[i, :steps] = tokens
    tabular = rng.normal(size=(n, 5)).astype("float32")
    tabular[:, 0] = s_tab
    return {"image": image, "text": text, "tabular": tabular}, y


def digits(image=True, seed=0):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), scaled to [0, 1].

    Args:
        image: bool. True: `(n, 8, 8, 1)` images; False: `(n, 8, 8)` sequences (rows as
            time steps).
        seed: int >= 0, seed of the shuffle.

    Returns:
        `(x, y)`: float32 inputs and int32 labels, shuffled.

    Raises:
        ValueError: for a bad argument, naming it and its value.

    Example:

    >>> from kfusion.datasets import digits
    >>> x, y = digits(image=False)
    >>> x.shape, int(y.max())
    ((1797, 8, 8), 9)
    """
    image = _checks.check_bool("image", image)
    seed = _checks.check_int("seed", seed, minimum=0)
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return (x[..., None] if image else x), y


# ---------------------------------------------------------------------------- UCR / UEA
_AEON_MISSING = (
    "kfusion.datasets.ucr reads the UCR/UEA sets bundled with the `aeon` package, which is "
    "not installed: `pip install aeon` (or `pip install kfusion[datasets]`)."
)


def _aeon_data_dir():
    """The folder of `.ts` files inside the installed aeon package (ImportError if none)."""
    try:
        import aeon.datasets
    except ImportError as e:
        raise ImportError(_AEON_MISSING) from e
    return os.path.join(os.path.dirname(aeon.datasets.__file__), "data")


def _ts_header(path):
    """The `@key value` lines of a `.ts` file's header, keys lower-cased (stops at @data)."""
    header = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("@"):
                continue
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key == "data":
                break
            header.setdefault(key, value.strip())
    return header


@functools.cache
def _bundled_sets():
    """`{name: (train_path, test_path)}` of the classification sets aeon's wheel holds."""
    root = _aeon_data_dir()
    sets = {}
    for folder in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        for file in sorted(os.listdir(path)):
            if not file.endswith("_TRAIN.ts"):
                continue
            name = file[: -len("_TRAIN.ts")]
            train = os.path.join(path, file)
            test = os.path.join(path, f"{name}_TEST.ts")
            if not os.path.isfile(test):
                continue
            header = _ts_header(train)
            if not header.get("classlabel", "").lower().startswith("true"):
                continue  # a regression set (`@targetLabel true`)
            if header.get("timestamps", "false").lower() != "false":
                continue  # time-stamped values: not a plain array of steps
            sets[name] = (train, test)
    return sets


def ucr_names():
    """The names `ucr` can load: the UCR/UEA classification sets bundled with aeon.

    Found by reading the headers of the `.ts` files inside the installed aeon package (a
    set counts when it has both a `_TRAIN.ts` and a `_TEST.ts` file, class labels and no
    time stamps). With aeon 1.x these include `ArrowHead`, `BasicMotions`, `GunPoint`,
    `ItalyPowerDemand`, `JapaneseVowels`, `OSULeaf` and `PickupGestureWiimoteZ`; names
    ending in `_eq` are aeon's equal-length versions of unequal-length sets.

    Returns:
        A sorted list of dataset names.

    Raises:
        ImportError: when aeon is not installed, with the command that installs it.

    Example:

    >>> from kfusion.datasets import ucr_names
    >>> "GunPoint" in ucr_names() and "JapaneseVowels" in ucr_names()
    True
    """
    return sorted(_bundled_sets())


def _label_key(label):
    """Sort key for class labels: numeric-looking strings by value ("2" before "10")."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _channels_last(data):
    """Turns aeon's `(n, C, T)` array or list of `(C, T_i)` arrays as a list of `(T_i, C)`."""
    return [np.asarray(series, dtype="float32").T for series in data]


def ucr(name):
    """A UCR/UEA time-series classification set bundled with aeon, official split.

    Reads the `.ts` files that the `aeon` package ships inside its wheel (`pip install
    aeon`; nothing is downloaded, `ucr_names()` lists what is there) with
    `aeon.datasets.load_from_ts_file`, and returns them ready for a `FusionModel`:
    channels last, class ids from 0, and for sets of unequal length (`JapaneseVowels`)
    the series right-padded with 0.0 to the longest series of train and test together,
    with a mask and the lengths. A model reads that padding as padding when its input
    is declared with `mask_value=0.0`; on equal-length sets every step is valid. (A
    masking layer reads any step whose channels all equal `mask_value` as padding: in
    `PickupGestureWiimoteZ` some valid steps are 0.0, so feed `mask_*` there instead.)

    Labels keep the spelling of the file's `@classLabel` header (aeon itself lower-cases
    them). Missing values (`NaN` in a file) are kept as `NaN`. The training files of the UCR
    archive are often sorted by class: validate on
    `train_validation_split(x_train, y_train)`, not on the last rows, and keep the test
    part for the final score.

    Args:
        name: str, one of `ucr_names()`, e.g. `"GunPoint"`, `"ItalyPowerDemand"`,
            `"BasicMotions"` or `"JapaneseVowels"` (case-sensitive).

    Returns:
        A dict with `"x_train"`, `"x_test"` (float32 `(n, T, C)`), `"y_train"`,
        `"y_test"` (int32 class ids), `"classes"` (the original label strings, index =
        class id, sorted; numeric-looking labels by value: "1", "2", "10"),
        `"lengths_train"`, `"lengths_test"` (int32 valid steps per series),
        `"mask_train"`, `"mask_test"` (bool `(n, T)`, True on valid steps) and `"name"`.

    Raises:
        ValueError: for a name that is not bundled, listing the names that are.
        ImportError: when aeon is not installed, with the command that installs it.

    Example:

    >>> from kfusion.datasets import ucr
    >>> data = ucr("ItalyPowerDemand")
    >>> data["x_train"].shape, data["x_test"].shape, data["classes"]
    ((67, 24, 1), (1029, 24, 1), ['1', '2'])
    """
    sets = _bundled_sets()  # ImportError without aeon, before the name is judged
    if not isinstance(name, str) or name not in sets:
        hint = ""
        if isinstance(name, str):
            same = [n for n in sets if n.lower() == name.lower()]
            hint = f" Did you mean {same[0]!r}?" if same else ""
        raise ValueError(
            f"`name` must be a UCR/UEA classification set bundled with aeon.{hint} "
            f"Received: name={name!r}. Bundled: {sorted(sets)}"
        )
    from aeon.datasets import load_from_ts_file

    parts = {}
    for split, path in zip(("train", "test"), sets[name]):
        data, labels, meta = load_from_ts_file(path, return_meta_data=True)
        parts[split] = (_channels_last(data), np.asarray(labels).astype(str), meta)
    # aeon lower-cases the labels it reads ("Standing" -> "standing"): the header's
    # `@classLabel true ...` line gives them back as the archive spells them.
    declared = _ts_header(sets[name][0]).get("classlabel", "").split()[1:]
    spelling = {}
    for label in declared:
        spelling.setdefault(label.lower(), label)
    for split, (series, labels, meta) in parts.items():
        labels = np.array([spelling.get(v.lower(), v) for v in labels], dtype=str)
        parts[split] = (series, labels, meta)
    seen = set(parts["train"][1]) | set(parts["test"][1])
    classes = sorted(set(spelling.values()) | seen, key=_label_key)
    ids = {label: i for i, label in enumerate(classes)}
    longest = max(len(s) for split in parts.values() for s in split[0])
    result = {"name": name, "classes": classes}
    for split, (series, labels, _) in parts.items():
        x, mask = pad_sequences(series, max_length=longest, value=0.0, dtype="float32")
        result[f"x_{split}"] = x
        result[f"y_{split}"] = np.array([ids[v] for v in labels], dtype="int32")
        result[f"lengths_{split}"] = mask.sum(axis=1).astype("int32")
        result[f"mask_{split}"] = mask
    return result


# ------------------------------------------------------------------------------ padding
def pad_sequences(sequences, max_length=None, value=0.0, dtype="float32", truncate=False):
    """Right-pads variable-length sequences into one array, with a mask of valid steps.

    Args:
        sequences: a non-empty list of arrays (or nested lists), each `(T_i, F)` with the
            same `F`, or each `(T_i,)` (token ids, one value per step). `T_i` may be 0.
        max_length: int >= 1 or None, the padded length. None: the longest `T_i`.
        value: number, what the padded steps hold (the model's `mask_value`).
        dtype: NumPy dtype of the result, `"float32"` by default (`"int32"` for ids).
        truncate: bool. False (default): a sequence longer than `max_length` raises a
            ValueError, nothing is cut silently. True: such sequences keep their first
            `max_length` steps.

    Returns:
        `(x, mask)`: `x` of shape `(n, T, F)` (or `(n, T)` for 1-D sequences) in `dtype`,
        right-padded with `value`, and a bool mask `(n, T)`, True on the valid steps
        (`mask.sum(1)` gives the lengths).

    Raises:
        ValueError: for a bad argument, naming it and its value (or the shape expected).

    Example:

    >>> import numpy as np
    >>> from kfusion.datasets import pad_sequences
    >>> x, mask = pad_sequences([np.ones((2, 3)), np.ones((4, 3))])
    >>> x.shape, mask.sum(1).tolist(), float(x[0, 2:].max())
    ((2, 4, 3), [2, 4], 0.0)
    """
    max_length = _checks.check_int("max_length", max_length, allow_none=True)
    truncate = _checks.check_bool("truncate", truncate)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"`dtype` must be a NumPy numeric dtype. Received: dtype={dtype!r}"
        ) from None
    if dtype.kind not in "biuf":
        raise ValueError(f"`dtype` must be a NumPy numeric dtype. Received: dtype={dtype!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (dtype.kind in "biu" and not float(value).is_integer())
    ):
        raise ValueError(
            f"`value` must be a number that `dtype` {dtype.name} holds. Received: value={value!r}"
        )
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        sequences = list(sequences)
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise ValueError(
            "`sequences` must be a non-empty list of arrays of shape (T_i, F) or (T_i,). "
            f"Received: sequences={_short(sequences)}"
        )
    arrays = []
    for i, seq in enumerate(sequences):
        try:
            arr = np.asarray(seq)
            if arr.dtype.kind not in "biuf":
                raise TypeError
            arr = arr.astype(dtype)
        except (TypeError, ValueError):
            raise ValueError(
                f"`sequences[{i}]` must be an array of numbers of shape (T_i, F) or (T_i,). "
                f"Received: sequences[{i}]={_short(seq)}"
            ) from None
        arrays.append(arr)
    first = arrays[0]
    if first.ndim not in (1, 2):
        raise ValueError(
            "`sequences` must hold arrays of shape (T_i, F) or (T_i,). "
            f"Received: sequences[0] of shape {first.shape}"
        )
    for i, arr in enumerate(arrays):
        if arr.ndim != first.ndim or arr.shape[1:] != first.shape[1:]:
            expected = "(T_i,)" if first.ndim == 1 else f"(T_i, {first.shape[1]})"
            raise ValueError(
                f"`sequences` must all have the shape {expected} of sequences[0]. "
                f"Received: sequences[{i}] of shape {arr.shape}"
            )
    lengths = np.array([len(a) for a in arrays])
    longest = int(lengths.max())
    length = longest if max_length is None else max_length
    if longest > length and not truncate:
        i = int(np.argmax(lengths))
        raise ValueError(
            f"`sequences[{i}]` has {longest} steps, more than max_length={max_length}; "
            "pass a larger `max_length`, or `truncate=True` to keep the first steps. "
            f"Received: max_length={max_length}"
        )
    x = np.full((len(arrays), length) + first.shape[1:], value, dtype=dtype)
    mask = np.zeros((len(arrays), length), dtype=bool)
    for i, arr in enumerate(arrays):
        steps = min(len(arr), length)
        x[i, :steps] = arr[:steps]
        mask[i, :steps] = True
    return x, mask


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- splitting
def _is_class_labels(y):
    """True for 1-D (or one-column) integer, bool or string labels."""
    return (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)) and y.dtype.kind in "biuUSO"


def _stratified_counts(counts, n_val, rng):
    """Validation rows per class: about `n_val` in all, proportional to `counts`.

    Every class of >= 2 rows keeps at least one row in each part; a class of one row stays
    in training.
    """
    counts = np.asarray(counts)
    quota = counts * (n_val / counts.sum())
    low = np.where(counts >= 2, 1, 0)
    high = np.where(counts >= 2, counts - 1, 0)
    take = np.clip(np.floor(quota).astype(int), low, high)
    order = rng.permutation(len(counts))  # ties broken at random, reproducibly
    while take.sum() < n_val:
        room = [c for c in order if take[c] < high[c]]
        if not room:
            break
        take[max(room, key=lambda c: quota[c] - take[c])] += 1
    while take.sum() > n_val:
        room = [c for c in order if take[c] > low[c]]
        if not room:
            break
        take[min(room, key=lambda c: quota[c] - take[c])] -= 1
    return take


def train_validation_split(x, y, validation_split=0.2, seed=0, stratify=True):
    """Splits `(x, y)` into shuffled training and validation parts, stratified by class.

    Use it instead of keras' `fit(validation_split=...)`, which validates on the last rows
    as they come: files sorted by class (the UCR/UEA training files) would validate on one
    or two classes only.

    With class labels (1-D, or one column, of integers, bools or strings) and
    `stratify=True`, each class gives about `validation_split` of its rows to the
    validation part, and every class with at least 2 rows keeps at least one row in each
    part (a class of one row stays in training). That rule can move the validation size
    away from `round(validation_split * n)` when there are many small classes. Float
    labels (regression), several label columns or `stratify=False` give a plain shuffled
    split of `round(validation_split * n)` rows (at least 1, at most n - 1). Both parts
    come out shuffled with `seed`: the same seed gives the same split.

    Args:
        x: an array (or nested list) of inputs, or a dict of arrays with the same rows
            (one per model input).
        y: the labels, an array with one row per sample.
        validation_split: float in (0, 1), the share of rows to validate on.
        seed: int >= 0, seed of the shuffle.
        stratify: bool, whether to stratify class labels (float labels never are).

    Returns:
        `(x_train, y_train), (x_val, y_val)`, with `x` parts of the same kind as `x` (a
        dict gives dicts).

    Raises:
        ValueError: for a bad argument, naming it and its value (or its rows).

    Example:

    >>> import numpy as np
    >>> from kfusion.datasets import train_validation_split
    >>> x, y = np.arange(20.0).reshape(10, 2), np.array([0] * 5 + [1] * 5)
    >>> (x_tr, y_tr), (x_val, y_val) = train_validation_split(x, y, validation_split=0.4)
    >>> x_tr.shape, sorted(y_val.tolist())
    ((6, 2), [0, 0, 1, 1])
    """
    if (
        isinstance(validation_split, bool)
        or not isinstance(validation_split, numbers.Real)
        or not 0.0 < float(validation_split) < 1.0
    ):
        raise ValueError(
            "`validation_split` must be a float in (0, 1). "
            f"Received: validation_split={validation_split!r}"
        )
    seed = _checks.check_int("seed", seed, minimum=0)
    stratify = _checks.check_bool("stratify", stratify)
    try:
        y = np.asarray(y)
    except ValueError:
        y = None
    if y is None or y.ndim == 0:
        raise ValueError(f"`y` must be an array with one row per sample. Received: y={_short(y)}")
    n = len(y)
    if n < 2:
        raise ValueError(
            f"`y` must have at least 2 rows to split into two parts. Received: y of shape {y.shape}"
        )
    if isinstance(x, dict):
        if not x:
            raise ValueError("`x` must be an array or a non-empty dict of arrays. Received: x={}")
        xs = {}
        for key, value in x.items():
            try:
                xs[key] = np.asarray(value)
            except ValueError:
                raise ValueError(
                    f"`x[{key!r}]` must be an array. Received: x[{key!r}]={_short(value)}"
                ) from None
    else:
        try:
            xs = {None: np.asarray(x)}
        except ValueError:
            raise ValueError(
                f"`x` must be an array or a dict of arrays. Received: x={_short(x)}"
            ) from None
    for key, value in xs.items():
        label = "x" if key is None else f"x[{key!r}]"
        if value.ndim == 0 or len(value) != n:
            raise ValueError(
                f"`{label}` must have one row per label ({n} rows, as `y`). "
                f"Received: {label} of shape {value.shape}"
            )
    rng = np.random.default_rng(seed)
    n_val = min(max(int(round(float(validation_split) * n)), 1), n - 1)
    if stratify and _is_class_labels(y):
        labels = y.reshape(n).astype(str) if y.dtype.kind == "O" else y.reshape(n)
        classes, inverse = np.unique(labels, return_inverse=True)
        take = _stratified_counts(np.bincount(inverse, minlength=len(classes)), n_val, rng)
        val_parts, train_parts = [], []
        for c in range(len(classes)):
            rows = rng.permutation(np.flatnonzero(inverse == c))
            val_parts.append(rows[: take[c]])
            train_parts.append(rows[take[c] :])
        val_idx = rng.permutation(np.concatenate(val_parts))
        train_idx = rng.permutation(np.concatenate(train_parts))
    else:
        order = rng.permutation(n)
        val_idx, train_idx = order[:n_val], order[n_val:]

    def part(idx):
        picked = {key: value[idx] for key, value in xs.items()}
        return (picked if isinstance(x, dict) else picked[None]), y[idx]

    return part(train_idx), part(val_idx)
