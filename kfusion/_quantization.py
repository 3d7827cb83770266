"""Quantized sub-layers that survive `.keras` saving: keras' `DTypePolicyMap` mechanism.

`model.quantize(mode)` quantizes the leaf layers that have keras' quantization hooks
(Dense, EinsumDense, Embedding), wherever they are, and gives each a quantized dtype
policy (`"int8_from_float32"`, ...) and quantized variables (an int8 kernel and its
scale, ...). A kfusion layer (a branch, a fusion layer, a head) makes its sub-layers
itself from its own arguments, so its config alone would rebuild them as float layers,
and loading the quantized weights into them fails (`Layer 'gate' expected 2 variables,
but received 0 variables during loading`).

keras' answer (documented with `keras.dtype_policies.DTypePolicyMap`) is followed here:
a kfusion layer with quantized sub-layers writes, as its `dtype`, a `DTypePolicyMap`
whose default is its own policy and whose entries are the quantized sub-layers' policies,
keyed by their path below the layer. Loaded, the layer passes that map on as the `dtype`
of every sub-layer it makes (kfusion layers make their sub-layers with
`dtype=self.dtype_policy`), and each sub-layer looks itself up by its path when it is
built, so the quantized ones are built quantized and take the saved variables. Keys are
regular expressions that allow any prefix before the layer's own name, so the layer loads
the same inside a differently named model.
"""

import contextlib
import gc
import re

import keras


def _effective_policy(layer):
    """The dtype policy `layer` computes with (its entry when it holds a map)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path] if layer.path else policy.default_policy
    return policy


def quantized_sublayers(layer):
    """`{relative path: policy}` of the quantized layers below `layer`."""
    prefix = (layer.path or layer.name) + "/"
    found = {}
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        path = sub.path
        if not path or not path.startswith(prefix):
            continue
        policy = _effective_policy(sub)
        if policy.quantization_mode is not None:
            found[path[len(prefix) :]] = policy
    return found


def with_quantized_sublayers(layer, config):
    """`config` (the layer's `get_config()`) with its quantized sub-layers' policies.

    Unchanged for a layer without quantized sub-layers.
    """
    found = quantized_sublayers(layer)
    if not found:
        return config
    own = _effective_policy(layer) if layer.path else layer.dtype_policy
    if isinstance(own, keras.dtype_policies.DTypePolicyMap):
        own = own.default_policy
    policy_map = keras.dtype_policies.DTypePolicyMap(default_policy=own)
    for relative, policy in found.items():
        key = f"(?:.*/)?{re.escape(layer.name)}/{re.escape(relative)}"
        policy_map[key] = policy
    return {**config, "dtype": keras.dtype_policies.serialize(policy_map)}


def float32_policy(policy):
    """`"float32"`, or a map with a float32 default when `policy` is a `DTypePolicyMap`.

    For the sub-layers kfusion keeps in float32 under mixed precision (a head's output
    layer): they still find their quantized entry in a loaded map.
    """
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        entries = {key: policy[key] for key in policy}
        return keras.dtype_policies.DTypePolicyMap(default_policy="float32", policy_map=entries)
    return "float32"


@contextlib.contextmanager
def one_garbage_collection():
    """Runs Python's garbage collector once at the end instead of once per layer.

    keras' `Layer.__delattr__` calls `gc.collect()` every time a variable is deleted, and
    quantizing deletes each layer's float kernel: with TensorFlow loaded, one collection
    takes a tenth of a second or more, so quantizing a model of a hundred layers spent
    most of its time collecting. The float kernels are freed by the one collection at the
    end all the same.
    """
    real = gc.collect
    skipped = []

    def deferred(generation=2):
        skipped.append(generation)
        return 0

    gc.collect = deferred
    try:
        yield
    finally:
        gc.collect = real
        if skipped:
            gc.collect()
