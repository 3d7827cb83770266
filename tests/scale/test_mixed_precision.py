"""Training under mixed precision: FusionModel, averaged and stacked ensembles, Distiller.

Under `mixed_float16` / `mixed_bfloat16` every layer computes in the policy's 16-bit dtype
and keeps float32 variables, except the layers kfusion keeps in float32 on purpose (see
`_float32_by_design`); predictions and losses are float32, and training lowers the loss.
`mixed_float16` also gets the `LossScaleOptimizer` Keras wraps around the optimizer.

Backend-agnostic and cheap (tiny widths, short sequences, few distinct models): it runs on
TensorFlow, JAX and PyTorch.
"""

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.heads._base import BaseHead
from tests.ensemble import ensemble_data
from tests.scale.models import small_fusion_model as fusion_model

POLICIES = ["mixed_float16", "mixed_bfloat16"]


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def sequences():
    """Noisy sinusoids, the class is the frequency: (64, 8, 3) float32, 3 classes."""
    return kf.datasets.sequence_classification(n=64, length=8, features=3, seed=0)


@pytest.fixture(scope="module")
def vectors():
    """The feature-subset task of the ensemble tests: (256, 6) float32, binary labels."""
    return ensemble_data.subset_data(256, seed=3)


@pytest.fixture
def policy(request):
    """Sets the global policy for the test; the float32 policy comes back in any case."""
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param
    finally:
        keras.config.set_dtype_policy("float32")


def parametrize_policies(test):
    return pytest.mark.parametrize("policy", POLICIES, indirect=True)(test)


# --------------------------------------------------------------------------- checks
def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _sublayers(layer):
    """Every layer below `layer` (nested models and layers included), each once."""
    seen, out, stack = set(), [], [layer]
    while stack:
        for sub in stack.pop()._flatten_layers(include_self=False, recursive=False):
            if id(sub) not in seen:
                seen.add(id(sub))
                out.append(sub)
                stack.append(sub)
    return out


def _float32_by_design(model):
    """The layers kfusion keeps in float32 under any policy (their documented exception).

    - a head's output Dense (`kf.heads`: "the output Dense and its activation always
      compute in float32, so predictions and losses are float32");
    - an RNN branch's recurrent layers, with their wrappers and cells ("the recurrent
      layers (their sigmoid gates and the carried state) run in float32").

    Softmax and sigmoid gates inside fusion layers and attention compute in float32 inside
    layers that follow the policy, so they are not layer-level exceptions.
    """
    layers = []
    for layer in _sublayers(model):
        if isinstance(layer, BaseHead):
            layers.append(layer.output_layer)
        if isinstance(layer, kf.branches.RNN):
            for rnn in layer.rnn_layers:
                layers += [rnn] + _sublayers(rnn)
    return layers


def check_layer_dtypes(model, policy, also_float32=()):
    """Every sub-layer computes in the policy's dtype (float32 where by design), float32
    variables everywhere. Returns the number of layers checked."""
    compute = keras.DTypePolicy(policy).compute_dtype
    float32 = {id(layer) for layer in _float32_by_design(model)}
    float32 |= {id(layer) for layer in also_float32}
    layers = [
        layer for layer in _sublayers(model) if not isinstance(layer, keras.layers.InputLayer)
    ]
    for layer in layers:
        expected = "float32" if id(layer) in float32 else compute
        assert layer.compute_dtype == expected, (layer.path, layer.dtype_policy.name, expected)
        assert layer.variable_dtype == "float32", (layer.path, layer.dtype_policy.name)
    floats = [v for v in model.variables if "float" in _dtype(v)]
    assert floats
    for variable in floats:
        assert _dtype(variable) == "float32", variable.path
    # Every head has its float32 output layer, and each exception is a layer of the model.
    assert float32 and float32 <= {id(layer) for layer in layers}
    return len(layers)


def check_compiled(model, policy):
    """`mixed_float16` compiles to a LossScaleOptimizer, `mixed_bfloat16` needs none."""
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16"), type(model.optimizer).__name__


def check_loss_falls(history, ratio=0.9):
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < ratio * losses[0], losses


def check_float32_predictions(model, x):
    pred = model.predict(x, verbose=0)
    assert pred.dtype == np.float32, pred.dtype
    assert np.all(np.isfinite(pred))
    return pred


# ---------------------------------------------------------------------- FusionModel
@parametrize_policies
def test_fusion_model_trains(sequences, policy, rng):
    x, y = sequences
    compute = keras.DTypePolicy(policy).compute_dtype
    model = fusion_model()
    checked = check_layer_dtypes(model, policy)
    assert checked > 20  # the walk reached into the branches, fusion and head

    # The graph: branch features and fused features in the compute dtype, the head's
    # predictions in float32.
    features = model.branch_features().outputs
    assert [_dtype(t) for t in features] == [compute] * 3
    assert _dtype(model.fusion_layer.output) == compute
    assert _dtype(model.outputs[0]) == "float32"
    # Eager: the fusion layer computes in the compute dtype and its gates in float32.
    values = [keras.ops.cast(rng.normal(size=(4, 8)), compute) for _ in features]
    fused, gates = model.fusion_layer(values, return_weights=True)
    assert _dtype(fused) == compute
    assert _dtype(gates) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.sum(gates, 1)), 1.0, atol=1e-6)

    model.compile(optimizer=keras.optimizers.Adam(0.02))
    check_compiled(model, policy)
    history = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    check_loss_falls(history)
    check_float32_predictions(model, x[:8])
    check_layer_dtypes(model, policy)  # training changed no dtype


