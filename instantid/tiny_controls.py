"""Tiny random-weight stand-ins for the condition estimators, written with `save_pretrained`.

They share the real checkpoints' architectures and processor types (Depth Anything on a DINOv2 backbone,
VitPose, RT-DETR on a ResNet backbone), so the real loading and inference code in `controls.py` runs
offline and in tests. Their outputs are noise. Each is seeded and a few hundred KB at most.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small processor input sizes keep a CPU forward pass in milliseconds; the real ones use 518, 256x192, 640.
_DEPTH_INPUT = 56  # a multiple of the 14 px DINOv2 patch
_POSE_INPUT = (64, 48)  # height, width: the 4:3 aspect of the real VitPose input
_DETECTOR_INPUT = 64
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def save_tiny_depth_estimator(folder: Path) -> None:
    """A tiny Depth Anything (relative depth) with its PIL DPT image processor."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessorPil

    torch.manual_seed(0)
    backbone = Dinov2Config(
        image_size=_DEPTH_INPUT, patch_size=14, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
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
    # Same settings as Depth-Anything-V2-Small-hf's processor, at a tiny size.
    DPTImageProcessorPil(
        size={"height": _DEPTH_INPUT, "width": _DEPTH_INPUT}, keep_aspect_ratio=True, ensure_multiple_of=14,
        resample=3, do_pad=False, **_IMAGENET,
    ).save_pretrained(folder)


def save_tiny_pose_estimator(folder: Path) -> None:
    """A tiny VitPose (simple decoder, COCO-17 heatmaps) with its PIL image processor."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessorPil

    torch.manual_seed(0)
    backbone = VitPoseBackboneConfig(
        image_size=list(_POSE_INPUT), patch_size=[16, 16], hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, mlp_ratio=2,
        out_indices=[2],  # type: ignore[call-arg]  # consumed by the config's __post_init__
    )
    # num_labels is a generic PreTrainedConfig argument: one heatmap per COCO keypoint.
    config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=True, scale_factor=4, num_labels=17)  # type: ignore[call-arg]
    VitPoseForPoseEstimation(config).save_pretrained(folder)
    size = {"height": _POSE_INPUT[0], "width": _POSE_INPUT[1]}
    VitPoseImageProcessorPil(size=size, **_IMAGENET).save_pretrained(folder)


def save_tiny_person_detector(folder: Path) -> None:
    """A tiny RT-DETR (ResNet backbone) whose label 0 is "person", with its PIL image processor."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessorPil, RTDetrResNetConfig

    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
        out_indices=[2, 3, 4],  # type: ignore[call-arg]  # consumed by the config's __post_init__
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        # The encoder takes the three backbone stages named by out_indices.
        encoder_in_channels=[8, 16, 16], encoder_hidden_dim=8, encoder_ffn_dim=32, encoder_attention_heads=2,
        d_model=16, decoder_in_channels=[8, 8, 8], decoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
        decoder_n_points=2, num_queries=10, num_denoising=0,
        id2label={0: "person", 1: "object"}, label2id={"person": 0, "object": 1},
    )
    RTDetrForObjectDetection(config).save_pretrained(folder)
    # As the real RT-DETR processor: plain resize and rescale, no normalisation.
    size = {"height": _DETECTOR_INPUT, "width": _DETECTOR_INPUT}
    RTDetrImageProcessorPil(size=size, do_normalize=False, do_pad=False, resample=2).save_pretrained(folder)
