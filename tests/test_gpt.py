"""The hand-written GPT-2 against transformers, and its invariants: padding, KV cache, LoRA, heads."""
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from transformers import GPT2Config, GPT2LMHeadModel

from common import UserError
from configs import ModelConfig, get_preset
from gpt import (
    GPT,
    Int8Linear,
    KVCache,
    RewardModel,
    ValueModel,
    _decoding_layout,
    lora_disabled,
    mark_only_lora_trainable,
    merge_lora,
    sample_from_logits,
    unmerge_lora,
)
from loss import logprobs_from_hidden, logprobs_from_hidden_reference
from tokenizer import get_tokenizer


def hf_config(c: ModelConfig) -> GPT2Config:
    return GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                      n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def hf_and_ours(config: ModelConfig, seed=0, std=0.1):
    torch.manual_seed(seed)
    hf = randomize_(GPT2LMHeadModel(hf_config(config)), std=std, seed=seed).eval()
    ours = GPT(config).eval()
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def left_pad(ids: torch.Tensor, n_pad: int, pad_id=50256):
    """One unpadded row (1, T) -> (1, n_pad + T) ids and mask, padding on the left."""
    padded = torch.cat([torch.full((1, n_pad), pad_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    return padded, mask


@pytest.mark.parametrize("shape", ["small", "gpt2-medium"])
def test_logits_equal_transformers(shape):
    config = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=64) if shape == "small" \
        else replace(get_preset("gpt2-medium"), pretrained=None)
    std = 0.1 if shape == "small" else 0.02  # 24 layers at std 0.1 would blow the activations up
    hf, ours = hf_and_ours(config, std=std)
    ids = torch.randint(0, config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours.logits(ids)
        assert want.abs().max() > 1.0  # a meaningful scale for the tolerance below
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # Left-padded rows give the logits of the same rows without padding.
        for row in range(2):
            padded, mask = left_pad(ids[row:row + 1], n_pad=5 + 3 * row)
            got_padded = ours.logits(padded, mask)[:, -ids.size(1):]
            torch.testing.assert_close(got_padded, want[row:row + 1], atol=1e-4, rtol=0)


def test_batch_with_mixed_padding_equals_rows_alone(tiny_config):
    hf, ours = hf_and_ours(tiny_config)
    tok = get_tokenizer()
    texts = ["a short one", "a somewhat longer prompt with more words in it", "mid length text"]
    ids, mask = tok(texts, padding_side="left")
    with torch.no_grad():
        batched = ours.logits(ids, mask)
        for i, text in enumerate(texts):
            alone = torch.tensor([tok.encode(text)])
            n = alone.size(1)
            torch.testing.assert_close(batched[i:i + 1, -n:], hf(alone).logits, atol=1e-4, rtol=0)


def test_export_round_trip(tmp_path, tiny_config):
    config = replace(tiny_config, lora_rank=4)
    torch.manual_seed(0)
    ours = randomize_(GPT(config)).eval()  # lora_B random too: the export must merge it
    ids = torch.randint(0, config.vocab_size, (2, 20))
    ours.export_hf(str(tmp_path / "hf"))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.logits(ids), atol=1e-4, rtol=0)
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_load_transformers_directory(tmp_path, tiny_config):
    hf, _ = hf_and_ours(tiny_config)
    hf.save_pretrained(str(tmp_path / "saved"))
    ours = GPT.from_pretrained(str(tmp_path / "saved")).eval()
    assert ours.config.n_layer == tiny_config.n_layer and ours.config.block_size == tiny_config.block_size
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ids), hf(ids).logits, atol=1e-4, rtol=0)
    # LoRA on top of the loaded weights starts out identical (B = 0).
    lora_model = GPT.from_pretrained(str(tmp_path / "saved"), config=replace(tiny_config, lora_rank=2)).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora_model.logits(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_weights_that_do_not_fit_the_preset(tmp_path, tiny_config):
    hf, _ = hf_and_ours(tiny_config)
    hf.save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="do not fit the preset: n_embd 128"):
        GPT.from_pretrained(str(tmp_path / "saved"), config=replace(tiny_config, n_embd=128))
    with pytest.raises(UserError, match="cannot load GPT-2 weights"):
        GPT.from_pretrained(str(tmp_path / "nothing-here"))


