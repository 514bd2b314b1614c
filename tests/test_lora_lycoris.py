"""LoHa, LoCon's lora_mid (Tucker) and diffusers' old attention-processor keys: the fused weights against deltas
computed here by hand (LoHa: (w1a @ w1b) * (w2a @ w2b); lora_mid: per kernel tap, up @ mid[:, :, k, l] @ down;
both times alpha / rank), and processor keys against the same tensors under PEFT names (torch.equal).
Tolerance for the hand deltas: 1e-5 (float32 sums over the rank)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdrt

from factories import save_pipeline

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris")
    save_pipeline(root / "model", "sd1")
    return sdrt.load(root / "model", device="cpu", dtype="float32")


def _module(pipe, name):
    return dict(pipe.unet.named_modules())[name]


def test_loha_and_lora_mid_match_hand_computed_deltas(pipe, tmp_path):
    g = torch.Generator().manual_seed(1)
    q, conv = _module(pipe, ATTN + ".to_q"), _module(pipe, CONV)
    o, i = q.weight.shape
    co, ci, kh, kw = conv.weight.shape
    w1a, w1b, w2a, w2b = (torch.randn(o, 3, generator=g), torch.randn(3, i, generator=g),
                          torch.randn(o, 3, generator=g), torch.randn(3, i, generator=g))
    down, mid, up = (torch.randn(2, ci, 1, 1, generator=g), torch.randn(2, 2, kh, kw, generator=g),
                     torch.randn(co, 2, 1, 1, generator=g))
    qk, ck = "lora_unet_" + (ATTN + ".to_q").replace(".", "_"), "lora_unet_" + CONV.replace(".", "_")
    save_file({f"{qk}.hada_w1_a": w1a, f"{qk}.hada_w1_b": w1b, f"{qk}.hada_w2_a": w2a, f"{qk}.hada_w2_b": w2b,
               f"{qk}.alpha": torch.tensor(1.0), f"{ck}.lora_down.weight": down, f"{ck}.lora_mid.weight": mid,
               f"{ck}.lora_up.weight": up, f"{ck}.alpha": torch.tensor(1.0)}, str(tmp_path / "lyco.safetensors"))
    q0, conv0 = q.weight.detach().clone(), conv.weight.detach().clone()
    pipe.load_lora(tmp_path / "lyco.safetensors", scale=0.8)
    try:
        loha = (w1a @ w1b) * (w2a @ w2b) / 3
        tucker = torch.empty_like(conv0)
        for k in range(kh):
            for m in range(kw):
                tucker[:, :, k, m] = up.flatten(1) @ mid[:, :, k, m] @ down.flatten(1)
        torch.testing.assert_close(q.weight, q0 + 0.8 * loha, rtol=0, atol=1e-5)
        torch.testing.assert_close(conv.weight, conv0 + 0.8 * tucker / 2, rtol=0, atol=1e-5)
    finally:
        pipe.unload_lora()
    assert torch.equal(q.weight, q0) and torch.equal(conv.weight, conv0)


def test_attention_processor_keys_are_the_peft_names(pipe, tmp_path):
    g = torch.Generator().manual_seed(2)
    old, peft = {}, {}
    for proj, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
        m = _module(pipe, f"{ATTN}.{module}")
        down, up = torch.randn(4, m.in_features, generator=g), torch.randn(m.out_features, 4, generator=g)
        old[f"unet.{ATTN}.processor.{proj}_lora.down.weight"], old[f"unet.{ATTN}.processor.{proj}_lora.up.weight"] = down, up
        peft[f"unet.{ATTN}.{module}.lora_A.weight"], peft[f"unet.{ATTN}.{module}.lora_B.weight"] = down, up
    save_file(old, str(tmp_path / "old.safetensors"))
    save_file(peft, str(tmp_path / "peft.safetensors"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora(tmp_path / "old.safetensors")
    by_old = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.unload_lora()
    pipe.load_lora(tmp_path / "peft.safetensors")
    try:
        assert all(torch.equal(v, by_old[k]) for k, v in pipe.unet.state_dict().items())
        changed = {k for k in before if not torch.equal(before[k], by_old[k])}
        assert changed == {f"{ATTN}.{m}.weight" for m in ("to_q", "to_k", "to_v", "to_out.0")}
    finally:
        pipe.unload_lora()
