"""Look inside a FusionModel: architecture plots, branch weights, branch ablation."""

import os
import shutil
import sys
import tempfile

import keras
import numpy as np

from kfusion import _checks

GRAPHVIZ_HINT = (
    "kfusion: architecture plot skipped: it needs pydot and Graphviz "
    "(`pip install pydot` and `apt-get install graphviz`, or `brew install graphviz`)."
)

__all__ = ["ablation", "branch_accuracy", "branch_labels", "branch_weights", "plot"]


def plot(model, path, show_shapes=True, dpi=96, **kwargs):
    """Draws `model` (inputs -> branches -> fusion -> head) to an image file.

    Draws what `keras.utils.plot_model` draws. When pydot or Graphviz is missing, prints
    one line saying how to get them and returns None instead of failing. The image is
    drawn beside `path` under a temporary name and renamed into place, so an earlier image
    at `path` is only ever replaced by a whole one.

    Args:
        model: a keras Model.
        path: the image path (`.png`, `.svg`, `.pdf`).
        show_shapes: bool, whether to show the tensor shapes.
        dpi: int, resolution of raster images.
        **kwargs: more `keras.utils.model_to_dot` arguments (`show_dtype`, `rankdir`,
            `expand_nested`, ...).

    Returns:
        The path written, or None when the plotting tools are missing.

    Example:

    >>> import keras, tempfile, os
    >>> from kfusion import inspect
    >>> i = keras.Input((3,), name="x")
    >>> model = keras.Model(i, keras.layers.Dense(1)(i))
    >>> out = inspect.plot(model, os.path.join(tempfile.mkdtemp(), "m.png"))
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras Model. Received: model={model!r}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`path` must be a non-empty path. Received: path={path!r}")
    show_shapes = _checks.check_bool("show_shapes", show_shapes)
    dpi = _checks.check_int("dpi", dpi)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tmp = os.path.join(tmp_dir, os.path.basename(path))
        extension = os.path.splitext(path)[1][1:] or "png"
        try:
            # `plot_model` without its last step, which under IPython shows the image and
            # fails for formats it can't embed (`.svg`) after writing the file.
            dot = keras.utils.model_to_dot(
                model, show_shapes=show_shapes, show_layer_names=True, dpi=dpi, **kwargs
            )
            dot.write(tmp, format=extension)
        except ImportError:
            print(GRAPHVIZ_HINT, file=sys.stderr)
            return None
        except OSError as e:  # pydot present, the `dot` program missing
            if "dot" not in str(e).lower():
                raise
            print(GRAPHVIZ_HINT, file=sys.stderr)
            return None
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


WEIGHTED_FUSIONS = ("AttentionFusion", "GatedFusion", "WeightedSumFusion")


def branch_labels(model):
    """Readable labels of a FusionModel's branch features, in the fusion layer's order.

    A branch listed under several inputs appears once per input, as `input/branch`.

    Args:
        model: a FusionModel.

    Returns:
        A list of strings.

    Example:

    >>> import keras
    >>> import kfusion as kf
    >>> tied = kf.branches.MLP(units=(4,), name="tied")
    >>> model = kf.FusionModel(
    ...     inputs={"a": keras.Input((3,)), "b": keras.Input((3,))},
    ...     branches={"a": tied, "b": tied},
    ... )
    >>> kf.inspect.branch_labels(model)
    ['a/tied', 'b/tied']
    """
    if not isinstance(getattr(model, "branch_map", None), dict):
        raise ValueError(f"branch_labels needs a FusionModel. Received: model={model!r}")
    several = len(model.branch_map) > 1
    return [
        f"{input_name}/{branch}" if several else branch
        for input_name, branches in model.branch_map.items()
        for branch in branches
    ]


def _require_fusion_model(model, what):
    if not hasattr(model, "branch_map") or getattr(model, "fusion_layer", None) is None:
        raise ValueError(
            f"{what} needs a FusionModel with two or more branches. Received: model={model!r}"
        )


def _check_inputs(model, x, batch_size):
    """`batch_size` as an int; `x` checked against the model's inputs (names, shapes)."""
    batch_size = _checks.check_int("batch_size", batch_size)
    if x is None:
        raise ValueError("`x` must be the model's inputs (an array or a dict of arrays).")
    check_data = getattr(model, "check_data", None)
    if check_data is not None:
        check_data(x)
    return batch_size


