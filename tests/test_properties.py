"""Property-based tests (hypothesis) over FusionModel configurations.

Valid configurations (input kinds, branches, fusion, head, dtype policy) must build, take a
training step, reload from `.keras` with `safe_mode=True` with equal outputs, and keep
padding invariance for token ids. Invalid ones must raise `ValueError` / `TypeError` whose
message names the offending argument (or input), never an internal backend error.

Profiles (env HYPOTHESIS_PROFILE): "ci" (default; derandomized and small, so CI is
reproducible and fast) and "deep" (random, many examples). Deep run:

    HYPOTHESIS_PROFILE=deep python -m pytest -q tests/test_properties.py
"""

import copy
import json
import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kfusion as kf
from tests import helpers

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("deep", max_examples=400, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
# The valid-configuration property trains and saves a model per example: it draws fewer
# examples than the invalid one (ci: 10 and 25; deep: 100 and 400).
VALID_EXAMPLES = 100 if PROFILE == "deep" else 10
# On CI the training step runs eagerly: tracing a graph per example would cost most of
# the time (graph and XLA training are tested per layer and per model elsewhere); the
# deep run traces the train step as `fit` does by default.
RUN_EAGERLY = PROFILE != "deep"

N = 8  # rows: one batch
T = 6  # token / sequence length
EXTRA_PADDING = 3
VOCAB = 12
SHAPES = {"sequence": (T, 3), "image": (8, 8, 2), "tokens": (None,), "vectors": (5,)}
DTYPES = {"tokens": "int32"}
BRANCH_TYPES = {
    "sequence": ("CNN", "RNN", "Transformer"),
    "image": ("CNN", "RNN", "Transformer", "Backbone"),
    "tokens": ("CNN", "RNN", "Transformer"),
    "vectors": ("MLP",),
}
POOLINGS = {
    "CNN": ("mean", "max", "last"),
    "RNN": ("last", "mean", "max"),
    "Transformer": ("mean", "max", "last", "cls"),
    "Backbone": ("mean", "max"),
    "MLP": ("mean",),
}
FUSIONS = ("concat", "weighted", "attention", "gated", "cross_attention", "low_rank", "film")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Outputs of two computations that should agree (a reload, a padded batch), per policy.
TOLERANCE = {"float32": 1e-5, "mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}


# ------------------------------------------------------------------------ strategies
@st.composite
def branch_specs(draw, kind, name, token_level):
    """A plain-data branch spec (`type` + constructor arguments) for an input kind."""
    type_name = draw(st.sampled_from(BRANCH_TYPES[kind]))
    width = draw(st.sampled_from((4, 8)))
    poolings = POOLINGS[type_name]
    if token_level and type_name != "MLP":
        poolings = poolings + (None,)
    spec = {"type": type_name, "name": name, "pooling": draw(st.sampled_from(poolings))}
    if type_name == "CNN":
        spec.update(
            filters=[width] * draw(st.integers(1, 2)),
            kernel_size=draw(st.sampled_from((1, 3))),
            residual=draw(st.booleans()),
            normalization=draw(st.sampled_from((None, "layer", "batch"))),
        )
    elif type_name == "RNN":
        spec.update(
            units=width,
            cell=draw(st.sampled_from(("lstm", "gru"))),
            bidirectional=draw(st.booleans()),
        )
    elif type_name == "Transformer":
        spec.update(
            dim=width,
            depth=1,
            num_heads=2,
            intermediate_dim=8,
            max_length=16,
            patch_size=4,
            norm_first=draw(st.booleans()),
        )
    elif type_name == "MLP":
        spec.update(units=[width], normalization=draw(st.sampled_from((None, "layer", "batch"))))
    if type_name != "Backbone":
        spec["dropout"] = draw(st.sampled_from((0.0, 0.1)))
    if draw(st.booleans()):
        spec["output_dim"] = 4
    if kind == "tokens":
        spec.update(vocab_size=VOCAB, embedding_dim=4)
    return spec


HEADS = st.one_of(
    st.none(),
    st.builds(
        lambda k, logits, hidden: {
            "type": "Classification",
            "num_classes": k,
            "from_logits": logits,
            "hidden_units": hidden,
        },
        st.sampled_from((2, 3)),
        st.booleans(),
        st.sampled_from(([], [4])),
    ),
    st.builds(lambda u: {"type": "Regression", "units": u}, st.sampled_from((1, 2))),
    st.just({"type": "MultiLabel", "num_labels": 3}),
    st.just(
        {
            "type": "MultiTask",
            "heads": {
                "label": {"type": "Classification", "num_classes": 3},
                "score": {"type": "Regression"},
            },
        }
    ),
)


@st.composite
def valid_configs(draw):
    """A valid FusionModel configuration as plain data (readable in failure reports)."""
    fusion = draw(st.sampled_from(FUSIONS))
    kinds = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=1, max_size=3, unique=True))
    if fusion == "film":
        kinds = kinds[:2]
        count = 2
    else:
        count = draw(st.integers(len(kinds), 3))
    # Token-level fusion takes unpooled branches; a single branch feeds the head directly.
    token_level = fusion == "cross_attention" and count > 1
    owners = list(kinds) + [draw(st.sampled_from(kinds)) for _ in range(count - len(kinds))]
    branches = {k: [] for k in kinds}
    for i, kind in enumerate(owners):
        branches[kind].append(draw(branch_specs(kind, f"branch_{i}", token_level)))
    inputs = {kind: kind for kind in kinds}
    if fusion != "film" and draw(st.booleans()):
        # A tied (siamese) branch: a second input of the same kind, the same instance.
        kind = draw(st.sampled_from(kinds))
        inputs[f"{kind}_twin"] = kind
        branches[f"{kind}_twin"] = [{"ref": branches[kind][0]["name"]}]
    return {
        "policy": draw(st.sampled_from(POLICIES)),
        "inputs": inputs,
        "branches": branches,
        "fusion": fusion,
        "fusion_units": draw(st.sampled_from((None, 6))),
        "head": draw(HEADS),
        "listed": len(inputs) == 1 and draw(st.booleans()),
    }


