"""Smoke and property tests of tstar.py on tiny models, CPU only. Run: pytest -q

Each test names the property it checks and fails if that property breaks."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

import tstar

HERE = Path(__file__).parent
FIXTURE = HERE.parent / "shared" / "fixtures" / "sdar-tiny"


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised tiny model (fp32) and its character tokenizer."""
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    return model, tok


def sample_kwargs(tok, **overrides):
    kw = dict(mask_id=tok.mask_token_id, stop_ids=[tok.eos_token_id], block_size=4, max_new_tokens=24)
    kw.update(overrides)
    return kw


PROMPTS = ["a3 b7=", "a1=", "a3 b7 c1 d5 e9=", "x", "a0 b9 c2="]


# ------------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("offset", [0, 2])
@pytest.mark.parametrize("remasking", ["static", "dynamic", "ass"])
def test_greedy_output_is_the_same_alone_and_in_a_mixed_length_batch(tiny, offset, remasking):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    batch = tstar.generate(model, prompts, **sample_kwargs(tok, offset=offset, remasking=remasking))
    for p, together in zip(prompts, batch):
        alone = tstar.generate(model, [p], **sample_kwargs(tok, offset=offset, remasking=remasking))[0]
        assert alone.ids == together.ids
        assert alone.step_map == together.step_map
        assert alone.nfe == together.nfe


def test_kv_cache_matches_full_forward(tiny):
    """Logits of a noisy block computed from the cache of finished blocks equal those of one forward
    over [clean prefix | noisy block] under the block mask (fp32, max abs diff <= 1e-5)."""
    model, tok = tiny
    B, offset = 4, 2
    torch.manual_seed(1)
    prefix = torch.randint(3, 98, (2, 10))                       # two rows, positions 0..9 clean
    block = torch.randint(3, 98, (2, B))                         # positions 10..13, some masked
    block[:, 1::2] = tok.mask_token_id
    pos = torch.arange(10 + B).expand(2, -1)
    noisy = torch.arange(10 + B).expand(2, -1) >= 10
    valid = torch.ones(2, 10 + B, dtype=torch.bool)
    with torch.no_grad():
        full_mask = tstar.block_attention_mask(pos, noisy, pos, noisy, valid, B, offset)
        full = model(input_ids=torch.cat([prefix, block], 1), position_ids=pos, attention_mask=full_mask).logits[:, 10:]
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
        pre_mask = tstar.block_attention_mask(pos[:, :10], noisy[:, :10], pos[:, :10], noisy[:, :10], valid[:, :10], B, offset)
        tstar.hidden_states(model, prefix, pos[:, :10], pre_mask, cache)
        step_mask = tstar.block_attention_mask(pos[:, 10:], noisy[:, 10:], pos, noisy, valid, B, offset)
        cached = model.lm_head(tstar.hidden_states(model, block, pos[:, 10:], step_mask, cache))
    assert (full - cached).abs().max().item() <= 1e-5


@pytest.mark.parametrize("offset", [0, 2])
def test_cached_and_uncached_sampling_agree(tiny, offset):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    a = tstar.generate(model, prompts, **sample_kwargs(tok, offset=offset))
    b = tstar.generate(model, prompts, **sample_kwargs(tok, offset=offset), kv_cache=False)
    assert [g.ids for g in a] == [g.ids for g in b]
    assert [g.step_map for g in a] == [g.step_map for g in b]


