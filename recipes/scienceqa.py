"""ScienceQA with zero-init prompts and image features (the paper's multimodal result: 85.19 % on test).

Data: the official release (docs/design.md §4): ``problems.json`` (``pid -> {question, choices, answer, hint, image,
subject, grade, ...}``), ``pid_splits.json`` (train / val / test / mini*) and ``images/{split}/{pid}/image.png``. Or
the published layout (:mod:`zinit.recipes.published`): ``--data derek-thomas/ScienceQA`` where a network exists, or a
folder with its ``{train,validation,test}-*.parquet`` offline, converted once into the release layout (images
written from the embedded bytes; ``validation`` is ``val``; pids ``{split}-{row}``).

Prompt: the Alpaca instruction template (as LLaMA-Adapter) around ``Question: ...\\nContext: <hint or N/A>\\nOptions:
(A) ... (B) ...``; target ``The answer is X.`` (loss on the target only). Train on ``train``, keep the adapter of the
epoch that scores best on ``val``, report on ``test``.

Images: a frozen encoder (Hugging Face ``CLIPVisionModel``, default ``openai/clip-vit-large-patch14``, or
``timm:<name>`` for any timm ViT) gives the class token of several layers (multi-scale, default three evenly spaced
ones, each layer-normalised without parameters) concatenated to ``D = layers × width``. Features are computed once
per image and cached on disk (safetensors, one file per split and encoder, keyed by pid and the image file's size and
modification time; another encoder, other layers or other weights get another cache). ``zinit.inject(...,
visual_dim=D)`` adds the trainable projection; each forward passes its batch's features through
``zinit.visual_features``. ``--no-image`` trains the text-only variant.

Answers: the letter after "The answer is"; a reply with no valid letter counts as wrong and is counted separately
(never replaced by a guess). Two evaluation modes: ``generate`` (greedy decoding, the paper's) and ``likelihood``
(the option letter the model scores highest after "The answer is": fast and deterministic).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zinit
from zinit.cliargs import check_model_folder, option_value, positive_int, without_options
from zinit.files import atomic_write, read_json, write_json
from zinit.embedded import EMBEDDED_NAME
from zinit.lm import format_prompt, load_model, tokenize_pair
from zinit.train import Task, causal_lm_loss, train
from zinit.train import dist as D
from zinit.train.data import pad_collate

from zinit.methods import registry as methods

from . import published
from .common import TrainingRun, add_flags, add_train_flags
from .vision import load_pretrained

LETTERS = "ABCDEFGHIJ"
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
DEFAULT_ENCODER = "openai/clip-vit-large-patch14"
#: What summary.json reports (and zinit compare tabulates), headline first.
METRICS = ("Avg", "IMG", "TXT", "NO")
RECIPE_FILE = "scienceqa.json"  #: beside the adapter: how its features and prompts were made
#: Test accuracy (%) reported in the paper (docs/design.md §3).
PAPER = {
    "LLaMA-Adapter (paper)": {"NAT": 84.37, "SOC": 88.30, "LAN": 84.36, "TXT": 83.72, "IMG": 80.32, "NO": 86.90,
                              "G1-6": 85.83, "G7-12": 84.05, "Avg": 85.19},
    "text-only (paper)": {"Avg": 78.31},
}


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class ScienceQA:
    """The release: ``problems`` (pid -> problem), ``splits`` (name -> pids) and the folder."""

    root: Path
    problems: dict[str, dict[str, Any]]
    splits: dict[str, list[str]]

    def image_path(self, pid: str, split: str) -> Path | None:
        image = self.problems[pid].get("image")
        return self.root / "images" / split / pid / image if image else None

    def split(self, name: str, images: bool = True) -> list[str]:
        """The pids of a split, checked: every pid is in ``problems.json``, its answer indexes its choices, and (with
        ``images``) its image file exists. Errors name the pid and what is wrong."""
        if name not in self.splits:
            raise ValueError(f"split {name!r} is not in {self.root / 'pid_splits.json'} (it has {sorted(self.splits)})")
        pids = [str(p) for p in self.splits[name]]
        for pid in pids:
            problem = self.problems.get(pid)
            if problem is None:
                raise ValueError(f"pid {pid} of split {name!r} in pid_splits.json is not in problems.json")
            if not isinstance(problem, dict):
                raise ValueError(f"pid {pid} in problems.json is a {type(problem).__name__}, not an object")
            choices, answer = problem.get("choices"), problem.get("answer")
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
                raise ValueError(f"pid {pid}: 'choices' must be a list of 2..{len(LETTERS)} options, got {choices!r}")
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"pid {pid}: answer index {answer!r} is out of range for {len(choices)} choices")
            path = self.image_path(pid, name)
            if images and path is not None and not path.is_file():
                raise FileNotFoundError(f"pid {pid}: image file {path} does not exist")
        return pids


#: The published (Hub) split names and the release's.
PUBLISHED_SPLITS = {"train": "train", "validation": "val", "test": "test"}
#: The published columns copied into each problem (``image`` handled apart; ``question, choices, answer`` required).
PUBLISHED_FIELDS = ("question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category", "skill",
                    "lecture", "solution")
#: What ``--data`` takes, for error messages.
ACCEPTS = ("a ScienceQA release folder (problems.json, pid_splits.json, images/), a folder with the published "
           "train-/validation-/test-*.parquet (derek-thomas/ScienceQA as downloaded: data/), or the Hub id "
           "derek-thomas/ScienceQA")


def load_scienceqa(root: str | Path) -> ScienceQA:
    """Read ``problems.json`` and ``pid_splits.json`` from ``root``; errors name the missing or malformed file.

    ``root`` may also be the published layout (:func:`release_folder`), converted once into the release's."""
    root = release_folder(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ScienceQA folder {root} does not exist")
    problems = read_json(root / "problems.json", "ScienceQA problems file")
    splits = read_json(root / "pid_splits.json", "ScienceQA split file")
    if not isinstance(problems, dict) or not problems:
        raise ValueError(f"{root / 'problems.json'} must be a non-empty object pid -> problem")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise ValueError(f"{root / 'pid_splits.json'} must be an object split -> list of pids")
    return ScienceQA(root, {str(k): v for k, v in problems.items()}, splits)


def release_folder(data: str | Path) -> Path:
    """The folder in the release layout that ``--data`` stands for: a release folder (with ``problems.json``) as it
    is; or the published layout (:mod:`zinit.recipes.published`: a folder with ``{train,validation,test}-*.parquet``
    as ``derek-thomas/ScienceQA`` has them under ``data/``, one such file, or the Hub id) converted once into the
    release layout in zinit's data cache (:func:`convert_published`). Anything else is returned as it is (reading it
    then names what is missing)."""
    root = Path(data)
    if (root / "problems.json").is_file():
        return root
    is_hub = published.hub_id(data) is not None
    if not is_hub and not root.is_dir() and not (root.is_file() and root.suffix == ".parquet"):
        return root
    found = published.source_files(data, ACCEPTS, _published_files)
    if found is None:
        return root
    source, files, label = found
    if not files:
        if is_hub:
            raise FileNotFoundError(f"{data} has no train-/validation-/test-*.parquet files; pass --data DIR instead "
                                    f"({ACCEPTS})")
        return root
    target = published.cache_root() / "scienceqa" / f"{label}-{published.source_key(files, source, 'scienceqa')}"
    return published.build_once(target, lambda tmp: convert_published(files, tmp, str(data), source),
                                note=f"ScienceQA {data}")


def _published_files(root: Path) -> list[Path]:
    return [f for split in PUBLISHED_SPLITS for f in published.data_files(root, split)]


def _published_split(file: Path) -> str:
    for split in PUBLISHED_SPLITS:
        if file.name.startswith((f"{split}-", f"{split}.")):
            return split
    raise ValueError(f"{file}: the name does not say its split: published ScienceQA files are named "
                     f"{{{','.join(PUBLISHED_SPLITS)}}}-*.parquet (rename it, e.g. test-00000.parquet)")


def convert_published(files: Sequence[Path], out: Path, what: str, source: Path | None = None) -> None:
    """Write the release layout into ``out`` from published ScienceQA parquet files (split from each file's name;
    ``validation`` becomes the release's ``val``): ``problems.json`` (the published columns, ``answer`` an int,
    ``image`` ``"image.png"`` or null, ``split``), ``pid_splits.json`` and ``images/{split}/{pid}/image.png`` (the
    embedded bytes, verbatim). The release's pids are not published: a problem's pid is ``{split}-{row}``, its row
    in the split's files (sorted by name), so it is the same at every conversion. ``source``: the folder relative
    image paths (an image struct with no bytes) are looked up in."""
    problems: dict[str, dict[str, Any]] = {}
    splits: dict[str, list[str]] = {}
    for name, release in PUBLISHED_SPLITS.items():
        paths = [f for f in files if _published_split(f) == name]
        if not paths:
            continue
        pids = splits.setdefault(release, [])
        rows = published.read_rows(paths, f"ScienceQA {what} ({name})", ("question", "choices", "answer"),
                                   raw_images=("image",))
        for i, row in enumerate(rows):
            pid = f"{release}-{i}"
            where = f"ScienceQA {what}: {name} row {i}"
            problem = {k: ("" if row.get(k) is None else row.get(k)) for k in PUBLISHED_FIELDS}
            if not isinstance(row["choices"], list) or not isinstance(row["answer"], int) or \
                    isinstance(row["answer"], bool):
                raise ValueError(f"{where}: 'choices' must be a list and 'answer' an int, got {row['choices']!r} and "
                                 f"{row['answer']!r}")
            image = _image_bytes(row.get("image"), source, where)
            if image is not None:
                folder = out / "images" / release / pid
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "image.png").write_bytes(image)
            problem["image"] = "image.png" if image is not None else None
            problem["split"] = release
            problems[pid] = problem
            pids.append(pid)
    if not problems:
        raise ValueError(f"ScienceQA {what}: {[str(f) for f in files]} hold no rows")
    write_json(out / "problems.json", problems)
    write_json(out / "pid_splits.json", splits)
    write_json(out / "published.json", {"data": what, "files": [str(f) for f in files],
                                        "pids": "{split}-{row}: the row in the published split, from 0"})


