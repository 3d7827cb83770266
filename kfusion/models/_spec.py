"""Declarative specs <-> FusionModel arguments (private; used by FusionModel and the CLI).

A spec is plain data (JSON/YAML friendly):

    inputs:   {name: {shape: [...], dtype: float32, mask_value: 0.0, normalize: series}}
              (mask_value and normalize are optional; see FusionModel)
    branches: {input name: [{type: CNN, ...}, {ref: branch name}, ...]}  (or a list
              when there is one input)
    fusion:   a fusion name ("gated") or {type: GatedFusion, units: 64}
    head:     {type: Classification, num_classes: 10}
    name, fusion_units: optional

`{ref: NAME}` lists an earlier branch again: the same instance, so the same weights.
Specs are only ever parsed as data (json / yaml.safe_load): nothing in them is executed.
"""

import json
import os

import keras

from kfusion.models import _factory

MODEL_KEYS = (
    "inputs",
    "branches",
    "fusion",
    "head",
    "name",
    "fusion_units",
    "branch_dropout",
    "feature_norm",
    "missing_modalities",
    "modality_dropout",
    "aux_loss_weight",
    "balance",
)
INPUT_KEYS = ("shape", "dtype", "mask_value", "normalize")
_BASE_LAYER_KEYS = ("trainable",)


def check_keys(mapping, allowed, where):
    """Raises `ValueError` naming an unknown key and the closest valid one."""
    for key in mapping:
        if key not in allowed:
            raise ValueError(
                f"Unknown key {key!r} in {where}.{_factory.suggest(key, allowed)} "
                f"Valid keys: {sorted(allowed)}"
            )


def load_spec(spec):
    """A spec dict from a dict, a JSON string, or a `.json`/`.yaml`/`.yml` path."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and not spec.lstrip().startswith("{")
    ):
        path = os.fspath(spec)
        if not os.path.isfile(path):
            raise ValueError(f"Spec file not found. Received: spec={path!r}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"Malformed YAML in {path}: {e}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"Malformed JSON in {path}: {e}") from None
    elif isinstance(spec, str):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"Malformed JSON spec: {e}") from None
    else:
        raise ValueError(f"`spec` must be a dict, a JSON string or a path. Received: spec={spec!r}")
    if not isinstance(data, dict):
        raise ValueError(f"A spec must be a mapping at the top level. Received: {data!r}")
    return data


def _lookup(module, type_name, what, names=None):
    if names is None:
        names = [n for n in getattr(module, "__all__", []) if not n.startswith("_")]
    if not isinstance(type_name, str) or type_name not in names:
        raise ValueError(
            f"Unknown {what} type {type_name!r}.{_factory.suggest(type_name, names)} "
            f"Known: {sorted(names)}"
        )
    return getattr(module, type_name)


def _build_layer(entry, module, what, names=None):
    if not isinstance(entry, dict) or "type" not in entry:
        raise ValueError(f"A {what} entry must be a mapping with a 'type'. Received: {entry!r}")
    kwargs = dict(entry)
    cls = _lookup(module, kwargs.pop("type"), what, names)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a missing, unexpected or bad argument
        raise ValueError(f"Invalid {what} entry {entry!r}: {e}") from None


def _build_head(entry):
    from kfusion import heads

    if isinstance(entry, dict) and entry.get("type") == "MultiTask":
        kwargs = dict(entry)
        kwargs.pop("type")
        tasks = kwargs.pop("heads", None)
        if not isinstance(tasks, dict):
            raise ValueError(f"MultiTask needs `heads`: a mapping task -> head. Got {tasks!r}")
        return heads.MultiTask({k: _build_head(v) for k, v in tasks.items()}, **kwargs)
    return _build_layer(entry, heads, "head")


def spec_to_kwargs(spec):
    """FusionModel constructor arguments from a spec dict."""
    from kfusion import branches as branch_module
    from kfusion import layers as layer_module

    check_keys(spec, MODEL_KEYS, "the model spec")
    for key in ("inputs", "branches"):
        if key not in spec:
            raise ValueError(f"The model spec needs {key!r}. Received keys: {sorted(spec)}")
    inputs = spec["inputs"]
    if not isinstance(inputs, dict) or not inputs:
        raise ValueError(f"`inputs` must map input names to {{shape, dtype}}. Got {inputs!r}")
    input_map, mask_values, normalizers = {}, {}, {}
    for name, value in inputs.items():
        if not isinstance(name, str) or not name:  # keras would rename "" to its own name
            raise ValueError(f"Input names must be non-empty strings. Received: {name!r}")
        if not isinstance(value, dict) or "shape" not in value:
            raise ValueError(f"Input {name!r} needs a 'shape'. Received: {value!r}")
        check_keys(value, INPUT_KEYS, f"input {name!r}")
        if value.get("mask_value") is not None:
            mask_values[name] = value["mask_value"]
        if value.get("normalize") is not None:
            normalizers[name] = value["normalize"]
        shape = value["shape"]
        if not isinstance(shape, (list, tuple)):
            raise ValueError(
                f"The 'shape' of input {name!r} must be a list of sizes (null for any), "
                f"without the batch. Received: shape={shape!r}"
            )
        try:
            input_map[name] = keras.Input(
                shape=tuple(shape), dtype=value.get("dtype", "float32"), name=name
            )
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"Invalid input {name!r}: {str(e).strip()} Received: {value!r}"
            ) from None
    built = {}

    def branch(entry):
        if isinstance(entry, dict) and set(entry) == {"ref"}:
            if entry["ref"] not in built:
                raise ValueError(
                    f"Branch ref {entry['ref']!r} names no earlier branch. Known: {sorted(built)}"
                )
            return built[entry["ref"]]
        layer = _build_layer(entry, branch_module, "branch")
        built[layer.name] = layer
        return layer

    raw = spec["branches"]
    if isinstance(raw, list):
        branches = [branch(e) for e in raw]
    elif isinstance(raw, dict):
        branches = {
            k: [branch(e) for e in (v if isinstance(v, list) else [v])] for k, v in raw.items()
        }
    else:
        raise ValueError(f"`branches` must be a list or a mapping. Received: {raw!r}")
    single = len(input_map) == 1 and isinstance(raw, list)
    fusion = spec.get("fusion", "concat")
    if isinstance(fusion, dict):
        fusion_types = sorted(set(_factory.FUSION_NAMES.values()))
        fusion = _build_layer(fusion, layer_module, "fusion", fusion_types)
    head = spec.get("head")
    if head is not None:
        head = _build_head(head)
    kwargs = {
        "inputs": next(iter(input_map.values())) if single else input_map,
        "branches": branches,
        "fusion": fusion,
        "head": head,
        "fusion_units": spec.get("fusion_units"),
        "mask_value": mask_values or None,
        "normalize": normalizers or None,
        "branch_dropout": spec.get("branch_dropout", 0.0),
        "feature_norm": spec.get("feature_norm"),
        "missing_modalities": spec.get("missing_modalities"),
        "modality_dropout": spec.get("modality_dropout", 0.0),
        "aux_loss_weight": spec.get("aux_loss_weight", 0.0),
        "balance": spec.get("balance"),
    }
    if spec.get("name"):
        kwargs["name"] = spec["name"]
    return kwargs


def _clean_config(layer):
    config = dict(layer.get_config())
    for key in _BASE_LAYER_KEYS:
        if config.get(key) is True:
            config.pop(key)
    dtype = config.pop("dtype", None)
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name")
    if dtype and dtype != "float32":
        config["dtype"] = dtype
    return {"type": type(layer).__name__, **_plain(config)}


def _plain(value):
    """Tuples to lists, recursively, so specs compare equal after JSON/YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _head_spec(head):
    if hasattr(head, "heads") and isinstance(head.heads, dict):
        spec = _clean_config(head)
        spec["heads"] = {k: _head_spec(v) for k, v in head.heads.items()}
        return spec
    return _clean_config(head)


