"""PRS-Med's official prompted mask decoder: the ``mask_decoder.pth`` layout, its residual blocks, the shapes the
PRS-Med pipeline uses.

The layout is written here from huyquoctrinh/PRS-Med ``segment_model/mask_decoder_v5.py`` (``v5:<line>``),
independently of the module under test.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nbsupport.prs_med.decoder import FFN, BasicBlock, PromptedMaskDecoder, load_prompted_mask_decoder
from nbsupport.weights import WeightsMismatchError


def _linear(name: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (cout, cin), f"{name}.bias": (cout,)}


def _norm(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _mha(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.in_proj_weight": (3 * dim, dim), f"{name}.in_proj_bias": (3 * dim,)} | _linear(
        f"{name}.out_proj", dim, dim)


def mask_decoder_layout(prompt: int, image: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of ``mask_decoder.pth`` (PRS-Med model_v7.py:106 saves PromptedMaskDecoder's state dict)."""
    out = (_linear("prompt_projection.0", prompt, hidden) | _norm("prompt_projection.1", hidden)  # v5:260-267
           | _linear("prompt_projection.3", hidden, image) | _norm("prompt_projection.4", image)
           | _mha("attn", image) | _norm("norm1", image)  # v5:279-280
           | _linear("ffn.fc1", image, image) | _linear("ffn.fc2", image, image)  # FFN, v5:235-239
           | _norm("ffn.norm", image) | _norm("ffn.norm1", image)
           | _mha("encoder_layer.self_attn", image) | _linear("encoder_layer.linear1", image, 512 * image // 256)
           | _linear("encoder_layer.linear2", 512 * image // 256, image)  # v5:292, ff 512 at image 256
           | _norm("encoder_layer.norm1", image) | _norm("encoder_layer.norm2", image))
    for i, (cin, cout) in enumerate([(image, image), (image, image // 2), (image // 2, image // 4)]):  # v5:302-306
        p = f"mask_generation.{i}"  # BasicBlock, v5:157-162
        out |= {f"{p}.conv1.weight": (cin, cin, 3, 3), f"{p}.conv1.bias": (cin,), f"{p}.bn1.weight": (cin,),
                f"{p}.bn1.bias": (cin,), f"{p}.conv2.weight": (cout, cin, 1, 1), f"{p}.conv2.bias": (cout,),
                f"{p}.bn2.weight": (cout,), f"{p}.bn2.bias": (cout,), f"{p}.conv3.weight": (cout, cout, 3, 3),
                f"{p}.conv3.bias": (cout,)}
    return out | {"out_dec.weight": (1, image // 4, 1, 1), "out_dec.bias": (1,)  # v5:309-311
                  } | _norm("image_norm", image) | _norm("prompt_norm", image)


def test_full_size_decoder_has_the_official_layout_and_output() -> None:
    with torch.device("meta"):
        decoder = PromptedMaskDecoder()  # v5:257 defaults: prompt 4096, image 256, hidden 512
        shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
        assert shapes == mask_decoder_layout(4096, 256, 512) and len(shapes) == 70
        assert sum(p.numel() for p in decoder.parameters()) == 5_366_465
        # the PRS-Med pipeline: TinySAM's (B, 256, 64, 64) and LLaVA-Med's bf16 hidden states (B, T, 4096)
        logits, attention = decoder(torch.empty(2, 256, 64, 64), torch.empty(2, 57, 4096, dtype=torch.bfloat16),
                                    torch.ones(2, 57), return_attention=True)
    assert logits.shape == (2, 1, 1024, 1024) and logits.dtype == torch.float32
    assert attention.shape == (2, 64 * 64, 57)


def test_mask_decoder_pth_loads_every_tensor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layout = mask_decoder_layout(48, 32, 24)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in layout.items()}
    path = tmp_path / "llm_seg_13" / "mask_decoder.pth"
    path.parent.mkdir()
    torch.save(state, path)  # torch.save(self.mask_decoder.state_dict(), ...), model_v7.py:106
    decoder = load_prompted_mask_decoder(str(path))
    n = len(layout)
    assert capsys.readouterr().out == f"{path}: loaded {n} of {n} tensors (0 missing, 0 unexpected)\n"
    own = decoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    with torch.no_grad():
        logits, _ = decoder.eval()(torch.randn(2, 32, 4, 4), torch.randn(2, 5, 48))
    assert logits.shape == (2, 1, 64, 64)
    del state["mask_generation.1.bn2.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"mask_decoder\.pth: .*1 missing: mask_generation\.1\.bn2\.bias"):
        load_prompted_mask_decoder(path, log=None)
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "cls.pth")
    with pytest.raises(ValueError, match=r"cls\.pth: not a PRS-Med mask_decoder\.pth"):
        load_prompted_mask_decoder(tmp_path / "cls.pth")


def test_basic_block_is_residual_and_keeps_the_size() -> None:
    """v5:179-190: relu(IN(conv1 x)) + x, then the 1x1 conv padded by one, IN over the padded map, unpadded 3x3."""
    torch.manual_seed(0)
    block = BasicBlock(4, 2)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv1.bias.zero_()  # relu(IN(0)) = 0: the block then sees x itself through its residual
        expected = block.conv3(block.bn2(F.conv2d(x, block.conv2.weight, block.conv2.bias, padding=1)))
        got = block(x)
    assert got.shape == (1, 2, 6, 6) and torch.allclose(got, expected, atol=1e-6)


def test_ffn_adds_its_input_before_fc2_and_ends_in_layer_norm() -> None:
    """v5:245-254: norm(relu(fc2(relu(fc1 x) + x)))."""
    ffn = FFN(8, 8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ffn.fc1.weight.zero_()
        ffn.fc1.bias.zero_()
        ffn.fc2.weight.copy_(torch.eye(8))
        ffn.fc2.bias.zero_()
        assert torch.allclose(ffn(x), F.layer_norm(F.relu(x), (8,)), atol=1e-6)


def test_prompt_mask_hides_padding_and_all_ones_is_the_official_call() -> None:
    torch.manual_seed(0)
    decoder = PromptedMaskDecoder(prompt_dim=24, image_dim=32, hidden_dim=16).eval()
    image, prompt = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 24)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        official, none = decoder(image, prompt)
        assert none is None and official.shape == (2, 1, 64, 64)
        assert torch.allclose(decoder(image, prompt, torch.ones(2, 5))[0], official, atol=1e-5)
        masked, attention = decoder(image, prompt, valid, output_size=48, return_attention=True)
        changed = prompt.clone()
        changed[1, 3:] = 100.0
        again, _ = decoder(image, changed, valid, output_size=48)
    assert masked.shape == (2, 1, 48, 48) and attention[1, :, 3:].abs().max() == 0
    assert torch.allclose(again, masked, atol=1e-5)
    assert not torch.allclose(decoder(image, changed)[0][1], official[1], atol=1e-3)  # unmasked, padding counts
