"""Private base of the vector fusion layers that can return per-branch weights."""

import keras

from kfusion import _quantization
from kfusion.layers import _utils


class WeightedFusionBase(keras.layers.Layer):
    """Shapes, specs and masks shared by AttentionFusion, GatedFusion, WeightedSumFusion.

    Subclasses implement `_output_width(shapes)` (the fused width) and may override
    `_weights_shape(batch, num_branches)` (default `(batch, M)`).
    """

    def _output_width(self, shapes):
        return self.units

    def get_config(self):
        # Quantized sub-layers (model.quantize) are rebuilt quantized when loaded.
        return _quantization.with_quantized_sublayers(self, super().get_config())

    def _weights_shape(self, batch, num_branches):
        return (batch, num_branches)

    def compute_output_shape(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, self.__class__.__name__)
        return (shapes[0][0], self._output_width(shapes))

    def compute_output_spec(
        self, inputs, training=None, mask=None, return_weights=False, presence=None
    ):
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        shapes = [tuple(h.shape) for h in items]
        fused = keras.KerasTensor(self.compute_output_shape(shapes), dtype=self.compute_dtype)
        if not return_weights:
            return fused
        weights_shape = self._weights_shape(shapes[0][0], len(items))
        return fused, keras.KerasTensor(weights_shape, dtype="float32")

    def compute_mask(self, inputs, mask=None):
        return None