# -------------------------------------------------------------------- model builder
def _tiny_image_model():
    inp = keras.Input((None, None, 2))
    return keras.Model(inp, keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp))


def _make_branch(spec):
    kwargs = dict(spec)
    type_name = kwargs.pop("type")
    if type_name == "Backbone":
        kwargs.setdefault("model", _tiny_image_model())
        kwargs.setdefault("preprocess", False)
    return getattr(kf.branches, type_name)(**kwargs)


def _make_head(spec):
    if spec == "layer:Dense":  # layers that are not heads (made here, not in a strategy)
        return keras.layers.Dense(3)
    if spec == "layer:MLP":
        return kf.branches.MLP(units=[4], name="mlp_as_head")
    if spec is None or not isinstance(spec, dict):
        return spec
    kwargs = dict(spec)
    type_name = kwargs.pop("type")
    if type_name == "MultiTask":
        heads = kwargs.pop("heads")
        heads = {k: _make_head(v) for k, v in heads.items()} if isinstance(heads, dict) else heads
        return kf.heads.MultiTask(heads, **kwargs)
    return getattr(kf.heads, type_name)(**kwargs)


def _make_input(name, kind, config):
    shape = config.get("shapes", {}).get(name, SHAPES[kind])
    dtype = config.get("dtypes", {}).get(name, DTYPES.get(kind, "float32"))
    return keras.Input(shape, dtype=dtype, name=name)


def build(config):
    """The FusionModel a configuration describes (under its dtype policy)."""
    inputs = {name: _make_input(name, kind, config) for name, kind in config["inputs"].items()}
    # Every instance first (references may come before what they name), then the lists.
    made = {
        (key, i): _make_branch(spec)
        for key, specs in config["branches"].items()
        for i, spec in enumerate(specs)
        if "ref" not in spec
    }
    by_name = {}
    for layer in made.values():
        by_name.setdefault(layer.name, layer)
    branches = {
        key: [
            by_name[spec["ref"]] if "ref" in spec else made[key, i] for i, spec in enumerate(specs)
        ]
        for key, specs in config["branches"].items()
    }
    fusion = config["fusion"]
    if isinstance(fusion, dict):
        kwargs = dict(fusion)
        fusion = getattr(kf.layers, kwargs.pop("type"))(**kwargs)
    kwargs = dict(config.get("extra", {}))
    if config.get("listed"):
        (name,) = inputs
        model_inputs, model_branches = inputs[name], branches[name]
    else:
        model_inputs, model_branches = inputs, branches
    if "raw_inputs" in config:
        model_inputs = config["raw_inputs"]
    return kf.FusionModel(
        inputs=model_inputs,
        branches=model_branches,
        fusion=fusion,
        head=_make_head(config["head"]),
        fusion_units=config["fusion_units"],
        **kwargs,
    )


