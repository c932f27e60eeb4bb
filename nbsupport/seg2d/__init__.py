"""seg2d: 2-D GI-tract segmentation (UW-Madison GI Tract) by transfer learning of Hugging Face segmentation models.

Notebooks use the configs and verbs re-exported here; ``data`` (Kaggle format adapter, RLE, demo generator),
``model`` (SegFormer / DPT / BEiT / UperNet factory) and ``scoring`` (competition metric) hold the parts.
"""
from nbsupport.seg2d.pipeline import (AttentionConfig, InferConfig, PostProcess, PreprocessConfig, TrainConfig,
                                      attention_maps, attention_viewer_cases, baseline_scores, evaluate_split,
                                      load_manifest, predict, preprocess, train, viewer_cases)

__all__ = ["AttentionConfig", "InferConfig", "PostProcess", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "baseline_scores", "evaluate_split", "load_manifest", "predict", "preprocess",
           "train", "viewer_cases"]