def greedy(model, ids, mask, n, **kw):
    return model.generate(ids, mask, max_new_tokens=n, temperature=0.0, eos_id=None, **kw)


def test_kv_cache_equals_full_recompute(tiny_config):
    _, model = hf_and_ours(tiny_config, std=0.05)
    tok = get_tokenizer()
    ids, mask = tok(["The capital of France is", "Hi", "One two three four five six"], padding_side="left")
    with_cache = greedy(model, ids, mask, 30)
    without = greedy(model, ids, mask, 30, use_cache=False)
    assert torch.equal(with_cache.tokens, without.tokens)
    assert with_cache.tokens.size(1) == ids.size(1) + 30


def test_decoding_layout_changes_strides_not_results(tiny_config):
    _, model = hf_and_ours(tiny_config, std=0.05)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    before = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model.logits(ids)
        with _decoding_layout(model):
            assert not model.wte.weight.is_contiguous() and model.wte.weight.t().is_contiguous()
            got = model.logits(ids)
        model.generate(ids, max_new_tokens=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert before == {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}  # all put back


def test_batched_left_padded_generation_equals_one_by_one(tiny_config):
    _, model = hf_and_ours(tiny_config, std=0.05)
    tok = get_tokenizer()
    texts = ["The capital of France is", "Hi", "One two three four five six"]
    ids, mask = tok(texts, padding_side="left")
    batched = greedy(model, ids, mask, 20)
    for i, text in enumerate(texts):
        alone = torch.tensor([tok.encode(text)])
        single = greedy(model, alone, None, 20)
        assert batched.tokens[i, -20:].tolist() == single.tokens[0, -20:].tolist()


def test_generation_stops_at_eos_and_masks_after_it(tiny_config):
    _, model = hf_and_ours(tiny_config, std=0.05)
    ids = torch.randint(0, 1000, (4, 6), generator=torch.Generator().manual_seed(0))
    free = greedy(model, ids, None, 12)
    # Declare the 4th generated token of row 0 to be "EOS": row 0 must stop right there.
    eos = free.tokens[0, 6 + 3].item()
    out = model.generate(ids, max_new_tokens=12, temperature=0.0, eos_id=eos)
    resp = out.response_mask[:, 6:]
    first = (out.tokens[0, 6:] == eos).nonzero()[0].item()
    assert resp[0, :first + 1].all() and not resp[0, first + 1:].any()  # EOS is the last response token
    for row in range(4):  # every row: response = tokens up to and including its first EOS
        toks = out.tokens[row, 6:]
        hits = (toks == eos).nonzero()
        n = hits[0].item() + 1 if len(hits) else toks.numel()
        assert resp[row].tolist() == [1] * n + [0] * (toks.numel() - n)
        assert torch.equal(out.attention_mask[row, 6:], resp[row])


def test_stop_strings(tiny_config):
    _, model = hf_and_ours(tiny_config, std=0.05)
    tok = get_tokenizer()
    ids = torch.tensor([tok.encode("Once upon a time")])
    free = greedy(model, ids, None, 16)
    new = free.tokens[0, ids.size(1):].tolist()
    stop = tok.decode(new[4:6])  # a string that the free run completes at its 6th token
    out = greedy(model, ids, None, 16, stop_strings=[stop], tokenizer=tok)
    n_resp = out.response_mask.sum().item()
    assert stop in tok.decode(out.tokens[0, ids.size(1):][:n_resp])
    assert n_resp <= 6 and stop not in tok.decode(new[:n_resp - 1])


def test_sampling_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_from_logits(logits, generator=g), minlength=5).float() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01, rtol=0)
    # temperature 2 flattens: p ~ sqrt(p)
    freq_t = torch.bincount(sample_from_logits(logits, temperature=2.0, generator=g), minlength=5).float() / 40000
    want = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).sqrt()
    torch.testing.assert_close(freq_t, want / want.sum(), atol=0.01, rtol=0)
    assert set(sample_from_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_from_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample_from_logits(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert sample_from_logits(logits[:3], temperature=0.0).tolist() == [0, 0, 0]


def kl_per_position(want_logits, got_logits):
    """KL(want || got) of the softmaxes at every position: (...,)."""
    want, got = torch.log_softmax(want_logits.float(), -1), torch.log_softmax(got_logits.float(), -1)
    return (want.exp() * (want - got)).sum(-1)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_sampler_is_a_frozen_copy_near_the_model(tiny_config, precision):
    """GPT.for_decoding: LoRA merged in, next-token distributions within 1e-3 nats (KL) of the
    model's, through the KV cache and with left padding as well as on a full recompute; the model
    itself (fp32, trainable adapters) untouched."""
    model = randomize_(GPT(replace(tiny_config, lora_rank=4)), std=0.05).eval()  # lora_B != 0: adapters matter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sampler = model.for_decoding(precision)
    assert model.for_decoding("fp32") is model
    assert not any(p.requires_grad for p in sampler.parameters())
    tok = get_tokenizer()
    ids, mask = tok(["The capital of France is", "Hi", "One two three four five six"], padding_side="left")
    with torch.no_grad():
        want = model.logits(ids, mask)  # (B, T, V)
        assert kl_per_position(want, sampler.logits(ids, mask))[mask.bool()].max() < 1e-3
        # Step by step through the sampler's KV cache, as generate runs it: the same distributions.
        cache, steps = KVCache(tiny_config.n_layer, ids.size(1)), []
        for t in range(ids.size(1)):
            steps.append(sampler.lm_head(sampler(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache)))
        assert kl_per_position(want, torch.cat(steps, 1))[mask.bool()].max() < 1e-3
        alone = torch.tensor([tok.encode("Hi")])
        assert kl_per_position(want[1:2, -1], sampler.logits(alone)[:, -1]).max() < 1e-3  # padding changes nothing
        out = sampler.generate(ids, mask, max_new_tokens=5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, ids.size(1) + 5) and out.tokens.max() < tiny_config.vocab_size
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) and v.dtype == after[k].dtype for k, v in before.items())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_int8_linear_is_the_fp32_product_within_rounding_on_both_paths(monkeypatch):
    """Int8Linear: torch's fused int8 x bf16 kernel (few rows on the CPU) and the widen-then-multiply
    path (many rows, or no such kernel) agree, and both stay within 2% of the fp32 product."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 64, generator=g), torch.randn(48, generator=g), torch.randn(5, 3, 64, generator=g)
    layer = Int8Linear(w, b)
    want = F.linear(x, w, b)  # (5, 3, 48)
    fused = layer(x).float()
    layer.fused_max_rows = 14  # 15 rows: the widening path
    widened = layer(x).float()
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    layer.fused_max_rows = 32
    torch.testing.assert_close(layer(x).float(), widened, atol=0, rtol=0)  # no fused kernel: the same path
    assert fused.shape == widened.shape == want.shape
    for got in (fused, widened):
        assert (got - want).abs().max() < 0.02 * want.abs().max()
    torch.testing.assert_close(fused, widened, atol=0.02 * want.abs().max().item(), rtol=0)


@pytest.mark.skipif(not os.environ.get("RUN_COMPILE_TESTS"),
                    reason="torch.compile takes ~40 s: RUN_COMPILE_TESTS=1 runs it")
def test_compiled_sampler_decodes_like_the_eager_one(tiny_config):
    """for_decoding(compile=True): the same tokens as eager decoding, at two lengths, and the
    model's own forward left uncompiled."""
    _, model = hf_and_ours(tiny_config, std=0.05)
    tok = get_tokenizer()
    ids, mask = tok(["The capital of France is", "Hi", "One two three four five six"], padding_side="left")
    compiled = model.for_decoding("fp32", compile=True)
    assert compiled is not model and compiled.wte.weight is model.wte.weight and "forward" not in vars(model)
    assert torch.equal(greedy(compiled, ids, mask, 12).tokens, greedy(model, ids, mask, 12).tokens)
    assert torch.equal(greedy(compiled, ids, mask, 30).tokens, greedy(model, ids, mask, 30).tokens)