def _image_bytes(value: Any, source: Path | None, where: str) -> bytes | None:
    """The encoded image of a published row: the struct's ``bytes``, else the file its ``path`` names; None for no
    image. Errors name the row."""
    if value is None:
        return None
    if hasattr(value, "save"):  # a decoded PIL image: encode it again
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: 'image' is a {type(value).__name__}; expected the datasets Image struct "
                         "{bytes, path} or null")
    if value.get("bytes"):
        return bytes(value["bytes"])
    path = value.get("path")
    if not path:
        return None
    for candidate in (Path(path), *((source / path,) if source is not None else ())):
        if candidate.is_file():
            return candidate.read_bytes()
    raise FileNotFoundError(f"{where}: the image has no embedded bytes and its path {path!r} is not a file"
                            + (f" (nor relative to {source})" if source is not None else "")
                            + ": use the published parquet files, which embed the images")


def question_text(problem: dict[str, Any]) -> str:
    """``Question: ...\\nContext: ...\\nOptions: (A) ... (B) ...`` (context = the hint, or "N/A" when empty).

    >>> print(question_text({"question": "Which is a fish?", "hint": "", "choices": ["trout", "frog"]}))
    Question: Which is a fish?
    Context: N/A
    Options: (A) trout (B) frog
    """
    context = (problem.get("hint") or "").strip() or "N/A"
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    return f"Question: {problem['question']}\nContext: {context}\nOptions: {options}"


