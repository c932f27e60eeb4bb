"""ct_clip: CT-RATE preprocessing and 3-D vision-language pretraining (CT-Data / CT-CLIP).

Notebooks use the configs and verbs re-exported here; ``data`` (CT-RATE layout, demo generator, manifest),
``preprocessing`` (fast HU/RAS/resample/window/crop, CLI), ``model`` (3-D encoders, text tower, SigLIP/CLIP loss)
and ``pipeline`` (the verbs) hold the parts.
"""
from nbsupport.ct_clip.pipeline import (
                                        AttentionConfig,
                                        InferConfig,
                                        PreprocessConfig,
                                        TrainConfig,
                                        attention_maps,
                                        attention_viewer_cases,
                                        evaluate_split,
                                        extract_features,
                                        load_manifest,
                                        load_trained_model,
                                        predict,
                                        preprocess,
                                        train,
                                        viewer_cases,
)

__all__ = ["AttentionConfig", "InferConfig", "PreprocessConfig", "TrainConfig", "attention_maps",
           "attention_viewer_cases", "evaluate_split", "extract_features", "load_manifest", "load_trained_model",
           "predict", "preprocess", "train", "viewer_cases"]
