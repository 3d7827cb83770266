"""FusionModel on the real distribution engines, and the README's scaling guide run as written.

Every distributed run is a process of its own with its own environment: logical devices,
`TF_CONFIG`, `XLA_FLAGS` and the Keras backend must be set before TensorFlow or JAX start, and
they are process-global. Each process is bounded by a timeout and always ended by the test.

- MirroredStrategy over two logical CPU devices trains to the weights of one device.
- MultiWorkerMirroredStrategy: the README's `train.py` as two workers on 127.0.0.1 ends with
  the same weights on both, and the chief's saved model holds them.
- JAX `keras.distribution`: the README's DataParallel and ModelParallel blocks on two CPU
  devices (replicated weights and split batches; the LayoutMap's kernels split in two).
- The README's TPU block (no TPU here): its `tf.`/`keras.`/`kf.` names exist, and its model
  builds and compiles.
"""

import ast
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import requires_tensorflow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
README = os.path.join(ROOT, "README.md")
TIMEOUT = 300  # seconds per distributed run (a few on an idle machine; CI machines are busy)


# --------------------------------------------------------------------------- README
def scaling_section():
    text = open(README, encoding="utf-8").read()
    return text.split("\n## Scaling\n", 1)[1].split("\n## ", 1)[0]


def scaling_blocks(fence):
    """The code blocks of one fence (`py`, `bash`, ...) in README's Scaling section."""
    return re.findall(rf"```{fence}\n(.*?)```", scaling_section(), re.S)


def scaling_block(fence, marker):
    """The one block of `fence` in the Scaling section that contains `marker`."""
    found = [b for b in scaling_blocks(fence) if marker in b]
    assert len(found) == 1, f"README Scaling: {len(found)} ```{fence} blocks contain {marker!r}"
    return found[0]


# ------------------------------------------------------------------------ processes
def child_env(**extra):
    """The environment of a child process: CPU only, quiet, kfusion importable."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_processes(commands, tmp_path, timeout=TIMEOUT):
    """Starts `(args, env, cwd)` commands together, waits for all of them (bounded), and
    always ends them. Returns `[(returncode, output)]`; a timeout fails the test."""
    procs, logs = [], []
    try:
        for i, (args, env, cwd) in enumerate(commands):
            log = open(os.path.join(str(tmp_path), f"process_{i}.log"), "w+", encoding="utf-8")
            logs.append(log)
            procs.append(
                subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"distributed run still going after {timeout} s:\n{_tails(logs)}")
        return [(proc.returncode, _read(log)) for proc, log in zip(procs, logs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in logs:
            log.close()


def _read(log):
    log.flush()
    log.seek(0)
    return log.read()


def _tails(logs, chars=3000):
    return "\n".join(f"--- process {i}:\n{_read(log)[-chars:]}" for i, log in enumerate(logs))


def check_succeeded(results):
    for i, (code, output) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{output[-4000:]}"


def free_ports(count):
    """`count` distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ----------------------------------------------------------------- MirroredStrategy
@requires_tensorflow
def test_mirrored_strategy_matches_single_device(tmp_path):
    out = tmp_path / "mirrored.json"
    command = [sys.executable, os.path.join(HERE, "mirrored_worker.py"), str(out)]
    results = run_processes([(command, child_env(KERAS_BACKEND="tensorflow"), ROOT)], tmp_path)
    check_succeeded(results)
    result = json.loads(out.read_text())

    assert result["replicas"] == 2
    assert len(result["variable_devices"]) == 2, result["variable_devices"]  # one copy each
    assert result["max_abs_change"] > 1e-2, result  # training moved the weights
    # Same data, same global batch, SGD: the mirrored run equals the single-device run.
    assert result["max_abs_diff"] < 1e-5, f"max |mirrored - single| = {result['max_abs_diff']}"
    np.testing.assert_allclose(result["mirrored_loss"], result["single_loss"], rtol=1e-5)
    assert result["mirrored_loss"][-1] < result["mirrored_loss"][0]


