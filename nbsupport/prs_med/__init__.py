"""prs_med: PRS-Med position reasoning segmentation (SAM-style encoder + LLaVA-style VLM with LoRA + prompted mask
decoder) on the MMRS/PosMed layout.

Notebooks use the configs and verbs re-exported here. The parts: ``config`` (stage configs), ``data`` (layout
adapter, ``position_of``, manifest, Dataset), ``demo_data`` (synthetic dataset), ``model`` (the network, spec,
structure loss, full-size parameter counts), ``task`` (what the training loop needs), ``inference`` (answer,
segment, score, attention over the image), ``views`` (figures, viewer cases, HTML views) and ``pipeline`` (the
verbs).
"""
from nbsupport.prs_med.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.prs_med.inference import answer_image, evaluate_split
from nbsupport.prs_med.pipeline import attention_maps, load_trained_model, predict, preprocess, train
from nbsupport.prs_med.views import attention_viewer_cases, viewer_cases

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "answer_image", "attention_maps",
           "attention_viewer_cases", "evaluate_split", "load_trained_model", "predict", "preprocess", "train",
           "viewer_cases"]