def prompt_text(problem: dict[str, Any]) -> str:
    """The model's input: the Alpaca instruction template around :func:`question_text`."""
    return format_prompt(question_text(problem))


def target_text(answer: int) -> str:
    """``The answer is X.``

    >>> target_text(2)
    'The answer is C.'
    """
    return f"The answer is {LETTERS[answer]}."


_ANSWER = re.compile(r"The answer is \(?([A-J])\)?(?![A-Za-z])")


def extract_answer(reply: str, n_choices: int) -> int | None:
    """The option index after "The answer is", or None when the reply names no valid letter (never a guess).

    >>> extract_answer(" The answer is B.", 3), extract_answer("The answer is (A)", 2), extract_answer("The answer is E.", 3)
    (1, 0, None)
    >>> extract_answer("I think it is B", 3) is None
    True
    """
    match = _ANSWER.search(reply)
    if match is None:
        return None
    index = LETTERS.index(match.group(1))
    return index if index < n_choices else None


def accuracy_table(problems: dict[str, dict[str, Any]], predictions: dict[str, int | None]) -> dict[str, Any]:
    """The paper's columns (%) over the predicted pids: NAT/SOC/LAN by subject, TXT = has a hint, IMG = has an
    image, NO = neither, G1-6 / G7-12 by grade, Avg over all; plus the counts and the replies with no valid letter.

    A column with no question is None. A None prediction is wrong.
    """
    columns: dict[str, list[bool]] = {c: [] for c in COLUMNS}
    invalid = 0
    for pid, predicted in predictions.items():
        p = problems[pid]
        ok = predicted is not None and predicted == p["answer"]
        invalid += predicted is None
        has_text, has_image = bool((p.get("hint") or "").strip()), bool(p.get("image"))
        grade = int(str(p.get("grade", "grade0")).replace("grade", "") or 0)
        member = {"NAT": p.get("subject") == "natural science", "SOC": p.get("subject") == "social science",
                  "LAN": p.get("subject") == "language science", "TXT": has_text, "IMG": has_image,
                  "NO": not has_text and not has_image, "G1-6": 1 <= grade <= 6, "G7-12": 7 <= grade <= 12,
                  "Avg": True}
        for column, inside in member.items():
            if inside:
                columns[column].append(ok)
    table: dict[str, Any] = {c: (100.0 * sum(v) / len(v) if v else None) for c, v in columns.items()}
    table["counts"] = {c: len(v) for c, v in columns.items()}
    table["no_valid_letter"] = invalid
    return table