def branch_weights(model, x, batch_size=256):
    """Per-sample weight of each branch, read from the fusion layer.

    For `AttentionFusion` these are the attention weights a_m; for `GatedFusion` the
    gates z_m averaged over features; for `WeightedSumFusion` the learned mixture
    weights. Each row sums to 1 over branches. Other fusion kinds hold no such weights:
    use `ablation`, which works for every fusion kind.

    Args:
        model: a FusionModel with attention, gated or weighted fusion.
        x: its inputs (an array or a dict of arrays).
        batch_size: int, prediction batch size.

    Returns:
        A dict: `"branches"` (labels), `"per_sample"` (array `(n, M)`) and `"mean"`
        (dict label -> mean weight).

    Example:

    >>> import numpy as np, keras
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((6,)),
    ...     branches=[kf.branches.MLP(units=(4,)), kf.branches.MLP(units=(4,))],
    ...     fusion="attention",
    ... )
    >>> w = kf.inspect.branch_weights(model, np.ones((3, 6), "float32"))
    >>> w["per_sample"].shape
    (3, 2)
    """
    _require_fusion_model(model, "branch_weights")
    fusion = model.fusion_layer
    kind = type(fusion).__name__
    if kind not in WEIGHTED_FUSIONS:
        raise ValueError(
            f"branch_weights reads attention, gated or weighted fusion; this model uses "
            f"{kind}. Use kfusion.inspect.ablation(model, x, y), which works for every "
            "fusion kind."
        )
    batch_size = _check_inputs(model, x, batch_size)
    features = model.branch_features()
    feats = features.predict(x, batch_size=batch_size, verbose=0)
    weights = []
    for start in range(0, len(feats[0]), batch_size):
        chunk = [f[start : start + batch_size] for f in feats]
        _, w = fusion(chunk, training=False, return_weights=True)
        w = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(w, "float32")))
        if w.ndim == 3:  # gates (batch, M, units): mean over features
            w = w.mean(axis=-1)
        weights.append(w)
    per_sample = np.concatenate(weights, axis=0)
    labels = branch_labels(model)
    return {
        "branches": labels,
        "per_sample": per_sample,
        "mean": {label: float(v) for label, v in zip(labels, per_sample.mean(axis=0))},
    }


