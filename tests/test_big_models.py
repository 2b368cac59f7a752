"""Models past RAM (issue 13): an external-data model is pruned with its weights on disk, read one tensor at a time
(memory-mapped) and written tensor by tensor into the output's data file. The same code path as the 2.4 GB
benchmark (tools/bench_memory.py), on a model of a few MB."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, files, invoke
from onnx import external_data_helper, numpy_helper

import onnxprune
from onnxprune import Options, lazy_tensors
from onnxprune.graph import load_model, save_model
from onnxprune.pipeline import prepare
from onnxprune.verify import check_valid, random_feeds, run


def conv_mlp() -> tuple[onnx.ModelProto, str]:
    """Convs, then MatMuls of up to 1024 x 512 (about 3 MB of float32 weights); and the name of one 512 x 512
    weight whose channels the tests freeze, so it is copied whole rather than sliced."""
    b = GraphBuilder(seed=3)
    x = b.conv_bn_relu(b.conv_bn_relu(b.input(["N", 8, 12, 12]), 8, 64), 64, 128)
    h = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    h = b.op("Relu", [b.matmul(h, 128, 1024)])
    h = b.op("Relu", [b.matmul(h, 1024, 512)])
    frozen = b.weight(512, 512, scale=0.05)
    h = b.op("Relu", [b.op("MatMul", [h, frozen])])
    return b.model(b.matmul(h, 512, 10)), frozen


def saved_with_external_data(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "big.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="big.weights",
                    size_threshold=1024)
    return path


@pytest.fixture
def external(tmp_path) -> tuple[Path, str]:
    (tmp_path / "in").mkdir()
    model, frozen = conv_mlp()
    return saved_with_external_data(model, tmp_path / "in"), frozen


def no_full_reads(monkeypatch) -> None:
    """Reading an external tensor through onnx (which loads its bytes into the proto) fails the test."""
    def refuse(read):
        def checked(tensor, *args, **kwargs):
            assert not lazy_tensors.is_external(tensor), f"'{tensor.name}' read whole into memory"
            return read(tensor, *args, **kwargs)
        return checked
    monkeypatch.setattr(numpy_helper, "to_array", refuse(numpy_helper.to_array))
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor",
                        refuse(external_data_helper.load_external_data_for_tensor))


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_lazy_prune_writes_the_model_an_in_memory_prune_writes(external, tmp_path, monkeypatch):
    path, frozen = external
    options = Options(round_to=8, exclude=(frozen,))
    eager, _ = onnxprune.prune(onnx.load(path), 0.5, options)  # weights read into memory
    with monkeypatch.context() as patch:
        no_full_reads(patch)
        lazy, report = onnxprune.prune(path, 0.5, options)
        assert lazy_tensors.weights_folder(lazy) is not None
        big = [t for t in lazy.graph.initializer if np.prod(t.dims) >= 1024]
        assert big and all(lazy_tensors.is_external(t) and not t.raw_data for t in big)
        check_valid(lazy)
        save_model(lazy, tmp_path / "lazy.onnx")
    assert report.params_after < report.params_before
    save_model(eager, tmp_path / "eager.onnx")
    written, expected = load_model(tmp_path / "lazy.onnx"), load_model(tmp_path / "eager.onnx")
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in expected.graph.node]
    got, want = arrays(written), arrays(expected)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert np.array_equal(got[frozen], numpy_helper.to_array(onnx.load(path).graph.initializer[
        [t.name for t in onnx.load(path).graph.initializer].index(frozen)]))  # copied whole, not sliced
    feeds = random_feeds(written, seed=2, batch=3)
    assert all(np.array_equal(a, b) for a, b in zip(run(written, feeds), run(expected, feeds)))


def test_lazy_output_keeps_its_weights_beside_it_and_out_of_the_proto(external, tmp_path):
    path, _ = external
    pruned, _ = onnxprune.prune(path, 0.5, Options(round_to=8))
    save_model(pruned, tmp_path / "out.onnx")
    assert files(tmp_path) >= {"out.onnx", "out.onnx.data"}
    assert not [name for name in files(tmp_path) if name.startswith(".")]  # no temporary file left
    proto = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert all(p.key != lazy_tensors.FOLDER_KEY for p in proto.metadata_props)
    entries = [dict((e.key, e.value) for e in t.external_data) for t in proto.graph.initializer
               if lazy_tensors.is_external(t)]
    assert entries and {e["location"] for e in entries} == {"out.onnx.data"}
    assert all(int(e["offset"]) % lazy_tensors.ALIGNMENT == 0 for e in entries)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_steps_that_run_the_model_read_its_weights_into_memory(external):
    """Calibration, recovery and sparsity steps read the weights from the proto: there the model is loaded."""
    path, _ = external
    lazy, eager = prepare(path, lazy=True).model, prepare(path).model
    assert lazy_tensors.weights_folder(lazy) is not None
    assert lazy_tensors.weights_folder(eager) is None
    assert not any(lazy_tensors.is_external(t) for t in eager.graph.initializer)


def test_a_data_file_too_short_is_refused_when_opened(external):
    path, _ = external
    data = path.parent / "big.weights"
    data.write_bytes(data.read_bytes()[:-4096])
    with pytest.raises(onnxprune.OnnxPruneError, match="needs .* bytes"):
        load_model(path, lazy=True)


def _cli(args: list[str], tmp: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen([sys.executable, "-c", "from onnxprune.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_command_line_leaves_no_temporary_file_and_the_input_as_it_was(external, tmp_path):
    path, _ = external
    before = hashlib.sha256((path.parent / "big.weights").read_bytes()).hexdigest()
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    done = _cli([str(path), "--ratio", "0.5", "-o", str(out / "p.onnx"), "--check", "--quiet"], tmp_path / "tmp")
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()
    assert not [n for n in files(tmp_path / "tmp") if "onnxprune" in n]  # surgery's weights went with the process
    assert files(out) == {"p.onnx", "p.onnx.data"}
    assert files(path.parent) == {"big.onnx", "big.weights"}
    assert hashlib.sha256((path.parent / "big.weights").read_bytes()).hexdigest() == before


def test_output_may_not_be_the_inputs_data_file(external):
    path, _ = external
    (path.parent / "big.weights").rename(path.parent / "q.onnx.data")
    proto = onnx.load(path, load_external_data=False)
    for tensor in lazy_tensors.all_tensors(proto):
        for entry in tensor.external_data:
            entry.value = "q.onnx.data" if entry.key == "location" else entry.value
    onnx.save_model(proto, path)
    done = _cli([str(path), "--ratio", "0.5", "-o", str(path.parent / "q.onnx")], path.parent)
    assert done.wait(timeout=300) == 2
    assert "would overwrite the input model's external data" in done.stderr.read().decode()


def test_scratch_folder_goes_on_sigterm(tmp_path):
    code = ("import os, signal, sys; from onnxprune import files; print(files.run_scratch_folder(), flush=True); "
            "sys.stdin.readline(); os.kill(os.getpid(), signal.SIGTERM)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    folder = Path(proc.stdout.readline().decode().strip())
    assert folder.is_dir()
    proc.communicate(b"\n", timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert not folder.exists()


def test_file_sizes_in_the_summary_count_the_data_files(external, tmp_path):
    path, _ = external
    result = invoke(path, "--ratio", "0.5", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    sizes = [path.stat().st_size + (path.parent / "big.weights").stat().st_size,
             (tmp_path / "p.onnx").stat().st_size + (tmp_path / "p.onnx.data").stat().st_size]
    assert f"file size   {sizes[0]:>14,} -> {sizes[1]:>14,}  bytes" in result.output


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_prune_lazily_as_in_memory(tmp_path, dtype):
    """float16 is memory-mapped as it is stored; bfloat16 (no numpy type) is converted by onnx one tensor at a
    time. Both give the model an in-memory prune gives."""
    import ml_dtypes
    numpy_type = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    b = GraphBuilder(seed=4)
    h = b.input(["N", 64], elem_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(numpy_type)))
    for k, n in ((64, 128), (128, 96), (96, 16)):
        h = b.op("Relu", [b.op("MatMul", [h, b.const(b.rng.standard_normal((k, n)).astype(numpy_type))])])
    path = saved_with_external_data(b.model(h), tmp_path)
    lazy, _ = onnxprune.prune(path, 0.5, Options(round_to=8))
    eager, _ = onnxprune.prune(onnx.load(path), 0.5, Options(round_to=8))
    save_model(lazy, tmp_path / "lazy.onnx")
    got, want = arrays(load_model(tmp_path / "lazy.onnx")), arrays(eager)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    assert sum(v.size for v in got.values()) < 64 * 128 + 128 * 96 + 96 * 16


def test_constant_node_with_external_data_is_read_when_opened(tmp_path):
    b = GraphBuilder(seed=5)
    x = b.input(["N", 32])
    w = b.rng.standard_normal((32, 64)).astype(np.float32)
    b.nodes.append(onnx.helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w, "w")))
    model = b.model(b.matmul(b.op("Relu", [b.op("MatMul", [x, "w_const"])]), 64, 8))
    onnx.save_model(model, tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    external_data_helper.convert_model_to_external_data(proto, location="m.data", size_threshold=0,
                                                        convert_attribute=True)
    onnx.save_model(proto, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx", lazy=True)
    value = loaded.graph.node[0].attribute[0].t
    assert not lazy_tensors.is_external(value) and np.array_equal(numpy_helper.to_array(value), w)
    pruned, report = onnxprune.prune(tmp_path / "m.onnx", 0.5, Options(round_to=8))
    assert report.params_after < report.params_before
    check_valid(pruned)


def test_analyze_leaves_the_weights_on_disk(external, monkeypatch):
    path, _ = external
    expected = onnxprune.analyze(onnx.load(path))
    no_full_reads(monkeypatch)
    analysis = onnxprune.analyze(path)
    assert lazy_tensors.weights_folder(analysis.index.model) is not None
    assert [g.to_dict() for g in analysis.groups] == [g.to_dict() for g in expected.groups]
    assert analysis.mac_reach.to_dict() == expected.mac_reach.to_dict()
    result = invoke("analyze", path)
    assert result.exit_code == 0 and "prunable" in result.output, result.output


def test_small_constants_in_external_data_are_read_when_opened(tmp_path):
    """A model saved with every tensor external (size_threshold=0) still has its Reshape target read by shape
    inference, so a flatten into a MatMul prunes lazily as in memory."""
    b = GraphBuilder(seed=6)
    x = b.op("Relu", [b.conv(b.input([2, 4, 6, 6]), 4, 128)])
    h = b.op("Reshape", [x, b.const(np.array([2, -1], np.int64))])
    model = b.model(b.matmul(h, 128 * 36, 8))
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "m.onnx",
                    save_as_external_data=True, location="m.data", size_threshold=0)  # it moves the given weights
    loaded = load_model(tmp_path / "m.onnx", lazy=True)
    external = [t.name for t in loaded.graph.initializer if lazy_tensors.is_external(t)]
    assert external == [model.graph.initializer[k].name for k in (0, 3)]  # the conv's and the MatMul's weights
    lazy, report = onnxprune.prune(tmp_path / "m.onnx", 0.5, Options(round_to=8))
    eager, expected = onnxprune.prune(model, 0.5, Options(round_to=8))
    assert report.params_after == expected.params_after < report.params_before
    save_model(lazy, tmp_path / "lazy.onnx")
    got, want = arrays(load_model(tmp_path / "lazy.onnx")), arrays(eager)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_runs_on_data_read_the_weights_and_give_the_in_memory_result(external, tmp_path):
    """An iterative schedule with least-squares recovery runs the model: its steps read the weights into memory
    (the schedule's own analysis leaves them on disk) and end on the in-memory run's weights."""
    path, _ = external
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 8, 12, 12)).astype(np.float32))
    options = Options(round_to=8, schedule="iterative", steps=2, recover="lsq",
                      calib=onnxprune.CalibrationSource(tmp_path / "calib.npz"), quiet=True)
    lazy, _ = onnxprune.prune(path, 0.5, options)
    eager, _ = onnxprune.prune(onnx.load(path), 0.5, options)
    got, want = arrays(lazy), arrays(eager)
    assert got.keys() == want.keys() and all(np.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_check_command_runs_external_data_models_from_their_files(external, tmp_path):
    path, _ = external
    assert invoke(path, "--ratio", "0.5", "-o", tmp_path / "p.onnx", "--quiet").exit_code == 0
    result = invoke("check", path, tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    assert "cosine" in result.output