def format_table(table: dict[str, Any], label: str = "zinit (measured)") -> str:
    """A Markdown table: the measured row beside the paper's."""
    lines = ["| | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    lines.append(f"| {label} | " + " | ".join(cell(table.get(c)) for c in COLUMNS) + " |")
    for name, row in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |")
    lines.append(f"\n{table['counts']['Avg']} questions; replies with no valid letter: {table['no_valid_letter']} "
                 "(counted wrong)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# image features


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


class ImageEncoder:
    """A frozen visual encoder giving multi-scale global features: the class token of each chosen layer
    (1-based; default three evenly spaced layers ending at the last), layer-normalised without parameters and
    concatenated.

    ``spec``: a Hugging Face CLIP checkpoint (hub id or folder; its vision tower is used), or ``timm:<name>`` for a
    timm ViT (random weights unless ``weights`` names a local file; ``img_size`` its input size, default the model's
    own, e.g. 518 for DINOv2, whose position table is then resized).

    >>> enc = ImageEncoder("timm:vit_tiny_patch16_224", img_size=32)
    >>> from PIL import Image
    >>> enc.encode([Image.new("RGB", (28, 28))]).shape  # three class tokens of width 192
    torch.Size([1, 576])
    """

    def __init__(self, spec: str = DEFAULT_ENCODER, layers: Sequence[int] | None = None, weights: str | None = None,
                 device: torch.device | str = "cpu", img_size: int | None = None) -> None:
        self.spec, self.weights, self.device, self.img_size = spec, weights, torch.device(device), img_size
        if spec.startswith("timm:"):
            import timm
            from timm.data import create_transform, resolve_model_data_config

            kwargs = {"img_size": img_size} if img_size else {}
            self.model = timm.create_model(spec[5:], pretrained=False, num_classes=0, **kwargs)
            if weights:
                load_pretrained(self.model, weights)
            data_config = resolve_model_data_config(self.model)
            data_config["input_size"] = (3, *self.model.patch_embed.img_size)  # the size built, not the pretrained one
            self.transform = create_transform(**data_config, is_training=False)
            self.depth, self.width = len(self.model.blocks), self.model.embed_dim
        else:
            from transformers import AutoImageProcessor, CLIPVisionModel

            if img_size:
                raise ValueError(f"--visual-img-size applies to a timm:<name> encoder; {spec} is a CLIP checkpoint, "
                                 "whose processor sets its own size: leave --visual-img-size out")
            self.model = CLIPVisionModel.from_pretrained(spec)
            self.processor = AutoImageProcessor.from_pretrained(spec)
            self.depth, self.width = self.model.config.num_hidden_layers, self.model.config.hidden_size
        self.model.to(self.device).eval().requires_grad_(False)
        if layers is None:
            layers = sorted({round(self.depth * (i + 1) / 3) for i in range(3)})
        self.layers = tuple(int(n) for n in layers)
        for n in self.layers:
            if not 1 <= n <= self.depth:
                raise ValueError(f"--visual-layers {n} is out of range: {spec} has layers 1..{self.depth}")
        self.dim = len(self.layers) * self.width

    def fingerprint(self) -> str:
        """Identifies what the features depend on: the encoder, its weights (file sizes and times) and the layers."""
        identity: dict[str, Any] = {"spec": self.spec, "layers": list(self.layers), "width": self.width}
        if self.img_size:  # absent at the default size, so caches written before the option stay valid
            identity["img_size"] = self.img_size
        folder = Path(self.spec)
        if folder.is_dir():
            identity["files"] = {p.name: _file_stamp(p) for p in sorted(folder.iterdir()) if p.is_file()}
        if self.weights:
            identity["weights"] = [str(self.weights), _file_stamp(Path(self.weights))]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    @torch.no_grad()
    def encode(self, images: Sequence[Any]) -> Tensor:
        """``[N, D]`` float32 features of PIL images."""
        if self.spec.startswith("timm:"):
            pixels = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)
            captured: dict[int, Tensor] = {}
            hooks = [self.model.blocks[n - 1].register_forward_hook(
                lambda _m, _a, out, n=n: captured.__setitem__(n, out[:, 0])) for n in self.layers]
            try:
                self.model.forward_features(pixels)
            finally:
                for h in hooks:
                    h.remove()
            tokens = [captured[n] for n in self.layers]
        else:
            pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            states = self.model(pixel_values=pixels.to(self.device), output_hidden_states=True).hidden_states
            tokens = [states[n][:, 0] for n in self.layers]  # hidden_states[0] is the embedding output
        return torch.cat([F.layer_norm(t.float(), (t.shape[-1],)) for t in tokens], dim=-1).cpu()


def image_features(data: ScienceQA, split: str, pids: Sequence[str], encoder: ImageEncoder, cache_dir: str | Path,
                   batch_size: int = 32, progress: bool = True) -> dict[str, Tensor]:
    """Features ``[D]`` of every pid with an image, from the disk cache where the image file is unchanged, computed
    (and added to the cache, atomically) otherwise."""
    from PIL import Image, UnidentifiedImageError
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(cache_dir) / encoder.fingerprint()
    folder.mkdir(parents=True, exist_ok=True)
    file, index_file = folder / f"{split}.safetensors", folder / f"{split}.index.json"
    paths = {pid: data.image_path(pid, split) for pid in pids}
    wanted = {pid: path for pid, path in paths.items() if path is not None}
    stamps = {pid: _file_stamp(path) for pid, path in wanted.items()}
    cached: dict[str, Tensor] = {}
    index: dict[str, str] = {}
    if index_file.is_file() and file.is_file():
        try:  # a damaged cache (a disk that filled up, a copy cut short) is only a cache: compute it again
            index = json.loads(index_file.read_text())
            if not isinstance(index, dict):
                raise ValueError("the index is not an object")
            with safe_open(str(file), framework="pt") as f:
                keys = set(f.keys())
                cached = {pid: f.get_tensor(pid) for pid in index if pid in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            print(f"zinit: the image feature cache {file} cannot be read ({exc}); computing the features again",
                  file=sys.stderr)
            index, cached = {}, {}
    out = {pid: cached[pid] for pid in wanted if pid in cached and index.get(pid) == stamps[pid]}
    missing = [pid for pid in wanted if pid not in out]
    if missing:
        bar = tqdm(total=len(missing), desc=f"image features ({split})", unit="img", disable=not progress)
        for s in range(0, len(missing), batch_size):
            chunk = missing[s:s + batch_size]
            images = []
            for pid in chunk:
                try:
                    with Image.open(wanted[pid]) as im:
                        im.load()
                        images.append(im.copy())
                except (UnidentifiedImageError, OSError) as exc:
                    raise ValueError(f"pid {pid}: image {wanted[pid]} cannot be decoded: {exc}; replace the file "
                                     f"with the image, or set the problem's \"image\" to null") from None
            for pid, row in zip(chunk, encoder.encode(images)):
                out[pid] = row.clone()
            bar.update(len(chunk))
        bar.close()
        keep = {**cached, **out}
        new_index = {**index, **{pid: stamps[pid] for pid in out}}
        atomic_write(file, lambda tmp: save_file({k: v.contiguous() for k, v in keep.items()}, tmp))
        text = json.dumps(new_index)
        atomic_write(index_file, lambda tmp: Path(tmp).write_text(text))
    return out


# ---------------------------------------------------------------------------------------------------------------
# examples, loss, evaluation


def tokenize_example(problem: dict[str, Any], tokenizer: Any, max_seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt + target + EOS, ``labels`` masked on the prompt; None if no target token fits."""
    return tokenize_pair(prompt_text(problem), target_text(problem["answer"]), tokenizer, max_seq_len)


def make_collate(pad_id: int, dim: int | None):
    def collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = pad_collate(items, pad_id)
        if dim is not None:
            batch["features"] = torch.stack([x["features"] if x["features"] is not None else torch.zeros(dim)
                                             for x in items])
            batch["has_image"] = torch.tensor([x["features"] is not None for x in items])
        return batch

    return collate


def visual_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`causal_lm_loss` with the batch's image features passed to the adapter."""
    if "features" not in batch:
        return causal_lm_loss(model, batch)
    with zinit.visual_features(model, batch["features"], batch["has_image"]):
        return causal_lm_loss(model, batch)


def _with_images(model: nn.Module, features: list[Tensor | None] | None, dim: int | None):
    if features is None or dim is None:
        return nullcontext()
    device = next(model.parameters()).device
    stacked = torch.stack([f if f is not None else torch.zeros(dim) for f in features]).to(device)
    return zinit.visual_features(model, stacked, [f is not None for f in features])


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, problems: Sequence[dict[str, Any]],
            features: Sequence[Tensor | None] | None, mode: str = "likelihood", batch_size: int = 16,
            max_seq_len: int = 512, progress: bool = False) -> list[tuple[int | None, str]]:
    """``(predicted option index or None, reply)`` for each problem.

    ``likelihood``: the option whose target ``The answer is X.`` the model scores highest, read at the first token
    where the options' tokenizations differ (one forward per problem batch; a full-sequence score when two options
    share that token). ``generate``: greedy decoding, then :func:`extract_answer`.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dim = zinit.injection(model).visual_dim if zinit.is_injected(model) else None
    autocast = D.autocast(device)
    out: list[tuple[int | None, str]] = []
    side = tokenizer.padding_side
    try:
        for s in tqdm(range(0, len(problems), batch_size), desc=f"scienceqa {mode}", unit="batch",
                      disable=not progress, leave=False):
            chunk = problems[s:s + batch_size]
            feats = list(features[s:s + batch_size]) if features is not None else None
            with _with_images(model, feats, dim), autocast:
                if mode == "generate":
                    tokenizer.padding_side = "left"
                    enc = tokenizer([prompt_text(p) for p in chunk], return_tensors="pt", padding=True).to(device)
                    ids = model.generate(**enc, max_new_tokens=12, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
                    replies = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                    out += [(extract_answer(r, len(p["choices"])), r.strip()) for p, r in zip(chunk, replies)]
                elif mode == "likelihood":
                    out += _likelihood(model, tokenizer, chunk, max_seq_len, device)
                else:
                    raise ValueError(f"mode {mode!r} is not 'likelihood' or 'generate'")
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _likelihood(model: nn.Module, tokenizer: Any, chunk: Sequence[dict[str, Any]], max_seq_len: int,
                device: torch.device) -> list[tuple[int | None, str]]:
    prefixes, candidates = [], []
    for p in chunk:
        prompt = tokenizer(prompt_text(p))["input_ids"]
        options = [tokenizer(target_text(i), add_special_tokens=False)["input_ids"] for i in range(len(p["choices"]))]
        common = 0
        while all(len(o) > common for o in options) and len({o[common] for o in options}) == 1:
            common += 1
        heads = [o[common] if len(o) > common else None for o in options]
        if None in heads or len(set(heads)) != len(heads):
            raise ValueError(f"the tokenizer cannot tell the option letters of {p['question']!r} apart by one token")
        prefixes.append((prompt + options[0][:common])[-max_seq_len:])
        candidates.append(heads)
    batch = pad_collate([{"input_ids": x, "labels": x} for x in prefixes], tokenizer.pad_token_id)
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    logits = methods.token_logits(logits, ids)  # without prompt tuning's K virtual positions, if any
    last = batch["attention_mask"].sum(1) - 1  # right padding: each row's last real token
    results = []
    for row, heads in enumerate(candidates):
        scores = logits[row, last[row]].float()[torch.tensor(heads, device=logits.device)]
        best = int(scores.argmax())
        results.append((best, target_text(best)))
    return results


def evaluate_split(model: nn.Module, tokenizer: Any, data: ScienceQA, split: str, pids: Sequence[str],
                   features: dict[str, Tensor] | None, mode: str, batch_size: int, max_seq_len: int,
                   progress: bool = False) -> dict[str, Any]:
    """Predictions and the accuracy table of ``pids``."""
    problems = [data.problems[pid] for pid in pids]
    feats = [features.get(pid) for pid in pids] if features is not None else None
    results = predict(model, tokenizer, problems, feats, mode, batch_size, max_seq_len, progress)
    predictions = {pid: r[0] for pid, r in zip(pids, results)}
    table = accuracy_table(data.problems, predictions)
    return {"split": split, "mode": mode, "table": table,
            "predictions": {pid: {"predicted": r[0], "reply": r[1], "answer": data.problems[pid]["answer"]}
                            for pid, r in zip(pids, results)}}


# ---------------------------------------------------------------------------------------------------------------
# commands


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--visual-layers {text!r}: expected comma-separated layer numbers, e.g. 8,16,24") from None


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help="ScienceQA folder (problems.json, pid_splits.json, images/), a folder "
                   "with the published {train,validation,test}-*.parquet, or the Hub id derek-thomas/ScienceQA")
    p.add_argument("--feature-cache", default=None, help="image feature cache (default: DATA/zinit_features)")
    p.add_argument("--mode", choices=("likelihood", "generate"), default="likelihood",
                   help="evaluation: option-letter likelihood (fast) or greedy generation (the paper's)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N questions of a split")
    add_flags(p, "eval_batch_size", "device", "no_progress", "quantize")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit train scienceqa``."""
    _common_args(p)
    p.add_argument("--visual-encoder", default=DEFAULT_ENCODER,
                   help=f"CLIP checkpoint (hub id or folder) or timm:<name> (default {DEFAULT_ENCODER})")
    p.add_argument("--visual-encoder-weights", default=None, help="local weights for a timm:<name> encoder")
    p.add_argument("--visual-layers", default=None, help="1-based encoder layers of the multi-scale features "
                   "(default: three evenly spaced, ending at the last)")
    p.add_argument("--visual-img-size", type=positive_int, default=None, help="input size of a timm:<name> encoder "
                   "(default the model's own, e.g. 518 for DINOv2; 224 is 5x cheaper)")
    p.add_argument("--visual-hidden", type=positive_int, default=128, help="hidden width of the visual projection MLP")
    p.add_argument("--no-image", action="store_true", help="text-only variant: no visual features at all")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", default="test")
    p.add_argument("--max-train", type=positive_int, default=None, help="use the first N training questions")
    add_train_flags(p, skip=("device", "no_progress"), layers=30, K=10, epochs=20.0, warmup_epochs=2.0,
                    batch_size=4, save_every=200)
    add_flags(p, "max_seq_len")


def run_train(args: argparse.Namespace) -> int:
    """``zinit train scienceqa``: train on the train split, keep the adapter of the best val epoch, report test."""
    check_model_folder(args.model)
    with TrainingRun("scienceqa", args) as run:
        if not methods.is_zinit(args.method) and not args.no_image:
            raise methods.NotApplicable("image features enter through zinit's visual projection; pass --no-image to "
                                        "compare text-only models")
        _train(args, run)
    return run.status


def _split_features(args: argparse.Namespace, run: TrainingRun, data: ScienceQA, splits: Sequence[tuple[str, list[str]]]
                    ) -> tuple[ImageEncoder | None, dict[str, dict[str, Tensor]]]:
    """The image encoder and each split's features (none with ``--no-image``), the main process filling the cache."""
    env = run.env
    cache = Path(args.feature_cache) if args.feature_cache else data.root / "zinit_features"
    encoder = None
    features: dict[str, dict[str, Tensor]] = {}
    if not args.no_image:
        encoder = ImageEncoder(args.visual_encoder, _parse_layers(args.visual_layers), args.visual_encoder_weights,
                               env.device, args.visual_img_size)
        for split, pids in splits:
            if env.is_main:  # one process fills the cache, the others read it
                features[split] = image_features(data, split, pids, encoder, cache, progress=not args.no_progress)
            D.barrier()
            if not env.is_main:
                features[split] = image_features(data, split, pids, encoder, cache, progress=False)
        encoder.model.cpu()
    return encoder, features


def _train_model(args: argparse.Namespace, run: TrainingRun, dim: int | None) -> tuple[nn.Module, Any]:
    """The model (zinit injected with the visual projection, or another ``--method`` applied) and its tokenizer."""
    model, tokenizer = load_model(args.model, run.env.device, args.quantize)
    if methods.is_zinit(args.method):  # the image features enter through zinit's visual projection
        run.layers = min(args.layers, zinit.find_backbone(model).dims(model).num_layers)
        torch.manual_seed(args.seed)
        zinit.inject(model, methods.zinit_config(args.method).replace(
            layers=run.layers, K=args.K, visual_dim=dim, visual_hidden=args.visual_hidden if dim is not None else None))
        methods.train_in_float32(model)  # the precision policy every method's setup goes through (zinit: float32)
    else:
        model = run.prepare(model)
    return model, tokenizer


def _train_items(args: argparse.Namespace, data: ScienceQA, tokenizer: Any, pids: Sequence[str],
                 features: dict[str, Tensor]) -> tuple[list[dict[str, Any]], int]:
    """The tokenized training questions with their image features, and how many were too long to keep."""
    items, dropped = [], 0
    for pid in pids:
        item = tokenize_example(data.problems[pid], tokenizer, args.max_seq_len)
        if item is None:
            dropped += 1
            continue
        item["features"] = features.get(pid)
        items.append(item)
    if not items:
        raise ValueError(f"no training question keeps a target token within --max-seq-len {args.max_seq_len}")
    return items, dropped


def _select_on_val(model: nn.Module, tokenizer: Any, out: Path, per_epoch: int, history: list[dict[str, Any]],
                   val_args: tuple[Any, ...], recipe_info: dict[str, Any]) -> Callable[[int, dict[str, Any]], None]:
    """The training callback scoring val each epoch (and at the end), saving the adapter whenever val improves."""
    history_file = out / "val_history.json"
    total_steps: list[int] = []  # read once: the trainer writes it before the first step

    def select_on_val(step: int, record: dict[str, Any]) -> None:
        if not total_steps:
            total_steps.append(json.loads((out / "train_config.json").read_text())["total_steps"])
        if step % max(per_epoch, 1) and step != total_steps[0]:
            return
        result = evaluate_split(model, tokenizer, *val_args)
        avg = result["table"]["Avg"]
        best = max((h["val_avg"] for h in history), default=-1.0)
        history.append({"step": step, "epoch": record["epoch"], "val_avg": avg})
        if avg > best:
            methods.save_trained(model, out / "adapter", prompt_format="alpaca")  # the Alpaca prompt
            write_json(out / "adapter" / RECIPE_FILE, recipe_info)
        write_json(history_file, history)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "val_avg": avg}) + "\n")

    return select_on_val


