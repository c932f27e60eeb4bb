"""Embeddings of CT files from a trained ct_clip checkpoint, from the command line (a top request on CT-CLIP).

``python -m nbsupport.ct_clip.features --checkpoint RUN/checkpoints/best scan1.nii.gz scan2.nii.gz --out feats/``
writes one ``<name>.npy`` (the unit-length image embedding, float32 (embed_dim,)) per file. From Python:
``nbsupport.ct_clip.extract_features(load_trained_model(checkpoint), path)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from nbsupport.ct_clip.inference import extract_features
from nbsupport.ct_clip.pipeline import load_trained_model
from nbsupport.ct_clip.preprocessing import TARGET_SHAPE, TARGET_SPACING, PreprocessSpec
from nbsupport.runs import atomic_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbsupport.ct_clip.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help=".nii or .nii.gz CT volumes (HU from the header's scaling)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (<run>/checkpoints/best)")
    parser.add_argument("--out", default="features", help="folder for the .npy files")
    parser.add_argument("--spacing", type=float, nargs=3, default=TARGET_SPACING,
                        help="preprocessing voxel size (mm); use the one the training data had")
    parser.add_argument("--shape", type=int, nargs=3, default=TARGET_SHAPE, help="preprocessing pad/crop size")
    args = parser.parse_args(argv)
    model = load_trained_model(Path(args.checkpoint))
    spec = PreprocessSpec(spacing=tuple(args.spacing), shape=tuple(args.shape))
    out = Path(args.out)
    failures = 0
    for name in args.files:
        try:
            embedding = extract_features(model, name, spec)
        except Exception as err:  # report and go on with the other files
            print(f"FAILED {name}: {type(err).__name__}: {err}", file=sys.stderr)
            failures += 1
            continue
        target = out / (Path(name).name.split(".")[0] + ".npy")
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.save(fh, embedding)
        print(f"{name} -> {target} ({embedding.shape[0]} values)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