# ------------------------------------------------------- MultiWorkerMirroredStrategy
SAVE_RESULTS = """

# --- appended by tests/scale/test_distribution.py: what each worker ends with
import json as _json
import numpy as _np

_np.savez("weights.npz", *[_np.asarray(w) for w in model.get_weights()])
with open("result.json", "w") as _f:
    _json.dump(
        {
            "task_id": strategy.cluster_resolver.task_id,
            "replicas": strategy.num_replicas_in_sync,
            "losses": losses,
        },
        _f,
    )
"""


@requires_tensorflow
def test_multi_worker_mirrored_strategy_workers_agree(tmp_path):
    """The README's train.py as two workers on 127.0.0.1, each in its own directory."""
    script = tmp_path / "train.py"
    script.write_text(scaling_block("py", "MultiWorkerMirroredStrategy") + SAVE_RESULTS)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    commands = []
    for index in range(2):
        cwd = tmp_path / f"worker_{index}"
        cwd.mkdir()
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = child_env(KERAS_BACKEND="tensorflow", TF_CONFIG=json.dumps(tf_config))
        commands.append(([sys.executable, str(script)], env, str(cwd)))
    check_succeeded(run_processes(commands, tmp_path))

    results = [json.loads((tmp_path / f"worker_{i}" / "result.json").read_text()) for i in (0, 1)]
    assert [r["task_id"] for r in results] == [0, 1]
    assert [r["replicas"] for r in results] == [2, 2]
    assert results[0]["losses"] == results[1]["losses"]  # reduced over both workers
    assert results[0]["losses"][-1] < results[0]["losses"][0], results[0]["losses"]
    weights = [
        np.load(tmp_path / f"worker_{i}" / "weights.npz", allow_pickle=False) for i in (0, 1)
    ]
    assert weights[0].files and weights[0].files == weights[1].files
    for key in weights[0].files:
        np.testing.assert_array_equal(weights[0][key], weights[1][key], err_msg=key)

    # Only the chief saved, and its file holds the trained weights.
    assert not (tmp_path / "worker_1" / "fused.keras").exists()
    import keras

    import kfusion  # noqa: F401  (registers the classes the file names)

    saved = keras.saving.load_model(str(tmp_path / "worker_0" / "fused.keras"), safe_mode=True)
    loaded = saved.get_weights()
    assert len(loaded) == len(weights[0].files)
    for i, value in enumerate(loaded):
        np.testing.assert_array_equal(value, weights[0][f"arr_{i}"])


