"""Nothing lost: no output may be a file the run reads or another output (links resolved), every file is written
atomically with the umask's mode, and a signal, a name too long or a full disk leaves no temporary file behind."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_CALIB, DIGITS_DATA, ROOT, files, invoke, one_line_error, residual_block

from onnxprune import OnnxPruneError, UsageError, files as filing, graph
from onnxprune.external_data import external_data_files


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(DIGITS, tmp_path / "m.onnx")
    shutil.copy(DIGITS_CALIB, tmp_path / "c.npz")
    shutil.copy(DIGITS_DATA, tmp_path / "d.npz")
    (tmp_path / "out.onnx").write_bytes(b"old output")
    return tmp_path


def contents(folder: Path) -> dict[str, bytes]:
    """Every file in the folder with its bytes: what a refused run must leave exactly as it was."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def leftovers(folder: Path) -> list[str]:
    return [name for name in files(folder) if name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- clashes: exit 2

CLASHES = [
    (["analyze", "m.onnx", "--json", "m.onnx"], "--json", "the input model"),
    (["check", "m.onnx", "out.onnx", "--json", "m.onnx"], "--json", "the original model"),
    (["check", "m.onnx", "out.onnx", "--json", "out.onnx"], "--json", "the pruned model"),
    (["check", "m.onnx", "out.onnx", "--data", "d.npz", "--json", "d.npz"], "--json", "--data"),
    (["sensitivity", "m.onnx", "--calib", "c.npz", "--json", "m.onnx"], "--json", "the input model"),
    (["sensitivity", "m.onnx", "--calib", "c.npz", "--json", "c.npz"], "--json", "--calib"),
    (["sensitivity", "m.onnx", "--calib", "c.npz", "--plot", "m.onnx"], "--plot", "the input model"),
    (["sensitivity", "m.onnx", "--calib", "c.npz", "--json", "j.json", "--plot", "j.json"], "--plot", "--json"),
    (["m.onnx", "--ratio", "0.5", "-o", "m.onnx"], "-o", "the input model"),
    (["m.onnx", "--ratio", "0.5", "--report", "m.onnx"], "--report", "the input model"),
    (["m.onnx", "--ratio", "0.5", "-o", "out.onnx", "--report", "out.onnx"], "--report", "-o"),
    (["m.onnx", "--ratio", "0.5", "-o", "out.onnx", "--plan-out", "out.onnx"], "--plan-out", "-o"),
    (["m.onnx", "--ratio", "0.5", "--plan-out", "m.pruned.onnx"], "--plan-out", "the output"),
    (["m.onnx", "--ratio", "0.5", "--report", "r.json", "--plan-out", "r.json"], "--plan-out", "--report"),
    (["m.onnx", "--ratio", "0.5", "--calib", "c.npz", "--report", "c.npz"], "--report", "--calib"),
    (["m.onnx", "--ratio", "0.5", "--data", "d.npz", "-o", "d.npz"], "-o", "--data"),
    (["m.onnx", "--ratio", "0.5", "--data", "d.npz", "--labels", "l.npy", "--report", "l.npy"], "--report",
     "--labels"),
    (["m.onnx", "--plan-in", "p.json", "--report", "p.json"], "--report", "--plan-in"),
    (["m.onnx", "--target-latency", "0.5", "-o", "out.onnx", "--latency-table", "out.onnx"], "-o",
     "--latency-table"),
    (["m.onnx", "--target-latency", "0.5", "--latency-table", "m.onnx"], "--latency-table", "the input model"),
]


@pytest.mark.parametrize("args, written, read", CLASHES, ids=[" ".join(c[0]) for c in CLASHES])
def test_an_output_that_is_an_input_or_another_output_is_refused_before_any_work(workdir, monkeypatch, args,
                                                                                  written, read):
    np.save(workdir / "l.npy", np.zeros(10, dtype=np.int64))
    (workdir / "p.json").write_text("{}")
    monkeypatch.chdir(workdir)
    before = contents(workdir)
    result = invoke(*args)
    one_line_error(result, 2, written)
    assert read in result.stderr
    assert contents(workdir) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_link_to_the_input_is_the_input(workdir, link):
    (os.symlink if link == "symlink" else os.link)(workdir / "m.onnx", workdir / "alias.onnx")
    before = contents(workdir)
    one_line_error(invoke("analyze", workdir / "m.onnx", "--json", workdir / "alias.onnx"), 2, "the input model")
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "alias.onnx"), 2, "the input model")
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "--calib", workdir / "c.npz",
                          "--report", workdir / "alias.onnx"), 2, "the input model")
    assert contents(workdir) == before


