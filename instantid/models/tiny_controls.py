"""Random-weight stand-ins for the condition estimators, written with `save_pretrained`.

Each writer makes one estimator checkpoint folder in one of two shapes: tiny (the default: the tiny preset
and the tests, a few hundred KB, a CPU forward pass in milliseconds) or, with `released_shape=True`, the
released checkpoint's architecture from transformers' default configs (the benchmarks' memory figures).
Both share the real checkpoints' architectures and processor types (Depth Anything on a DINOv2 backbone,
VitPose, RT-DETR on a ResNet backbone), so the real loading and inference code in `controls.py` runs
offline. Their outputs are noise; each is seeded. `controls.CONTROLS` names the writer of each estimator
checkpoint, so nothing finds them by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small processor input sizes keep a CPU forward pass in milliseconds; the real ones use 518, 256x192, 640.
_DEPTH_INPUT = 56  # a multiple of the 14 px DINOv2 patch
_POSE_INPUT = (64, 48)  # height, width: the 4:3 aspect of the real VitPose input
_DETECTOR_INPUT = 64
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def save_depth_estimator(folder: Path, *, released_shape: bool = False) -> None:
    """A Depth Anything (relative depth) with its PIL DPT image processor: tiny, or V2 Small's shape (24.8 M)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessorPil

    torch.manual_seed(0)
    if released_shape:
        side = 518
        config = DepthAnythingConfig(depth_estimation_type="relative")
    else:
        side = _DEPTH_INPUT
        backbone = Dinov2Config(
            image_size=side, patch_size=14, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            mlp_ratio=2, reshape_hidden_states=False,
            out_indices=[1, 2],  # type: ignore[call-arg]  # consumed by the config's __post_init__
        )
        config = DepthAnythingConfig(
            backbone_config=backbone, patch_size=14, reassemble_hidden_size=16, fusion_hidden_size=8,
            # One reassemble factor and one neck size per backbone feature taken.
            reassemble_factors=[2, 1], neck_hidden_sizes=[8, 16],
            head_hidden_size=8, depth_estimation_type="relative",
        )
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    # Same settings as Depth-Anything-V2-Small-hf's processor (at a tiny size unless released_shape).
    DPTImageProcessorPil(
        size={"height": side, "width": side}, keep_aspect_ratio=True, ensure_multiple_of=14,
        resample=3, do_pad=False, **_IMAGENET,
    ).save_pretrained(folder)


def save_pose_estimator(folder: Path, *, released_shape: bool = False) -> None:
    """A VitPose (simple decoder, COCO-17 heatmaps) with its PIL image processor: tiny, or base's shape (85.8 M)."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    torch.manual_seed(0)
    height, width = (256, 192) if released_shape else _POSE_INPUT
    backbone = None
    if not released_shape:
        backbone = VitPoseBackboneConfig(
            image_size=[height, width], patch_size=[16, 16], hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, mlp_ratio=2,
            out_indices=[2],  # type: ignore[call-arg]  # consumed by the config's __post_init__
        )
    # num_labels is a generic PreTrainedConfig argument: one heatmap per COCO keypoint.
    config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4, num_labels=17)  # type: ignore[call-arg]
    VitPoseForPoseEstimation(config).save_pretrained(folder)
    VitPoseImageProcessorPil(size={"height": height, "width": width}, **_IMAGENET).save_pretrained(folder)


def save_person_detector(folder: Path, *, released_shape: bool = False) -> None:
    """An RT-DETR whose label 0 is "person", with its PIL image processor: tiny, or R50vd's shape (42.7 M)."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessorPil, RTDetrResNetConfig

    torch.manual_seed(0)
    labels = {"id2label": {0: "person", 1: "object"}, "label2id": {"person": 0, "object": 1}}
    side = 640 if released_shape else _DETECTOR_INPUT
    if released_shape:
        config = RTDetrConfig(**labels)
    else:
        backbone = RTDetrResNetConfig(
            embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
            out_indices=[2, 3, 4],  # type: ignore[call-arg]  # consumed by the config's __post_init__
        )
        config = RTDetrConfig(
            backbone_config=backbone,
            # The encoder takes the three backbone stages named by out_indices.
            encoder_in_channels=[8, 16, 16], encoder_hidden_dim=8, encoder_ffn_dim=32, encoder_attention_heads=2,
            d_model=16, decoder_in_channels=[8, 8, 8], decoder_ffn_dim=32, decoder_layers=1,
            decoder_attention_heads=2, decoder_n_points=2, num_queries=10, num_denoising=0, **labels,
        )
    RTDetrForObjectDetection(config).save_pretrained(folder)
    # As the real RT-DETR processor: plain resize and rescale, no normalisation.
    size = {"height": side, "width": side}
    RTDetrImageProcessorPil(size=size, do_normalize=False, do_pad=False, resample=2).save_pretrained(folder)
