"""Qwen3 decoder `llm` against the transformers reference (tiny random config, weights copied by name)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from vlmcook.config import LLMConfig
from vlmcook.model.llm import KVCache, Qwen3ForCausalLM, RMSNorm, attention_mask_for, rope_cos_sin

transformers = pytest.importorskip("transformers")
from transformers import Qwen3Config  # noqa: E402
from transformers import Qwen3ForCausalLM as HFQwen3  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding  # noqa: E402

CFG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=4096)


def hf_config(cfg: LLMConfig = CFG) -> Qwen3Config:
    return Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
                       attn_implementation="eager")


@pytest.fixture(scope="module")
def pair():
    """(HF reference, ours) with identical random weights. Norm weights are randomised too (HF inits them to 1,
    which would hide a q_norm/k_norm mix-up); scales keep logits O(1) so bf16 errors are representative."""
    torch.manual_seed(0)
    hf = HFQwen3(hf_config()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    ours = Qwen3ForCausalLM(CFG).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def padded_batch(side: str, B: int = 3, T: int = 12, seed: int = 1):
    """Random ids and a padding mask with rows of different lengths padded on `side` (row 0 is unpadded). "middle"
    puts a hole inside rows: the only case where the default positions (cumsum of the mask) change the result,
    since RoPE is invariant to shifting all positions of a row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n_pad in enumerate([0, 5, T - 1][:B]):
        if side == "left":
            mask[b, :n_pad] = 0
        elif side == "right":
            mask[b, T - n_pad:] = 0
        elif side == "middle":
            mask[b, 1:1 + n_pad] = 0
    return ids, mask


def hf_logits(hf, ids, mask=None, position_ids=None):
    if position_ids is None and mask is not None:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits


# ---- checkpoint layout ------------------------------------------------------------------------------------------

def test_state_dict_keys_are_the_released_llm_keys(reference_dir):
    with torch.device("meta"):
        model = Qwen3ForCausalLM(LLMConfig())
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    released = {k[len("llm."):] for k in index if k.startswith("llm.")}
    assert set(model.state_dict()) == released
    # docs/reference.md 2.5: llm parameter count, and per-tensor shapes from docs/reference.md 3
    assert sum(p.numel() for p in model.parameters()) == 8_189_195_264
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (1024, 4096)
    assert sd["model.layers.35.self_attn.q_norm.weight"].shape == (128,)
    assert sd["lm_head.weight"].shape == (151748, 4096)
    assert sd["lm_head.weight"] is not sd["model.embed_tokens.weight"]


# ---- components, bit-exact in bf16 ----------------------------------------------------------------------------

def test_rmsnorm_matches_reference_bitwise_in_bf16():
    ref = Qwen3RMSNorm(64, eps=1e-6)
    ours = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_(1, 0.3)
        ours.weight.copy_(ref.weight)
    x = torch.randn(2, 7, 64) * 3
    ref, ours, x = ref.to(torch.bfloat16), ours.to(torch.bfloat16), x.to(torch.bfloat16)
    assert torch.equal(ours(x), ref(x))


def test_rope_cos_sin_match_reference_at_long_positions():
    rotary = Qwen3RotaryEmbedding(hf_config(LLMConfig(head_dim=128)))  # released theta 1e6, head_dim 128
    pos = torch.tensor([[0, 1, 2, 4095, 20000, 40959]])
    for dtype in (torch.float32, torch.bfloat16):
        cos_ref, sin_ref = rotary(torch.zeros(1, dtype=dtype), pos)
        cos, sin = rope_cos_sin(pos, 128, 1_000_000.0, dtype)
        assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


# ---- fp32 parity with the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right", "middle"])
def test_logits_match_reference_with_padding(pair, side):
    hf, ours = pair
    ids, mask = padded_batch(side)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
    ref = hf_logits(hf, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all(), "pad positions must not produce NaN/inf"


def test_no_mask_and_inputs_embeds_match_reference(pair):
    hf, ours = pair
    ids, _ = padded_batch("left")
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref, rtol=1e-5, atol=1e-5)
        emb = ours.model.embed_tokens(ids)
        torch.testing.assert_close(ours(inputs_embeds=emb), ref, rtol=1e-5, atol=1e-5)
        # the composed model applies lm_head itself to the positions it needs
        torch.testing.assert_close(ours.lm_head(ours.model(ids)[:, -1]), ref[:, -1], rtol=1e-5, atol=1e-5)


