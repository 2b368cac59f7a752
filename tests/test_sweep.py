"""One forward sweep for layer-by-layer work (issue 13): least-squares recovery and sequential sparsity read each
layer's inputs from the model as re-fitted so far, with every node run once, and give the weights a run of the
whole models for every layer gives; cached values spill to disk beyond a budget, and the temporary files go."""
from __future__ import annotations

import copy
import dataclasses
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune import recover as recover_module
from onnxprune import sweep as sweep_module
from onnxprune.calibrate import with_outputs
from onnxprune.recover import NormalEquations, recover_lsq
from onnxprune.surgery import apply_plan
from onnxprune.sweep import ForwardSweep, spill_store
from onnxprune.verify import session

from builders import GraphBuilder
from exactness import planned

ROOT = Path(__file__).resolve().parent.parent


def residual_net() -> onnx.ModelProto:
    """Two residual blocks, two convs reading the same tensor (concatenated), and a MatMul + Add head."""
    b = GraphBuilder(seed=3)
    stem = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    y = b.bn(b.conv(b.conv_bn_relu(stem, 16, 16), 16, 16), 16)
    first = b.op("Relu", [b.op("Add", [stem, y])])
    cat = b.op("Relu", [b.op("Concat", [b.conv(first, 16, 8, k=1), b.conv(first, 16, 8)], axis=1)])
    second = b.op("Relu", [b.op("Add", [cat, b.conv_bn_relu(cat, 16, 16)])])
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [second])])
    return b.model(b.matmul(pooled, 16, 10))