def test_lora_zero_b_equals_base_and_merge(tiny_config):
    base = randomize_(GPT(tiny_config)).eval()
    lora_model = GPT(replace(tiny_config, lora_rank=4)).eval()
    missing, unexpected = lora_model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(lora_model.logits(ids), base.logits(ids), atol=0, rtol=0)  # B = 0
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        unmerged = lora_model.logits(ids)
        assert (unmerged - base.logits(ids)).abs().max() > 1e-2  # the adapters now matter
        with lora_disabled(lora_model):
            torch.testing.assert_close(lora_model.logits(ids), base.logits(ids), atol=0, rtol=0)
        merge_lora(lora_model)
        torch.testing.assert_close(lora_model.logits(ids), unmerged, atol=1e-4, rtol=0)
        unmerge_lora(lora_model)
        torch.testing.assert_close(lora_model.logits(ids), unmerged, atol=1e-4, rtol=0)


def test_merged_state_dict_matches_merged_model(tiny_config):
    model = randomize_(GPT(replace(tiny_config, lora_rank=4, lora_targets=("q", "v", "mlp_in")))).eval()
    plain = GPT(tiny_config).eval()
    plain.load_state_dict(model.merged_state_dict(), strict=True)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(ids), model.logits(ids), atol=1e-4, rtol=0)


