import inspect
import math
import numbers
import re
import warnings

import keras
import numpy as np
from keras import ops

from kfusion import _checks, _quantization, _xla
from kfusion.branches._base import is_integer_dtype
from kfusion.export import check_signature_name
from kfusion.layers.auxiliary_heads import AuxiliaryHeads
from kfusion.layers.branch_dropout import BranchDropout
from kfusion.layers.gradient_modulation import GradientModulation
from kfusion.layers.input_normalization import MODES as NORMALIZE_MODES
from kfusion.layers.input_normalization import InputNormalization
from kfusion.layers.missing_modalities import MissingModalities
from kfusion.models import _factory, _guards, _presence, _spec

FEATURE_NORMS = (None, "layer")
BALANCES = (None, "ogm")


def _input_spec(tensor, name):
    return {
        "name": name,
        "shape": [None if d is None else int(d) for d in tensor.shape[1:]],
        "dtype": keras.backend.standardize_dtype(tensor.dtype),
    }


def _fresh_input(tensor, name):
    """A new `keras.Input` like `tensor`, named `name` (the model's own input node)."""
    if not isinstance(tensor, keras.KerasTensor):
        raise ValueError(
            f"`inputs` must be a keras.Input or a dict of them. Received: {name}={tensor!r}"
        )
    # Names a SavedModel / LiteRT signature can't carry are refused here, not at export.
    check_signature_name("Input name", name)
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if not (dtype.startswith(("float", "bfloat", "int", "uint"))):
        raise ValueError(
            f"Input {name!r} has dtype {dtype}: FusionModel inputs hold numbers (float "
            "features or images, integer token ids or images). "
            f"Received: inputs[{name!r}] of dtype {dtype}"
        )
    shape = tuple(tensor.shape[1:])
    if any(d is not None and d < 1 for d in shape):
        raise ValueError(
            f"Input {name!r} has a dimension of size 0: every dimension after the batch must "
            f"be >= 1 or None. Received: inputs[{name!r}] of shape {(None,) + shape}"
        )
    return keras.Input(shape=shape, dtype=dtype, name=name)


def _normalize_inputs(inputs):
    """Returns `(dict name -> keras.Input, single)` from what the user passed.

    Accepts one `keras.Input`, a dict name -> `keras.Input` (or name -> `{"shape",
    "dtype"}`), or the config form: a list of `{"name", "shape", "dtype"}` dicts. The
    model gets fresh inputs named after the dict keys, so the serving signature and
    `fit`'s dict keys are the names the user chose.
    """
    if isinstance(inputs, keras.KerasTensor):
        name = getattr(inputs, "name", None) or ""
        if not name or name.startswith("keras_tensor"):
            name = "inputs"
        return {name: _fresh_input(inputs, name)}, True
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, dict) for s in inputs):
        inputs = {s.get("name"): s for s in inputs}
    if isinstance(inputs, dict) and inputs:
        out = {}
        for key, value in inputs.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"`inputs` keys must be non-empty strings. Received: {key!r}")
            if isinstance(value, dict):
                if "shape" not in value:
                    raise ValueError(f"`inputs[{key!r}]` needs a 'shape'. Received: {value!r}")
                try:
                    value = keras.Input(shape=tuple(value["shape"]), dtype=value.get("dtype"))
                except (ValueError, TypeError) as e:
                    raise ValueError(
                        f"`inputs[{key!r}]` is not a valid input spec: {e} Received: {value!r}"
                    ) from None
            out[key] = _fresh_input(value, key)
        return out, False
    raise ValueError(
        f"`inputs` must be a keras.Input or a non-empty dict of them. Received: inputs={inputs!r}"
    )


def _normalize_branches(branches, input_names, single):
    """Returns an ordered dict input name -> list of layers."""
    if isinstance(branches, keras.layers.Layer):
        branches = [branches]
    if isinstance(branches, (list, tuple)):
        if not single and len(input_names) > 1:
            raise ValueError(
                "With several inputs, `branches` must be a dict input name -> list of "
                f"branches. Inputs: {list(input_names)}. Received: branches={branches!r}"
            )
        branches = {input_names[0]: list(branches)}
    if not isinstance(branches, dict) or not branches:
        raise ValueError(
            "`branches` must be a non-empty list of branch layers or a dict input name -> "
            f"list of them. Received: branches={branches!r}"
        )
    out = {}
    for key, value in branches.items():
        if key not in input_names:
            raise ValueError(
                f"`branches` names an input that does not exist. Received: branches key "
                f"{key!r}; inputs are {list(input_names)}.{_factory.suggest(key, input_names)}"
            )
        items = [value] if isinstance(value, keras.layers.Layer) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(
                f"`branches[{key!r}]` must be a branch layer or a non-empty list of them. "
                f"Received: {value!r}"
            )
        for item in items:
            if not isinstance(item, keras.layers.Layer):
                raise ValueError(
                    f"`branches[{key!r}]` must hold keras layers (kf.branches.CNN(), ...). "
                    f"Received: {item!r}"
                )
        out[key] = list(items)
    missing = [n for n in input_names if n not in out]
    if missing:
        raise ValueError(
            f"Every input needs at least one branch. Inputs without a branch: {missing}. "
            f"Received: branches keys {list(out)}"
        )
    return out


def _unique_layers(branches):
    """Distinct branch instances in order of first appearance; checks name clashes."""
    seen, names = [], {}
    for items in branches.values():
        for layer in items:
            if any(layer is s for s in seen):
                continue
            if layer.name in names:
                raise ValueError(
                    f"Two different branch layers share the name {layer.name!r}. Give each "
                    "branch a unique `name=` (the same instance listed twice shares weights)."
                    f" Received: branches with names {[s.name for s in seen] + [layer.name]}"
                )
            names[layer.name] = layer
            seen.append(layer)
    return seen


