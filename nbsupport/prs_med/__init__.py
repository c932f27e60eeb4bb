"""prs_med: PRS-Med position reasoning segmentation (SAM-style encoder + LLaVA-style VLM with LoRA + prompted mask
decoder) on the MMRS/PosMed layout.

Notebooks use the configs and verbs re-exported here; ``data`` (layout adapter, ``position_of``, demo generator),
``model`` (the network, structure loss, full-size parameter counts) and ``pipeline`` (the verbs) hold the parts.
"""
from nbsupport.prs_med.pipeline import (
                                        AttentionConfig,
                                        InferConfig,
                                        PreprocessConfig,
                                        TrainConfig,
                                        answer_image,
                                        attention_maps,
                                        attention_viewer_cases,
                                        evaluate_split,
                                        load_manifest,
                                        predict,
                                        preprocess,
                                        train,
                                        viewer_cases,
)

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "answer_image", "attention_maps",
           "attention_viewer_cases", "evaluate_split", "load_manifest", "predict", "preprocess", "train",
           "viewer_cases"]