def _input_entry(model, spec):
    entry = {"shape": list(spec["shape"]), "dtype": spec["dtype"]}
    name = spec["name"]
    if name in getattr(model, "mask_value", {}):
        entry["mask_value"] = model.mask_value[name]
    if name in getattr(model, "normalize", {}):
        entry["normalize"] = model.normalize[name]
    return entry


def model_to_spec(model):
    """The spec of a FusionModel (plain lists and dicts)."""
    layers = {layer.name: layer for layer in model.branch_layers}
    emitted = set()

    def entry(name):
        if name in emitted:
            return {"ref": name}
        emitted.add(name)
        return _clean_config(layers[name])

    branches = {k: [entry(n) for n in v] for k, v in model.branch_map.items()}
    config = model.get_config()
    if isinstance(config["branches"], list):
        branches = next(iter(branches.values()))
    spec = {
        "name": model.name,
        "inputs": {s["name"]: _input_entry(model, s) for s in model.input_specs},
        "branches": branches,
        "fusion": (
            _clean_config(model.fusion_layer) if model.fusion_layer is not None else model.fusion
        ),
        "head": _head_spec(model.head) if model.head is not None else None,
    }
    if model.fusion_units is not None:
        spec["fusion_units"] = model.fusion_units
    if getattr(model, "branch_dropout", 0.0):
        spec["branch_dropout"] = model.branch_dropout
    if getattr(model, "feature_norm", None):
        spec["feature_norm"] = model.feature_norm
    if getattr(model, "missing_modalities", False):
        spec["missing_modalities"] = True
    if getattr(model, "modality_dropout", 0.0):
        spec["modality_dropout"] = model.modality_dropout
    if getattr(model, "aux_loss_weight", 0.0):
        spec["aux_loss_weight"] = model.aux_loss_weight
    if getattr(model, "balance", None):
        spec["balance"] = model.balance
    return spec