def feeds(count: int = 3, batch: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def full_run_system(self, layer, kept, rng, positions) -> NormalEquations:
    """The straightforward reference for LayerSweep.system: both whole models run for this one layer (depth^2
    work in all), the model as re-fitted so far for the layer's inputs, the reference for its outputs."""
    data, output = layer.node.input[0], layer.node.output[0]
    inputs = session(with_outputs(self.inputs.model, [data]), threads=0)
    targets = session(with_outputs(self.outputs.model, [output]), threads=0)
    system = NormalEquations()
    for feed, real in zip(self.inputs.feeds, self.real):
        target = targets.run([output], feed)[0]
        target = target if kept is None else np.take(target, kept, axis=layer.output_axis)
        system.add(*recover_module._rows(layer, inputs.run([data], feed)[0], target, rng, positions, real))
    return system


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def assert_same_weights(got: onnx.ModelProto, expected: onnx.ModelProto, rtol: float = 5e-5) -> None:
    """Every initializer equal within `rtol` of its largest magnitude. Segments and whole models are fused
    differently by onnxruntime (a residual Add into the conv before it, or not), so float32 activations differ by
    ~1e-7 and each fit down the network amplifies that a little: at most 1.7e-5 on these models (the residual net's
    last bias), where layers fitted on inputs that miss the earlier fits differ by 0.5 to 2."""
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys()
    for name in a:
        scale = max(float(np.abs(b[name]).max(initial=0.0)), 1e-12)
        assert np.abs(a[name].astype(np.float64) - b[name]).max(initial=0.0) <= rtol * scale, name


def prune_both_ways(monkeypatch, model, target: Target, options: Options) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(swept, reference): the same prune with the forward sweep and with whole-model runs per layer."""
    swept, _ = onnxprune.prune(model, target, options)
    with monkeypatch.context() as patch:
        patch.setattr(recover_module.LayerSweep, "system", full_run_system)
        reference, _ = onnxprune.prune(model, target, options)
    return swept, reference


def digits_options(**kw) -> Options:
    return Options(calib=CalibrationSource(ROOT / "models" / "digits_cnn.calib.npz", size=32), **kw)


@pytest.mark.parametrize("model_name", ["digits", "residual"])
def test_lsq_recovery_in_one_sweep_gives_the_weights_of_whole_model_runs(monkeypatch, model_name):
    if model_name == "digits":
        model, options = onnx.load(ROOT / "models" / "digits_cnn.onnx"), digits_options(recover="lsq")
    else:
        model, options = residual_net(), Options(recover="lsq", round_to=1, calib=CalibrationSource(feeds()))
    swept, reference = prune_both_ways(monkeypatch, model, Target.ratio(0.5), options)
    assert_same_weights(swept, reference)
    alone = weights(onnxprune.prune(model, Target.ratio(0.5), dataclasses.replace(options, recover="none"))[0])
    assert any(name not in alone or not np.array_equal(value, alone[name])  # recovery changed the weights
               for name, value in weights(swept).items())


@pytest.mark.parametrize("model_name,criterion,recover", [("digits", "l1", "lsq"), ("residual", "l1", "lsq"),
                                                          ("residual", "sparsegpt", "none")])
def test_sequential_sparsity_in_one_sweep_gives_the_weights_of_whole_model_runs(monkeypatch, model_name, criterion,
                                                                               recover):
    if model_name == "digits":
        model, calib = onnx.load(ROOT / "models" / "digits_cnn.onnx"), digits_options().calib
    else:
        model, calib = residual_net(), CalibrationSource(feeds())
    options = Options(granularity="unstructured", criterion=criterion, recover=recover, calib=calib)
    swept, reference = prune_both_ways(monkeypatch, model, Target.ratio(0.5), options)
    assert_same_weights(swept, reference)


def test_sweep_runs_every_node_once_and_reads_what_a_whole_run_reads(monkeypatch):
    model, data = residual_net(), feeds()
    targets = [n.input[0] for n in model.graph.node if n.op_type in ("Conv", "MatMul")]
    ran: list[str] = []

    def recording(segment, threads=0):
        ran.extend(node.name for node in segment.graph.node)
        return session(segment, threads)

    monkeypatch.setattr(sweep_module, "session", recording)
    with spill_store() as store:
        sweep = ForwardSweep(model, targets, data, store)
        for name in targets:
            whole = session(with_outputs(model, [name]), threads=0)
            for value, feed in zip(sweep.values(name), data):
                np.testing.assert_allclose(value, whole.run([name], feed)[0], rtol=1e-5, atol=1e-6)
        assert not sweep.cache  # every value dropped once read for the last time
    assert len(ran) == len(set(ran)) and len(ran) < len(model.graph.node)  # once each; the head's MatMul never


def test_values_spilled_to_disk_give_the_same_fit_and_the_files_go(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spilled = []
    spill = sweep_module.SpillStore._spill
    monkeypatch.setattr(sweep_module.SpillStore, "_spill", lambda self, value: spilled.append(1) or spill(self, value))
    prepared, plan = planned(residual_net(), 0.5)
    original = copy.deepcopy(prepared.model)
    pruned = apply_plan(prepared.model, prepared.analysis, plan)
    in_memory, on_disk = copy.deepcopy(pruned), copy.deepcopy(pruned)
    assert recover_lsq(in_memory, original, prepared.analysis, plan, lambda: iter(feeds())) > 0
    assert not spilled
    assert recover_lsq(on_disk, original, prepared.analysis, plan, lambda: iter(feeds()), budget=2000) > 0
    assert len(spilled) > 10
    assert_same_weights(on_disk, in_memory, rtol=0)
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_go_on_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prepared, plan = planned(residual_net(), 0.5)
    original = copy.deepcopy(prepared.model)
    pruned = apply_plan(prepared.model, prepared.analysis, plan)

    def failing(*args):
        assert any(tmp_path.iterdir())  # the scratch folder exists while the sweep runs
        raise RuntimeError("fit failed")

    monkeypatch.setattr(recover_module, "_apply_fit", failing)
    with pytest.raises(RuntimeError, match="fit failed"):
        recover_lsq(pruned, original, prepared.analysis, plan, lambda: iter(feeds()), budget=0)
    assert list(tmp_path.iterdir()) == []


def test_scratch_folder_is_removed_on_sigterm(tmp_path):
    script = ("import sys, time, tempfile; tempfile.tempdir = sys.argv[1]\n"
              "from onnxprune.files import scratch_folder\n"
              "with scratch_folder() as folder:\n"
              "    (folder / 'spilled.npy').write_bytes(b'0')\n"
              "    print(folder, flush=True)\n"
              "    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    folder = Path(child.stdout.readline().strip())
    assert folder.is_dir() and folder.parent == tmp_path
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM
    assert not folder.exists()


def test_progress_names_each_layer(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    prepared, plan = planned(residual_net(), 0.5)
    original = copy.deepcopy(prepared.model)
    pruned = apply_plan(prepared.model, prepared.analysis, plan)
    layers = recover_module.refit_layers(prepared.analysis, plan)
    recover_lsq(pruned, original, prepared.analysis, plan, lambda: iter(feeds()), quiet=False)
    shown = capsys.readouterr().err
    assert f"lsq 1/{len(layers)} {layers[0].node.name}" in shown
