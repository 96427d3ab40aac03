"""D-FINE built with Hugging Face transformers, in the official sizes N to X."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import DFineConfig, DFineForObjectDetection

Variant = Literal["n", "s", "m", "l", "x"]
VARIANTS: tuple[Variant, ...] = ("n", "s", "m", "l", "x")

# Backbone (HGNetV2) and encoder/decoder settings of the official checkpoints, as transformers'
# conversion script (convert_d_fine_original_pytorch_checkpoint_to_hf.py) sets them.
_COMMON_BACKBONE: dict[str, Any] = {
    "layer_type": "basic",
    "embedding_size": 32,
    "stage_downsample": [False, True, True, True],
    "stage_light_block": [False, False, True, True],
    "stage_kernel_size": [3, 3, 5, 5],
}
_SMALL_BACKBONE: dict[str, Any] = {  # HGNetV2-B0, used by N and S
    "hidden_sizes": [128, 256, 512, 1024],
    "stem_channels": [3, 16, 16],
    "stage_in_channels": [16, 64, 256, 512],
    "stage_mid_channels": [16, 32, 64, 128],
    "stage_out_channels": [64, 256, 512, 1024],
    "stage_num_blocks": [1, 1, 2, 1],
    "stage_numb_of_layers": [3, 3, 3, 3],
    "use_learnable_affine_block": True,
}
_VARIANT_SETTINGS: dict[Variant, tuple[dict[str, Any], dict[str, Any]]] = {
    # variant: (backbone settings, D-FINE settings)
    "n": (
        {**_SMALL_BACKBONE, "out_indices": [3, 4]},
        {
            "num_feature_levels": 2, "encoder_ffn_dim": 512, "encode_proj_layers": [1],
            "d_model": 128, "encoder_hidden_dim": 128, "decoder_ffn_dim": 512,
            "encoder_in_channels": [512, 1024], "decoder_n_points": [6, 6],
            "decoder_in_channels": [128, 128], "feat_strides": [16, 32], "depth_mult": 0.5,
            "decoder_layers": 3, "hidden_expansion": 0.34,
        },
    ),
    "s": (
        _SMALL_BACKBONE,
        {
            "decoder_layers": 3, "hidden_expansion": 0.5, "depth_mult": 0.34,
            "decoder_n_points": [3, 6, 3], "encoder_in_channels": [256, 512, 1024],
        },
    ),
    "m": (
        {
            "hidden_sizes": [192, 384, 768, 1536], "stem_channels": [3, 24, 32],
            "stage_in_channels": [32, 96, 384, 768], "stage_mid_channels": [32, 64, 128, 256],
            "stage_out_channels": [96, 384, 768, 1536], "stage_num_blocks": [1, 1, 3, 1],
            "stage_numb_of_layers": [4, 4, 4, 4], "use_learnable_affine_block": True,
        },
        {
            "decoder_layers": 4, "decoder_n_points": [3, 6, 3],
            "encoder_in_channels": [384, 768, 1536], "depth_mult": 0.67,
        },
    ),
    "l": (
        {
            "hidden_sizes": [256, 512, 1024, 2048], "stem_channels": [3, 32, 48],
            "stage_in_channels": [48, 128, 512, 1024], "stage_mid_channels": [48, 96, 192, 384],
            "stage_out_channels": [128, 512, 1024, 2048], "stage_num_blocks": [1, 1, 3, 1],
            "stage_numb_of_layers": [6, 6, 6, 6],
        },
        {"decoder_layers": 6, "encoder_ffn_dim": 1024, "encoder_in_channels": [512, 1024, 2048],
         "decoder_n_points": [3, 6, 3]},
    ),
    "x": (
        {
            "hidden_sizes": [256, 512, 1024, 2048], "stem_channels": [3, 32, 64],
            "stage_in_channels": [64, 128, 512, 1024], "stage_mid_channels": [64, 128, 256, 512],
            "stage_out_channels": [128, 512, 1024, 2048], "stage_num_blocks": [1, 2, 5, 2],
            "stage_numb_of_layers": [6, 6, 6, 6],
        },
        {
            "decoder_layers": 6, "encoder_in_channels": [512, 1024, 2048],
            "encoder_hidden_dim": 384, "encoder_ffn_dim": 2048, "decoder_n_points": [3, 6, 3],
            "decoder_in_channels": [384, 384, 384],
        },
    ),
}


def build_config(variant: Variant, labels: list[str]) -> DFineConfig:
    """A from-scratch config: trainable batch norms and the official class-bias prior of 0.01."""
    backbone, model = _VARIANT_SETTINGS[variant]
    config = DFineConfig(
        freeze_backbone_batch_norms=False,
        initializer_bias_prior_prob=0.01,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **model,
    )
    for key, value in {**_COMMON_BACKBONE, **backbone}.items():
        setattr(config.backbone_config, key, value)
    return config


def build_model(variant: Variant, labels: list[str]) -> DFineForObjectDetection:
    return DFineForObjectDetection(build_config(variant, labels))


def load_model(source: str | Path) -> DFineForObjectDetection:
    """A trained model from a transformers folder (``save_pretrained``) or a hub id, in float32
    (the shipped checkpoint is stored in float16 to halve its size)."""
    model = DFineForObjectDetection.from_pretrained(str(source), dtype=torch.float32)
    assert isinstance(model, DFineForObjectDetection)
    return model


def model_labels(model: DFineForObjectDetection) -> list[str]:
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]