def test_explicit_position_ids_match_reference(pair):
    hf, ours = pair
    ids, mask = padded_batch("left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + 1000
    ref = hf_logits(hf, ids, mask, pos)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_padding_mask_never_leaves_a_query_row_empty():
    """Some SDPA kernels return NaN for a query row with no visible key (a left-pad query sees only pads); the
    mask gives every row at least its own key. Real rows must see exactly the causal real keys."""
    key_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for past in (0, 2):
        mask = attention_mask_for(key_mask, past, 6 - past)[:, 0]  # [B, T, S]
        assert mask.any(-1).all()
        q = torch.arange(past, 6)[:, None]
        expected = (torch.arange(6)[None] <= q) & key_mask[:, None, :]
        real = key_mask[:, past:]
        assert torch.equal(mask[real], expected[real])


# ---- KV cache -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side,pass_mask", [("left", False), ("left", True), ("none", False)])
def test_incremental_decoding_matches_full_forward_and_reference(pair, side, pass_mask):
    """Prefill a prompt, one 3-token chunk, then single tokens; compare every position. Without pass_mask the
    cache must remember the prompt's padding; "none" exercises the unpadded causal-with-offset path."""
    hf, ours = pair
    prompt, pmask = padded_batch(side, T=10)
    B, n_new = prompt.shape[0], 6
    new = torch.randint(0, CFG.vocab_size, (B, n_new), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([prompt, new], 1)
    mask = torch.cat([pmask, torch.ones(B, n_new, dtype=torch.long)], 1)
    real = mask.bool()
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache(B, max_len=ids.shape[1])
        steps = [ours(prompt, attention_mask=pmask, cache=cache)]
        t = prompt.shape[1]
        for n in [3] + [1] * (n_new - 3):
            steps.append(ours(ids[:, t:t + n], attention_mask=mask[:, :t + n] if pass_mask else None, cache=cache))
            t += n
    inc = torch.cat(steps, 1)
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(inc[real], full[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inc[real], hf_logits(hf, ids, mask)[real], rtol=1e-5, atol=1e-5)


def test_cache_select_keeps_and_reorders_rows(pair):
    hf, ours = pair
    prompt, pmask = padded_batch("left", T=8)
    nxt = torch.randint(0, CFG.vocab_size, (3, 2), generator=torch.Generator().manual_seed(3))
    rows = [2, 0]  # drop row 1, swap the others
    with torch.no_grad():
        cache = ours.new_cache(3, max_len=10)
        ours(prompt, attention_mask=pmask, cache=cache)
        cache.select(rows)
        out = torch.cat([ours(nxt[rows, i:i + 1], cache=cache) for i in range(2)], 1)
    ids = torch.cat([prompt, nxt], 1)[rows]
    mask = torch.cat([pmask, torch.ones(3, 2, dtype=torch.long)], 1)[rows]
    torch.testing.assert_close(out, hf_logits(hf, ids, mask)[:, -2:], rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_asserted(pair):
    _, ours = pair
    cache = KVCache(CFG, batch_size=1, max_len=5)
    with torch.no_grad():
        ours(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(AssertionError, match=r"KVCache overflow: 4 \+ 2 > max_len 5"):
            ours(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    assert cache.length == 4  # the failed call changed nothing


def test_shape_contracts_are_asserted(pair):
    """Each of these would otherwise broadcast or be ignored silently (ids beside embeds, a [1, ...] tensor over B)."""
    _, ours = pair
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(AssertionError, match="exactly one of input_ids"):
        ours(ids, inputs_embeds=torch.zeros(2, 4, CFG.hidden_size))
    with pytest.raises(AssertionError, match=r"attention_mask \(1, 4\), past 0"):
        ours(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(AssertionError, match="batch 2, KVCache rows 1"):
        ours(ids, cache=KVCache(CFG, 1, 8))
    with pytest.raises(AssertionError, match=r"position_ids \(2, 1\), x 2x4"):
        ours(ids, position_ids=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(AssertionError, match=r"rows \[-1\] of 2"):
        KVCache(CFG, 2, 8).select([-1])
    with pytest.raises(AssertionError, match="segment_ids take no KVCache"):
        ours.model(ids, segment_ids=torch.ones(2, 4), cache=KVCache(CFG, 2, 8))
    with pytest.raises(AssertionError, match=r"segment_ids \(1, 4\), x 2x4"):
        ours.model(ids, segment_ids=torch.ones(1, 4))


# ---- bf16 -----------------------------------------------------------------------------------------------------

def test_bf16_logits_close_to_reference_bf16(pair):
    """Both bf16 runs round the same fp32 function; they differ only in kernel rounding (SDPA vs eager attention,
    ~2^-8 relative per op), so our distance to HF-bf16 must stay within HF-bf16's own distance to fp32 (the bf16
    noise floor, x1.5 slack). Positions near 20k make RoPE precision matter: cos/sin built from bf16 angles would
    be off by ~0.3 on average here, far past this bound."""
    hf, ours = pair
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    hf_bf16.model.rotary_emb.inv_freq = hf.model.rotary_emb.inv_freq.clone()  # from_pretrained keeps it fp32
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    ids, mask = padded_batch("left", B=3, T=48)
    pos = (mask.cumsum(-1) - 1).clamp(min=0) + 20000
    real = mask.bool()
    ref32 = hf_logits(hf, ids, mask, pos)[real]
    ref16 = hf_logits(hf_bf16, ids, mask, pos).float()[real]
    with torch.no_grad():
        out = ours_bf16(ids, attention_mask=mask, position_ids=pos)
    assert out.dtype == torch.bfloat16
    out = out.float()[real]
    floor_max, floor_mean = (ref16 - ref32).abs().max(), (ref16 - ref32).abs().mean()
    assert (out - ref16).abs().max() <= 1.5 * floor_max
    assert (out - ref16).abs().mean() <= 1.5 * floor_mean
    assert (out - ref32).abs().mean() <= 1.5 * floor_mean


# ---- training -------------------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_same_gradients(pair):
    _, ref = pair
    ids, mask = padded_batch("right")
    labels = ids.masked_fill(mask == 0, -100)

    def grads(checkpointing: bool):
        model = copy.deepcopy(ref).train()
        model.model.gradient_checkpointing = checkpointing
        calls = []
        model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        logits = model(ids, attention_mask=mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)

    loss0, g0, calls0 = grads(False)
    loss1, g1, calls1 = grads(True)
    assert (calls0, calls1) == (1, 2), "checkpointing must recompute each layer in backward"
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
