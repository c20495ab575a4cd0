"""The training tasks of ``kfopt compare``: data, model, batches, loss and evaluation per size.

* ``chars``: a byte-level ``CharGPT`` on a text (default: the embedded standard-library slice; or the
  user's file). Split: first 90% of the bytes for training, last 10% for validation. Validation loss
  is the mean next-byte cross-entropy (nats) over fixed, evenly spaced windows of the validation part.
* ``digits``: a ``DigitsCNN`` on scikit-learn's 8x8 digits. Fixed split (seed 0): 1500 training and
  297 validation images. Validation reports cross-entropy and accuracy on all validation images.

Training batches are drawn (with replacement) from a ``torch.Generator`` seeded by the caller, so the
same seed gives every optimizer the same sequence of batches.

Default budget and target loss per size. The target applies to the smoothed training loss (see
``kfopt.compare.runner``) and was calibrated with AdamW at its default lr, which reaches it at about
40-70% of the steps (seed 0, CPU). Chars medium and large are estimates, not measured on their
4 MB text (on the 1 MB text medium overfitted: training loss 1.05, validation 1.69 after 1000
steps, hence the larger text). The same target is used for ``--text FILE``, whose loss scale may differ: pass
``--target`` there.

================  =====  ============================  =====  ===  ======  ======
task / size       steps  model                         batch  ctx  text    target
================  =====  ============================  =====  ===  ======  ======
chars  small        300  width 128, 2 blocks, 4 heads     32   64  1 MB      2.10
chars  medium      1000  width 256, 4 blocks, 8 heads     32  128  4 MB      1.80
chars  large       2000  width 384, 6 blocks, 6 heads     32  256  4 MB      1.50
digits small        300  16 channels, hidden 64           64    -  -         0.02
digits medium       400  32 channels, hidden 128          64    -  -        0.002
digits large        600  64 channels, hidden 256         128    -  -        0.002
================  =====  ============================  =====  ===  ======  ======

The text is the first 1 or 4 MB of ``data.STDLIB_FILES`` (the interpreter's own source). On the
1 MB text the validation part is almost entirely modules absent from the training part (on Python
3.11: the last 632 bytes of random, then shutil and most of statistics), so the validation loss
measures generalisation to unseen code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import embedded_text, load_digits, read_text
from .models import CharGPT, DigitsCNN

TASKS = ("chars", "digits")
SIZES = ("small", "medium", "large")

#: Byte-level vocabulary.
VOCAB = 256
#: Fraction of a text used for training (the rest validates).
TRAIN_FRACTION = 0.9
#: Number of fixed validation windows of the chars task.
EVAL_WINDOWS = 256
#: Validation images of the digits task (the rest of the 1797 train).
DIGITS_VALIDATION = 297

CHAR_SIZES = {
    "small": dict(width=128, depth=2, heads=4, batch=32, context=64, steps=300, text=1_000_000, target=2.10),
    "medium": dict(width=256, depth=4, heads=8, batch=32, context=128, steps=1000, text=4_000_000, target=1.80),
    "large": dict(width=384, depth=6, heads=6, batch=32, context=256, steps=2000, text=4_000_000, target=1.50),
}
DIGITS_SIZES = {
    "small": dict(channels=16, hidden=64, batch=64, steps=300, target=0.02),
    "medium": dict(channels=32, hidden=128, batch=64, steps=400, target=0.002),
    "large": dict(channels=64, hidden=256, batch=128, steps=600, target=0.002),
}


@dataclass
class Task:
    """What a training run needs from a task; ``describe`` is written into the results JSON."""

    name: str
    size: str
    device: torch.device
    steps: int
    target: float
    describe: dict = field(default_factory=dict)

    def build_model(self) -> nn.Module:
        """A freshly initialised model on ``device`` (seed the global RNG first for a fixed init)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model a run trains, from a copy of the initial one (data-parallel wrappers: ``distributed``)."""
        return model

    def train_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) training batch on ``device``, drawn with ``generator``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on ``batch`` (a 0-d tensor)."""
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of ``model``: always ``loss``, plus ``accuracy`` where meaningful."""
        raise NotImplementedError


@dataclass
class CharTask(Task):
    """Next-byte prediction on a text with ``CharGPT``."""

    text: bytes = b""
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        data = torch.frombuffer(bytearray(self.text), dtype=torch.uint8)
        split = int(len(data) * TRAIN_FRACTION)
        self.train_data = data[:split].to(self.device)
        val = data[split:]
        context = self.config["context"]
        starts = torch.linspace(0, len(val) - context - 1, min(EVAL_WINDOWS, len(val) - context)).long()
        windows = val[starts[:, None] + torch.arange(context + 1)].long().to(self.device)
        self.val_windows = windows
        self.window = torch.arange(context + 1, device=self.device)

    def build_model(self) -> nn.Module:
        c = self.config
        return CharGPT(VOCAB, c["context"], c["width"], c["depth"], c["heads"]).to(self.device)

    def train_batch(self, generator):
        context = self.config["context"]
        starts = torch.randint(len(self.train_data) - context - 1, (self.config["batch"],), generator=generator)
        chunk = self.train_data[starts.to(self.device)[:, None] + self.window].long()
        return chunk[:, :-1], chunk[:, 1:]

    @torch.no_grad()
    def evaluate(self, model):
        total = 0.0
        for chunk in self.val_windows.split(self.config["batch"] * 2):
            total += self.loss(model, (chunk[:, :-1], chunk[:, 1:])).item() * len(chunk)
        return {"loss": total / len(self.val_windows)}


@dataclass
class DigitsTask(Task):
    """Classification of scikit-learn's 8x8 digits with ``DigitsCNN``."""

    config: dict = field(default_factory=dict)

    def __post_init__(self):
        images, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        train, val = order[:-DIGITS_VALIDATION], order[-DIGITS_VALIDATION:]
        self.train_images, self.train_labels = images[train].to(self.device), labels[train].to(self.device)
        self.val_images, self.val_labels = images[val].to(self.device), labels[val].to(self.device)

    def build_model(self) -> nn.Module:
        return DigitsCNN(self.config["channels"], self.config["hidden"]).to(self.device)

    def train_batch(self, generator):
        index = torch.randint(len(self.train_labels), (self.config["batch"],), generator=generator).to(self.device)
        return self.train_images[index], self.train_labels[index]

    @torch.no_grad()
    def evaluate(self, model):
        logits = model(self.val_images)
        return {"loss": F.cross_entropy(logits, self.val_labels).item(),
                "accuracy": (logits.argmax(1) == self.val_labels).float().mean().item()}


def make_task(name: str, size: str, device: torch.device, text_path: str | None = None) -> Task:
    """The task ``name`` ("chars" or "digits") at ``size`` on ``device``; ``text_path`` replaces the
    embedded text of the chars task."""
    if name == "chars":
        config = CHAR_SIZES[size]
        text, source = read_text(text_path) if text_path else embedded_text(config["text"])
        model = {k: config[k] for k in ("width", "depth", "heads", "context")}
        return CharTask(name, size, device, config["steps"], config["target"],
                        {"model": {"type": "CharGPT", "vocab": VOCAB, **model}, "batch": config["batch"],
                         "data": source, "train_fraction": TRAIN_FRACTION, "eval_windows": EVAL_WINDOWS},
                        text=text, config=config)
    if name == "digits":
        config = DIGITS_SIZES[size]
        return DigitsTask(name, size, device, config["steps"], config["target"],
                          {"model": {"type": "DigitsCNN", "channels": config["channels"], "hidden": config["hidden"]},
                           "batch": config["batch"],
                           "data": {"source": "sklearn.datasets.load_digits", "validation": DIGITS_VALIDATION}},
                          config=config)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
