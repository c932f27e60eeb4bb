"""ct_clip: CT-RATE preprocessing and 3-D vision-language pretraining (CT-Data / CT-CLIP).

Notebooks use the configs and verbs re-exported here. The parts: ``config`` (stage configs), ``data`` (CT-RATE
layout, manifest, Dataset), ``demo_data`` (synthetic CT-RATE), ``preprocessing`` (fast HU/RAS/resample/window/crop,
CLI), ``model`` (3-D encoders, text tower, SigLIP/CLIP loss, spec), ``task`` (the training task), ``inference``
(retrieval, zero-shot, features, relevance), ``views`` (figures, viewer cases and pages), ``pipeline`` (the verbs)
and ``features`` (embeddings of CT files from the command line).
"""
from nbsupport.ct_clip.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.ct_clip.inference import evaluate_split, extract_features
from nbsupport.ct_clip.pipeline import attention_maps, load_trained_model, predict, preprocess, train
from nbsupport.ct_clip.views import attention_viewer_cases, viewer_cases

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "evaluate_split", "extract_features", "load_trained_model", "predict",
           "preprocess", "train", "viewer_cases"]
