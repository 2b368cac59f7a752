"""Prune + fine-tune outside onnxprune: prune the digits model, apply the same plan to the PyTorch model, fine-tune,
export, and gate the result with `onnxprune check` (the seed's prune + fine-tune, and with --steps K the iterative
prune + fine-tune).

    python -m venv /tmp/tools-venv && /tmp/tools-venv/bin/pip install -e '.[tools]'
    /tmp/tools-venv/bin/python tools/finetune_digits.py [--ratio 0.5] [--steps 1] [--epochs 5] [--out /tmp/ft.onnx]

`--plan-out` writes, for every original initializer, the kept indices along each pruned axis. The ONNX initializers
of this model carry the PyTorch state-dict names, so applying the plan is slicing each parameter and buffer named
there; nothing here knows the architecture's widths.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import DigitsCNN, export_onnx, load_data, set_determinism, train  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune import Options  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL, DATA = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_cnn.test.npz"


def torch_model_from_onnx(path: Path) -> torch.nn.Module:
    """DigitsCNN with the weights of the ONNX model (its initializers are named like the state dict)."""
    model = DigitsCNN()
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(path).graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise SystemExit(f"the ONNX model lacks {missing[:3]}: not exported from DigitsCNN with BN unfolded")
    model.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    return model


def apply_plan(model: torch.nn.Module, plan: dict) -> None:
    """Slice every parameter and buffer the plan names along its pruned axes, in place."""
    modules = dict(model.named_modules())
    for name, axes in plan["initializers"].items():
        owner, _, attr = name.rpartition(".")
        if owner not in modules or not hasattr(modules[owner], attr):
            continue  # a constant the exporter made (e.g. a folded shape), not a parameter
        tensor = getattr(modules[owner], attr)
        for axis, kept in axes.items():
            tensor = tensor.index_select(int(axis), torch.as_tensor(kept))
        if isinstance(getattr(modules[owner], attr), torch.nn.Parameter):
            setattr(modules[owner], attr, torch.nn.Parameter(tensor.detach().clone()))
        else:
            modules[owner].register_buffer(attr, tensor.detach().clone())


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=1, help="prune + fine-tune rounds of growing ratio")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs per round")
    parser.add_argument("--out", type=Path, default=Path("/tmp/digits_finetuned.onnx"))
    args = parser.parse_args()
    set_determinism(0)
    x_tr, x_te, y_tr, y_te = load_data()
    model, current = torch_model_from_onnx(MODEL), MODEL
    print(f"original: top-1 {accuracy(model, x_te, y_te):.4f}")
    for step in range(1, args.steps + 1):
        target = args.ratio * step / args.steps  # removed share of the original channels after this round
        step_ratio = 1 - (1 - target) / (1 - args.ratio * (step - 1) / args.steps)
        pruned_onnx, report = onnxprune.prune(str(current), step_ratio, Options(round_to=1))
        apply_plan(model, report.plan_dict)
        print(f"round {step}: pruned to {report.macs_after / report.macs_before:.1%} of this round's MACs, "
              f"top-1 {accuracy(model, x_te, y_te):.4f} before fine-tuning")
        train(model, x_tr, y_tr, args.epochs, seed=step, lr=1e-3)
        print(f"round {step}: top-1 {accuracy(model, x_te, y_te):.4f} after {args.epochs} epochs")
        export_onnx(model, str(args.out))
        current = args.out
    command = ["onnxprune", "check", str(MODEL), str(args.out), "--data", str(DATA), "--max-drop", "0.02",
               "--latency"]
    print("$", " ".join(command), flush=True)
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