def _report_test(args: argparse.Namespace, run: TrainingRun, model: nn.Module, tokenizer: Any, data: ScienceQA,
                 pids: Sequence[str], features: dict[str, Tensor] | None, history: list[dict[str, Any]], steps: int,
                 recipe_info: dict[str, Any]) -> None:
    """Rank 0 after training: the best val epoch's adapter scored on the test split, its files written and printed."""
    out = run.out
    best = max(history, key=lambda h: h["val_avg"])
    methods.load_trained(model, out / "adapter")  # the best val epoch's adapter
    test = evaluate_split(model, tokenizer, data, args.test_split, pids, features,
                          args.mode, args.eval_batch_size, args.max_seq_len, progress=not args.no_progress)
    write_json(out / "predictions_test.json", test.pop("predictions"))
    report = {**test, "best_val": best, "steps": steps, **recipe_info,
              "trainable_parameters": methods.trainable_count(model), "method": args.method,
              "paper": PAPER}
    write_json(out / "report.json", report)
    run.finish(model, {c: test["table"][c] for c in METRICS if test["table"][c] is not None}, save=False)
    print(f"best val Avg {best['val_avg']:.2f} at step {best['step']}; {args.test_split} ({args.mode}):")
    print(format_table(test["table"]))
    print(f"adapter: {out / 'adapter'}   report: {out / 'report.json'}")