@pytest.mark.parametrize("remasking", ["static", "dynamic", "ass"])
@pytest.mark.parametrize("B", [1, 3, 4, 8])
def test_no_mask_left_every_step_commits_and_nfe_matches_step_map(tiny, remasking, B):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    for offset in sorted({0, B // 2}):
        gens = tstar.generate(model, prompts, **sample_kwargs(tok, block_size=B, offset=offset, remasking=remasking,
                                                             temperature=1.0),
                              generator=torch.Generator().manual_seed(0))
        for g in gens:
            assert tok.mask_token_id not in g.ids
            assert len(g.ids) == len(g.step_map) == len(g.logprobs)
            assert sorted(set(g.step_map)) == list(range(1, g.nfe + 1))     # every step committed something
            assert max(g.step_map) == g.nfe


def test_stopped_rows_end_after_the_block_with_the_stop_token(tiny):
    model, tok = tiny
    # with every token a stop token, each row stops after its first block
    gens = tstar.generate(model, [tok.encode(p) for p in PROMPTS],
                          **sample_kwargs(tok, stop_ids=list(range(len(tok)))))
    for p, g in zip(PROMPTS, gens):
        assert g.stopped and g.n_tokens == 1
        first_block_end = tstar.block_start(len(p), 4) + 4
        assert len(g.ids) == first_block_end - len(p)


def test_dynamic_with_an_unreachable_threshold_equals_static(tiny):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    for B, K in ((4, 4), (8, 3)):
        static = tstar.generate(model, prompts, **sample_kwargs(tok, block_size=B, steps=K, remasking="static"))
        dynamic = tstar.generate(model, prompts, **sample_kwargs(tok, block_size=B, steps=K, remasking="dynamic",
                                                                threshold=1.5))
        assert [g.ids for g in static] == [g.ids for g in dynamic]
        assert [g.step_map for g in static] == [g.step_map for g in dynamic]


def test_one_token_per_step_gives_tpf_exactly_one(tiny):
    model, tok = tiny
    gens = tstar.generate(model, [tok.encode(p) for p in PROMPTS],
                          **sample_kwargs(tok, block_size=8, steps=8, threshold=1.5, max_new_tokens=20))
    assert tstar.tokens_per_forward([len(g.ids) for g in gens], [g.nfe for g in gens]) == 1.0


def test_step_quotas_hand_worked():
    q = tstar.step_quotas(torch.tensor([4, 7, 2, 1]), 4, "static")
    assert q.tolist() == [[1, 1, 1, 1], [2, 2, 2, 1], [1, 1, 0, 0], [1, 0, 0, 0]]


# ------------------------------------------------------------------------------------------------ block mask


def test_block_mask_hand_worked_offset_0():
    # B=2: clean positions 0..3 (blocks 0 0 1 1), then a noisy copy of positions 2..3 (block 1)
    pos = torch.tensor([[0, 1, 2, 3, 2, 3]])
    noisy = torch.tensor([[0, 0, 0, 0, 1, 1]]).bool()
    m = tstar.block_attention_mask(pos, noisy, pos, noisy, torch.ones(1, 6, dtype=torch.bool), 2, 0)[0, 0]
    expected = [[1, 1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [1, 1, 0, 0, 1, 1],
                [1, 1, 0, 0, 1, 1]]
    assert m.int().tolist() == expected


def test_block_mask_hand_worked_offset_half_block():
    # B=2, offset 1: blocks are [0], [1 2], [3]; clean 0..3, then a noisy copy of positions 1..3
    pos = torch.tensor([[0, 1, 2, 3, 1, 2, 3]])
    noisy = torch.tensor([[0, 0, 0, 0, 1, 1, 1]]).bool()
    m = tstar.block_attention_mask(pos, noisy, pos, noisy, torch.ones(1, 7, dtype=torch.bool), 2, 1)[0, 0]
    expected = [[1, 0, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0],
                [1, 0, 0, 0, 1, 1, 0],
                [1, 0, 0, 0, 1, 1, 0],
                [1, 1, 1, 0, 0, 0, 1]]
    assert m.int().tolist() == expected


def test_block_mask_padding_is_never_seen_and_sees_only_itself():
    pos = torch.tensor([[0, 1, 2, 0]])
    noisy = torch.zeros(1, 4, dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 0]]).bool()
    m = tstar.block_attention_mask(pos, noisy, pos, noisy, valid, 4, 0)[0, 0]
    assert m[:, 3].int().tolist() == [0, 0, 0, 1]
    assert m[3].int().tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------------------------------------ metrics


def test_local_strict_and_tpf_hand_worked():
    # B=4, prompt of 2: response positions 2..9, blocks [2 3 | 4 5 6 7 | 8 9]
    steps = [1, 2, 3, 3, 5, 4, 6, 6]
    # pairs inside a block: (1,2) ok | (3,3) ok (3,5) ok (5,4) no | (6,6) ok  -> 4 of 5
    assert tstar.local_strict([steps], [2], 4) == pytest.approx(4 / 5)
    # offset 2: blocks [2 3 4 5 | 6 7 8 9]: (1,2)(2,3)(3,3) ok | (4,6) ok (6,6) ok -> 5 of 6 with (5,4) no
    assert tstar.local_strict([steps], [2], 4, offset=2) == pytest.approx(5 / 6)
    assert tstar.tokens_per_forward([8, 4], [6, 4]) == pytest.approx(12 / 10)
    assert tstar.pass_at_k(3, 1, 3) == 1.0 and tstar.pass_at_k(3, 0, 3) == 0.0
    assert tstar.pass_at_k(4, 2, 1) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/sdar-tiny is absent (a user's clone has no ../shared)")
def test_sdar_fixture_loads_as_qwen3_and_generates():
    model, tok = tstar.load_model_and_tokenizer(str(FIXTURE))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tok.mask_token_id == 151669
    assert tstar.stop_token_ids(model, tok) == [151643, 151645]
    prompt = tstar.encode_prompt(tok, "What is 1+1?")
    gens = tstar.generate(model, [prompt, prompt[:5]], mask_id=tok.mask_token_id,
                          stop_ids=tstar.stop_token_ids(model, tok), block_size=4, max_new_tokens=12)
    for g in gens:
        assert len(g.ids) >= 1 and tok.mask_token_id not in g.ids
        assert max(g.step_map) == g.nfe


def test_warm_start_lowers_the_loss(tiny):
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    data = tstar.toy_splits(64, 8, 0)["train"]
    prompts = [torch.tensor(tok.encode(q)) for q in data["question"][:16]]
    answers = [torch.tensor(tok.encode(a) + [tok.eos_token_id]) for a in data["answer"][:16]]

    def loss():
        with torch.no_grad():
            return tstar.block_diffusion_loss(model, prompts, answers, 4, tok.mask_token_id, tok.eos_token_id,
                                              torch.Generator().manual_seed(123)).item()
    before = loss()
    cfg = tstar.Config(warm_start_steps=30, warm_start_batch=16, warm_start_lr=3e-3)
    tstar.warm_start(model, tok, data[:], cfg, "cpu")
    assert loss() < 0.7 * before
