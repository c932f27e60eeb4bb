"""textseg3d: LLMSeg — text-guided 3-D radiotherapy target-volume segmentation (tvseg/MM-LLM-RO).

Notebooks use the configs and verbs re-exported here. The parts: ``config`` (the four stage configs), ``data``
(npz/NIfTI layouts, report table, report -> prompt, manifest), ``demo_data`` (the synthetic breast-RT generator),
``transforms`` (MONAI chains), ``model`` (3-D UNet + frozen text encoder + context prompts + two-way attention
fusion, and its spec), ``task`` (the training task), ``inference`` (sliding window, scores, result.csv, fusion
attention), ``views`` (figures, viewer cases, the HTML views) and ``pipeline`` (the verbs).
"""
from nbsupport.textseg3d.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.textseg3d.pipeline import attention_maps, load_trained_model, predict, preprocess, train
from nbsupport.textseg3d.views import attention_viewer_cases, viewer_cases

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "load_trained_model", "predict", "preprocess", "train", "viewer_cases"]