@keras.saving.register_keras_serializable(package="kfusion")
class FusionModel(keras.Model):
    """A multi-branch model: inputs -> branches -> fusion layer -> head, one graph.

    A functional `keras.Model` built the way keras-hub builds its backbones: the
    constructor creates the layers, wires the functional graph and stores its arguments,
    so `get_config()` returns exactly what rebuilds it. Each branch turns one input into
    features (`kf.branches`), a fusion layer (`kf.layers`) combines the branch features,
    and a head (`kf.heads`) makes the predictions. Train with plain `fit`.

    Weight sharing: one branch instance listed under two inputs is one set of weights (a
    siamese or tied branch). With a single branch there is nothing to fuse and `fusion`
    is not used.

    Args:
        inputs: one `keras.Input`, or a dict name -> `keras.Input` for several inputs.
        branches: a list of branch layers (all take the single input), or a dict input
            name -> list of branch layers (or one branch layer).
        fusion: a fusion name, one of `"concat"`, `"weighted"`, `"attention"`, `"gated"`,
            `"cross_attention"`, `"low_rank"`, `"film"`, or a fusion layer instance
            (`kf.layers.GatedFusion(128)`). Defaults to `"concat"`.
        head: a head (`kf.heads.Classification(10)`, ...) or None to output the fused
            features.
        fusion_units: int or None. Width of a fusion layer made from a name (default: the
            widest branch output; `"concat"`: no projection).
        mask_value: None, a number, or a dict input name -> number. A float sequence
            input `(batch, T, F)` with a mask value is read through
            `keras.layers.Masking`: a step whose features all equal it is padding, and
            every branch and fusion layer leaves padded steps out (convolutions, RNN
            steps, attention, pooling), so right-padding a sequence never changes a
            prediction. A number applies to every float sequence input. Pad
            unequal-length sequences with `kf.datasets.pad_sequences` (value 0.0).
        normalize: None, `"adapt"`, `"series"`, or a dict input name -> one of them.
            Standardises the raw input inside the graph with
            `kf.layers.InputNormalization`, so saved and exported models normalise
            their own inputs: `"adapt"` with per-feature statistics of the training
            data (set by `adapt(x)`, and by the first `fit` on arrays when not yet
            adapted; masked steps left out), `"series"` per sequence and channel over
            its valid steps (the UCR/UEA convention). A string applies to every float
            input it fits (`"series"`: sequences only).
        branch_dropout: float in [0, 1). In training, each sample loses each branch's
            features with this chance (never all of them; `kf.layers.BranchDropout`),
            so no branch leans on the others and the fused model behaves like an
            ensemble of its branches. Defaults to 0 (off). Not used with one branch.
        missing_modalities: bool or None. True gives a model with several inputs one
            presence input per input, `"<name>_present"`: a bool `(batch,)` flag, True
            where the sample has that modality. An absent modality's branch features are
            replaced by a learned "missing" embedding (`kf.layers.MissingModalities`),
            and the fusion layers that weight branches (`"attention"`, `"gated"`,
            `"weighted"`) renormalise their weights over the present ones;
            `"cross_attention"` masks the absent branches' tokens as keys. So an absent
            modality's values change no output. `fit`, `evaluate`, `predict` and `serve`
            fill the flags in: a flag left out of the input dict means present for every
            sample, and an input left out means absent for every sample. A sample with
            every modality absent gets the model's answer from the missing embeddings
            alone (the same for every such sample). The exported signatures take the
            flags as inputs. None (the default): True when `modality_dropout` is set.
        modality_dropout: float in [0, 1), or a dict input name -> rate. In training,
            each sample loses each present modality with this chance, through the
            presence flags (never its last present one), so the missing embeddings are
            learned and the model predicts well with modalities missing. Off at
            inference. Defaults to 0 (off).
        aux_loss_weight: float >= 0. Above 0, one auxiliary head per branch (a copy of
            `head`'s config, `kf.layers.AuxiliaryHeads`) is trained on that branch's
            features alone, jointly with the fused head: the loss becomes
            `loss + aux_loss_weight * sum_m loss_m` (with missing modalities, an absent
            branch's samples count 0 in its loss). Each branch's auxiliary loss is
            logged as `aux_<branch>_loss`. The auxiliary heads run in training only:
            `predict` and exports leave them out; `branch_predictions(x)` gives their
            predictions. Needs a single-task head and two branches or more. Defaults to
            0 (off).
        balance: None or `"ogm"`. `"ogm"` balances the branches' learning with
            on-the-fly gradient modulation (Peng et al. 2022): a
            `kf.layers.GradientModulation` layer scales the gradient each branch gets
            from the fused head, and `kf.callbacks.ModalityBalance` (added by `fit`
            unless given) slows the branch whose auxiliary head is most confident, once
            an epoch. Needs `aux_loss_weight > 0` (the confidence comes from the
            auxiliary heads). Defaults to None.
        feature_norm: None or `"layer"`. `"layer"` puts a `LayerNormalization` on each
            branch's features before the fusion layer (named `<branch>_feature_norm`),
            so branches whose features differ in scale (a CNN's ReLU sums against an
            RNN's bounded states) meet on one scale and no gate saturates on the larger
            one. Defaults to None (off). Not used with one branch.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Returns:
        A `keras.Model`. `compile(optimizer=...)` takes the head's loss and metrics by
        default.

    Example:

    >>> import numpy as np, keras
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((16, 3), name="signal"),
    ...     branches=[kf.branches.CNN(filters=(8,)), kf.branches.RNN(units=8)],
    ...     fusion="gated",
    ...     head=kf.heads.Classification(3),
    ... )
    >>> model.compile(optimizer="adam")
    >>> x = np.random.normal(size=(8, 16, 3)).astype("float32")
    >>> _ = model.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    >>> model.predict(x, verbose=0).shape
    (8, 3)
    """

    def __init__(
        self,
        inputs,
        branches,
        fusion="concat",
        head=None,
        fusion_units=None,
        mask_value=None,
        normalize=None,
        branch_dropout=0.0,
        feature_norm=None,
        missing_modalities=None,
        modality_dropout=0.0,
        aux_loss_weight=0.0,
        balance=None,
        **kwargs,
    ):
        single = kwargs.pop("single_input", None)
        _check_model_kwargs(kwargs)
        if kwargs.get("name") is not None:
            check_signature_name("Model name", kwargs["name"])
        fusion_units = _checks.check_int("fusion_units", fusion_units, allow_none=True)
        branch_dropout = _checks.check_rate("branch_dropout", branch_dropout)
        feature_norm = _checks.check_choice("feature_norm", feature_norm, FEATURE_NORMS)
        aux_loss_weight = _checks.check_non_negative_float("aux_loss_weight", aux_loss_weight)
        balance = _checks.check_choice("balance", balance, BALANCES)
        if balance is not None and aux_loss_weight == 0.0:
            raise ValueError(
                f"`balance={balance!r}` reads each branch's confidence from its auxiliary "
                "head: set `aux_loss_weight` > 0 too (e.g. 0.5). Received: "
                f"aux_loss_weight={aux_loss_weight!r}"
            )
        # === Inputs and branches ===
        input_map, is_single = _normalize_inputs(inputs)
        mask_values = _per_input_option("mask_value", mask_value, input_map)
        normalizers = _per_input_option("normalize", normalize, input_map)
        if single is not None:
            is_single = bool(single) and len(input_map) == 1
        names = list(input_map)
        missing_modalities, modality_rates = _presence.resolve(
            missing_modalities, modality_dropout, names
        )
        branch_map = _normalize_branches(branches, names, is_single)
        unique = _unique_layers(branch_map)
        if isinstance(fusion, str):
            _factory.check_fusion_name(fusion)
        elif fusion is not None and not isinstance(fusion, keras.layers.Layer):
            raise ValueError(
                f"`fusion` must be a fusion name or a keras layer. Received: fusion={fusion!r}"
            )
        if head is not None and not _is_head(head):
            raise ValueError(
                "`head` must be a kfusion head (kf.heads.Classification(10), ...: a layer "
                f"with `default_loss` and `default_metrics`) or None. Received: head={head!r}"
            )
        for input_name, items in branch_map.items():
            tensor = input_map[input_name]
            for branch in items:
                if hasattr(branch, "check_input"):
                    branch.check_input(tensor.shape, tensor.dtype, input_name=input_name)
                width = 1 if is_integer_dtype(tensor.dtype) else tensor.shape[-1]
                _guards.check_size(branch, width, f"branch {branch.name!r} (input {input_name!r})")
        _check_shared_branches(branch_map, input_map)

        # === Functional graph ===
        prepared = _prepare_inputs(input_map, mask_values, normalizers)
        features, owners, modalities = [], [], []
        for input_name, items in branch_map.items():
            for branch in items:
                features.append(_call_branch(branch, prepared[input_name], input_name))
                owners.append(branch.name)
                modalities.append(names.index(input_name))
        if aux_loss_weight > 0.0:
            if len(features) < 2 or head is None or hasattr(head, "heads"):
                raise ValueError(
                    "`aux_loss_weight` adds one auxiliary head per branch: it needs two "
                    "branches or more and a single-task head (Classification, MultiLabel, "
                    f"Regression). This model has {len(features)} branch(es) and head "
                    f"{None if head is None else _layer_str(head)}. Received: "
                    f"aux_loss_weight={aux_loss_weight!r}"
                )
        raw_features = features
        if balance is not None:
            features = GradientModulation(dtype=unique[0].dtype_policy, name="gradient_modulation")(
                features
            )
        presence_map, branch_presence = {}, None
        if missing_modalities:
            presence_map = {
                _presence.presence_name(n): keras.Input(
                    shape=(), dtype="bool", name=_presence.presence_name(n)
                )
                for n in names
            }
            rates = [modality_rates[n] for n in names]
            # The branches' policy (a rebuilt model gets it from their saved configs).
            features, branch_presence = MissingModalities(
                modalities,
                rates=rates if len(set(rates)) > 1 else rates[0],
                dtype=unique[0].dtype_policy,
                name="missing_modalities",
            )(features, list(presence_map.values()))
        fusion_layer = None
        if len(features) == 1:
            fused = features[0]
        else:
            if fusion is None or isinstance(fusion, str):
                widths = [int(f.shape[-1]) for f in features]
                fusion_layer = _factory.make_fusion(fusion or "concat", widths, units=fusion_units)
            else:
                fusion_layer = fusion
            _check_feature_ranks(features, fusion_layer, owners, fusion)
            if feature_norm == "layer":
                features = [
                    keras.layers.LayerNormalization(
                        dtype=unique[0].dtype_policy, name=f"{owner}_feature_norm"
                    )(f)
                    for f, owner in zip(features, owners)
                ]
            _guards.check_size(fusion_layer, sum(int(f.shape[-1]) for f in features), "fusion")
            if branch_dropout > 0.0:
                features = BranchDropout(branch_dropout, name="branch_dropout")(features)
            fused = _call_fusion(fusion_layer, features, fusion, branch_presence)
        if aux_loss_weight > 0.0:
            # Auxiliary heads on the branches' own features (not gradient-modulated),
            # on the fused features' way to the head: computed in training only.
            fused = AuxiliaryHeads(head, owners, dtype=head.dtype_policy, name="auxiliary_heads")(
                fused, raw_features, presence=branch_presence
            )
        if head is not None:  # MultiTask: each task's head too
            for part in (head, *getattr(head, "heads", {}).values()):
                _guards.check_size(part, fused.shape[-1], f"head {part.name!r}")
        if head is None:
            outputs = fused
        elif hasattr(head, "heads") and isinstance(head.heads, dict):
            # MultiTask: one output per task, each from its own named layer.
            outputs = {task: _call_head(sub, fused) for task, sub in head.heads.items()}
            if not head.built:  # its own weights (learned task weights), if any
                head.build(tuple(fused.shape))
        else:
            outputs = _call_head(head, fused)
        model_inputs = input_map[names[0]] if is_single else {**input_map, **presence_map}
        super().__init__(inputs=model_inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.input_specs = [_input_spec(input_map[n], n) for n in names]
        self.single_input = is_single
        self.branch_map = {k: [b.name for b in v] for k, v in branch_map.items()}
        self.branch_layers = unique
        self.fusion = fusion if isinstance(fusion, str) or fusion is None else None
        self.fusion_layer = fusion_layer
        self.head = head
        self.fusion_units = fusion_units
        self.mask_value = mask_values
        self.normalize = normalizers
        self.branch_dropout = branch_dropout
        self.feature_norm = feature_norm
        self.missing_modalities = missing_modalities
        self.aux_loss_weight = aux_loss_weight
        self.balance = balance
        if aux_loss_weight > 0.0:
            self.aux_trackers = [keras.metrics.Mean(name=f"aux_{b}_loss") for b in owners]
        self.modality_dropout = (
            dict(modality_rates)
            if len(set(modality_rates.values())) > 1
            else next(iter(modality_rates.values()))
        )
        self._branches_as_list = isinstance(branches, (list, tuple)) or isinstance(
            branches, keras.layers.Layer
        )

    # ------------------------------------------------------------------ training
    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Configures training; `loss` and `metrics` default to the head's.

        Args:
            optimizer: as in `keras.Model.compile`. Defaults to `"adam"`.
            loss: as in `keras.Model.compile`; None takes `head.default_loss()`.
            metrics: as in `keras.Model.compile`; None takes `head.default_metrics()`.
            **kwargs: other `keras.Model.compile` arguments (`jit_compile`, ...).
                With `jit_compile="auto"` (Keras' default) a model holding a minGRU
                or minLSTM branch compiles with XLA on a TensorFlow CPU too, where
                Keras would leave it off: their parallel scan trains 3x faster
                fused by XLA. `jit_compile=False` keeps it off.
        """
        default_loss = self.head.default_loss() if self.head is not None else None
        if loss is None:
            loss = default_loss
        # Labels are checked against the head only when they feed the head's own loss:
        # `loss=None`, or the same loss passed explicitly (as a `.keras` file restores it).
        self._check_labels = default_loss is not None and _same_loss(loss, default_loss)
        if metrics is None and self.head is not None:
            metrics = self.head.default_metrics()
        if getattr(self.head, "loss_weights", None) is not None:
            kwargs.setdefault("loss_weights", self.head.default_loss_weights())
        if getattr(self.head, "uncertainty_weighting", False) and not self._check_labels:
            raise ValueError(
                "A MultiTask head with `uncertainty_weighting=True` weighs its tasks' own "
                "losses: compile with loss=None (the default). Received: loss="
                f"{loss!r}"
            )
        if kwargs.get("jit_compile", "auto") == "auto" and not kwargs.get("run_eagerly"):
            if _xla.parallel_scan_wants_xla(self):
                kwargs["jit_compile"] = True
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Restores the compiled state saved in a `.keras` file (loss, metrics, optimizer)."""
        restore_compiled_state(self, config)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, after checking `x` against the model's inputs.

        With the head's default loss (`compile(loss=None)`, or that loss given again, as a
        `.keras` file restores it), NumPy labels `y` are checked by the head too (finite;
        class ids in range; multi-label values in [0, 1]). Labels in a `Classification`
        head's own vocabulary (`labels=`) are mapped to class ids first. Inputs with
        `normalize="adapt"` that were never adapted are adapted on the rows `fit` trains
        on (those before a `validation_split`).
        """
        y = self.encode_labels(y)
        x = self.complete_inputs(x)
        if "validation_data" in kwargs and isinstance(kwargs["validation_data"], tuple):
            data = kwargs["validation_data"]
            if len(data) >= 2:
                kwargs["validation_data"] = (
                    self.complete_inputs(data[0]),
                    self.encode_labels(data[1]),
                ) + data[2:]
        self.check_data(x, y)
        if self._normalizations(adapted=False):
            split = kwargs.get("validation_split", 0.0) or 0.0
            arrays = self._input_arrays(x)
            if arrays is not None:
                rows = len(next(iter(arrays.values())))
                keep = int(math.floor(rows * (1.0 - split)))
                self.adapt({k: v[:keep] for k, v in arrays.items()}, only_unadapted=True)
        if self.balance is not None:
            from kfusion.callbacks.modality_balance import ModalityBalance

            callbacks = list(kwargs.get("callbacks") or [])
            if not any(isinstance(c, ModalityBalance) for c in callbacks):
                callbacks.append(ModalityBalance())
            kwargs["callbacks"] = callbacks
        return super().fit(x, y, *args, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The head's loss, plus `aux_loss_weight` times the branches' auxiliary losses.

        With a `MultiTask(uncertainty_weighting=True)` head, the head's loss is its
        learned weighting of the task losses (`MultiTask.weighted_loss`).
        """
        if getattr(self.head, "uncertainty_weighting", False) and y is not None:
            # Learned task weights (Kendall et al. 2018) replace the compiled sum.
            loss = self.head.weighted_loss(y, y_pred, sample_weight)
            for extra in self.losses:
                loss = loss + self._aggregate_additional_loss(extra)
        else:
            loss = super().compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
            )
        # Trace-time flag read by `get_metrics_result` (same step, same trace).
        object.__setattr__(self, "_aux_logged", False)
        if not self.aux_loss_weight or not training:
            return loss
        aux = self.get_layer("auxiliary_heads").losses_for(y, sample_weight)
        if not aux:
            return loss
        object.__setattr__(self, "_aux_logged", True)
        for tracker, value in zip(self.aux_trackers, aux):
            tracker.update_state(value)
        return loss + self.aux_loss_weight * ops.sum(ops.stack(aux))

    def get_metrics_result(self):
        """The logged metrics; the auxiliary losses only where they were computed."""
        results = super().get_metrics_result()
        if not getattr(self, "_aux_logged", False):
            for tracker in getattr(self, "aux_trackers", ()):
                results.pop(tracker.name, None)
        return results

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, after checking `x` (and `y`, as in `fit`)."""
        y = self.encode_labels(y)
        x = self.complete_inputs(x)
        self.check_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`, after checking `x` against the model's inputs."""
        x = self.complete_inputs(x)
        self.check_data(x)
        return super().predict(x, *args, **kwargs)

    def complete_inputs(self, x):
        """`x` with the presence flags filled in, for a model with `missing_modalities`.

        For a dict of arrays: an input left out is absent for every sample (zeros, flag
        False), a `"<name>_present"` flag left out is True for every sample, and flags
        given as 0/1 numbers become bools. Anything else, and any `x` of a model without
        presence inputs, is returned unchanged.

        Args:
            x: the inputs, as for `predict`.

        Returns:
            The inputs, with every presence flag.
        """
        if not self.missing_modalities:
            return x
        if isinstance(x, (list, tuple)) and len(x) == len(self.input_specs):
            x = {s["name"]: v for s, v in zip(self.input_specs, x)}
        specs = {s["name"]: s for s in self.input_specs}
        return _presence.complete(x, specs, list(specs))

    # ------------------------------------------------------------------ labels
    def _class_head(self):
        if self.head is None or not callable(getattr(self.head, "class_ids", None)):
            raise ValueError(
                "predict_classes and predict_labels need a Classification head. This model's "
                f"head is {None if self.head is None else _layer_str(self.head)}."
            )
        return self.head

    def encode_labels(self, y):
        """`y` with labels of a `Classification(labels=...)` head mapped to class ids.

        Anything else (ids, other heads, datasets, None) is returned unchanged. For a
        `MultiTask` head, a dict of labels is mapped task by task.
        """
        if y is None or self.head is None:
            return y
        heads = getattr(self.head, "heads", None)
        if isinstance(heads, dict) and isinstance(y, dict):
            return {
                k: heads[k].encode(v) if k in heads and _has_vocabulary(heads[k]) else v
                for k, v in y.items()
            }
        if _has_vocabulary(self.head) and _is_array_like(y, allow_dict=False):
            return self.head.encode(y)
        return y

    def predict_classes(self, x, **kwargs):
        """Class ids `(batch,)` for `x`, whatever the head's output shape.

        The argmax for several classes; for a binary head (one sigmoid unit) the output
        above 0.5 (0 with `from_logits=True`), where `predict(x).argmax(-1)` would
        answer 0 for every row.

        Args:
            x: the inputs, as for `predict`.
            **kwargs: `predict` arguments (`batch_size`, `verbose`, ...).
        """
        head = self._class_head()
        kwargs.setdefault("verbose", 0)
        return head.class_ids(self.predict(x, **kwargs))

    def predict_labels(self, x, **kwargs):
        """Predicted labels in the head's own vocabulary (`labels=`), else class ids.

        Args:
            x: the inputs, as for `predict`.
            **kwargs: `predict` arguments (`batch_size`, `verbose`, ...).
        """
        return self._class_head().decode(self.predict_classes(x, **kwargs))

    # ------------------------------------------------------------ normalisation
    def _normalizations(self, adapted=None):
        """`{input name: InputNormalization}` of the `"adapt"` inputs (by `adapted`)."""
        out = {}
        for name, mode in self.normalize.items():
            if mode != "adapt":
                continue
            layer = self.get_layer(_layer_name(name, "normalization"))
            if adapted is None or layer.adapted == adapted:
                out[name] = layer
        return out

    def _input_arrays(self, x):
        """`x` as a dict input name -> NumPy array, or None when it is not array data."""
        names = [s["name"] for s in self.input_specs]
        if x is None:
            return None
        if isinstance(x, dict):
            if not all(_is_array_like(v, False) for v in x.values()):
                return None
            return {k: np.asarray(v) for k, v in x.items() if k in names}
        if _is_array_list(x) and len(x) == len(names) and not self.single_input:
            return {n: np.asarray(v) for n, v in zip(names, x)}
        if _is_array_like(x, allow_dict=False) and len(names) == 1:
            return {names[0]: np.asarray(x[0] if _is_array_list(x) else x)}
        return None

    def adapt(self, x, only_unadapted=False):
        """Sets the statistics of every `normalize="adapt"` input from training data `x`.

        Steps that are padding (`mask_value`) are left out. `fit` calls this itself on
        its first call when an input was never adapted.

        Args:
            x: the training inputs as for `fit` (arrays, or a dict of them).
            only_unadapted: bool, whether inputs adapted before keep their statistics.

        Raises:
            ValueError: when the model has no `"adapt"` input or `x` is not array data.
        """
        layers = self._normalizations(adapted=False if only_unadapted else None)
        if not layers:
            if only_unadapted:
                return
            raise ValueError(
                "This model has no input with normalize='adapt'. Received: normalize="
                f"{dict(self.normalize) or None}"
            )
        self.check_data(x)
        arrays = self._input_arrays(x)
        if arrays is None:
            raise ValueError(
                "adapt needs array data (NumPy arrays, or a dict input name -> array). "
                f"Received: {type(x).__name__}"
            )
        for name, layer in layers.items():
            data = arrays[name].astype("float32")
            mask = None
            if name in self.mask_value:
                mask = np.any(data != np.float32(self.mask_value[name]), axis=-1)
            layer.adapt(data, mask=mask)

    def check_data(self, x, y=None):
        """Raises `ValueError` naming the input and its expected shape when `x` can't fit.

        Checks array data: NumPy arrays, nested lists, backend tensors, and lists or dicts
        of them (datasets and generators are left to keras). For each input it checks the
        name, the shape (batch first), that the values are numbers (integers for token
        ids), that every input has the same number of rows, and that each token id is in
        `[0, vocab_size)` of every branch reading it (0 is padding).

        Args:
            x: the data passed to `fit`, `evaluate` or `predict`.
            y: the labels, or None. Checked by the head (`head.check_labels`) when the
                model was compiled with the head's default loss.
        """
        if y is not None and getattr(self, "_check_labels", False):
            check_labels = getattr(self.head, "check_labels", None)
            if check_labels is not None:
                check_labels(y)
        specs = {s["name"]: s for s in self.input_specs}
        if x is None or not (isinstance(x, dict) or _is_array_like(x, allow_dict=False)):
            return
        expected = ", ".join(f"{n!r} of shape {_shape_str(s)}" for n, s in specs.items())
        flags = [_presence.presence_name(n) for n in specs] if self.missing_modalities else []
        if self.single_input:
            (name,) = specs
            if isinstance(x, dict):
                if set(x) != {name}:
                    raise ValueError(
                        f"This model has one input {name!r} of shape "
                        f"{_shape_str(specs[name])}; received a dict with keys {sorted(x)}."
                    )
                x = x[name]
            elif _is_array_list(x):
                if len(x) != 1:
                    raise ValueError(
                        f"This model has one input {name!r} of shape "
                        f"{_shape_str(specs[name])}; received a list of {len(x)} arrays."
                    )
                x = x[0]
            x = {name: x}
        else:
            if isinstance(x, (list, tuple)) and len(x) == len(specs):
                x = dict(zip(specs, x))
            if not isinstance(x, dict):
                if len(specs) == 1:
                    (name,) = specs
                    raise ValueError(
                        f"This model takes a dict with its one input {name!r} (it was built "
                        "from a dict of inputs or of branches): pass {"
                        f"{name!r}: array}}. Expected: {expected}"
                    )
                raise ValueError(
                    f"This model has several inputs; pass a dict input name -> array. "
                    f"Expected: {expected}"
                )
            missing = [n for n in specs if n not in x]
            if missing:
                raise ValueError(
                    f"Missing input(s) {missing}. Expected: {expected}. "
                    f"Received keys: {sorted(map(str, x))}"
                )
            unknown = [n for n in x if n not in specs and n not in flags]
            if unknown:
                raise ValueError(
                    f"Unknown input name(s) {unknown}. This model's inputs are {list(specs)}."
                    + _factory.suggest(unknown[0], specs)
                )
        by_name = {layer.name: layer for layer in self.branch_layers}
        rows = {}
        for name in flags:
            if name in x:
                rows[name] = len(_presence.check_flags(name, x[name], None))
        for name, spec in specs.items():
            shape = _check_array(name, x[name], spec)
            for branch_name in self.branch_map[name]:
                _check_for_branch(name, x[name], shape, by_name[branch_name])
            rows[name] = shape[0] if shape else 0
        if len(set(rows.values())) > 1:
            raise ValueError(
                "Every input needs the same number of rows (samples). Received: "
                + ", ".join(f"{n!r} with {r} rows" for n, r in rows.items())
            )

    # ------------------------------------------------------------------- config
    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "inputs": [dict(s) for s in self.input_specs],
            "single_input": self.single_input,
            "branch_layers": [keras.saving.serialize_keras_object(b) for b in self.branch_layers],
            "branches": (
                list(self.branch_map[self.input_specs[0]["name"]])
                if self.single_input and self._branches_as_list
                else {k: list(v) for k, v in self.branch_map.items()}
            ),
            "fusion": (
                keras.saving.serialize_keras_object(self.fusion_layer)
                if self.fusion_layer is not None
                else self.fusion
            ),
            "head": keras.saving.serialize_keras_object(self.head) if self.head else None,
            "fusion_units": self.fusion_units,
            "mask_value": dict(self.mask_value) or None,
            "normalize": dict(self.normalize) or None,
            "branch_dropout": self.branch_dropout,
            "feature_norm": self.feature_norm,
            "missing_modalities": self.missing_modalities,
            "modality_dropout": self.modality_dropout,
            "aux_loss_weight": self.aux_loss_weight,
            "balance": self.balance,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layers = [
            keras.saving.deserialize_keras_object(c, custom_objects=custom_objects)
            for c in config.pop("branch_layers")
        ]
        branches = config.pop("branches")
        names = sum(branches.values(), []) if isinstance(branches, dict) else branches
        by_name = _guards.branches_by_name(layers, names)
        if isinstance(branches, dict):
            branches = {k: [by_name[n] for n in v] for k, v in branches.items()}
        else:
            branches = [by_name[n] for n in branches]
        fusion = config.pop("fusion")
        if isinstance(fusion, dict):
            fusion = keras.saving.deserialize_keras_object(fusion, custom_objects=custom_objects)
        head = config.pop("head")
        if head is not None:
            head = keras.saving.deserialize_keras_object(head, custom_objects=custom_objects)
        return cls(branches=branches, fusion=fusion, head=head, **config)

    # --------------------------------------------------------------------- spec
    @classmethod
    def from_spec(cls, spec):
        """Builds a FusionModel from a declarative spec.

        Args:
            spec: a dict, a JSON string, or a path to a `.json` / `.yaml` / `.yml` file with
                keys `inputs`, `branches`, `fusion`, `head` and optionally `name` and
                `fusion_units` (see `to_spec`).

        Returns:
            A new FusionModel.

        Example:

        >>> import kfusion as kf
        >>> model = kf.FusionModel.from_spec({
        ...     "inputs": {"x": {"shape": [12], "dtype": "float32"}},
        ...     "branches": {"x": [{"type": "MLP", "units": [8]}]},
        ...     "head": {"type": "Regression"},
        ... })
        >>> model.output_shape
        (None, 1)
        """
        return cls(**_spec.spec_to_kwargs(_spec.load_spec(spec)))

    def to_spec(self):
        """The model as a plain, JSON/YAML-friendly spec that `from_spec` rebuilds."""
        return _spec.model_to_spec(self)

    # -------------------------------------------------------------- inspection
    @property
    def fusion_kind(self):
        """The fusion layer's name (`"gated"`, ...) or None with a single branch."""
        if self.fusion_layer is None:
            return None
        cls_name = type(self.fusion_layer).__name__
        for key, value in _factory.FUSION_NAMES.items():
            if value == cls_name:
                return key
        return cls_name

    # ------------------------------------------------------------------ serving
    def serve(self, x, jit_compile=True, check=True):
        """Predictions for one sample or a small batch, from a compiled function.

        The fast path for serving from Python: `predict` builds a data pipeline and runs
        callbacks for every call (about 70 ms for one sample on two cores, whatever the
        model), and a plain `model(x)` runs op by op. `serve` traces the model once per
        batch size into a graph (TensorFlow: `tf.function`, with XLA when `jit_compile`;
        JAX: `jax.jit`; PyTorch: `torch.inference_mode()`) and calls it directly. See
        the serving table of `benchmarks/RESULTS.md` for the latencies. For large batches `predict`
        is as fast and streams the data.

        Args:
            x: the inputs, as for `predict` (an array, or a dict input name -> array).
            jit_compile: bool, whether to compile with XLA (TensorFlow, JAX). A model XLA
                can't compile falls back to the plain graph. Defaults to True.
            check: bool, whether to check `x` against the model's inputs first (as
                `predict` does; a few microseconds). Defaults to True.

        Returns:
            NumPy arrays in the structure of the model's outputs.

        Example:

        >>> import numpy as np, keras
        >>> import kfusion as kf
        >>> model = kf.FusionModel(
        ...     inputs=keras.Input((6,), name="x"),
        ...     branches=[kf.branches.MLP(units=(8,))],
        ...     head=kf.heads.Classification(3),
        ... )
        >>> model.serve(np.zeros((1, 6), "float32")).shape
        (1, 3)
        """
        jit_compile = _checks.check_bool("jit_compile", jit_compile)
        check = _checks.check_bool("check", check)
        x = self.complete_inputs(x)
        if check:
            self.check_data(x)
        serving = getattr(self, "_serving_functions", None)
        if serving is None:
            # Not a tracked attribute: saving and export never see the compiled functions.
            serving = {}
            object.__setattr__(self, "_serving_functions", serving)
        if jit_compile not in serving:
            from kfusion import _serving

            serving[jit_compile] = _serving.make_serving_function(self, jit_compile)
        return serving[jit_compile](x)

    # ------------------------------------------------------------------- export
    def export(
        self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs
    ):
        """Exports the model for serving, through kfusion's verified export for ONNX.

        `format="onnx"` (and `"litert"` without converter arguments) goes through
        `kfusion.export.export`: written beside `filepath`, reloaded, compared with the
        model, renamed into place, with kfusion's ONNX fixes (the exact GELU's `Erfc`, no
        converter noise); `opset_version` picks the ONNX opset. Anything else is
        `keras.Model.export` (`"tf_saved_model"`, `"openvino"`, a custom
        `input_signature` or converter arguments).

        Args:
            filepath: where to write.
            format: `"tf_saved_model"`, `"onnx"`, `"litert"`, or another keras format.
            verbose: whether to print a message once written (keras' default: yes).
            input_signature: as in `keras.Model.export`; given, keras exports as is.
            **kwargs: as in `keras.Model.export` (`opset_version` for ONNX).

        Returns:
            For ONNX and LiteRT, the `kfusion.export.ExportResult` (the path written);
            else what `keras.Model.export` returns.
        """
        onnx = format == "onnx" and set(kwargs) <= {"opset_version"}
        litert = format == "litert" and not kwargs
        verified = input_signature is None and (onnx or litert)
        if not verified:
            return super().export(
                filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
            )
        from kfusion import export as kexport

        result = kexport.export(self, filepath, format=format, opset=kwargs.get("opset_version"))
        if verbose is None or verbose:
            print(f"Saved artifact at '{result}'.")
        return result

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize`, without a warning for every layer it leaves float.

        keras quantizes the layers that have its quantization hooks (Dense, EinsumDense,
        Embedding: the fusion layers' projections and gates, the Transformer blocks'
        attention and feed-forward layers, token embeddings, the heads), including
        those inside kfusion layers, and warns once for each other layer (InputLayer,
        Conv1D, LSTM cells, normalisation, dropout...), which simply stays float. The
        quantized model saves to `.keras`, loads with `safe_mode=True` and exports.
        Python's garbage collector runs once at the end, not once per quantized layer
        as keras has it (most of the time quantization took).

        Args:
            mode: `"int8"`, `"int4"`, `"float8"`, or another keras mode.
            config: a keras `QuantizationConfig`, or None.
            filters: which layers to quantize, as in `keras.Model.quantize`.
            **kwargs: other `keras.Model.quantize` arguments.
        """
        with warnings.catch_warnings(), _quantization.one_garbage_collection():
            warnings.filterwarnings("ignore", message=r".*does not have a `quantize` method")
            return super().quantize(mode, config=config, filters=filters, **kwargs)

    def branch_predictions(self, x, **kwargs):
        """Each branch's own predictions, from its auxiliary head (`aux_loss_weight`).

        Args:
            x: the inputs, as for `predict`.
            **kwargs: `predict` arguments (`batch_size`, `verbose`, ...).

        Returns:
            A dict branch name -> its auxiliary head's predictions (NumPy arrays).
        """
        if not self.aux_loss_weight:
            raise ValueError(
                "branch_predictions needs the auxiliary heads of a model built with "
                f"aux_loss_weight > 0. This model has aux_loss_weight={self.aux_loss_weight}."
            )
        x = self.complete_inputs(x)
        self.check_data(x)
        layer = self.get_layer("auxiliary_heads")
        features = list(layer._inbound_nodes[0].arguments.args[1])
        outputs = []
        for head, feature in zip(layer.heads, features):
            if len(feature.shape) == 3:  # mean over the valid steps, as in training
                feature = keras.layers.GlobalAveragePooling1D(name=f"{head.name}_pooling")(feature)
            outputs.append(head(feature))
        model = keras.Model(self.input, outputs, name=f"{self.name}_branch_predictions")
        kwargs.setdefault("verbose", 0)
        out = model.predict(x, **kwargs)
        return {n: np.asarray(p) for n, p in zip(layer.branch_names, out)}

    def branch_features(self):
        """A `keras.Model` from the inputs to the list of branch features (pre-fusion).

        Returns:
            A `keras.Model` whose outputs are the branch features, in the order the fusion
            layer receives them.
        """
        if self.fusion_layer is not None:
            # The positional argument only (not a `presence=` tensor).
            features = list(
                keras.tree.flatten(self.fusion_layer._inbound_nodes[0].arguments.args[0])
            )
        elif self.head is not None:
            node = keras.tree.flatten(self.outputs)[0]._keras_history.operation
            features = list(node._inbound_nodes[0].input_tensors)
        else:
            features = keras.tree.flatten(self.outputs)
        return keras.Model(self.input, features, name=f"{self.name}_branch_features")


def restore_compiled_state(model, config):
    """`compile_from_config` for kfusion models whose `compile` fills in head defaults.

    Compiles `model` with the saved arguments (through its own `compile`) and builds the
    optimizer, so the optimizer variables saved in the file have somewhere to load.
    """
    config = keras.saving.deserialize_keras_object(config)
    model.compile(**config)
    if getattr(model, "optimizer", None) is not None and model.built:
        model.optimizer.build(model.trainable_variables)


# Keyword arguments FusionModel passes on to `keras.Model` (the functional constructor
# silently drops any other, so a typo such as `fusoin=` would otherwise go unnoticed).
_MODEL_KWARGS = ("name", "trainable")
_ARGUMENTS = (
    "inputs",
    "branches",
    "fusion",
    "head",
    "fusion_units",
    "mask_value",
    "normalize",
    "branch_dropout",
    "feature_norm",
    "missing_modalities",
    "modality_dropout",
    "aux_loss_weight",
    "balance",
) + _MODEL_KWARGS


def _has_vocabulary(head):
    return getattr(head, "labels", None) is not None and callable(getattr(head, "encode", None))


def _layer_name(input_name, what):
    """A readable layer name for an input's preprocessing (names hold no odd characters)."""
    return f"{re.sub(r'[^0-9A-Za-z_.-]', '_', input_name)}_{what}"


def _eligible(option, tensor):
    """Whether an input of this shape/dtype can take `option` (mask_value / normalize)."""
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    floating = dtype.startswith(("float", "bfloat"))
    if option == "mask_value":
        return floating and len(tensor.shape) == 3
    return floating and len(tensor.shape) >= 2


def _check_option_value(option, value, name):
    if option == "mask_value":
        ok = (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
        if not ok:
            raise ValueError(
                f"`mask_value` must be a finite number (the value of padded steps). "
                f"Received: mask_value[{name!r}]={value!r}"
            )
        return float(value)
    if value not in NORMALIZE_MODES:
        raise ValueError(
            f"`normalize` must be one of {list(NORMALIZE_MODES)} or None. "
            f"Received: normalize[{name!r}]={value!r}"
        )
    return value


def _per_input_option(option, value, input_map):
    """`{input name: value}` for `mask_value`/`normalize` given as one value or a dict."""
    if value is None:
        return {}
    what = {
        "mask_value": "float sequence inputs (batch, T, F)",
        "normalize": "float inputs",
    }[option]
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            if name not in input_map:
                raise ValueError(
                    f"`{option}` names an input that does not exist. Received: {option} key "
                    f"{name!r}; inputs are {list(input_map)}."
                    f"{_factory.suggest(name, input_map)}"
                )
            if item is None:
                continue
            item = _check_option_value(option, item, name)
            tensor = input_map[name]
            ok = _eligible(option, tensor) and not (item == "series" and len(tensor.shape) != 3)
            if not ok:
                raise ValueError(
                    f"`{option}` applies to {what}"
                    + (" ('series': sequences (batch, T, F) only)" if option == "normalize" else "")
                    + f"; input {name!r} has shape {tuple(tensor.shape)} and dtype "
                    f"{keras.backend.standardize_dtype(tensor.dtype)}. "
                    f"Received: {option}[{name!r}]={item!r}"
                )
            out[name] = item
        return out
    out = {}
    for name, tensor in input_map.items():
        item = _check_option_value(option, value, name)
        if _eligible(option, tensor) and not (item == "series" and len(tensor.shape) != 3):
            out[name] = item
    if not out:
        raise ValueError(
            f"`{option}` applies to {what}"
            + (" ('series': sequences only)" if option == "normalize" else "")
            + ", and this model has none: "
            + ", ".join(
                f"{n!r} {tuple(t.shape)} {keras.backend.standardize_dtype(t.dtype)}"
                for n, t in input_map.items()
            )
            + f". Received: {option}={value!r}"
        )
    return out


def _prepare_inputs(input_map, mask_values, normalizers):
    """Each input through its `Masking` and `InputNormalization` layers, if any."""
    prepared = {}
    for name, tensor in input_map.items():
        if name in mask_values:
            tensor = keras.layers.Masking(
                mask_values[name], dtype="float32", name=_layer_name(name, "masking")
            )(tensor)
        if name in normalizers:
            tensor = InputNormalization(normalizers[name], name=_layer_name(name, "normalization"))(
                tensor
            )
        prepared[name] = tensor
    return prepared


def _same_loss(loss, other):
    """Whether `loss` is the loss `other` (a head's default: a Loss, or a dict of them).

    Two `keras.losses.Loss` objects are the same loss when they are of one type with one
    config; dicts compare task by task. Anything else (names, functions, other objects)
    is another loss. Never raises: a loss whose config can't be read is another loss, and
    keras judges it in `compile`.
    """
    if isinstance(loss, dict) and isinstance(other, dict):
        return loss.keys() == other.keys() and all(_same_loss(loss[k], other[k]) for k in loss)
    if not isinstance(loss, keras.losses.Loss) or type(loss) is not type(other):
        return False
    try:
        return loss.get_config() == other.get_config()
    except Exception:  # noqa: BLE001 - a user loss's get_config may raise anything
        return False


def _check_model_kwargs(kwargs):
    for key in kwargs:
        if key not in _MODEL_KWARGS:
            raise TypeError(
                f"FusionModel got an unexpected keyword argument {key!r}."
                f"{_factory.suggest(key, _ARGUMENTS)} Valid arguments: {list(_ARGUMENTS)}"
            )


def _is_head(head):
    """A kfusion head: a layer with the head contract (`default_loss`, `default_metrics`)."""
    return (
        isinstance(head, keras.layers.Layer)
        and callable(getattr(head, "default_loss", None))
        and callable(getattr(head, "default_metrics", None))
    )


def _check_shared_branches(branch_map, input_map):
    """One branch instance under several inputs needs inputs of one shape and dtype."""
    first = {}
    for input_name, items in branch_map.items():
        tensor = input_map[input_name]
        signature = (tuple(tensor.shape[1:]), keras.backend.standardize_dtype(tensor.dtype))
        for branch in items:
            seen = first.setdefault(id(branch), (input_name, signature))
            if seen[1] != signature:
                raise ValueError(
                    f"Branch '{branch.name}' is shared by inputs {seen[0]!r} and "
                    f"{input_name!r}, which differ: {seen[0]!r} is {_signature_str(seen[1])}, "
                    f"{input_name!r} is {_signature_str(signature)}. A shared branch (one "
                    "set of weights) needs inputs of one shape and dtype; give each input "
                    "its own branch instance."
                )


def _signature_str(signature):
    shape, dtype = signature
    return f"{(None,) + shape} {dtype}"


def _call_in_context(layer, x, context, received="", **kwargs):
    """`layer(x)`; a ValueError/TypeError is re-raised (same class) with `context` first."""
    try:
        return layer(x, **kwargs)
    except (ValueError, TypeError) as e:
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(f"{context}: {e}{received}") from e


def _call_branch(branch, tensor, input_name):
    context = (
        f"Branch '{branch.name}' ({type(branch).__name__}) cannot take input "
        f"{input_name!r} of shape {tuple(tensor.shape)}"
    )
    return _call_in_context(branch, tensor, context)


def _layer_str(layer):
    return f"<{type(layer).__name__} name={layer.name}>"


def _fusion_str(fusion, fusion_layer):
    return repr(fusion) if isinstance(fusion, str) else _layer_str(fusion_layer)


def _takes_presence(layer):
    """Whether a fusion layer's `call` takes the branches' presence (`presence=`)."""
    return "presence" in inspect.signature(layer.call).parameters


def _call_fusion(fusion_layer, features, fusion, presence=None):
    shapes = [tuple(f.shape) for f in features]
    context = f"The fusion layer cannot fuse the branch features of shapes {shapes}"
    received = f" Received: fusion={_fusion_str(fusion, fusion_layer)}"
    kwargs = {}
    if presence is not None and _takes_presence(fusion_layer):
        kwargs["presence"] = presence
    return _call_in_context(fusion_layer, features, context, received, **kwargs)


def _call_head(head, fused):
    context = f"The head cannot take the fused features of shape {tuple(fused.shape)}"
    return _call_in_context(head, fused, context, f" Received: head={_layer_str(head)}")


def _check_feature_ranks(features, fusion_layer, owners, fusion):
    token_level = type(fusion_layer).__name__ in ("CrossAttentionFusion", "FiLMFusion")
    if token_level:
        return
    for feature, owner in zip(features, owners):
        if len(feature.shape) != 2:
            raise ValueError(
                f"This fusion takes one vector per branch, but branch '{owner}' returns shape "
                f"{tuple(feature.shape)}. Give the branch a pooling mode (pooling='mean') or "
                "use fusion='cross_attention' for token-level fusion. "
                f"Received: fusion={_fusion_str(fusion, fusion_layer)}"
            )


def _is_array_like(x, allow_dict):
    if isinstance(x, dict):
        return allow_dict and all(_is_array_like(v, False) for v in x.values())
    if _is_array_list(x):
        return True
    return isinstance(x, (np.ndarray, list)) or hasattr(x, "__array__")


def _is_array_list(x):
    """A list or tuple of arrays (one per input), as opposed to nested lists of numbers."""
    return (
        isinstance(x, (list, tuple))
        and bool(x)
        and all(isinstance(v, np.ndarray) or hasattr(v, "__array__") for v in x)
    )


def _shape_str(spec):
    return str((None,) + tuple(spec["shape"]))


def _dtype_name(array):
    """The dtype of `array` as a string (NumPy, backend tensors, nested lists)."""
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        dtype = np.asarray(array).dtype
    if isinstance(dtype, np.dtype):
        if dtype.kind in "biuf":
            return str(dtype)
        return f"{dtype} (not numbers)"
    try:
        return keras.backend.standardize_dtype(dtype)
    except (ValueError, TypeError):
        return f"{dtype} (not numbers)"


def _check_array(name, array, spec):
    """Checks one input's array against its spec; returns its shape."""
    if array is None or isinstance(array, (str, bytes)) or not _is_array_like(array, False):
        raise ValueError(
            f"Input {name!r} expects an array of shape {_shape_str(spec)} (batch first). "
            f"Received: {type(array).__name__}."
        )
    try:
        shape = tuple(np.shape(array))
    except ValueError as e:
        raise ValueError(
            f"Input {name!r} expects an array of shape {_shape_str(spec)} (batch first), "
            f"but its rows could not be read as one array ({e})."
        ) from None
    expected = [None] + list(spec["shape"])
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected[1:], shape[1:])
    )
    if not ok:
        raise ValueError(
            f"Input {name!r} expects arrays of shape {_shape_str(spec)} (batch first). "
            f"Received shape {shape}."
        )
    dtype = _dtype_name(array)
    integer = dtype.startswith(("int", "uint"))
    if is_integer_dtype(spec["dtype"]):
        if not integer:
            raise ValueError(
                f"Input {name!r} expects integer token ids ({spec['dtype']}) of shape "
                f"{_shape_str(spec)}. Received dtype {dtype}."
            )
    elif not (integer or dtype.startswith(("float", "bfloat", "bool"))):
        raise ValueError(
            f"Input {name!r} expects numbers ({spec['dtype']}) of shape {_shape_str(spec)}. "
            f"Received dtype {dtype}."
        )
    return shape


def _value_range(array):
    """`(min, max)` of an array's values as Python ints.

    NumPy arrays and lists are reduced by NumPy; backend tensors where they live (only
    two scalars come back to the host), falling back to NumPy for another backend's
    tensors.
    """
    if not isinstance(array, (np.ndarray, list, tuple)):
        try:
            tensor = keras.ops.convert_to_tensor(array)
            return (
                int(keras.ops.convert_to_numpy(keras.ops.min(tensor))),
                int(keras.ops.convert_to_numpy(keras.ops.max(tensor))),
            )
        except (TypeError, ValueError, RuntimeError):
            pass
    array = np.asarray(array)
    return int(array.min()), int(array.max())


def _check_for_branch(name, array, shape, branch):
    """Checks what one branch needs of its input's data.

    Token ids below its `vocab_size`; no more steps (or image patches) than its position
    table holds (`max_length`).
    """
    max_length = getattr(branch, "position_rows", getattr(branch, "max_length", None))
    if max_length is not None and len(shape) in (2, 3, 4):
        steps = branch.token_count(shape)
        if len(shape) == 4:
            what = "image patches"
        else:
            what = "patches" if getattr(branch, "patch_length", None) else "steps"
        if steps > max_length:
            raise ValueError(
                f"Input {name!r} has {steps} {what}, more than branch '{branch.name}' takes "
                f"(max_length={max_length}). Received shape {shape}."
            )
    vocab = getattr(branch, "vocab_size", None)
    if vocab is not None and np.prod(shape, dtype=np.int64):
        low, high = _value_range(array)
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(
                f"Input {name!r} holds token id {bad}, outside [0, {vocab}): branch "
                f"'{branch.name}' has vocab_size={vocab} (ids 1..{vocab - 1}; 0 is padding)."
            )
