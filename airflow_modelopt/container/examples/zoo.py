"""A model zoo for the coverage matrix: small models of the shapes users bring, each trained for a few
epochs on scikit-learn's digits (shipped inside the package: no download), so accuracy means something.

Every entry (``ZOO[name]``, a :class:`ZooModel`) says how its data is made from the digits:

* ``image``: the 8x8 grey digit, (N, 1, 8, 8) in [0, 1];
* ``rgb16``: the digit rendered as a tinted, noisy 3x16x16 image (nearest-neighbour upscale, each image
  its own ink and paper colour), normalised like ImageNet inputs;
* ``rows``: a sequence of the 8 rows of 8 pixels, (N, 8, 8) = (batch, time, features);
* ``tokens``: token ids, the intensity (0..16) of each pixel of the digit with neighbouring rows averaged
  (4 x 8) is one token, 32 tokens a digit (int64);
* ``columns``: (N, 8, T) channels-first sequence (rows as channels, columns as time) for a model
  whose time axis is dynamic;
* the UNet's labels are masks (pixel > 0.25, per-pixel class 0/1); the detector's are the class and
  the ink's bounding box (x0, y0, x1, y1 in [0, 1]); the two-input model takes the image and the
  column-sums of the ink and predicts the digit and its parity.

Labels sit under ``y`` (the first output's classes) so the validate step measures accuracy against
them; other targets (masks, boxes, parity) under ``y_<name>`` for the entry's own metric. Training
is deterministic for a seed; each model trains in seconds on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 0
EVAL_SIZE = 300
CALIBRATION_SIZE = 200


# -- data -------------------------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def render_rgb(img: np.ndarray, seed: int, size: int = 16) -> np.ndarray:
    """(N, 8, 8) in [0, 1] -> (N, 3, size, size): tinted ink on tinted paper with noise, ImageNet-normalised."""
    up = np.kron(img, np.ones((size // 8, size // 8), dtype=np.float32))[:, None]
    rng = np.random.default_rng(seed)
    ink = rng.uniform(0.4, 1.0, (len(img), 3, 1, 1)).astype(np.float32)
    paper = rng.uniform(0.0, 0.35, (len(img), 3, 1, 1)).astype(np.float32)
    rgb = paper + (ink - paper) * up + rng.normal(0, 0.05, (len(img), 3, size, size)).astype(np.float32)
    return ((rgb - 0.45) / 0.225).astype(np.float32)


def ink_boxes(img: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """(N, 4) float32: the bounding box (x0, y0, x1, y1) of the pixels above ``threshold``, in [0, 1]."""
    boxes = np.zeros((len(img), 4), dtype=np.float32)
    for i, im in enumerate(img):
        ys, xs = np.nonzero(im > threshold)
        if len(xs):
            boxes[i] = [xs.min() / 8, ys.min() / 8, (xs.max() + 1) / 8, (ys.max() + 1) / 8]
    return boxes


def make_data(kind: str, img: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The arrays of one split for a data kind (inputs keyed by input name, labels under y / y_*)."""
    if kind == "image":
        return {"x": img[:, None].copy(), "y": y}
    if kind == "rgb16":
        return {"x": render_rgb(img, seed), "y": y}
    if kind == "rows":
        return {"x": img.copy(), "y": y}
    if kind == "columns":
        return {"x": img.copy(), "y": y}  # (N, 8 rows = channels, 8 columns = time)
    if kind == "tokens":
        pairs = img.reshape(len(img), 4, 2, 8).mean(2)  # 4 rows of 8: neighbouring rows averaged
        return {"x": np.rint(pairs * 16).astype(np.int64).reshape(len(img), 32), "y": y}
    if kind == "segment":
        return {"x": img[:, None].copy(), "y_mask": (img > 0.25).astype(np.int64)}
    if kind == "detect":
        return {"x": img[:, None].copy(), "y": y, "y_box": ink_boxes(img)}
    if kind == "two_io":
        return {"image": img[:, None].copy(), "profile": img.sum(axis=1).astype(np.float32) / 8.0,
                "y": y, "y_parity": (y % 2).astype(np.int64)}
    raise ValueError(f"unknown data kind {kind!r}")


def splits(kind: str, seed: int = SEED, eval_size: int = EVAL_SIZE,
           calibration_size: int = CALIBRATION_SIZE) -> dict[str, dict[str, np.ndarray]]:
    """Disjoint train / calibration / eval splits (the same digits for every kind at one seed)."""
    img, y = _digits()
    order = np.random.default_rng(seed).permutation(len(img))
    parts = {"eval": order[:eval_size], "calibration": order[eval_size:eval_size + calibration_size],
             "train": order[eval_size + calibration_size:]}
    return {name: make_data(kind, img[idx], y[idx], seed + i + 1) for i, (name, idx) in enumerate(parts.items())}


