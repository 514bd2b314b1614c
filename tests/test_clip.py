"""sdrt's CLIP text encoder against transformers' CLIPTextModel, on tiny random-weight configs.

Target run time: about 5 s on a 2-core CPU.
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdrt.config import CLIPTextConfig, clip_text_config
from sdrt.errors import InvalidInputError
from sdrt.models.clip import IGNORED_KEYS, KEY_PREFIX, CLIPTextModel, checkpoint_state_dict

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32; observed 0.0 (same ops as transformers' SDPA path); gelu<->quick_gelu swap gives 4e-2

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            max_position_embeddings=77, layer_norm_eps=1e-5)


def _reference(tmp_path, hidden_act: str, layers: int):
    """A random transformers CLIPTextModel saved as safetensors. Weights are drawn wider than
    transformers' init (std 0.02) so activations are O(1) and e.g. gelu vs quick_gelu differ by far
    more than TOL."""
    torch.manual_seed(layers)
    hf_cfg = transformers.CLIPTextConfig(**TINY, num_hidden_layers=layers, hidden_act=hidden_act,
                                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    ref = transformers.CLIPTextModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref, hf_cfg


def _load(tensors, cfg: CLIPTextConfig) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(checkpoint_state_dict(tensors), strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("hidden_act,layers", [("quick_gelu", 2), ("gelu", 3), ("quick_gelu", 5)])
def test_matches_transformers(tmp_path, hidden_act, layers):
    ref, hf_cfg = _reference(tmp_path, hidden_act, layers)
    cfg = clip_text_config(hf_cfg.to_dict())
    assert cfg.hidden_act == hidden_act and cfg.num_hidden_layers == layers
    model = _load(load_file(tmp_path / "model.safetensors"), cfg)

    ids = torch.randint(0, TINY["vocab_size"], (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = model(ids)
    assert got.shape == (3, 77, 32)
    assert (got - expected).abs().max().item() <= TOL


def test_legacy_prefixed_checkpoint_loads_strictly_without_renaming(tmp_path):
    """SD checkpoints (saved by transformers < 5) prefix every key with "text_model." and may carry
    the position_ids buffer: dropping IGNORED_KEYS is all they need."""
    ref, hf_cfg = _reference(tmp_path, "gelu", 2)
    tensors = {KEY_PREFIX + k if not k.startswith(KEY_PREFIX) else k: v
               for k, v in load_file(tmp_path / "model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(tensors, tmp_path / "legacy.safetensors")
    legacy = load_file(tmp_path / "legacy.safetensors")

    with torch.device("meta"):
        model = CLIPTextModel(clip_text_config(hf_cfg.to_dict()))
    model.load_state_dict({k: v for k, v in legacy.items() if k not in IGNORED_KEYS}, strict=True, assign=True)
    ids = torch.randint(0, TINY["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).last_hidden_state).abs().max().item() <= TOL


def test_causal_mask():
    """A token's hidden state must not depend on the tokens after it."""
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TINY, num_hidden_layers=2)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 77))
    changed = ids.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[0, :40], b[0, :40])
    assert not torch.allclose(a[0, 40:], b[0, 40:])


def test_meta_construction_sd_sizes():
    """Full SD 1.x and SD 2.x text towers build on meta without allocating or initializing data."""
    sd1 = CLIPTextConfig()
    sd2 = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                         num_attention_heads=16, hidden_act="gelu", projection_dim=512)
    for cfg, n_params in ((sd1, 123_060_480), (sd2, 340_387_840)):
        with torch.device("meta"):
            model = CLIPTextModel(cfg)
        assert all(p.is_meta for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == n_params
        with torch.device("meta"):
            out = model(torch.zeros(2, 77, dtype=torch.long))
        assert out.shape == (2, 77, cfg.hidden_size)


def test_bad_input_ids_shape():
    model = CLIPTextModel(CLIPTextConfig(**TINY, num_hidden_layers=1))
    with pytest.raises(InvalidInputError, match="input_ids"):
        model(torch.zeros(78, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="input_ids"):
        model(torch.zeros(1, 78, dtype=torch.long))
