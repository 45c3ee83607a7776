"""LMConfig, presets, the HF model built from them, its size and FLOPs, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from neurolattice.lm import PRESETS, LMConfig, build_model, count_parameters, flops_per_token

from ..errors import one_line_error

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_size": 48, "seq_len": 16}


def expected_total(cfg: LMConfig) -> int:
    d, f, v = cfg.d_model, cfg.ffn_size, cfg.vocab_size
    block = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm weights
    return v * d * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * block + d  # + final norm


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_llama_models(name):
    cfg = LMConfig.preset(name)
    model = build_model(cfg)
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (PRESETS[name]["d_model"],
                                                                          PRESETS[name]["n_layers"])
    assert len(model.model.layers) == cfg.n_layers and cfg.name == name
    assert model.get_input_embeddings().weight.shape == (257, cfg.d_model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert (model.config.bos_token_id, model.config.eos_token_id) == (256, 256)
    counts = count_parameters(model)
    assert counts["total"] == expected_total(cfg) == counts["matmul"]
    t = cfg.seq_len
    assert flops_per_token(model) == 6 * counts["total"] + 12 * cfg.n_layers * cfg.d_model * t
    assert flops_per_token(model, 8) < flops_per_token(model)


def test_preset_sizes_and_overrides():
    assert [(PRESETS[n]["d_model"], PRESETS[n]["n_layers"]) for n in ("tiny", "small", "base")] == [
        (128, 4), (256, 6), (512, 8)]
    cfg = LMConfig.preset("small", seq_len=64, tie_embeddings=False)
    assert (cfg.d_model, cfg.seq_len, cfg.tie_embeddings) == (256, 64, False)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    assert LMConfig() == LMConfig.preset("tiny")


def test_untied_counts():
    cfg = LMConfig(**TINY, tie_embeddings=False)
    counts = count_parameters(build_model(cfg))
    assert counts["total"] == expected_total(cfg)
    assert counts["matmul"] == counts["total"] - cfg.vocab_size * cfg.d_model


@pytest.mark.parametrize("bad, match", [
    ({"d_model": 30, "n_heads": 4}, "d_model / n_heads"),
    ({"d_model": 24, "n_heads": 8}, "d_model / n_heads"),
    ({"n_layers": 0}, "n_layers must be a positive integer"),
    ({"eod_id": 257}, "eod_id"),
    ({"name": "huge"}, "name must be a preset"),
    ({"norm_eps": float("nan")}, "norm_eps"),
])
def test_bad_configs(bad, match):
    with one_line_error(match):
        LMConfig(**bad)


def test_unknown_preset_and_key():
    with pytest.raises(ValueError, match="unknown preset"):
        LMConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown LMConfig key"):
        LMConfig.from_dict({"d_modle": 64})


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_round_trip(tmp_path, tied):
    torch.manual_seed(0)
    model = build_model(LMConfig(**TINY, tie_embeddings=tied)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaForCausalLM
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    ids = torch.randint(257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