# -- models -----------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(ch, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV2/V3's block: 1x1 expand, 3x3 depthwise, squeeze-excite, 1x1 project (+ identity)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.Hardswish(),
                                   nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                   nn.Hardswish()]
        if se:
            layers.append(SqueezeExcite(mid, max(8, mid // 4)))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetTiny(nn.Module):
    """MobileNetV3-style for 3x16x16: hardswish, depthwise convolutions, squeeze-excite, inverted residuals."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 2, False), InvertedResidual(16, 24, 2, 3, True),
                                    InvertedResidual(24, 24, 1, 3, True), InvertedResidual(24, 40, 2, 3, True))
        self.head = nn.Sequential(nn.Conv2d(40, 96, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(96, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.down(x))


class ResNetTiny(nn.Module):
    """ResNet-style for 3x16x16: a 3x3 stem and three stages of one BasicBlock, each halving the size."""

    def __init__(self, classes: int = 10, widths: tuple[int, int, int] = (16, 24, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(widths[0], widths[0], 2), BasicBlock(widths[0], widths[1], 2),
                                    BasicBlock(widths[1], widths[2], 2))
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class UNetTiny(nn.Module):
    """UNet-style segmenter for 1x8x8: two downsamplings, bilinear upsampling + skip concatenation, and a
    dense per-pixel output (N, 2, 8, 8): background / ink logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.enc1, self.enc2 = _conv_block(1, width), _conv_block(width, 2 * width)
        self.mid = _conv_block(2 * width, 2 * width)
        self.dec2, self.dec1 = _conv_block(4 * width, width), _conv_block(2 * width, width)
        self.out = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([nn.functional.interpolate(m, scale_factor=2.0, mode="bilinear"), e2], 1))
        d1 = self.dec1(torch.cat([nn.functional.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.out(d1)


class DetectorTiny(nn.Module):
    """Detector-style for 1x8x8: a conv backbone and two heads, class logits (N, 10) and the ink's
    bounding box (N, 4, sigmoid) as a second output."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU())
        self.cls = nn.Linear(64, 10)
        self.box = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.cls(f), torch.sigmoid(self.box(f))


def _encoder(d: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class BertTiny(nn.Module):
    """BERT-tiny-shaped text encoder: token + position embeddings, a LayerNorm/GELU/softmax-attention
    ``nn.TransformerEncoder``, mean pooling and a classifier. Input: 32 token ids (int64)."""

    def __init__(self, vocab: int = 17, seq: int = 32, d: int = 32, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        nn.init.normal_(self.tok.weight, std=0.1)  # as BERT initialises it: positions are not drowned out
        self.pos = nn.Parameter(0.1 * torch.randn(1, seq, d))
        self.encoder = _encoder(d, heads, layers)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.tok(x) + self.pos)
        return self.fc(self.norm(h).mean(1))


class ViTTiny(nn.Module):
    """ViT-tiny-shaped image encoder for 1x8x8: 2x2 patches (16 tokens) by a strided conv, a class token,
    position embeddings, a pre-norm GELU transformer encoder and a linear head on the class token."""

    def __init__(self, d: int = 32, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 17, d))
        self.encoder = _encoder(d, heads, layers)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
        return self.fc(self.norm(self.encoder(h))[:, 0])


class RNNClassifier(nn.Module):
    """LSTM or GRU over the 8 rows of a digit (batch, time=8, features=8); the last step's state classifies."""

    def __init__(self, cell: str, hidden: int = 48) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(8, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TwoInTwoOut(nn.Module):
    """Two inputs (the image and its per-column ink profile) and two outputs (digit logits, parity logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.prof = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.trunk = nn.Sequential(nn.Linear(16 * 16 + 16, 64), nn.ReLU())
        self.digit = nn.Linear(64, 10)
        self.parity = nn.Linear(64, 2)

    def forward(self, image: torch.Tensor, profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(torch.cat([self.conv(image), self.prof(profile)], 1))
        return self.digit(h), self.parity(h)


class DynamicSeqConv(nn.Module):
    """A temporal conv net over (batch, 8 channels, time) with a dynamic time axis: 1-D convolutions and a
    mean over time, so any length >= 1 runs (trained on 8 columns)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(8, width, 3, padding=1), nn.ReLU(), nn.Conv1d(width, width, 3, padding=1),
                                 nn.ReLU())
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x).mean(2))


# -- losses and metrics -----------------------------------------------------------------------


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _loss(kind: str, outs: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    if kind == "segment":
        return ce(outs[0], batch["y_mask"])
    if kind == "detect":
        return ce(outs[0], batch["y"]) + 5.0 * nn.functional.l1_loss(outs[1], batch["y_box"])
    if kind == "two_io":
        return ce(outs[0], batch["y"]) + ce(outs[1], batch["y_parity"])
    return ce(outs[0], batch["y"])


def score(kind: str, outs: list[np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
    """The entry's metrics from its outputs on a split: ``accuracy`` always (top-1 on the digit, or
    pixel accuracy for the segmenter), plus ``box_iou`` / ``parity_accuracy`` for their models."""
    if kind == "segment":
        return {"accuracy": float((outs[0].argmax(1) == data["y_mask"]).mean())}
    metrics = {"accuracy": float((outs[0].argmax(1) == data["y"]).mean())}
    if kind == "detect":
        a, b = outs[1], data["y_box"]
        iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
        ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
        inter = iw * ih
        union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
        metrics["box_iou"] = float(np.mean(inter / np.maximum(union, 1e-6)))
    if kind == "two_io":
        metrics["parity_accuracy"] = float((outs[1].argmax(1) == data["y_parity"]).mean())
    return metrics


# -- the zoo ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: the model, its data, its inputs and outputs, and how it trains."""

    name: str
    factory: Callable[[], nn.Module]
    data: str                                  # data kind (see make_data)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # beyond the batch dimension
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 128
    min_accuracy: float = 0.9                  # what a trained model reaches on eval (tests assert it)
    description: str = ""

    def splits(self, seed: int = SEED) -> dict[str, dict[str, np.ndarray]]:
        return splits(self.data, seed)

    def inputs(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: arrays[n] for n in self.input_names}

    def build(self, seed: int = SEED) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory()

    def train(self, model: nn.Module, train: dict[str, np.ndarray], seed: int = SEED) -> list[float]:
        """Adam for ``epochs`` epochs (deterministic for the seed); returns each epoch's mean loss."""
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        tensors = {k: torch.from_numpy(v) for k, v in train.items()}
        n = len(next(iter(tensors.values())))
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs * -(-n // self.batch_size))
        losses = []
        model.train()
        for _ in range(self.epochs):
            total = 0.0
            for idx in torch.randperm(n, generator=gen).split(self.batch_size):
                batch = {k: v[idx] for k, v in tensors.items()}
                opt.zero_grad()
                loss = _loss(self.data, _as_tuple(model(*(batch[i] for i in self.input_names))), batch)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            losses.append(total / n)
        model.eval()
        return losses

    @torch.no_grad()
    def predict(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        model.eval()
        outs = _as_tuple(model(*(torch.from_numpy(arrays[i]) for i in self.input_names)))
        return [o.numpy() for o in outs]

    def evaluate(self, model: nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        return score(self.data, self.predict(model, arrays), arrays)

    def export(self, model: nn.Module, example: dict[str, np.ndarray], path: Any) -> Any:
        """torch.export ExportedProgram (.pt2) with a dynamic batch (and the entry's dynamic axes)."""
        batch = torch.export.Dim("batch", min=1, max=4096)
        dims = {label: torch.export.Dim(label, min=2, max=256)
                for axes in self.dynamic_axes.values() for label in axes.values()}
        shapes = {name: {0: batch, **{ax: dims[label] for ax, label in self.dynamic_axes.get(name, {}).items()}}
                  for name in self.input_names}
        args = tuple(torch.from_numpy(example[n][:2]) for n in self.input_names)
        program = torch.export.export(model.eval(), args, dynamic_shapes=shapes)
        torch.export.save(program, str(path))
        return path


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("mobilenet", MobileNetTiny, "rgb16", ("x",), ("logits",), epochs=6, min_accuracy=0.85,
             description="MobileNetV3-style: depthwise, hardswish, squeeze-excite (3x16x16)"),
    ZooModel("resnet", ResNetTiny, "rgb16", ("x",), ("logits",), epochs=4, min_accuracy=0.9,
             description="ResNet-style: BasicBlocks with batch norm (3x16x16)"),
    ZooModel("unet", UNetTiny, "segment", ("x",), ("mask_logits",), epochs=8, min_accuracy=0.93,
             description="UNet-style segmenter: upsample + concat, dense (N, 2, 8, 8) output; metric pixel accuracy"),
    ZooModel("detector", DetectorTiny, "detect", ("x",), ("logits", "box"), epochs=20, min_accuracy=0.9,
             description="Detector-style: class logits and the ink's bounding box (two outputs)"),
    ZooModel("bert_tiny", BertTiny, "tokens", ("x",), ("logits",), epochs=20, lr=5e-3, min_accuracy=0.85,
             description="BERT-tiny-shaped: token ids (pixel intensities), LayerNorm, GELU, softmax attention"),
    ZooModel("vit_tiny", ViTTiny, "image", ("x",), ("logits",), epochs=20, lr=5e-3, min_accuracy=0.85,
             description="ViT-tiny-shaped: 2x2 patches, class token, LayerNorm, GELU, softmax attention"),
    ZooModel("lstm", lambda: RNNClassifier("lstm"), "rows", ("x",), ("logits",), epochs=15, lr=1e-2, min_accuracy=0.85,
             description="LSTM over the 8 rows of a digit"),
    ZooModel("gru", lambda: RNNClassifier("gru"), "rows", ("x",), ("logits",), epochs=15, lr=1e-2, min_accuracy=0.85,
             description="GRU over the 8 rows of a digit"),
    ZooModel("two_io", TwoInTwoOut, "two_io", ("image", "profile"), ("digit", "parity"), epochs=12, min_accuracy=0.88,
             description="Two inputs (image, column profile), two outputs (digit, parity)"),
    ZooModel("dynamic_seq", DynamicSeqConv, "columns", ("x",), ("logits",), dynamic_axes={"x": {2: "time"}},
             epochs=20, lr=1e-2, min_accuracy=0.85, description="1-D conv net with a dynamic sequence length"),
)}


__all__ = ["ZOO", "ZooModel", "make_data", "score", "splits"]