def _score(head, y_true, y_pred):
    """Accuracy for classification heads, negative MSE for the rest (higher is better)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred, dtype="float64")
    kind = type(head).__name__ if head is not None else ""
    if kind == "Classification":
        if y_pred.shape[-1] == 1:
            pred = (y_pred[:, 0] > (0.0 if head.from_logits else 0.5)).astype(int)
        else:
            pred = y_pred.argmax(-1)
        return "accuracy", float(np.mean(pred == y_true.reshape(-1).astype(int)))
    if kind == "MultiLabel":
        cut = 0.0 if getattr(head, "from_logits", False) else head.threshold
        return "binary_accuracy", float(np.mean((y_pred > cut) == (y_true > 0.5)))
    return "neg_mse", -float(np.mean((y_pred - y_true.reshape(y_pred.shape)) ** 2))


def ablation(model, x, y, batch_size=256):
    """How much each branch matters: the score drop when its features are mean-replaced.

    Replacing one branch's features by their dataset mean removes what that branch says
    about each sample while keeping the fusion layer's input in its usual range
    (mean ablation). A large drop means the model relies on that branch.
    Works for every fusion kind; token-level features keep their padding masks.
    Scores: accuracy for `Classification`, binary accuracy for `MultiLabel`, negative MSE
    otherwise (higher is better in each case).

    Args:
        model: a FusionModel with two or more branches and a single-output head.
        x: inputs (an array or a dict of arrays).
        y: targets.
        batch_size: int.

    Returns:
        A dict: `"metric"`, `"baseline"` (score of the intact model) and `"branches"`
        (label -> `{"score", "drop"}`).

    Example:

    >>> import numpy as np, keras
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((6,)),
    ...     branches=[kf.branches.MLP(units=(4,)), kf.branches.MLP(units=(4,))],
    ...     head=kf.heads.Classification(2),
    ... )
    >>> x = np.random.normal(size=(8, 6)).astype("float32")
    >>> report = kf.inspect.ablation(model, x, np.arange(8) % 2)
    >>> sorted(report["branches"])
    ['mlp_branch', 'mlp_branch_1']
    """
    _require_fusion_model(model, "ablation")
    head = model.head
    if head is not None and hasattr(head, "heads"):
        raise ValueError("ablation scores one output; this model has a MultiTask head.")
    batch_size = _check_inputs(model, x, batch_size)
    feats = model.branch_features().predict(x, batch_size=batch_size, verbose=0)
    _check_targets(head, y, len(feats[0]))
    masks = _feature_masks(model, x, feats)

    def predict(features):
        outs = []
        for start in range(0, len(features[0]), batch_size):
            chunk = [f[start : start + batch_size] for f in features]
            mchunk = [None if m is None else m[start : start + batch_size] for m in masks]
            fused = model.fusion_layer(
                chunk, training=False, mask=mchunk if any(m is not None for m in mchunk) else None
            )
            out = head(fused, training=False) if head is not None else fused
            outs.append(np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))))
        return np.concatenate(outs, axis=0)

    metric, baseline = _score(head, y, predict(feats))
    report = {"metric": metric, "baseline": baseline, "branches": {}}
    for i, label in enumerate(branch_labels(model)):
        ablated = list(feats)
        ablated[i] = _mean_features(feats[i], masks[i])
        _, score = _score(head, y, predict(ablated))
        report["branches"][label] = {"score": score, "drop": baseline - score}
    return report


def branch_accuracy(model, x, y, batch_size=256):
    """Each branch's own score, from its auxiliary head, beside the fused model's.

    A model built with `aux_loss_weight > 0` trains one auxiliary head per branch on
    that branch's features alone (`kf.layers.AuxiliaryHeads`), so each branch's own
    accuracy can be read directly: how well each modality predicts by itself, and how
    much the fusion adds. Scores as in `ablation`: accuracy for `Classification`, binary
    accuracy for `MultiLabel`, negative MSE otherwise.

    Args:
        model: a FusionModel with `aux_loss_weight > 0`.
        x: inputs (an array or a dict of arrays).
        y: targets.
        batch_size: int.

    Returns:
        A dict: `"metric"`, `"fused"` (the model's score) and `"branches"` (branch name ->
        its auxiliary head's score).

    Example:

    >>> import numpy as np, keras
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs={"a": keras.Input((6,)), "b": keras.Input((6,))},
    ...     branches={
    ...         "a": kf.branches.MLP(units=(4,), name="mlp_a"),
    ...         "b": kf.branches.MLP(units=(4,), name="mlp_b"),
    ...     },
    ...     head=kf.heads.Classification(2),
    ...     aux_loss_weight=0.5,
    ... )
    >>> x = {k: np.random.normal(size=(8, 6)).astype("float32") for k in "ab"}
    >>> report = kf.inspect.branch_accuracy(model, x, np.arange(8) % 2)
    >>> report["metric"], sorted(report["branches"])
    ('accuracy', ['mlp_a', 'mlp_b'])
    """
    if not getattr(model, "aux_loss_weight", 0.0):
        raise ValueError(
            "branch_accuracy reads the auxiliary heads of a FusionModel built with "
            "aux_loss_weight > 0; for another model use kfusion.inspect.ablation(model, x, y)."
            f" Received: model={model!r}"
        )
    batch_size = _check_inputs(model, model.complete_inputs(x), batch_size)
    predictions = model.branch_predictions(x, batch_size=batch_size)
    fused = model.predict(x, batch_size=batch_size, verbose=0)
    _check_targets(model.head, y, len(fused))
    metric, score = _score(model.head, y, fused)
    return {
        "metric": metric,
        "fused": score,
        "branches": {n: _score(model.head, y, p)[1] for n, p in predictions.items()},
    }


def _check_targets(head, y, rows):
    """Raises `ValueError` unless `y` holds one target per sample, as the head needs."""
    shape = np.shape(y) if y is not None else None
    if shape is None or not shape or shape[0] != rows:
        raise ValueError(
            f"`y` must hold one target per sample of `x` ({rows} rows). "
            f"Received: y of shape {shape}."
        )
    if head is not None and hasattr(head, "check_labels"):
        head.check_labels(np.asarray(y))


def _mean_features(feature, mask):
    if feature.ndim == 2:
        return np.broadcast_to(feature.mean(axis=0), feature.shape).copy()
    if mask is None:
        mean = feature.mean(axis=(0, 1))
    else:
        mean = feature[mask.astype(bool)].mean(axis=0)
    return np.broadcast_to(mean, feature.shape).copy()


def _feature_masks(model, x, feats):
    """Padding masks of token-level branch features (None for vectors)."""
    masks = []
    for input_name, branches in model.branch_map.items():
        data = x[input_name] if isinstance(x, dict) else x
        for name in branches:
            layer = next(b for b in model.branch_layers if b.name == name)
            mask = None
            if feats[len(masks)].ndim == 3:
                m = layer.compute_mask(keras.ops.convert_to_tensor(data), None)
                if m is not None:
                    mask = np.asarray(keras.ops.convert_to_numpy(m))
            masks.append(mask)
    return masks
