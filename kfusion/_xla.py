"""When `jit_compile="auto"` should mean XLA on a TensorFlow CPU for kfusion models."""

import keras


def parallel_scan_wants_xla(model):
    """True when XLA should compile `model` although Keras' `"auto"` would leave it off.

    Keras resolves `jit_compile="auto"` to False on a TensorFlow machine with only CPUs.
    For minGRU / minLSTM (`kf.layers.MinGRU`, `kf.layers.MinLSTM`) that costs most of
    their speed: without XLA their log-space scan runs as separate elementwise kernels,
    and at 1,024 steps a minGRU branch trains 1.7x PyTorch's `nn.LSTM` instead of 5.6x
    (benchmarks/RESULTS.md, "Long sequences"). So a model holding one of these cells
    compiles with XLA on a TensorFlow CPU, unless something Keras itself checks rules it
    out: a layer with `supports_jit=False`, a `tf.distribute` strategy, op determinism.
    On other devices and backends Keras' own `"auto"` decides.
    """
    if keras.backend.backend() != "tensorflow":
        return False
    from kfusion.layers._min_rnn import MinRNNBase

    layers = list(model._flatten_layers())
    if not any(isinstance(layer, MinRNNBase) for layer in layers):
        return False
    if not all(getattr(layer, "supports_jit", True) for layer in layers):
        return False
    import tensorflow as tf

    if any(d.device_type != "CPU" for d in tf.config.list_physical_devices()):
        return False  # Keras' "auto" already turns XLA on where it supports the model
    if tf.distribute.has_strategy() or getattr(model, "_distribute_strategy", None):
        return False
    try:
        from tensorflow.python.framework.config import is_op_determinism_enabled
    except ImportError:  # pragma: no cover - older or newer TensorFlow layouts
        return False
    return not is_op_determinism_enabled()