def test_only_intended_parameters_trainable(tiny_config):
    rm = RewardModel(replace(tiny_config, lora_rank=4, lora_targets=("q", "v", "mlp_out")))
    mark_only_lora_trainable(rm, also=("head",))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.h.{i}.{m}.lora_{ab}" for i in range(tiny_config.n_layer)
                         for m in ("attn.c_attn", "mlp.c_proj") for ab in "AB"} | {"head.weight", "head.bias"}
    # q and v get adapters, k does not: the fused qkv adapter has rows for two of three projections.
    assert rm.backbone.h[0].attn.c_attn.lora_B.shape == (2 * tiny_config.n_embd, 4)


def test_reward_score_ignores_padding(tiny_config):
    rm = randomize_(RewardModel(tiny_config)).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    with torch.no_grad():
        plain = rm.score(ids, torch.ones_like(ids))
        for n_pad in (1, 7):
            padded, mask = left_pad(ids, n_pad)
            torch.testing.assert_close(rm.score(padded, mask), plain, atol=1e-5, rtol=0)
            right = torch.cat([ids, torch.full((1, n_pad), 50256)], 1)
            right_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, n_pad, dtype=torch.long)], 1)
            torch.testing.assert_close(rm.score(right, right_mask), plain, atol=1e-5, rtol=0)
        # The score is the per-token value at the last real token.
        torch.testing.assert_close(rm(ids)[:, -1], plain)


def test_value_model_shapes(tiny_config):
    critic = ValueModel(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 10))
    assert critic(ids).shape == (3, 10)


def test_token_logprobs_and_temperature(tiny_config):
    model = randomize_(GPT(tiny_config), std=0.05).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    with torch.no_grad():
        logits = model.logits(ids)
        for T in (1.0, 0.7):
            want = torch.log_softmax(logits[:, 3:-1] / T, -1).gather(-1, ids[:, 4:, None]).squeeze(-1)
            h = model(ids)[:, 3:-1]
            W = model.lm_head.weight
            got, ent = logprobs_from_hidden(W, h, ids[:, 4:], T, with_entropy=True, chunk_rows=5)
            plain, plain_ent = logprobs_from_hidden_reference(W, h, ids[:, 4:], T, with_entropy=True)
            torch.testing.assert_close(got, plain)  # the fused path and autograd's
            torch.testing.assert_close(ent, plain_ent)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            p = torch.softmax(logits[:, 3:-1] / T, -1)
            torch.testing.assert_close(ent, -(p * p.log()).sum(-1), atol=1e-4, rtol=0)


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(0)
    a = randomize_(GPT(tiny_config), std=0.05)
    b = GPT(replace(tiny_config, gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    for m in (a, b):
        m.logits(ids).logsumexp(-1).mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_presets():
    assert get_preset("tiny").pretrained is None and 3e6 < GPT(get_preset("tiny")).num_params() < 1e7
    assert get_preset("tiny").block_size >= 256
    assert get_preset("gpt2-medium/lora").lora_rank > 0 and get_preset("gpt2-xl/dropout").dropout == 0.1
    assert get_preset("gpt2-large").pretrained == "openai-community/gpt2-large"
    with pytest.raises(UserError, match="known presets: .*gpt2-medium/lora"):
        get_preset("gpt3")
