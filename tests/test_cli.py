"""The CLI through click's CliRunner: the happy path, the report, and every bad input."""
import json
import shutil

import onnx
import pytest
from builders import DIGITS, DIGITS_DATA, files, invoke, one_line_error


@pytest.fixture
def workdir(tmp_path):
    shutil.copy(DIGITS, tmp_path / "m.onnx")
    return tmp_path


def test_prune_writes_beside_the_input_and_reports(workdir):
    result = invoke(workdir / "m.onnx", "--ratio", "0.5", "--report", workdir / "r.json")
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "MACs" in result.output and "wrote" in result.output
    pruned = onnx.load(workdir / "m.pruned.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    report = json.loads((workdir / "r.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] < report["macs_before"]
    assert report["file_bytes_after"] == (workdir / "m.pruned.onnx").stat().st_size
    assert report["summary"]["pruned"] == 5 and report["summary"]["frozen"] == 1
    assert {"groups", "frozen_reasons", "file_bytes_before", "file_bytes_after"} <= set(report)


def test_prune_with_data_reports_accuracy(workdir):
    result = invoke(workdir / "m.onnx", "--ratio", "0.25", "--data", DIGITS_DATA, "-o", workdir / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "top-1 accuracy  0.9963 ->" in result.output


def test_analyze_changes_nothing(workdir):
    before = files(workdir)
    result = invoke("analyze", workdir / "m.onnx", "--json", workdir / "g.json")
    assert result.exit_code == 0, result.output
    assert "6 channel groups: 5 prunable, 1 frozen" in result.output
    assert files(workdir) == before | {"g.json"}


def test_exclude_freezes_matching_groups(workdir):
    result = invoke(workdir / "m.onnx", "--ratio", "0.5", "--exclude", "fc1*", "--report", workdir / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "r.json").read_text())
    excluded = [g for g in report["groups"] if any("--exclude" in r for r in g["frozen"])]
    assert excluded and all(g["kept"] == g["channels"] for g in excluded)


def test_missing_model(workdir):
    before = files(workdir)
    one_line_error(invoke(workdir / "nope.onnx", "--ratio", "0.5"), 1, "model not found")
    assert files(workdir) == before


def test_not_an_onnx_file(workdir):
    (workdir / "text.onnx").write_text("this is not a model\n" * 10)
    before = files(workdir)
    one_line_error(invoke(workdir / "text.onnx", "--ratio", "0.5"), 1, "text.onnx")
    assert files(workdir) == before


def test_truncated_model(workdir):
    data = (workdir / "m.onnx").read_bytes()
    (workdir / "cut.onnx").write_bytes(data[: len(data) // 2])
    before = files(workdir)
    one_line_error(invoke(workdir / "cut.onnx", "--ratio", "0.5"), 1, "cut.onnx")
    assert files(workdir) == before


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1", "abc"])
def test_ratio_out_of_range(workdir, ratio):
    before = files(workdir)
    one_line_error(invoke(workdir / "m.onnx", "--ratio", ratio), 2, "ratio")
    assert files(workdir) == before


def test_latency_table_needs_a_latency_target_and_a_writable_path(workdir):
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "--latency-table", workdir / "t.json"), 2,
                   "--latency-table needs --target-latency")
    one_line_error(invoke(workdir / "m.onnx", "--target-latency", "0.5", "--latency-table",
                          workdir / "no" / "t.json"), 1, "cannot write")
    assert not (workdir / "m.pruned.onnx").exists()


def test_output_equal_to_input(workdir):
    original = (workdir / "m.onnx").read_bytes()
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "m.onnx"), 2, "input")
    assert (workdir / "m.onnx").read_bytes() == original


def test_unwritable_output(workdir):
    before = files(workdir)
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "no" / "dir" / "x.onnx"), 1,
                   "cannot write")
    (workdir / "adir").mkdir()
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "adir"), 2, "directory")
    assert files(workdir) == before | {"adir"}


def test_existing_output_survives_a_failed_run(workdir):
    (workdir / "out.onnx").write_bytes(b"keep me")
    (workdir / "bad.npz").write_bytes(b"not an npz")
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "-o", workdir / "out.onnx",
                          "--data", workdir / "bad.npz"), 1, "bad.npz")
    assert (workdir / "out.onnx").read_bytes() == b"keep me"


def test_unknown_criterion_is_a_usage_error(workdir):
    one_line_error(invoke(workdir / "m.onnx", "--ratio", "0.5", "--criterion", "nope"), 2, "criterion")


def test_model_breaking_the_onnx_spec(workdir):
    model = onnx.load(workdir / "m.onnx")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.input[1:]  # a Conv without weights
    onnx.save(model, workdir / "broken.onnx")
    before = files(workdir)
    one_line_error(invoke(workdir / "broken.onnx", "--ratio", "0.5"), 1, "not valid ONNX")
    assert files(workdir) == before


def test_plan_written_and_reapplied_reproduces_the_model(workdir):
    assert invoke(workdir / "m.onnx", "--ratio", "0.5", "-c", "l2", "-o", workdir / "a.onnx",
                  "--plan-out", workdir / "plan.json").exit_code == 0
    plan = json.loads((workdir / "plan.json").read_text())
    weight = onnx.numpy_helper.to_array(next(i for i in onnx.load(workdir / "m.onnx").graph.initializer
                                             if i.name == "stem.0.weight"))
    assert len(plan["initializers"]["stem.0.weight"]["0"]) == 16 and weight.shape[0] == 32
    result = invoke(workdir / "m.onnx", "--plan-in", workdir / "plan.json", "-o", workdir / "b.onnx")
    assert result.exit_code == 0, result.output
    assert (workdir / "a.onnx").read_bytes() == (workdir / "b.onnx").read_bytes()


def test_plan_errors(workdir):
    (workdir / "not_a_plan.json").write_text('{"groups": []}')
    one_line_error(invoke(workdir / "m.onnx", "--plan-in", workdir / "not_a_plan.json"), 1, "not an onnxprune plan")
    one_line_error(invoke(workdir / "m.onnx", "--plan-in", workdir / "not_a_plan.json", "--ratio", "0.5"), 2,
                   "exclude each other")
    one_line_error(invoke(workdir / "m.onnx"), 2, "--ratio")
    import builders
    onnx.save(builders.residual_block(), workdir / "other.onnx")
    assert invoke(workdir / "other.onnx", "--ratio", "0.5", "--plan-out", workdir / "p2.json").exit_code == 0
    one_line_error(invoke(workdir / "m.onnx", "--plan-in", workdir / "p2.json"), 1, "does not match this model")
