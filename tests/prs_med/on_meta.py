"""What the prs_med device tests share: the tensors of a network that are not on a device, and the parts of
:meth:`nbsupport.prs_med.model.PRSMedNet.forward` run with meta inputs (the device rule checked without a GPU)."""
from __future__ import annotations

import torch

from nbsupport.prs_med.model import PRSMedNet


def tensors_off(module: torch.nn.Module, device: str) -> dict[str, str]:
    """Every parameter and buffer of ``module`` not on ``device``, by name."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.device.type for name, t in named if t.device.type != device}


def forward_parts_on_meta(model: PRSMedNet, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """The teacher-forced pass of :meth:`PRSMedNet.forward`, part by part, with meta inputs: image encoder, modality
    classifier, vision tower + projector (the position head on what the projector wrote), the language model over
    the embedded prompt with the image features in place of the ``<image>`` tokens, the answer logits and the mask
    decoder. Transformers' Llava checks the image-token count by value (``.item()``) and its SDPA mask code reads the
    padding mask's values, which meta tensors do not have, so the language model runs here on embeddings with eager
    attention; ``generate`` (stopping criteria read token values) cannot run on meta at all."""
    size = model.spec.image_size
    images = torch.empty(len(questions), 3, size, size, device="meta")
    enc = model.encode(questions, answers, device="meta")
    embedding = model.image_encoder(images)
    llava = model.llava.model
    model._projected.clear()
    features = torch.cat(list(llava.get_image_features(pixel_values=model.vlm_pixels(images)).pooler_output))
    embedded = llava.get_input_embeddings()(enc["input_ids"])
    is_image = (enc["input_ids"] == model.image_token_id)[..., None].expand_as(embedded)
    llava.language_model.set_attn_implementation("eager")
    hidden = llava.language_model(inputs_embeds=embedded.masked_scatter(is_image, features.to(embedded.dtype)),
                                  attention_mask=enc["attention_mask"]).last_hidden_state
    mask_logits, _ = model.mask_decoder(embedding, hidden, enc["attention_mask"], size)
    out = {"image_embedding": embedding, "modality": model.modality_classifier(embedding), "hidden": hidden,
           "answer_logits": model.llava.lm_head(hidden), "mask_logits": mask_logits}
    if model.position_classifier is not None:
        out["position"] = model.position_classifier(model._projected.pop())
    return out
