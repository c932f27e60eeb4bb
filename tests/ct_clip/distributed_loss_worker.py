"""One of N gloo processes for tests/ct_clip/test_losses.py: its share of a fixed global batch of embeddings
through :func:`nbsupport.ct_clip.model.contrastive_loss`, then backward; saves the loss and the gradients.

``python distributed_loss_worker.py RANK WORLD INIT_FILE OUT_FILE`` (both losses, ``{"siglip": ..., "clip": ...}``)
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from nbsupport.ct_clip.model import CTClip, CTClipSpec, contrastive_loss

BATCH, DIM = 8, 6
SPEC = dict(input_size=(16, 16, 16), image_width=4, image_blocks=(1, 1), text_encoder="tiny", embed_dim=DIM)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(images, texts): unit-length embeddings of the whole global batch, the same in every process."""
    g = torch.Generator().manual_seed(7)
    return (torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1),
            torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=g), dim=-1))


def loss_and_gradients(loss: str, rows: slice) -> dict[str, torch.Tensor]:
    """The loss of ``rows`` of the global batch and its gradients (embeddings, logit scale and bias)."""
    torch.manual_seed(0)
    model = CTClip(CTClipSpec(**SPEC, loss=loss))
    images, texts = (t[rows].clone().requires_grad_(True) for t in global_batch())
    value = contrastive_loss(model, images, texts)
    value.backward()
    out = {"loss": value.detach(), "images": images.grad, "texts": texts.grad, "scale": model.logit_scale.grad}
    if model.logit_bias.requires_grad:
        out["bias"] = model.logit_bias.grad
    return out


if __name__ == "__main__":
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    share = BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    torch.save({loss: loss_and_gradients(loss, rows) for loss in ("siglip", "clip")}, out_file)
    dist.destroy_process_group()