# ------------------------------------------------------------------------ ensembles
def member(name, units=(8,)):
    return kf.FusionModel(
        inputs=keras.Input((ensemble_data.WIDTH,), name="x"),
        branches=[kf.branches.MLP(units=units)],
        head=kf.heads.Classification(2),
        name=name,
    )


def trained_member(name, x, y, units=(8,)):
    model = member(name, units)
    model.compile(optimizer=keras.optimizers.Adam(0.02))
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    return model


@parametrize_policies
def test_average_trains(vectors, policy):
    x, y = vectors
    members = [member("member_a"), member("member_b")]
    ensemble = kf.ensemble.average(members)
    check_layer_dtypes(ensemble, policy, also_float32=[ensemble.get_layer("average")])
    assert _dtype(ensemble.outputs[0]) == "float32"

    # Plain averaging keeps the members trainable: the whole ensemble trains end to end.
    ensemble.compile(optimizer=keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    check_compiled(ensemble, policy)
    history = ensemble.fit(x, y, epochs=4, batch_size=32, verbose=0)
    check_loss_falls(history)
    pred = check_float32_predictions(ensemble, x[:8])
    members_mean = np.mean([m.predict(x[:8], verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(pred, members_mean, atol=1e-5)


@parametrize_policies
def test_learned_average_trains_its_mix(vectors, policy):
    x, y = vectors
    # One trained member and one untrained: learning the mix moves weight to the good one.
    good = trained_member("good", x, y)
    ensemble = kf.ensemble.average([good, member("untrained")], weights="learned")
    average = ensemble.get_layer("average")
    check_layer_dtypes(ensemble, policy, also_float32=[average])
    assert _dtype(average.mix_logits) == "float32"

    ensemble.compile(optimizer=keras.optimizers.Adam(0.2), loss="binary_crossentropy")
    check_compiled(ensemble, policy)
    history = ensemble.fit(x, y, epochs=4, batch_size=32, verbose=0)
    # Only the ensemble's own loss: not the compiled member's (FrozenMember hides it).
    assert list(history.history) == ["loss"]
    check_loss_falls(history)
    check_float32_predictions(ensemble, x[:8])
    mix = keras.ops.convert_to_numpy(average.mixing_weights())
    assert mix.dtype == np.float32 and mix[0] > 0.6, mix


@parametrize_policies
def test_stack_trains_its_meta_learner(vectors, policy):
    x, y = vectors
    bases = [trained_member("base_a", x[:128], y[:128]), member("base_b")]
    before = [m.get_weights() for m in bases]
    stacked = kf.ensemble.stack(bases)
    float32 = [stacked.get_layer("stacked_outputs"), stacked.get_layer("meta_learner")]
    check_layer_dtypes(stacked, policy, also_float32=float32)
    assert [w.path for w in stacked.trainable_weights] == [
        "meta_learner/kernel",
        "meta_learner/bias",
    ]

    stacked.compile(optimizer=keras.optimizers.Adam(0.1), loss="binary_crossentropy")
    check_compiled(stacked, policy)
    history = stacked.fit(x[128:], y[128:], epochs=12, batch_size=32, verbose=0)
    assert list(history.history) == ["loss"]  # not the compiled base's loss and accuracy
    check_loss_falls(history)
    check_float32_predictions(stacked, x[:8])
    for model, weights in zip(bases, before):  # the bases stay frozen
        for b, a in zip(weights, model.get_weights()):
            np.testing.assert_array_equal(b, a)


@parametrize_policies
def test_distiller_trains_the_student(vectors, policy):
    x, y = vectors
    teacher = trained_member("teacher", x, y, units=(16,))
    teacher_weights = teacher.get_weights()
    student = member("student", units=(4,))
    distiller = kf.ensemble.Distiller(teacher, student, temperature=2.0, alpha=0.5)
    check_layer_dtypes(distiller, policy)
    assert distiller.compute_dtype == keras.DTypePolicy(policy).compute_dtype

    distiller.compile(optimizer=keras.optimizers.Adam(0.02))
    check_compiled(distiller, policy)
    history = distiller.fit(x, y, epochs=4, batch_size=32, verbose=0)
    check_loss_falls(history)
    check_float32_predictions(distiller.student, x[:8])
    soft = distiller.distillation_loss(teacher(x[:8]), student(x[:8]))
    assert _dtype(soft) == "float32"
    for b, a in zip(teacher_weights, teacher.get_weights()):  # the teacher stays frozen
        np.testing.assert_array_equal(b, a)
