"""textseg3d: LLMSeg — text-guided 3-D radiotherapy target-volume segmentation (tvseg/MM-LLM-RO).

Notebooks use the configs and verbs re-exported here; ``data`` (npz/NIfTI layouts, report table, report -> prompt,
demo generator), ``transforms`` (MONAI chains) and ``model`` (3-D UNet + frozen text encoder + context prompts +
two-way attention fusion) hold the parts.
"""
from nbsupport.textseg3d.pipeline import (
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
