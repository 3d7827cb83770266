"""Small datasets made in code or bundled with a dependency: no network, real signal.

Every generator is seeded and returns NumPy arrays; labels depend on the inputs through a
rule the models have to learn, so accuracy well above chance means the model learned it.
"""

import numpy as np

from kfusion.layers import _utils

MODALITIES = ("image", "text", "tabular")

__all__ = ["digits", "multimodal_classification", "sequence_classification"]


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
    n = _utils.check_int("n", n)
    length = _utils.check_int("length", length)
    features = _utils.check_int("features", features)
    num_classes = _utils.check_int("num_classes", num_classes, minimum=2)
    seed = _utils.check_int("seed", seed, minimum=0)
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
    n = _utils.check_int("n", n)
    image_size = _utils.check_int("image_size", image_size, minimum=2)
    length = _utils.check_int("length", length)
    vocab_size = _utils.check_int("vocab_size", vocab_size, minimum=5)
    seed = _utils.check_int("seed", seed, minimum=0)
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
    image = _utils.check_bool("image", image)
    seed = _utils.check_int("seed", seed, minimum=0)
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return (x[..., None] if image else x), y
