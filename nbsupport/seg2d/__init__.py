"""seg2d: 2-D GI-tract segmentation (UW-Madison GI Tract) by transfer learning of Hugging Face segmentation models.

Notebooks use the configs and verbs re-exported here. The parts: ``config`` (stage configs), ``data`` (Kaggle format
adapter, RLE, manifest, Dataset), ``demo_data`` (synthetic dataset in the Kaggle layout), ``model`` (SegFormer / DPT /
BEiT / UperNet factory and spec), ``task`` (the training task), ``inference`` (prediction, post-processing,
evaluation, attention of a pixel), ``scoring`` (competition metric), ``views`` (figures, viewer cases, HTML views)
and ``pipeline`` (the four verbs).
"""
from nbsupport.seg2d.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.seg2d.inference import BASELINE_LABELS, PostProcess, baseline_scores, evaluate_split
from nbsupport.seg2d.pipeline import attention_maps, load_trained_model, predict, predict_files, preprocess, train
from nbsupport.seg2d.views import attention_viewer_cases, viewer_cases

__all__ = ["AttentionConfig", "BASELINE_LABELS", "InferConfig", "PostProcess", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "baseline_scores", "evaluate_split", "load_trained_model", "predict",
           "predict_files", "preprocess", "train", "viewer_cases"]
