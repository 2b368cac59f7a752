"""Train a small CNN on scikit-learn's ``load_digits`` and export it to ONNX.

This produces the real, trained example model used by the ``onnxprune`` README
quick start:

* ``<out-dir>/digits_cnn.onnx``      -- opset 17, BatchNormalization nodes kept
  as separate nodes (not folded into Conv), weights stored as initializers,
  dynamic batch dimension. Input ``input``: float32 ``(N, 1, 8, 8)`` with
  pixel values in [0, 1]; output ``logits``: float32 ``(N, 10)``.
* ``<out-dir>/digits_cnn.test.npz``  -- the held-out test split, exactly the
  tensor the ONNX model consumes: ``input`` (float32, ``(N, 1, 8, 8)``, raw
  digit values 0..16 divided by 16, no other normalisation) and ``label``
  (int64, ``(N,)``).

Architecture (all channel counts are multiples of 8; convolutions have no
bias because each is followed by BatchNorm)::

    Conv3x3(1->32)-BN-ReLU                  8x8
    Conv3x3(32->64)-BN-ReLU                 8x8
    MaxPool 2x2                             4x4
    residual block:
        Conv3x3(64->64)-BN-ReLU-Conv3x3(64->64)-BN, + identity, ReLU
    Conv1x1(64->64)-BN-ReLU                 4x4
    GlobalAveragePool, Flatten
    Linear(64->64)-ReLU-Linear(64->10)

Everything is deterministic: fixed seeds, a fixed stratified train/test split
(``test_size=0.3, random_state=0``), deterministic torch algorithms and
``torch.set_num_threads(2)``. Training uses Adam with a cosine learning-rate
schedule and random +-1 pixel shifts as augmentation; it takes well under two
minutes on two CPU cores.

After export the script checks the ONNX file (``onnx.checker`` with
``full_check=True``, opset 17, BatchNormalization present, no initializer
exposed as a graph input), runs it with onnxruntime on the test split, checks
that its logits match PyTorch's (atol 1e-4) and prints the ONNX top-1 accuracy.

Needs: torch (CPU build), onnx, onnxruntime, scikit-learn, numpy.

Usage::

    python tools/train_digits.py [--out-dir models] [--epochs N] [--seed S]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OPSET = 17
MODEL_NAME = "digits_cnn.onnx"
TEST_NAME = "digits_cnn.test.npz"


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + x)


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, 32)
        self.conv2 = ConvBNReLU(32, 64)
        self.pool = nn.MaxPool2d(2)
        self.res = ResidualBlock(64)
        self.conv3 = ConvBNReLU(64, 64, k=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.conv2(x)
        x = self.pool(x)
        x = self.res(x)
        x = self.conv3(x)
        x = torch.flatten(self.gap(x), 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.ascontiguousarray(x_te, dtype=np.float32),
        y_tr.astype(np.int64),
        y_te.astype(np.int64),
    )


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by a random offset in {-1, 0, 1}^2 (zero fill)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(3):
        for ox in range(3):
            idx = ((dy == oy) & (dx == ox)).nonzero(as_tuple=True)[0]
            if idx.numel():
                out[idx] = padded[idx, :, oy : oy + 8, ox : ox + 8]
    return out


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(x)).numpy()


def train(
    model: nn.Module,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    n = xt.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total_loss = 0.0
        correct = 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = random_shift(xt[idx], gen)
            yb = yt[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * idx.numel()
            correct += (logits.argmax(1) == yb).sum().item()
        if epoch == 1 or epoch % 5 == 0 or epoch == epochs:
            print(
                f"epoch {epoch:3d}/{epochs}  loss {total_loss / n:.4f}  "
                f"train acc (augmented) {correct / n:.4f}",
                flush=True,
            )


def export_onnx(model: nn.Module, path: str) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, 8, 8, dtype=torch.float32)
    # TrainingMode.PRESERVE exports the model in its current (eval) mode but
    # skips the eval-only peephole pass that fuses BatchNormalization into Conv.
    # The exporter warns that the TorchScript path is legacy and that constant
    # folding is risky in training mode; neither applies (eval mode, and the
    # result is verified against torch below), so those two are silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        _export(model, dummy, path)


def _export(model: nn.Module, dummy: torch.Tensor, path: str) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        path,
        opset_version=OPSET,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
        export_params=True,
        keep_initializers_as_inputs=False,
    )


def check_onnx(path: str) -> onnx.ModelProto:
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == OPSET, opsets
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops.get("BatchNormalization", 0) > 0, f"BN was folded away: {dict(ops)}"
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            # Inference-mode BN: a single output, training_mode unset or 0.
            assert len([o for o in n.output if o]) == 1, n
            for a in n.attribute:
                if a.name == "training_mode":
                    assert a.i == 0, n
    init_names = {i.name for i in m.graph.initializer}
    inputs = [i.name for i in m.graph.input]
    assert inputs == ["input"], inputs
    assert not init_names & set(inputs)
    assert [o.name for o in m.graph.output] == ["logits"]
    assert "Constant" not in ops, "unexpected Constant nodes holding weights"
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="models", help="output folder (default: models)")
    ap.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--calib-only", action="store_true",
                    help="only write the calibration split (no training, no export)")
    args = ap.parse_args(argv)

    set_determinism(args.seed)
    x_tr, x_te, y_tr, y_te = load_data()
    print(f"train {x_tr.shape}, test {x_te.shape}")
    if args.calib_only:
        os.makedirs(args.out_dir, exist_ok=True)
        save_calibration(x_tr, y_tr, args.out_dir)
        return 0

    model = DigitsCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")

    t0 = time.perf_counter()
    train(model, x_tr, y_tr, args.epochs, args.seed)
    train_s = time.perf_counter() - t0
    print(f"training time: {train_s:.1f} s")

    model.eval()
    torch_logits = predict(model, x_te)
    torch_acc = float((torch_logits.argmax(1) == y_te).mean())
    print(f"torch test top-1: {torch_acc:.4f}")

    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, MODEL_NAME)
    npz_path = os.path.join(args.out_dir, TEST_NAME)
    export_onnx(model, onnx_path)
    m = check_onnx(onnx_path)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    print(f"ONNX nodes: {len(m.graph.node)}  ops: {dict(sorted(ops.items()))}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(["logits"], {"input": x_te})[0]
    max_diff = float(np.abs(onnx_logits - torch_logits).max())
    print(f"max |onnx - torch| logits: {max_diff:.2e}")
    if not np.allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0):
        print("ERROR: ONNX logits differ from torch logits (atol 1e-4)", file=sys.stderr)
        return 1
    onnx_acc = float((onnx_logits.argmax(1) == y_te).mean())
    print(f"ONNX test top-1: {onnx_acc:.4f}")

    np.savez_compressed(
        npz_path,
        input=x_te.astype(np.float32),
        label=y_te.astype(np.int64),
    )
    with np.load(npz_path) as d:
        assert sorted(d.files) == ["input", "label"]
        assert d["input"].dtype == np.float32 and d["input"].shape == x_te.shape
        assert d["label"].dtype == np.int64 and d["label"].shape == y_te.shape
    print(
        f"wrote {onnx_path} ({os.path.getsize(onnx_path)} bytes), "
        f"{npz_path} ({os.path.getsize(npz_path)} bytes)"
    )
    save_calibration(x_tr, y_tr, args.out_dir)
    return 0


CALIB_NAME = "digits_cnn.calib.npz"
CALIB_SIZE = 256


def save_calibration(x_tr: np.ndarray, y_tr: np.ndarray, out_dir: str) -> None:
    """Calibration data for data-driven pruning: the first CALIB_SIZE samples of the training split (never the
    test split, which measures the result)."""
    path = os.path.join(out_dir, CALIB_NAME)
    np.savez_compressed(path, input=x_tr[:CALIB_SIZE].astype(np.float32), label=y_tr[:CALIB_SIZE].astype(np.int64))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    sys.exit(main())