def test_a_symlinked_folder_leads_to_the_same_file(workdir):
    os.symlink(workdir, workdir / "same")
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "same" / "out.onnx",
                          "--report", workdir / "out.onnx"), 2, "name the same file")
    assert (workdir / "out.onnx").read_bytes() == b"old output"


def test_the_external_data_of_an_input_model_is_an_input(tmp_path):
    onnx.save_model(residual_block(), tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    before = contents(tmp_path)
    one_line_error(invoke("analyze", tmp_path / "ext.onnx", "--json", tmp_path / "ext.weights"), 2,
                   "the input model's external data")
    one_line_error(invoke(tmp_path / "ext.onnx", "--ratio", "0.5", "-o", tmp_path / "ext.weights"), 2,
                   "the input model's external data")
    one_line_error(invoke("check", tmp_path / "ext.onnx", tmp_path / "ext.onnx", "--json", tmp_path / "ext.weights"),
                   2, "external data")
    assert contents(tmp_path) == before


def test_external_data_files_are_found_as_onnx_finds_them_without_loading_the_weights(tmp_path):
    model = residual_block()
    value = onnx.numpy_helper.from_array(np.arange(600, dtype=np.float32), "k")
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["k"], value=value))
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    loaded = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    expected = {tmp_path / entry.value for tensor in onnx.external_data_helper._get_all_tensors(loaded)
                for entry in tensor.external_data if entry.key == "location"}
    assert len(expected) > len(model.graph.initializer)  # the Constant's tensor too
    assert set(external_data_files(tmp_path / "ext.onnx")) == expected
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 64)
    assert external_data_files(tmp_path / "bad.onnx") == external_data_files(tmp_path / "none.onnx") == []
    assert external_data_files(DIGITS) == external_data_files(tmp_path) == []


def test_the_latency_table_is_read_and_written_by_its_own_option():
    table = Path("t.json")
    filing.check_paths([("--latency-table", table)], [("--latency-table", table)])
    with pytest.raises(UsageError, match="--report would overwrite --latency-table"):
        filing.check_paths([("--latency-table", table)], [("--latency-table", table), ("--report", table)])


# --------------------------------------------------------------------------------------------------- modes

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_honour_the_umask(workdir, umask, mode):
    old = os.umask(umask)
    try:
        result = invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "new.onnx", "--report",
                        workdir / "r.json", "--plan-out", workdir / "p.json", "-q")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for name in ("new.onnx", "r.json", "p.json"):
        assert (workdir / name).stat().st_mode & 0o777 == mode, name


def test_a_replaced_file_keeps_its_mode_as_with_cp(workdir):
    os.chmod(workdir / "out.onnx", 0o640)
    result = invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "out.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert (workdir / "out.onnx").stat().st_mode & 0o777 == 0o640
    onnx.checker.check_model(onnx.load(workdir / "out.onnx"))


def test_a_symlinked_output_is_written_through(tmp_path):
    (tmp_path / "real.json").write_text("old")
    os.symlink(tmp_path / "real.json", tmp_path / "link.json")
    filing.write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


# ------------------------------------------------------------------------------------------ failures: exit 1

def test_a_name_too_long_for_the_file_system_is_one_line(workdir):
    before = contents(workdir)
    long_name = "a" * 300 + ".onnx"
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / long_name), 1, "too long")
    one_line_error(invoke("analyze", workdir / "m.onnx", "--json", workdir / long_name), 1, "too long")
    one_line_error(invoke(workdir / long_name, "--ratio", "0.5"), 1, "not found")
    with pytest.raises(OnnxPruneError, match="too long"):
        filing.write_text(workdir / long_name, "{}")  # past the early check, the writer says the same
    assert contents(workdir) == before and not leftovers(workdir)


