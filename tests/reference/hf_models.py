"""Random-init transformers Qwen3 models saved in HF format: the independent reference for our model."""

import numpy as np
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

# Small configs covering the axes that break ports: tied/untied head, head_dim != hidden/heads,
# GQA ratios 1, 3 and 8, rope theta 1e4 and 1e6.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, head_dim=24, rope_theta=1e6,
            tie_word_embeddings=False)
VARIANTS = {
    "tied_mha_theta1e4": dict(TINY, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                              rope_theta=1e4, tie_word_embeddings=True),
    "untied_gqa3_theta1e6": TINY,
    "tied_gqa8_wide_heads": dict(TINY, num_attention_heads=8, num_key_value_heads=1, head_dim=32,
                                 tie_word_embeddings=True, num_hidden_layers=3),
}


def build(settings: dict, seed: int = 0) -> Qwen3ForCausalLM:
    settings = dict(settings)
    theta = settings.pop("rope_theta")
    torch.manual_seed(seed)
    config = Qwen3Config(**settings, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = Qwen3ForCausalLM(config).eval()
    # Larger-than-default weights make logits O(1) so relative errors are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def build_and_save(path: str, settings: dict, seed: int = 0) -> Qwen3ForCausalLM:
    model = build(settings, seed)
    model.save_pretrained(path)
    return model


def torch_logits(model: Qwen3ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