# ---------------------------------------------------------------------------- data
def make_data(config, seed):
    """Arrays for every input: token rows of random length (right-padded with 0)."""
    rng = np.random.default_rng(seed)
    data = {}
    for name, kind in config["inputs"].items():
        if kind == "tokens":
            ids = rng.integers(1, VOCAB, size=(N, T)).astype("int32")
            lengths = rng.integers(1, T + 1, size=N)
            ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
            data[name] = ids
        else:
            data[name] = rng.normal(size=(N,) + SHAPES[kind]).astype("float32")
    return data


def with_more_padding(config, data):
    """The same batch with EXTRA_PADDING more padding ids (0) after every token row."""
    out = dict(data)
    for name, kind in config["inputs"].items():
        if kind == "tokens":
            pad = np.zeros((N, EXTRA_PADDING), "int32")
            out[name] = np.concatenate([data[name], pad], axis=1)
    return out


def make_targets(config, model, seed):
    """Labels that fit the head (or the fused features' shape without a head)."""
    rng = np.random.default_rng(seed + 1)
    head = config["head"]
    if head is None:
        return rng.normal(size=(N,) + tuple(model.output_shape[1:])).astype("float32")
    if head["type"] == "Classification":
        k = head["num_classes"]
        return rng.integers(0, k, size=(N, 1) if k <= 2 else (N,)).astype("int32")
    if head["type"] == "Regression":
        return rng.normal(size=(N, head["units"])).astype("float32")
    if head["type"] == "MultiLabel":
        return rng.integers(0, 2, size=(N, head["num_labels"])).astype("float32")
    return {  # MultiTask: the tasks of HEADS
        "label": rng.integers(0, 3, size=(N,)).astype("int32"),
        "score": rng.normal(size=(N, 1)).astype("float32"),
    }


def model_inputs(model, data):
    return next(iter(data.values())) if model.single_input else data


def outputs(model, data):
    out = model(model_inputs(model, data), training=False)
    return [helpers.as_numpy(t).astype("float32") for t in keras.tree.flatten(out)]


def assert_close(expected, got, policy, what):
    tol = TOLERANCE[policy]
    assert len(expected) == len(got), what
    for e, g in zip(expected, got):
        assert e.shape == g.shape, (what, e.shape, g.shape)
        np.testing.assert_allclose(g, e, atol=tol, rtol=tol, err_msg=what)


# ------------------------------------------------------------------- valid configs
def _tokens(type_name, name, pooling, **kwargs):
    spec = {"type": type_name, "name": name, "pooling": pooling, "dropout": 0.0}
    return {**spec, "vocab_size": VOCAB, "embedding_dim": 4, **kwargs}


_TRANSFORMER = dict(dim=4, depth=1, num_heads=2, intermediate_dim=8, max_length=16, patch_size=4)
# Always run, whatever the profile draws: padded token ids through token-level fusion with a
# tied branch under float16, and FiLM over an image and token ids under bfloat16.
EXPLICIT = [
    {
        "policy": "mixed_float16",
        "inputs": {"tokens": "tokens", "vectors": "vectors", "tokens_twin": "tokens"},
        "branches": {
            "tokens": [
                _tokens("CNN", "branch_0", None, filters=[4], kernel_size=3, residual=True),
                _tokens("Transformer", "branch_1", None, norm_first=True, **_TRANSFORMER),
            ],
            "vectors": [{"type": "MLP", "name": "branch_2", "units": [4]}],
            "tokens_twin": [{"ref": "branch_1"}],
        },
        "fusion": "cross_attention",
        "fusion_units": None,
        "head": {"type": "Classification", "num_classes": 3},
        "listed": False,
    },
    {
        "policy": "mixed_bfloat16",
        "inputs": {"image": "image", "tokens": "tokens"},
        "branches": {
            "image": [
                {"type": "Transformer", "name": "branch_0", "pooling": "cls", **_TRANSFORMER}
            ],
            "tokens": [_tokens("RNN", "branch_1", "last", units=4, cell="gru", bidirectional=True)],
        },
        "fusion": "film",
        "fusion_units": None,
        "head": {"type": "Regression", "units": 2},
        "listed": False,
    },
]