def _train(args: argparse.Namespace, run: TrainingRun) -> None:
    env = run.env
    data = load_scienceqa(args.data)
    train_pids = data.split(args.train_split, images=not args.no_image)[:args.max_train]
    val_pids = data.split(args.val_split, images=not args.no_image)[:args.limit]
    test_pids = data.split(args.test_split, images=not args.no_image)[:args.limit]
    out = run.out
    encoder, features = _split_features(args, run, data, ((args.train_split, train_pids),
                                                          (args.val_split, val_pids), (args.test_split, test_pids)))
    dim = encoder.dim if encoder is not None else None

    model, tokenizer = _train_model(args, run, dim)
    items, dropped = _train_items(args, data, tokenizer, train_pids, features.get(args.train_split, {}))
    recipe_info = {"visual_encoder": None if args.no_image else args.visual_encoder,
                   "visual_encoder_weights": args.visual_encoder_weights,
                   # only when set: a run (and its resume fingerprint) from before the option is unchanged
                   **({"visual_img_size": args.visual_img_size} if args.visual_img_size else {}),
                   "visual_layers": list(encoder.layers) if encoder else None, "max_seq_len": args.max_seq_len,
                   "model": args.model or EMBEDDED_NAME}
    task = Task(examples=items, lengths=[len(x["input_ids"]) for x in items],
                collate=make_collate(tokenizer.pad_token_id, dim), loss=visual_loss,
                fingerprint={"recipe": "scienceqa", "method": args.method, **recipe_info, "data": str(data.root),
                             "examples": len(items),
                             "layers": run.layers, "K": args.K, "visual_hidden": args.visual_hidden})
    config = run.config()
    per_epoch = len(items) // (args.batch_size * env.world_size) // args.grad_accum
    history_file = out / "val_history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    val_args = (data, args.val_split, val_pids, features.get(args.val_split), args.mode, args.eval_batch_size,
                args.max_seq_len)
    select_on_val = _select_on_val(model, tokenizer, out, per_epoch, history, val_args, recipe_info)

    run.describe(model, recipe_info["model"], ("text only" if dim is None else
                                               f"image features {dim} ({args.visual_encoder})")
                 + f"; {len(items)} training questions"
                 + (f" ({dropped} longer than --max-seq-len dropped)" if dropped else ""))
    with run.hold():  # one run at a time writes this folder: training, saving, evaluation
        result = train(model, task, config, callbacks=[select_on_val])
        if env.is_main:
            _report_test(args, run, model, tokenizer, data, test_pids, features.get(args.test_split), history,
                         result.steps, recipe_info)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit eval scienceqa``."""
    _common_args(p)
    p.add_argument("--adapter", required=True, help="adapter folder written by zinit train scienceqa "
                   "(OUTPUT/adapter), or a Hub repo id org/name[@revision]")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--output", default=None, help="write report.json and predictions.json here")


def run_eval(args: argparse.Namespace) -> int:
    """``zinit eval scienceqa``: the accuracy table of an adapter on one split (the encoder is the one it was
    trained with, read from the adapter folder)."""
    check_model_folder(args.model)
    # a folder, or a Hub repo id fetched with the recipe's file beside the adapter
    folder = zinit.hub.resolve_adapter(args.adapter, extra_files=(RECIPE_FILE,))
    zinit.read_adapter_config(folder)  # a missing or broken adapter fails before anything loads
    env = D.setup(args.device)
    data = load_scienceqa(args.data)
    info_file = folder / RECIPE_FILE
    info = read_json(info_file, "ScienceQA adapter description", "it is written beside the adapter by zinit train "
                     "scienceqa")
    if not isinstance(info, dict) or "visual_encoder" not in info or "visual_layers" not in info:
        raise ValueError(f"{info_file} lacks \"visual_encoder\" / \"visual_layers\": it is written beside the adapter "
                         "by zinit train scienceqa; train again or restore the file")
    pids = data.split(args.split, images=info["visual_encoder"] is not None)[:args.limit]
    features = None
    if info["visual_encoder"] is not None:
        encoder = ImageEncoder(info["visual_encoder"], info["visual_layers"], info.get("visual_encoder_weights"),
                               env.device, info.get("visual_img_size"))
        cache = Path(args.feature_cache) if args.feature_cache else data.root / "zinit_features"
        features = image_features(data, args.split, pids, encoder, cache, progress=not args.no_progress)
    model, tokenizer = load_model(args.model, env.device, args.quantize)
    zinit.load_adapter(model, folder)
    result = evaluate_split(model, tokenizer, data, args.split, pids, features, args.mode, args.eval_batch_size,
                            info.get("max_seq_len", 512), progress=not args.no_progress)
    predictions = result.pop("predictions")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", {**result, "adapter": str(args.adapter), "paper": PAPER})
        write_json(out / "predictions.json", predictions)
    print(f"{args.split} ({args.mode}):")
    print(format_table(result["table"]))
    return 0


def validation_args(recipe_args: Sequence[str], folder: Path) -> list[str]:
    """``zinit compare --lr-grid``: score the release's validation split (``--val-split``) instead of the test split.
    """
    val = option_value(recipe_args, "--val-split") or "val"
    return without_options(recipe_args, ["--test-split"]) + ["--test-split", val]


RECIPE = zinit.register_recipe(zinit.Recipe(
    name="scienceqa", task="causal_lm",
    description="ScienceQA with image features (CLIP / timm ViT), paper's columns",
    add_train_args=add_train_args, run_train=run_train, add_eval_args=add_eval_args, run_eval=run_eval,
    eval_description="ScienceQA accuracy table of an adapter on one split",
    metrics=METRICS, blr={"zinit": 9e-3}, default_blr=9e-3, validation_args=validation_args,
    paper=lambda args: {f"{name.replace(' (paper)', '')}, LLaMA-7B":
                        {m: v for m, v in row.items() if m in METRICS} for name, row in PAPER.items()},
))
