"""cxr_report: chest X-ray report generation (MedGen_AI): DenseNet-121 disease attention tokens prefixed to a
QLoRA-tuned causal LM, on CheXpert Plus.

Notebooks use the configs and verbs re-exported here; ``data`` (CheXpert Plus / seed CSV / DICOM adapter, demo
generator), ``labeler`` (negation-aware rule labeler of reports), ``model`` (vision model, report generator) and
``pipeline`` hold the parts.
"""
from nbsupport.cxr_report.pipeline import (
                                           AttentionConfig,
                                           InferConfig,
                                           PreprocessConfig,
                                           TrainConfig,
                                           attention_maps,
                                           attention_viewer_cases,
                                           load_manifest,
                                           predict,
                                           preprocess,
                                           train,
                                           viewer_cases,
)

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "load_manifest", "predict", "preprocess", "train", "viewer_cases"]