@settings(max_examples=VALID_EXAMPLES)
@given(config=valid_configs(), seed=st.integers(0, 2**16))
@example(config=EXPLICIT[0], seed=0)
@example(config=EXPLICIT[1], seed=1)
def test_valid_configurations_build_train_save_and_ignore_padding(config, seed, tmp_path_factory):
    policy = config["policy"]
    keras.config.set_dtype_policy(policy)
    try:
        model = build(config)
        data = make_data(config, seed)

        # Eager outputs agree with the symbolic output structure and shapes.
        before = outputs(model, data)
        symbolic = [tuple(t.shape) for t in keras.tree.flatten(model.outputs)]
        assert [(N,) + s[1:] for s in symbolic] == [b.shape for b in before]
        assert all(np.all(np.isfinite(b)) for b in before)

        # One training step (plain fit, one batch; XLA is covered by the layer tests).
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="mse" if config["head"] is None else None,
            jit_compile=False,
            run_eagerly=RUN_EAGERLY,
        )
        history = model.fit(
            model_inputs(model, data),
            make_targets(config, model, seed),
            batch_size=N,
            epochs=1,
            verbose=0,
        )
        assert np.isfinite(history.history["loss"][-1])
        trained = outputs(model, data)

        # .keras round trip with safe_mode=True: same config, same outputs.
        path = os.path.join(str(tmp_path_factory.mktemp("model")), "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        assert isinstance(loaded, kf.FusionModel)
        assert json.dumps(loaded.get_config(), sort_keys=True) == json.dumps(
            model.get_config(), sort_keys=True
        )
        assert_close(trained, outputs(loaded, data), policy, "reloaded .keras outputs")

        # Token id 0 is padding: more padding never changes any output.
        if "tokens" in config["inputs"].values():
            padded = with_more_padding(config, data)
            assert_close(trained, outputs(model, padded), policy, "padded outputs")
            assert_close(trained, outputs(loaded, padded), policy, "padded reloaded outputs")
    finally:
        keras.config.set_dtype_policy("float32")
        keras.backend.clear_session()


# ----------------------------------------------------------------- invalid configs
BAD_BRANCH_ARGS = {
    "CNN": [
        ("filters", 0),
        ("filters", []),
        ("filters", [4, 0]),
        ("kernel_size", 0),
        ("residual", "yes"),
        ("normalization", "group"),
        ("image_pooling", 0),
        ("activation", "not_an_activation"),
    ],
    "RNN": [
        ("units", 0),
        ("units", 2.5),
        ("cell", "lstmx"),
        ("bidirectional", 1),
        ("num_layers", 0),
        ("recurrent_dropout", 1.5),
    ],
    "Transformer": [
        ("dim", 0),
        ("dim", 5),
        ("depth", 0),
        ("num_heads", 0),
        ("intermediate_dim", 0),
        ("max_length", 0),
        ("patch_size", 0),
        ("norm_first", "no"),
    ],
    "MLP": [("units", 0), ("units", []), ("normalization", "batchnorm"), ("activation", "nope")],
    "Backbone": [("pooling", "last"), ("preprocess", "yes"), ("input_size", -1), ("model", "X")],
}
BAD_COMMON_ARGS = [("pooling", "avg"), ("output_dim", 0), ("output_dim", -3)]
BAD_DROPOUTS = [("dropout", -0.1), ("dropout", 1.0), ("dropout", "0.1")]
BAD_TOKEN_ARGS = [("vocab_size", 1), ("embedding_dim", 0)]
BAD_HEADS = ["classification", 3, kf.heads.Classification, "layer:Dense", "layer:MLP"]
BAD_HEAD_ARGS = [
    ({"type": "Classification", "num_classes": 0}, "num_classes"),
    ({"type": "Classification", "num_classes": 2.5}, "num_classes"),
    ({"type": "Classification", "num_classes": 3, "dropout": 1.0}, "dropout"),
    ({"type": "Classification", "num_classes": 3, "label_smoothing": 1.5}, "label_smoothing"),
    ({"type": "Classification", "num_classes": 3, "hidden_units": [0]}, "hidden_units"),
    ({"type": "Regression", "units": 0}, "units"),
    ({"type": "MultiLabel", "num_labels": 0}, "num_labels"),
    ({"type": "MultiTask", "heads": {}}, "heads"),
    ({"type": "MultiTask", "heads": {"a": "x"}}, "heads"),
]
# Branch types that cannot take an input kind (vocab: the branch is given token ids' vocab).
WRONG_BRANCHES = {
    "sequence": [("MLP", False), ("Backbone", False), ("CNN", True)],
    "image": [("MLP", False), ("RNN", True)],
    "tokens": [("MLP", False), ("Backbone", False), ("CNN", False), ("Transformer", False)],
    "vectors": [("CNN", False), ("RNN", False), ("Transformer", False), ("RNN", True)],
}
VECTOR_FUSIONS = ("concat", "weighted", "attention", "gated", "low_rank")


def _own_specs(config):
    """(input name, index, spec) of every branch spec that is not a reference."""
    return [
        (name, i, spec)
        for name, specs in config["branches"].items()
        for i, spec in enumerate(specs)
        if "ref" not in spec
    ]


def _add_vectors_input(config, name="extra", branches=True):
    """A vector input (with an MLP branch unless `branches=False`): one more feature."""
    config["listed"] = False
    config["inputs"][name] = "vectors"
    config["branches"][name] = [{"type": "MLP", "units": [4], "name": f"{name}_mlp"}]
    if not branches:
        del config["branches"][name]


def _feature_count(config):
    return sum(len(specs) for specs in config["branches"].values())


@st.composite
def invalid_configs(draw):
    """A configuration with one thing wrong, and the fragments its error must name."""
    config = copy.deepcopy(draw(valid_configs()))
    mutation = draw(
        st.sampled_from(
            (
                "branch_arg",
                "fusion_name",
                "fusion_type",
                "fusion_units",
                "film_count",
                "unpooled",
                "film_condition",
                "head_type",
                "head_arg",
                "wrong_kind",
                "branches_key",
                "input_without_branch",
                "unknown_kwarg",
                "shared_mismatch",
                "duplicate_name",
                "bad_inputs",
                "input_dtype",
                "zero_dim",
            )
        )
    )
    own = _own_specs(config)
    if mutation == "branch_arg":
        name, _, spec = draw(st.sampled_from(own))
        kind = config["inputs"][name]
        choices = BAD_BRANCH_ARGS[spec["type"]] + BAD_COMMON_ARGS
        if spec["type"] != "Backbone":
            choices = choices + BAD_DROPOUTS
        if kind == "tokens":
            choices = choices + BAD_TOKEN_ARGS
        if spec["type"] == "Transformer" and kind != "tokens":
            choices = choices + [("max_length", 2)]  # fewer positions than steps/patches
        arg, value = draw(st.sampled_from(choices))
        spec[arg] = value
        return config, [f"{arg}="]
    if mutation == "fusion_name":
        name = draw(st.sampled_from(FUSIONS))
        typo = draw(st.sampled_from((name[:-1], name + "s", name.upper(), name + " ", "")))
        config["fusion"] = typo
        return config, ["fusion="]
    if mutation == "fusion_type":
        config["fusion"] = draw(st.sampled_from((3, 2.5, ["gated"], kf.layers.GatedFusion)))
        return config, ["fusion="]
    if mutation == "fusion_units":
        config["fusion_units"] = draw(st.sampled_from((0, -4, 2.5, "8", True)))
        return config, ["fusion_units="]
    if mutation == "film_count":
        config["fusion"] = "film"
        while _feature_count(config) < 3:
            _add_vectors_input(config, name=f"extra_{_feature_count(config)}")
        return config, ["fusion="]
    if mutation == "unpooled":
        config["fusion"] = draw(st.sampled_from(VECTOR_FUSIONS))
        poolable = [s for _, _, s in own if s["type"] != "MLP"]
        if not poolable:
            return config_with_unpooled_sequence(config), ["pooling"]
        draw(st.sampled_from(poolable))["pooling"] = None
        if _feature_count(config) < 2:
            _add_vectors_input(config)
        return config, ["pooling"]
    if mutation == "film_condition":
        spec = draw(branch_specs("sequence", "sequence_branch", token_level=True))
        spec["pooling"] = None
        config.update(
            inputs={"vectors": "vectors", "sequence": "sequence"},
            branches={"vectors": [{"type": "MLP", "units": [4], "name": "mlp"}]},
            fusion="film",
            listed=False,
        )
        config["branches"]["sequence"] = [spec]  # last: the conditioning input of FiLM
        return config, ["fusion="]
    if mutation == "head_type":
        config["head"] = draw(st.sampled_from(BAD_HEADS))
        return config, ["head="]
    if mutation == "head_arg":
        head, arg = draw(st.sampled_from(BAD_HEAD_ARGS))
        config["head"] = copy.deepcopy(head)
        return config, [f"{arg}="]
    if mutation == "wrong_kind":
        name, index, spec = draw(st.sampled_from(own))
        kind = config["inputs"][name]
        type_name, vocab = draw(st.sampled_from(WRONG_BRANCHES[kind]))
        wrong = {"type": type_name, "name": spec["name"]}
        if type_name == "MLP":
            wrong["units"] = [4]
        if vocab:
            wrong.update(vocab_size=VOCAB, embedding_dim=4)
        config["branches"][name][index] = wrong
        return config, [f"'{name}'"]
    if mutation == "branches_key":
        config["listed"] = False
        key = draw(st.sampled_from(sorted(config["branches"])))
        config["branches"][key + "_typo"] = config["branches"].pop(key)
        return config, ["branches", f"'{key}_typo'"]
    if mutation == "input_without_branch":
        _add_vectors_input(config, name="lonely", branches=False)
        return config, ["'lonely'"]
    if mutation == "unknown_kwarg":
        key = draw(st.sampled_from(("fusoin", "heads", "branch", "fusion_unit", "dtype")))
        config["extra"] = {key: None}
        return config, [f"'{key}'"]
    if mutation == "shared_mismatch":
        name, _, spec = draw(st.sampled_from(own))
        kind = config["inputs"][name]
        other = f"{name}_other"
        shape = SHAPES[kind]
        shape = (T,) if kind == "tokens" else shape[:-1] + (shape[-1] + 1,)
        config["listed"] = False
        config["inputs"][other] = kind
        config.setdefault("shapes", {})[other] = shape
        config["branches"][other] = [{"ref": spec["name"]}]
        return config, [f"'{other}'"]
    if mutation == "duplicate_name":
        name, _, spec = draw(st.sampled_from(own))
        config["branches"][name].append(copy.deepcopy(spec))  # same name, new instance
        return config, ["name"]
    if mutation == "bad_inputs":
        raw = draw(st.sampled_from(("array", "list", "empty", "string", "none", "spec")))
        name = next(iter(config["inputs"]))
        config["raw_inputs"] = {
            "array": np.zeros((2, 3)),
            "list": [keras.Input((3,)), keras.Input((3,))],
            "empty": {},
            "string": "inputs",
            "none": None,
            "spec": {name: {"shape": [-1]}},
        }[raw]
        config["listed"] = False
        return config, ["inputs"]
    if mutation == "input_dtype":
        name = draw(st.sampled_from(sorted(config["inputs"])))
        config.setdefault("dtypes", {})[name] = draw(st.sampled_from(("string", "bool")))
        return config, [f"'{name}'"]
    # zero_dim
    name = draw(st.sampled_from(sorted(config["inputs"])))
    kind = config["inputs"][name]
    config.setdefault("shapes", {})[name] = (0,) + tuple(SHAPES[kind][1:])
    return config, [f"'{name}'"]


def config_with_unpooled_sequence(config):
    """Adds a sequence input whose CNN keeps its steps (pooling=None)."""
    config["listed"] = False
    config["inputs"]["seq_extra"] = "sequence"
    config["branches"]["seq_extra"] = [
        {"type": "CNN", "filters": [4], "pooling": None, "name": "unpooled_cnn"}
    ]
    return config


@given(case=invalid_configs())
def test_invalid_configurations_raise_a_clear_error(case):
    config, fragments = case
    keras.config.set_dtype_policy(config["policy"])
    try:
        with pytest.raises((ValueError, TypeError)) as info:
            build(config)
        message = str(info.value)
        assert any(f in message for f in fragments), (
            f"{type(info.value).__name__} does not name any of {fragments}: {message}"
        )
    finally:
        keras.config.set_dtype_policy("float32")
        keras.backend.clear_session()
