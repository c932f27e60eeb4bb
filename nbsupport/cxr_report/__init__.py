"""cxr_report: chest X-ray report generation (MedGen_AI): DenseNet-121 disease attention tokens prefixed to a
QLoRA-tuned causal LM, on CheXpert Plus.

Notebooks use the configs and verbs re-exported here. Modules: ``config`` (stage configs), ``data`` (CheXpert Plus
/ seed CSV / DICOM adapter, manifest, Datasets), ``demo_data`` (synthetic demo dataset), ``labeler`` (negation-aware
rule labeler of reports), ``model`` (vision model, report generator, spec), ``task`` (the two training tasks),
``chexbert`` (who labels reports for clinical efficacy: CheXbert from local weights, else the rule labeler),
``inference`` (tokens, beam search, scores, baselines), ``views`` (figures, viewer cases, HTML views) and
``pipeline`` (the four verbs, ``load_trained_model`` and ``predict_files`` for your own radiographs).
"""
from nbsupport.cxr_report.config import AttentionConfig, InferConfig, PreprocessConfig, TrainConfig
from nbsupport.cxr_report.pipeline import (
    attention_maps,
    load_trained_model,
    predict,
    predict_files,
    preprocess,
    train,
)
from nbsupport.cxr_report.views import attention_viewer_cases, viewer_cases

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "load_trained_model", "predict", "predict_files", "preprocess", "train",
           "viewer_cases"]