def test_a_name_just_short_enough_is_written(workdir):
    name = "b" * (255 - len(".onnx")) + ".onnx"  # its temporary name must not be longer than the file system allows
    result = invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / name, "-q")
    assert result.exit_code == 0, result.output
    assert (workdir / name).stat().st_size > 0 and not leftovers(workdir)


def test_a_full_disk_is_one_line_and_leaves_the_old_file(workdir, monkeypatch):
    def full(handle, data):
        handle.write(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(filing, "_write_all", full)
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "out.onnx"), 1,
                   "No space left on device")
    one_line_error(invoke("analyze", workdir / "m.onnx", "--json", workdir / "out.onnx"), 1, "No space left")
    assert (workdir / "out.onnx").read_bytes() == b"old output" and not leftovers(workdir)


def test_a_folder_that_cannot_be_written_is_one_line(workdir, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(filing.tempfile, "mkstemp", refused)
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "out.onnx"), 1, "Permission denied")
    assert (workdir / "out.onnx").read_bytes() == b"old output" and not leftovers(workdir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(workdir):
    folder = workdir / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", folder / "x.onnx"), 1, "permission denied")
    finally:
        folder.chmod(0o755)
    assert not list(folder.iterdir())


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "t.json").write_text("old")
    with pytest.raises(ValueError):
        with filing.atomic_path(tmp_path / "t.json") as tmp:
            tmp.write_text("half")
            raise ValueError("the serialiser failed")
    assert (tmp_path / "t.json").read_text() == "old" and files(tmp_path) == {"t.json"}


def test_handlers_are_back_after_a_write_and_writes_work_outside_the_main_thread(tmp_path):
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)]
    filing.write_text(tmp_path / "a.json", "{}")
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)] == before
    worker = threading.Thread(target=filing.write_text, args=(tmp_path / "b.json", "{}"))
    worker.start()
    worker.join()
    assert files(tmp_path) == {"a.json", "b.json"}


def test_a_model_over_2_gb_writes_its_weights_beside_it_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "EXTERNAL_DATA_ABOVE", 0)
    (tmp_path / "x.onnx.data").write_bytes(b"old weights")
    graph.save_model(residual_block(), tmp_path / "x.onnx")
    assert files(tmp_path) == {"x.onnx", "x.onnx.data"}
    assert external_data_files(tmp_path / "x.onnx") == [tmp_path / "x.onnx.data"]
    loaded, expected = onnx.load(tmp_path / "x.onnx"), residual_block()
    for got, want in zip(loaded.graph.initializer, expected.graph.initializer):
        assert np.array_equal(onnx.numpy_helper.to_array(got), onnx.numpy_helper.to_array(want))


# ----------------------------------------------------------------------------------------------- signals

SLOW_SAVE = """
import sys, time
import onnx.external_data_helper as external
from onnxprune import files, graph
from onnxprune.cli import main

def announce_and_wait():
    print("writing", flush=True)
    time.sleep(60)

if sys.argv[1] == "external":
    graph.EXTERNAL_DATA_ABOVE = 0
    write_tensors = external.write_external_data_tensors
    def slow_tensors(model, folder):
        write_tensors(model, folder)
        announce_and_wait()
    external.write_external_data_tensors = slow_tensors
else:
    def slow(handle, data):
        handle.write(data[:1000])
        handle.flush()
        announce_and_wait()
    files._write_all = slow
sys.argv = ["onnxprune", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("kind", ["plain", "external"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_during_the_save_leaves_the_old_file_and_no_temporary(workdir, signum, kind):
    (workdir / "out.onnx.data").write_bytes(b"old weights")
    before = contents(workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, kind, "m.onnx", "--ratio", "0.5", "-o", "out.onnx",
                              "-q"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n", child.stderr.read()
        assert leftovers(workdir)  # caught in the middle of the save
        child.send_signal(signum)
        child.wait(timeout=60)
    finally:
        child.kill()
    stderr = child.stderr.read()
    if signum == signal.SIGINT:  # Python's own handler: KeyboardInterrupt, which the CLI reports in one line
        assert child.returncode == 1 and "aborted" in stderr, stderr
    else:  # the default action, as if onnxprune had no handler: killed by the signal
        assert child.returncode == -signum, stderr
    assert contents(workdir) == before and not leftovers(workdir)