# ------------------------------------------------------------ JAX keras.distribution
def run_jax_blocks(tmp_path):
    """The README's JAX DataParallel and ModelParallel blocks, run in one JAX process with
    two CPU devices. Returns what jax_worker.py reports."""
    paths = []
    for name, marker in (("data_parallel", "DataParallel("), ("model_parallel", "ModelParallel(")):
        path = tmp_path / f"{name}.py"
        path.write_text(scaling_block("py", marker))
        paths.append(str(path))
    out = tmp_path / "jax.json"
    env = child_env(
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    command = [sys.executable, os.path.join(HERE, "jax_worker.py"), str(out), *paths]
    check_succeeded(run_processes([(command, env, ROOT)], tmp_path))
    return json.loads(out.read_text())


def check_data_parallel(run):
    assert run["distribution"] == "DataParallel"
    assert run["mesh_shape"] == [2]
    # Each batch is split along its first axis over both devices ...
    assert run["data_axes"][0] == run["mesh_axes"][0]
    assert all(a is None for a in run["data_axes"][1:])
    # ... and every variable is replicated, whole, on both.
    assert len(run["variables"]) > 20
    for v in run["variables"]:
        assert v["devices"] == 2, v
        assert v["shard_shapes"] == [v["shape"]], v
    losses = run["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


# Which README layout applies to which variable, and the axis it splits (2 devices: halves).
SPLIT = {
    r".*/attention/(query|key|value)/kernel": 1,
    r".*/attention/attention_output/kernel": 0,
    r".*/intermediate_dense/kernel": 1,
    r".*/output_dense/kernel": 0,
}


def check_model_parallel(run):
    assert run["distribution"] == "ModelParallel"
    assert run["mesh_shape"] == [1, 2] and run["mesh_axes"] == ["batch", "model"]
    assert run["data_axes"][0] == "batch"
    assert run["compute_dtype"] == "bfloat16"
    split = 0
    for v in run["variables"]:
        assert v["devices"] == 2, v
        axes = [axis for pattern, axis in SPLIT.items() if re.fullmatch(pattern, v["path"])]
        expected = list(v["shape"])
        if axes:
            expected[axes[0]] //= 2
            split += 1
        assert v["shard_shapes"] == [expected], v
    assert split == 6  # query, key, value, attention_output, intermediate_dense, output_dense
    losses = run["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


def test_jax_distribution_trains_a_fusion_model(tmp_path):
    """DataParallel: replicated weights, split batches; ModelParallel: the README's
    LayoutMap really splits the Transformer kernels. One process for both (one JAX start)."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (the JAX distribution run needs it)")
    result = run_jax_blocks(tmp_path)
    assert result["backend"] == "jax"
    assert len(result["devices"]) == 2, result["devices"]
    data_parallel, model_parallel = result["blocks"]
    check_data_parallel(data_parallel)
    check_model_parallel(model_parallel)


# -------------------------------------------------------------------- the TPU block
def _dotted_names(tree, roots):
    """Every `root.a.b...` attribute chain read in `tree` whose root is in `roots`."""
    names = set()
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if parts and isinstance(node, ast.Name) and node.id in roots:
            names.add(".".join([node.id] + parts[::-1]))
    return names


def test_readme_scaling_blocks_name_real_apis():
    """Every `py` block parses and every tf./keras./kf. name in it exists; the TPU block's
    model builds and compiles (there is no TPU here to run the rest)."""
    tf = pytest.importorskip("tensorflow")
    import keras

    import kfusion as kf

    roots = {"tf": tf, "keras": keras, "kf": kf}
    blocks = scaling_blocks("py")
    markers = ["DataParallel(", "ModelParallel(", "MultiWorkerMirroredStrategy", "TPUStrategy"]
    assert all(any(m in b for b in blocks) for m in markers), "a Scaling block is missing"
    checked = set()
    for block in blocks:
        for name in _dotted_names(ast.parse(block), roots):
            obj = roots[name.split(".")[0]]
            for part in name.split(".")[1:]:
                assert hasattr(obj, part), f"README Scaling names {name}, which does not exist"
                obj = getattr(obj, part)
            checked.add(name)
    tpu = {
        "tf.distribute.cluster_resolver.TPUClusterResolver",
        "tf.config.experimental_connect_to_cluster",
        "tf.tpu.experimental.initialize_tpu_system",
        "tf.distribute.TPUStrategy",
    }
    assert tpu <= checked

    # The TPU block's model, built and compiled as written (without the TPU strategy).
    (scope,) = [
        node
        for node in ast.walk(ast.parse(scaling_block("py", "TPUStrategy")))
        if isinstance(node, ast.With) and "strategy.scope" in ast.unparse(node.items[0])
    ]
    namespace = {"keras": keras, "kf": kf}
    exec(
        compile(ast.Module(body=scope.body, type_ignores=[]), "README TPU block", "exec"), namespace
    )
    model = namespace["model"]
    assert isinstance(model, kf.FusionModel) and model.compiled
    assert model.steps_per_execution == 32

    # The TF_CONFIG example is valid JSON naming a worker cluster and this worker's index.
    (command,) = [b for b in scaling_blocks("bash") if "TF_CONFIG" in b]
    tf_config = json.loads(re.search(r"TF_CONFIG='(.*?)'", command).group(1))
    assert len(tf_config["cluster"]["worker"]) == 2
    assert tf_config["task"] == {"type": "worker", "index": 0}
