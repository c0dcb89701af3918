"""Smoke and property tests of tstar.py on tiny models, CPU only. Run: pytest -q

Each test names the property it checks and fails if that property breaks."""

import dataclasses
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tstar

HERE = Path(__file__).parent
FIXTURE = HERE.parent / "shared" / "fixtures" / "sdar-tiny"
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")      # (e.g. a renamed transformers argument)


def torchrun(n, script, *args, timeout=300, threads=None):
    """Run `script` under torchrun with n processes on a free port (--standalone: two test runs side by side
    never clash); returns the finished process."""
    env = {**os.environ, "PYTHONPATH": str(HERE), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(script),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=env)


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
                          **sample_kwargs(tok, stop_ids=list(range(model.config.vocab_size))))
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
    assert tstar.tokens_per_forward(sum(len(g.ids) for g in gens), sum(g.nfe for g in gens)) == 1.0


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
STOPS = list(range(3, 30))      # a fifth of the tiny vocabulary: rows of a random model stop at different blocks


def decode(model, tok, prompts, rows=None, graphs=False, **overrides):
    """(ids, step_map, nfe) of every row, decoded `rows` at a time through one Decoder (None: plain)."""
    kw = sample_kwargs(tok, **{"stop_ids": STOPS, "max_new_tokens": 40, **overrides})
    if rows is None:
        gens = tstar.generate(model, prompts, **kw)
    else:
        gens = tstar.Engine(model, tok, next(model.parameters()).dtype, rows, graphs).generate(prompts, **kw)
    return [(g.ids, g.step_map, g.nfe, g.n_tokens, g.stopped) for g in gens]


def many_prompts(tok, n=16):
    return [tok.encode(PROMPTS[i % len(PROMPTS)] * (1 + i % 3)) for i in range(n)]


@pytest.mark.parametrize("offset", [0, 2])
def test_greedy_output_is_the_same_whatever_the_rollout_batch_and_with_static_shapes(tiny, offset):
    """Rows decoded 1, 3 or 16 at a time, and with the fixed shapes of the CUDA-graph path (row buckets padded
    with finished rows, key lengths in buckets), give the same tokens as one plain call. The rows stop at
    different blocks, so finished rows are masked out and compacted along the way."""
    model, tok = tiny
    prompts = many_prompts(tok)
    plain = decode(model, tok, prompts, offset=offset)
    assert len({len(ids) for ids, *_ in plain}) >= 3                 # rows finish at different blocks
    for rows, graphs in ((1, False), (3, False), (16, False), (16, True), (5, True)):
        assert decode(model, tok, prompts, rows, graphs, offset=offset) == plain, (rows, graphs)


def test_kv_cache_is_allocated_once_and_compacted_only_when_half_the_rows_are_done(tiny, monkeypatch):
    model, tok = tiny
    prompts = many_prompts(tok)
    moves, allocations = [], []
    keep_rows, init = tstar.KVCache.keep_rows, tstar.KVCache.__init__
    monkeypatch.setattr(tstar.KVCache, "keep_rows", lambda self, keep: (moves.append(len(keep)), keep_rows(self, keep)))
    monkeypatch.setattr(tstar.KVCache, "__init__", lambda self, *a, **k: (allocations.append(1), init(self, *a, **k))[-1])
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, max_new_tokens=40))
    assert allocations == [1]
    assert moves and all(b <= a // 2 for a, b in zip([16] + moves, moves))   # each compaction halves the rows
    assert len(moves) <= 4 and len({len(g.ids) for g in gens}) > len(moves) + 1


def test_the_last_block_is_decoded_whole_and_the_response_cut_at_the_limit():
    """SDAR rounds the length up to whole blocks: with a prompt of 4 and max_new_tokens 6 at B=4 the sampler
    decodes two full blocks (8 tokens, each block from 4 masks), then cuts the response at 6. A stop token
    at the 8th position is past the cut: the response counts as cut by the limit."""
    V, stop = 6, 5
    table = torch.full((12, V), -20.0)
    for pos in range(4, 12):                         # each position: one likely token, its own confidence
        table[pos, 1 + pos % 3] = 5.0 - 0.1 * pos
    table[11, stop] = 9.0                            # position 11 (response token 8) is a stop token
    model = FixedLogits(table)
    kw = dict(mask_id=0, stop_ids=[stop], block_size=4, steps=4, remasking="static", max_new_tokens=6,
              kv_cache=False)
    g = tstar.generate(model, [[1, 2, 3, 1]], **kw)[0]
    assert len(g.ids) == 8 and g.ids[-1] == stop
    assert g.n_tokens == 6 and not g.stopped
    assert sorted(g.step_map[4:]) == [5, 6, 7, 8]    # the last block: 4 masks, one committed per step
    longer = tstar.generate(model, [[1, 2, 3, 1]], **{**kw, "max_new_tokens": 8})[0]
    assert longer.ids == g.ids and longer.stopped and longer.n_tokens == 8


@CUDA
def test_greedy_generation_on_cuda_equals_the_cpu_tokens_and_graphs_equal_eager(tiny):
    model, tok = tiny
    prompts = many_prompts(tok)
    cpu = decode(model, tok, prompts)
    gpu = model.to("cuda")
    try:
        assert decode(gpu, tok, prompts) == cpu                          # fp32 on cuda
        assert decode(gpu, tok, prompts, 16) == cpu                      # one decoder, in-place cache
        assert decode(gpu, tok, prompts, 5, graphs=True) == cpu          # captured CUDA graphs
    finally:
        model.to("cpu")


@CUDA
@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/sdar-tiny is absent")
def test_cuda_graphs_give_the_eager_tokens_in_bf16_on_the_sdar_fixture():
    model, tok = tstar.load_model_and_tokenizer(str(FIXTURE), "cuda", torch.bfloat16)
    prompts = [tstar.encode_prompt(tok, q) for q in ("What is 1+1?", "Name a prime.", "Say hi", "2*3=?")]
    kw = dict(mask_id=tok.mask_token_id, stop_ids=tstar.stop_token_ids(model, tok), block_size=4,
              max_new_tokens=24)
    eager = tstar.Engine(model, tok, torch.bfloat16, 4).generate(prompts, **kw)
    graphs = tstar.Engine(model, tok, torch.bfloat16, 4, graphs=True).generate(prompts, **kw)
    assert [g.ids for g in eager] == [g.ids for g in graphs]
    assert [g.step_map for g in eager] == [g.step_map for g in graphs]


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


def test_the_packed_layout_and_its_mask_are_section_5s_worked_example():
    """B = 2, prompt "ab", response x y z w with step map [1 2 | 3 3]: copies c1 (block 1, round 1), c2 (block 2,
    round 1), c3 (block 1, round 2, x visible), and the mask of the picture in section 5."""
    a, b, x, y, z, w, M = 10, 11, 20, 21, 22, 23, 1
    g = tstar.Generation(ids=[x, y, z, w], step_map=[1, 2, 3, 3], logprobs=[0.0] * 4, nfe=3, n_tokens=4, stopped=True,
                         prompt_len=2, offset=0)
    tb = tstar.build_trace_batch([[a, b]], [g], [0], 2, 0, 1, M)
    assert tb.ids[0].tolist() == [a, b, x, y, z, w, M, M, M, M, x, M]
    assert tb.pos[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3]
    assert tb.noisy[0].tolist() == [0] * 6 + [1, 1, 2, 2, 3, 3]
    assert tb.col.tolist() == [6, 8, 9, 11] and tb.label.tolist() == [x, z, w, y] and tb.round.tolist() == [0, 0, 0, 1]
    pos, noisy = tb.pos[0][None], tb.noisy[0][None]
    mask = tstar.block_attention_mask(pos, noisy, pos, noisy, torch.ones_like(noisy, dtype=torch.bool), 2)[0, 0]
    picture = ["11..........", "11..........", "1111........", "1111........", "111111......", "111111......",
               "11....11....", "11....11....", "1111....11..", "1111....11..", "11........11", "11........11"]
    assert ["".join(".1"[int(v)] for v in row) for row in mask] == picture


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
    assert tstar.local_strict([steps], [2], 4) == (4, 5)
    # offset 2: blocks [2 3 4 5 | 6 7 8 9]: (1,2)(2,3)(3,3) ok | (4,6) ok (6,6) ok -> 5 of 6 with (5,4) no
    assert tstar.local_strict([steps], [2], 4, offset=2) == (5, 6)
    assert tstar.tokens_per_forward(12, 10) == pytest.approx(12 / 10) and tstar.tokens_per_forward(3, 0) == 3.0
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


# ------------------------------------------------------------------------------------------------ TraceRL


def show_rounds(targets, masked, block_size, offset=0):
    """Render rounds as in design.md: P target, M masked, . visible, blocks separated by spaces."""
    L = targets.shape[1]
    blocks = tstar.block_index(torch.arange(L), block_size, offset)
    out = []
    for t, m in zip(targets, masked):
        s = ""
        for i in range(L):
            if i and blocks[i] != blocks[i - 1]:
                s += " "
            s += "P" if t[i] else "M" if m[i] else "."
        out.append(s)
    return out


def test_trace_rounds_reproduce_the_hand_worked_example():
    s = [1, 1, 2, 1, 3, 5, 4, 6, 7, 7, 7, 7]
    assert show_rounds(*tstar.trace_rounds(s, 4), 4) == ["PPMP PMMM PPPP", "..P. .MPM ....", ".... .P.M ....",
                                                         ".... ...P ...."]
    # shrink 2: runs of two consecutive steps of a block become one round
    assert show_rounds(*tstar.trace_rounds(s, 4, shrink=2), 4) == ["PPPP PMPM PPPP", ".... .P.P ...."]
    # offset 2: blocks are [1 1 | 2 1 3 5 | 4 6 7 7 | 7 7]
    assert show_rounds(*tstar.trace_rounds(s, 4, offset=2), 4, 2) == [
        "PP MPMM PMMM PP", ".. P.MM .PMM ..", ".. ..PM ..PP ..", ".. ...P .... .."]


def test_a_trace_batch_takes_its_rounds_from_trace_rounds_with_the_given_shrink():
    s = [1, 1, 2, 1, 3, 5, 4, 6, 7, 7, 7, 7]                    # the hand-worked step map above: 4 rounds, or 2
    g = tstar.Generation(ids=list(range(5, 17)), step_map=s, logprobs=[0.0] * 12, nfe=7, n_tokens=12, stopped=True,
                         prompt_len=0, offset=0)
    for shrink, n_copies in ((1, 2 + 4 + 1), (2, 1 + 2 + 1)):      # per block: its rounds (block 2: 4, or 2)
        tb = tstar.build_trace_batch([[]], [g], [0], 4, 0, shrink, 1)
        round_of = tstar.trace_rounds(s, 4, shrink=shrink)[0].int().argmax(0)           # (L,) each token's round
        assert len(tb.ids) == 1 and int(tb.noisy[0].max()) == n_copies and len(tb.ids[0]) == 12 + 4 * n_copies
        assert tb.round.tolist() == round_of[tb.token].tolist()


def per_round_trace_batch(prompts, gens, samples, block_size, offset, shrink, mask_id):
    """The obvious layout beside section 5's packed one: one sequence per (sample, round), [prompt | clean response
    | noisy copy of every block], the warm start's diffusion_layout with the round's masks."""
    seqs, targets = [], []
    for j in samples:
        g = gens[j]
        response = torch.tensor(g.ids, dtype=torch.long)
        tgt, masked = tstar.trace_rounds(g.step_map, block_size, offset, g.prompt_len, shrink)      # (R, L)
        ids, pos, noisy, col = tstar.diffusion_layout(torch.tensor(prompts[j], dtype=torch.long), response, masked,
                                                      block_size, offset, mask_id)
        for r in range(len(tgt)):
            i = tgt[r].nonzero()[:, 0]
            seqs.append((ids[r], pos[r], noisy[r]))
            targets.append(torch.stack([col[i], torch.full_like(i, j), i, torch.full_like(i, r)], 1))
    col, sample, token, rnd = torch.cat(targets).unbind(1)
    field = lambda name, dtype: torch.tensor([getattr(gens[j], name)[i] for j, i in zip(sample.tolist(), token.tolist())],  # noqa: E731
                                             dtype=dtype)
    counts = torch.tensor([len(t) for t in targets])
    return tstar.TraceBatch([a for a, _, _ in seqs], [b for _, b, _ in seqs], [c for _, _, c in seqs],
                            torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), col,
                            field("ids", torch.long), sample, token, rnd, field("step_map", torch.long),
                            field("logprobs", torch.float))


def scored(model, head, tb, B, offset, pad_id):
    """{(sample, token): (log-prob, entropy, value)} of every target of a TraceBatch, in micro-batches of 512 tokens."""
    out = {}
    chunks = tstar.micro_batches(tb, range(len(tb.ids)), (512, 10 ** 6))
    with torch.no_grad():
        for tgt, logp, values, ent in tstar.forward_sequences(model, head, tb, chunks, B, offset, pad_id, entropy=True):
            for k, t in enumerate(tgt.tolist()):
                out[int(tb.sample[t]), int(tb.token[t])] = (float(logp[k]), float(ent[k]), float(values[k]))
    return out


@pytest.mark.parametrize("shrink", [1, 2])
@pytest.mark.parametrize("source,B", [("tiny", 8), ("fixture", 4)])
def test_the_packed_layout_gives_every_target_the_log_prob_entropy_and_value_of_the_per_round_layout(source, B, shrink):
    """Section 5's packed layout against one sequence per (sample, round), at offsets 0 and B/2, prompts of mixed
    lengths, rows stopping at different blocks: every target's log-prob, entropy and value agree to 1e-5 (fp32),
    on fewer tokens; and cut into several sequences by a small budget, the same again."""
    if source == "fixture" and not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures/sdar-tiny is absent")
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json" if source == "tiny" else FIXTURE))
    head = tstar.new_value_head(model)
    torch.nn.init.normal_(head.weight)
    questions = PROMPTS if source == "tiny" else ["What is 1+1?", "Name a prime number below twenty, please.", "Hi"]
    prompts = [tstar.encode_prompt(tok, q) for q in questions for _ in range(2)]
    stops = STOPS if source == "tiny" else [IM_END]
    for offset in (0, B // 2):
        gens = tstar.Engine(model, tok, torch.float32, 16).generate(
            prompts, generator=torch.Generator().manual_seed(offset), stop_ids=stops, block_size=B, offset=offset,
            temperature=1.0, threshold=0.5 if source == "tiny" else 0.9, max_new_tokens=3 * B)
        assert len({len(g.ids) for g in gens}) > 1 and any(len(set(g.step_map)) > 2 for g in gens)
        args = (prompts, gens, range(len(gens)), B, offset, shrink, tok.mask_token_id)
        packed, per_round = tstar.build_trace_batch(*args), per_round_trace_batch(*args)
        want = scored(model, head, per_round, B, offset, tok.eos_token_id)
        assert len(packed.ids) == len(gens) and sum(map(len, packed.ids)) < sum(map(len, per_round.ids))
        for tb in (packed, tstar.build_trace_batch(*args, budget=(2 * max(map(len, prompts)) + 5 * B, 10 ** 6))):
            got = scored(model, head, tb, B, offset, tok.eos_token_id)
            assert got.keys() == want.keys() and len(want) == sum(len(g.ids) for g in gens)
            assert max(abs(a - b) for k in want for a, b in zip(got[k], want[k])) <= 1e-5
        assert len(tb.ids) > len(gens)                            # (the small budget cut samples into pieces)


def test_tiled_attention_gives_the_dense_attentions_log_probs_and_gradients_and_skips_masked_tiles(tiny, monkeypatch):
    """A long packed sequence (two samples padded into one batch) through the trainer's forward: with tiles of 16
    queries (tiled_sdpa) the log-probs and the gradient of the weights equal one dense attention's (fp32), while
    the key tiles each query tile attends to are a fraction of all."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS[2:4]]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, block_size=8, temperature=1.0, max_new_tokens=48),
                          generator=torch.Generator().manual_seed(0))
    tb = tstar.build_trace_batch(prompts, gens, [0, 1], 8, 0, 1, tok.mask_token_id)
    assert min(map(len, tb.ids)) > 4 * 16

    def forward(tile):
        monkeypatch.setitem(tstar.ATTENTION_TILE, "cpu", tile)
        model.zero_grad()
        (_, logp, _, _), = tstar.forward_sequences(model, None, tb, [[0, 1]], 8, 0, tok.eos_token_id)
        logp.sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters()]
    (dense, dense_grads), (tiled, tiled_grads) = forward(10 ** 6), forward(16)
    assert (tiled - dense).abs().max() <= 1e-5
    assert max((a - b).abs().max() for a, b in zip(tiled_grads, dense_grads)) <= 1e-5
    ids, pos, noisy, valid = tstar.pad_rows(tb.ids, tb.pos, tb.noisy, tok.eos_token_id)
    tiles = tstar.key_tiles(tstar.block_attention_mask(pos, noisy, pos, noisy, valid, 8, 0), 16)
    assert sum(map(len, tiles)) < 0.75 * len(tiles) * ids.shape[1]           # (masked tiles skipped)
    model.zero_grad()


@pytest.mark.parametrize("advantage", ["gae", "group"])
def test_one_ppo_step_on_the_packed_layout_moves_the_weights_as_on_the_per_round_layout(tiny, monkeypatch, advantage):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS[:3] for _ in range(4)]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0, threshold=0.5),
                          generator=torch.Generator().manual_seed(2))
    ro = tstar.Rollouts(prompts, gens, torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), 4, 0)
    weights = {}
    for layout in ("packed", "per round"):
        torch.manual_seed(0)
        policy, _ = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
        head = tstar.new_value_head(policy)
        opt = torch.optim.SGD([{"params": policy.parameters(), "lr": 0.5}, {"params": head.parameters(), "lr": 0.5}])
        if layout == "per round":
            monkeypatch.setattr(tstar, "build_trace_batch", lambda *a: per_round_trace_batch(*a[:7]))
        tstar.ppo_update(policy, head, opt, ro, rl_config(group_size=4, grad_clip=100.0, advantage=advantage),
                         tok.mask_token_id, tok.eos_token_id, torch.Generator().manual_seed(0))
        weights[layout] = {**policy.state_dict(), **{"head." + k: v for k, v in head.state_dict().items()}}
    start = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))[0].state_dict()
    a, b = weights.values()
    assert max((a[k] - start[k]).abs().max() for k in start) > 1e-3                     # the step moved the weights
    assert max((a[k] - b[k]).abs().max() for k in a) <= 1e-6


@pytest.mark.parametrize("threshold", [0.9, 0.008])      # (the random tiny model is ~1/128 confident)
@pytest.mark.parametrize("B,offset", [(4, 0), (4, 2), (8, 0), (8, 4)])
def test_training_layout_reproduces_the_sampler_logprobs(tiny, B, offset, threshold):
    """Trajectory consistency: before any update, the log-prob of every target in the training layout
    equals the log-prob the sampler computed when it committed that token (fp32, within 1e-4). With a low
    tau many steps commit several tokens at once; an empty prompt is decoded too."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS + [""]]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, block_size=B, offset=offset, temperature=1.0,
                                                          threshold=threshold),
                          generator=torch.Generator().manual_seed(3))
    if threshold < 0.5:
        assert sum(len(g.step_map) - len(set(g.step_map)) for g in gens) > len(gens)    # shared steps
    tb = tstar.build_trace_batch(prompts, gens, range(len(gens)), B, offset, 1, tok.mask_token_id)
    assert len(tb.label) == sum(len(g.ids) for g in gens)          # every token is a target exactly once
    logp = torch.full((len(tb.label),), float("nan"))
    with torch.no_grad():
        chunks = tstar.micro_batches(tb, range(len(tb.ids)), (200, 10 ** 6))
        for tgt, lp, _, _ in tstar.forward_sequences(model, None, tb, chunks, B, offset,
                                                tok.eos_token_id):
            logp[tgt] = lp
    assert (logp - tb.sampler_logp).abs().max().item() <= 1e-4


def brute_force_gae(r, v, s, gamma, lam):
    """GAE over steps written as explicit sums, for one sample (independent of tstar's recursion)."""
    steps = sorted(set(s))
    r_star = {t: sum(ri for ri, si in zip(r, s) if si == t) / s.count(t) for t in steps}
    v_star = {t: sum(vi for vi, si in zip(v, s) if si == t) / s.count(t) for t in steps}
    v_after = lambda n: v_star[steps[n]] if n < len(steps) else 0.0       # noqa: E731
    delta = [r_star[t] - v_star[t] + gamma * v_after(n + 1) for n, t in enumerate(steps)]
    A_star = [sum((gamma * lam) ** k * delta[n + k] for k in range(len(steps) - n)) for n in range(len(steps))]
    R_star = [sum(gamma ** k * r_star[steps[n + k]] for k in range(len(steps) - n)) for n in range(len(steps))]
    adv, ret = [], []
    for ri, vi, si in zip(r, v, s):
        n = steps.index(si)
        adv.append(ri - vi + gamma * v_after(n + 1) + gamma * lam * (A_star[n + 1] if n + 1 < len(steps) else 0))
        ret.append(ri + gamma * (R_star[n + 1] if n + 1 < len(steps) else 0))
    return adv, ret


def test_gae_with_gamma_and_lambda_one_is_outcome_minus_value():
    step = torch.tensor([[1, 1, 2, 3, 3, 0], [1, 2, 2, 4, 0, 0]])
    z = torch.tensor([[0.7], [-1.3]])
    last = step.max(1, keepdim=True).values
    rewards = torch.where(step == last, z, 0.0)
    values = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    adv, ret = tstar.gae_over_steps(rewards, values, step, 1.0, 1.0)
    real = step > 0
    assert torch.allclose(adv[real], (z - values)[real], atol=1e-6)
    assert torch.allclose(ret[real], z.expand(-1, 6)[real], atol=1e-6)


def test_gae_with_lambda_zero_is_the_one_step_form():
    s = torch.tensor([1, 2, 2, 3])
    r = torch.tensor([0.0, 0.5, 0.1, 1.0])
    v = torch.tensor([0.2, 0.4, -0.6, 0.3])
    adv, _ = tstar.gae_over_steps(r, v, s, 0.9, 0.0)
    v_next = torch.tensor([(0.4 - 0.6) / 2, 0.3, 0.3, 0.0])             # V* of the following step
    assert torch.allclose(adv, r - v + 0.9 * v_next, atol=1e-6)


def test_gae_matches_a_brute_force_sum_on_random_inputs():
    g = random.Random(0)
    for _ in range(20):
        L = g.randint(1, 12)
        s = sorted(g.randint(1, 6) for _ in range(L))
        s = [sorted(set(s)).index(x) + 1 for x in s]                        # contiguous step ids
        g.shuffle(s)
        r = [g.uniform(-1, 1) for _ in range(L)]
        v = [g.uniform(-1, 1) for _ in range(L)]
        gamma, lam = g.uniform(0.5, 1), g.uniform(0, 1)
        adv, ret = tstar.gae_over_steps(torch.tensor(r, dtype=torch.float64), torch.tensor(v, dtype=torch.float64),
                                        torch.tensor(s), gamma, lam)
        want_adv, want_ret = brute_force_gae(r, v, s, gamma, lam)
        assert torch.allclose(adv, torch.tensor(want_adv, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(ret, torch.tensor(want_ret, dtype=torch.float64), atol=1e-9)


def test_group_advantages_are_z_scores_and_drop_groups_that_agree():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, keep = tstar.group_advantages(rewards, "gae")
    assert adv[0].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert not keep[1].any() and adv[1].abs().sum() == 0 and not torch.isnan(adv).any()
    assert keep[2].all()
    _, keep = tstar.group_advantages(rewards, "gae", band=(0.3, 0.8))          # TraceRL's accuracy band
    assert keep[0].all() and not keep[2].any()
    _, keep = tstar.group_advantages(torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]), "gae", band=(0.3, 0.7))
    assert not keep[0].any() and keep[1].all()                                 # 0.75 is above the band


def rl_config(**kw):
    base = dict(group_size=4, minibatches=1, micro_batch_tokens=1024, lr=1e-3, value_lr=1e-2, max_new_tokens=24)
    base.update(kw)
    return tstar.Config(**base)


def text_parity_reward(text, problem):
    """A deterministic reward that splits a random model's samples."""
    import zlib
    return float(zlib.crc32(text.encode()) % 2)


@pytest.fixture
def every_token_stops(monkeypatch):
    """Every rollout ends after its first block, so it is not cut by the length limit and gets a reward."""
    monkeypatch.setattr(tstar, "stop_token_ids", lambda model, tok: list(range(model.config.vocab_size)))


def test_an_rl_step_draws_its_sampling_and_then_its_shuffle_from_one_stream(every_token_stops, monkeypatch):
    """One generator per RL step, seeded by the step's seed on the model's device: the rollouts sample from it,
    then the update's minibatch shuffle continues it (the default run's table rests on this rule)."""
    seen = {}
    real_collect, real_plan = tstar.collect_rollouts, tstar.minibatch_plan

    def collect(*a):
        seen["sampling"], seen["seed"] = a[-1], a[-1].initial_seed()
        ro = real_collect(*a)
        seen["after_sampling"] = a[-1].get_state()
        return ro

    def plan(tb, cfg, budget, shuffle):
        seen["shuffle"], seen["at_shuffle"] = shuffle, shuffle.get_state()
        return real_plan(tb, cfg, budget, shuffle)
    monkeypatch.setattr(tstar, "collect_rollouts", collect)
    monkeypatch.setattr(tstar, "minibatch_plan", plan)
    one_rl_step(text_parity_reward)
    assert seen["shuffle"] is seen["sampling"] and seen["seed"] == 0
    assert torch.equal(seen["at_shuffle"], seen["after_sampling"])         # not re-seeded in between


def one_rl_step(reward_fn, block_size=4, offset=0, optimizer=torch.optim.AdamW, **config):
    """A fresh tiny model and value head, one rl_step on three prompts; returns them, the weights before, stats."""
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    head = tstar.new_value_head(model)
    cfg = rl_config(**config)
    opt = optimizer([{"params": model.parameters(), "lr": cfg.lr},
                     {"params": head.parameters(), "lr": cfg.value_lr}], weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    problems = [{"question": q, "answer": ""} for q in PROMPTS[:3]]
    sampler = tstar.Engine(model, tok, torch.float32, rows=64)
    stats = tstar.rl_step(model, head, opt, sampler, tok, problems, reward_fn, cfg, block_size, offset, 0)
    return model, head, before, stats


@pytest.mark.parametrize("B,offset", [(4, 0), (4, 2), (8, 0), (8, 4)])
def test_rl_step_trains_on_the_states_its_rollouts_visited(monkeypatch, B, offset):
    """Through rl_step itself, rows stopping at different blocks, at offset 0 and at the shifted offset B/2:
    the trainer's old log-probs equal the sampler's (fp32). Rollouts and training at different offsets, or
    a training layout that drifts from the sampler's, make this gap 0.1 or more."""
    monkeypatch.setattr(tstar, "stop_token_ids", lambda model, tok: STOPS)
    seen = []
    build = tstar.build_trace_batch
    monkeypatch.setattr(tstar, "build_trace_batch", lambda *a, **k: seen.append(a[3:5]) or build(*a, **k))
    model, head, before, stats = one_rl_step(text_parity_reward, B, offset, max_new_tokens=4 * B)
    assert stats["kept"] > 0 and seen == [(B, offset)]
    assert 0 < stats["traj_gap"] <= 1e-4          # (0: nothing was compared, or the gap was rounded away)


def test_one_rl_step_changes_the_policy_and_the_value_head(every_token_stops):
    model, head, before, stats = one_rl_step(text_parity_reward)
    assert stats["kept"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert head.weight.abs().sum() > 0                                          # started at zero
    assert stats["traj_gap"] <= 1e-4


def test_a_step_with_zero_advantages_leaves_the_policy_unchanged(every_token_stops):
    model, head, before, stats = one_rl_step(lambda text, p: 1.0)
    assert stats["kept"] == 0 and stats["accuracy"] == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # and the loss itself: zero advantage and logp == logp_old give a zero gradient (KL is 0 at the start)
    logp = torch.randn(5, requires_grad=True)
    loss, _, _ = tstar.ppo_token_loss(logp, logp.detach(), torch.zeros(5), clip_eps=0.2, beta=0.01)
    loss.sum().backward()
    assert logp.grad.abs().max() == 0


# ------------------------------------------------------------------------------------------------ formulas


def ppo_case(ratio, adv, clip=0.2, beta=0.0):
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, _, _ = tstar.ppo_token_loss(logp, torch.zeros(1), torch.tensor([float(adv)]), clip_eps=clip, beta=beta)
    loss.sum().backward()
    return loss.item(), logp.grad.item()


@pytest.mark.parametrize("ratio,adv,loss,grad", [
    (1.5, +1.0, -1.2, 0.0),       # above the range, positive advantage: clipped, no gradient
    (0.5, +1.0, -0.5, -0.5),      # below, positive: unclipped; raising log p lowers the loss
    (1.0, +1.0, -1.0, -1.0),      # inside
    (1.5, -1.0, +1.5, +1.5),      # above, negative: unclipped, pushes log p down
    (0.5, -1.0, +0.8, 0.0),       # below, negative: clipped
    (1.0, -1.0, +1.0, +1.0),      # inside
])
def test_ppo_clip_loss_and_gradient_hand_worked(ratio, adv, loss, grad):
    """L = -min(rho A, clip(rho, 1-eps, 1+eps) A); dL/dlog p = -rho A where the unclipped term is the min."""
    got_loss, got_grad = ppo_case(ratio, adv)
    assert got_loss == pytest.approx(loss, abs=1e-6) and got_grad == pytest.approx(grad, abs=1e-6)


def test_one_ppo_step_raises_a_positive_advantage_token_and_lowers_a_negative_one():
    logits = torch.zeros(6, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    old = logits.detach().log_softmax(-1)
    logp = logits.log_softmax(-1)[[1, 4]]
    loss, _, _ = tstar.ppo_token_loss(logp, old[[1, 4]], torch.tensor([1.0, -1.0]), clip_eps=0.2, beta=0.01)
    loss.sum().backward()
    opt.step()
    new = logits.detach().log_softmax(-1)
    assert new[1] > old[1] + 0.05 and new[4] < old[4] - 0.05


def test_k3_kl_is_measured_from_the_old_policy_hand_worked():
    """kl = exp(d) - 1 - d with d = log p_old - log p: 0 at equality, positive otherwise, and not symmetric
    (d = 1 gives e - 2 = 0.718, d = -1 gives 1/e = 0.368)."""
    def kl(logp, logp_old):
        return tstar.ppo_token_loss(torch.tensor([logp]), torch.tensor([logp_old]), torch.zeros(1), clip_eps=0.2, beta=1.0)[2].item()
    assert kl(-2.0, -1.0) == pytest.approx(math.e - 2, abs=1e-6)
    assert kl(-1.0, -2.0) == pytest.approx(1 / math.e, abs=1e-6)
    assert kl(-1.5, -1.5) == 0.0
    loss = tstar.ppo_token_loss(torch.tensor([-2.0]), torch.tensor([-1.0]), torch.zeros(1), clip_eps=0.2, beta=0.01)[0]
    assert loss.item() == pytest.approx(0.01 * (math.e - 2), abs=1e-7)          # beta x kl joins the loss


@pytest.mark.parametrize("v,v_old,ret,loss", [
    (0.5, 0.0, 1.0, 0.5 * 0.64),      # the clipped value (0 + 0.2) is further from R: it wins
    (-0.5, 0.0, 0.0, 0.5 * 0.25),     # the unclipped one is further: it wins
    (0.1, 0.0, 1.0, 0.5 * 0.81),      # inside the range: both equal
    (-0.5, 0.0, -1.0, 0.5 * 0.64),    # clipped from below (0 - 0.2) is further from R: it wins
    (1.5, 1.0, 0.0, 0.5 * 2.25),      # V_old 1: clipped 1.2, unclipped 1.5 is further
    (0.5, 1.0, 2.0, 0.5 * 2.25),      # V_old 1, V below it: clipped 0.8 is further from R = 2
])
def test_clipped_value_loss_takes_the_larger_error_hand_worked(v, v_old, ret, loss):
    got = tstar.clipped_value_loss(torch.tensor([v]), torch.tensor([v_old]), torch.tensor([ret]), 0.2)
    assert got.item() == pytest.approx(loss, abs=1e-6)


def test_value_gradients_do_not_reach_the_policy(tiny):
    """The value head reads detached hidden states: a value loss trains the head only."""
    model, tok = tiny
    head = tstar.new_value_head(model)
    torch.nn.init.normal_(head.weight)
    model.zero_grad(set_to_none=True)
    ids = torch.tensor([tok.encode("a3 b7=12")])
    pos, noisy = torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.bool)
    _, values, _ = tstar.forward_targets(model, ids, pos, noisy, ~noisy, torch.zeros(3, dtype=torch.long),
                                      torch.tensor([5, 6, 7]), ids[0, 5:], 4, 0, head)
    (values ** 2).sum().backward()
    assert head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


def test_the_outcome_sits_on_each_samples_last_step_and_gae_one_gives_z_minus_value():
    """Two samples, tokens committed at steps (1, 3, 2, 3) and (2, 1): with gamma = lambda = 1 every token's
    advantage is z - V; with gamma < 1 its return is gamma^(T - t) z (reward on the last step T only)."""
    outcome = torch.tensor([0.7, -1.3])
    sample = torch.tensor([0, 0, 0, 0, 1, 1])
    token = torch.tensor([0, 1, 2, 3, 0, 1])
    step = torch.tensor([1, 3, 2, 3, 2, 1])
    values = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5, -0.4])
    adv, ret = tstar.token_advantages(outcome, sample, token, step, values, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, outcome[sample] - values) and torch.allclose(ret, outcome[sample])
    _, ret = tstar.token_advantages(outcome, sample, token, step, torch.zeros(6), gamma=0.5, lam=1.0)
    last = torch.tensor([3, 3, 3, 3, 2, 2])
    assert torch.allclose(ret, outcome[sample] * 0.5 ** (last - step).float())


def test_ppo_update_gives_gae_the_group_z_scores_of_the_rewards(monkeypatch, tiny):
    """The outcome fed to GAE is each sample's reward z-scored within its group, not the raw reward (0 for a
    group without signal); GAE gets the values of the pre-update pass (V_old of a non-zero head), and --gamma
    and --gae-lambda in their places."""
    model, tok = tiny
    seen, old = [], []
    real, real_old = tstar.token_advantages, tstar.old_policy_pass
    monkeypatch.setattr(tstar, "token_advantages",
                        lambda outcome, sample, token, step, values, *, gamma, lam: seen.append(
                            (outcome.clone(), values.clone(), gamma, lam, sample.clone())) or real(
                                outcome, sample, token, step, values, gamma=gamma, lam=lam))
    monkeypatch.setattr(tstar, "old_policy_pass", lambda *a: (lambda r: old.append(r) or r)(real_old(*a)))
    gens = tstar.generate(model, [tok.encode(p) for p in PROMPTS[:2] for _ in range(4)],
                          **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0), generator=torch.Generator().manual_seed(1))
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])           # the second group agrees
    ro = tstar.Rollouts([tok.encode(p) for p in PROMPTS[:2] for _ in range(4)], gens, rewards, 4, 0)
    head = tstar.new_value_head(model)
    torch.nn.init.normal_(head.weight)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.0)
    tstar.ppo_update(model, head, opt, ro, rl_config(group_size=4, gamma=0.9, gae_lambda=0.5), tok.mask_token_id,
                     tok.eos_token_id, torch.Generator().manual_seed(0))
    z = (torch.tensor([1.0, 0.0, 0.0, 0.0]) - 0.25) / math.sqrt(3 / 16)
    assert len(seen) == 1 and torch.allclose(seen[0][0][seen[0][4]], z[seen[0][4]]) and seen[0][2:4] == (0.9, 0.5)
    assert set(seen[0][4].tolist()) <= {0, 1, 2, 3}                        # the agreeing group has no targets
    v_old = old[0][1]
    assert v_old.abs().min() > 0 and torch.equal(seen[0][1], v_old)


def test_a_response_cut_by_the_length_limit_scores_zero(tiny):
    model, tok = tiny
    ro = tstar.collect_rollouts(tstar.Engine(model, tok, torch.float32, 64), tok, [{"question": "a3="}],
                                lambda text, p: 1.0, rl_config(group_size=4, max_new_tokens=6), 4, 0,
                                torch.Generator().manual_seed(0))
    assert all(not g.stopped for g in ro.gens) and ro.rewards.sum() == 0


def test_sampler_confidence_is_the_probability_under_the_tempered_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    for T, top_k in ((2.0, 0), (0.5, 0), (1.5, 2)):
        for seed in range(5):
            cand, conf, logp = tstar.propose(logits, T, top_k, 1.0, torch.Generator().manual_seed(seed), mask_id=3)
            z = logits / T
            if top_k:
                z = torch.where(z >= z.topk(top_k).values[:, -1:], z, float("-inf"))
            z[:, 3] = float("-inf")                                                   # the mask token
            assert conf.item() == pytest.approx(z.softmax(-1)[0, cand].item(), rel=1e-5)
            assert logp.item() == pytest.approx(logits.log_softmax(-1)[0, cand].item(), rel=1e-5)
    cand, conf, _ = tstar.propose(logits, 0.0, 0, 1.0, mask_id=4)      # greedy, the top token is the mask:
    assert cand.item() == 0                                                # the argmax of the rest, and its
    assert conf.item() == pytest.approx(logits[0, :4].softmax(-1)[0].item(), rel=1e-6)   # probability among them


def test_dynamic_remasking_commits_exactly_the_confident_positions_or_the_quota():
    todo = torch.tensor([[True, True, True, True], [True, True, False, True]])
    conf = torch.tensor([0.95, 0.91, 0.90, 0.50, 0.3, 0.2, 0.1])                      # row-major over todo
    quota = torch.tensor([1, 1])
    dyn = tstar.choose_commits(todo, conf, quota, "dynamic", 0.9)
    assert dyn.tolist() == [[True, True, False, False], [True, False, False, False]]   # > tau strictly; else quota
    static = tstar.choose_commits(todo, conf, torch.tensor([2, 2]), "static", 0.9)
    assert static.tolist() == [[True, True, False, False], [True, True, False, False]]


# ------------------------------------------------------------------------------------------------ curriculum


def test_stage_plan_doubles_and_spreads_the_shifted_batches():
    plan = tstar.stage_plan([4, 8, 16, 32], 4, 0.5)
    assert plan == [(4, [0, 2, 0, 2]), (8, [0, 4, 0, 4]), (16, [0, 8, 0, 8]), (32, [0, 16, 0, 16])]
    assert all(type(o) is int for _, offsets in plan for o in offsets)        # (positions: 2, not 2.0)
    ten = tstar.stage_plan([4], 10, 0.3)[0][1]
    assert sum(o > 0 for o in ten) == 3
    assert tstar.stage_plan([4], 5, 0.0)[0][1] == [0] * 5 and tstar.stage_plan([4], 5, 1.0)[0][1] == [2] * 5
    assert [B for B, _ in tstar.stage_plan([4, 8, 16], 2, 0.5, direct=True)] == [32 // 2, 16, 16]


# The warm start of these runs: 450 steps at batch 32 give a model right about a third of the time at B=4
# (temperature 1), so RL has groups that disagree; the same weights at 1, 2, 4 or 16 threads (at batch 16 the
# result depended on the thread count and scored 0 on a 16-core machine).
TINY = ["--warm-start-steps", "450", "--warm-start-batch", "32", "--train-size", "2000", "--test-size", "8",
            "--steps-per-stage", "2", "--prompts-per-step", "8", "--group-size", "8", "--block-sizes", "4,8",
            "--max-new-tokens", "24"]


@pytest.fixture(scope="session")
def tiny_warm_start(tmp_path_factory):
    """The warm start of TINY, trained once (about 45 s) and copied into each run's out dir, where
    tstar reuses it because its settings match."""
    import shutil
    made = tmp_path_factory.mktemp("warm")
    assert tstar.main(TINY + ["--device", "cpu", "--eval-only", "--out-dir", str(made)]) == 0

    def copy_to(out_dir):
        shutil.copytree(made / "warmstart", Path(out_dir) / "warmstart")
        return str(out_dir)
    return copy_to


def weights(path):
    return load_file(str(path / "model.safetensors"))


def spy_on_the_loop(monkeypatch):
    """Record (B, offset, id(value head), value head weight, policy lm_head weight, the step's questions) at
    every rl_step, and the settings of every sampler call (evaluation or rollouts)."""
    steps, evals = [], []
    rl_step, generate = tstar.rl_step, tstar.Engine.generate

    def spy_step(model, head, opt, sampler, tok, problems, reward_fn, cfg, B, offset, seed):
        steps.append((B, offset, id(head), head.weight.detach().clone(), model.lm_head.weight.detach().clone(),
                      (id(opt), [(g["lr"], g["weight_decay"]) for g in opt.param_groups]),
                      [p["question"] for p in problems]))
        return rl_step(model, head, opt, sampler, tok, problems, reward_fn, cfg, B, offset, seed)

    def spy_generate(self, prompts, **kw):
        evals.append(dict(kind=kw.get("desc", "").split()[0], offset=kw.get("offset", 0), prompts=len(prompts),
                          rows=kw.get("rows"), **{k: kw[k] for k in ("temperature", "block_size", "max_new_tokens")}))
        return generate(self, prompts, **kw)
    monkeypatch.setattr(tstar, "rl_step", spy_step)
    monkeypatch.setattr(tstar.Engine, "generate", spy_generate)
    return steps, evals


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_main_runs_the_pipeline_and_resume_is_deterministic(tmp_path, tiny_warm_start, device, monkeypatch):
    """The whole run, then an interrupted run resumed: the same weights, bit for bit (on CUDA too: bf16
    rollouts from a copy, fp32 master weights, deterministic algorithms)."""
    a, b = tmp_path / "a", tmp_path / "b"
    TINY_RUN = TINY + ["--device", device]
    steps, evals = spy_on_the_loop(monkeypatch)
    assert tstar.main(TINY_RUN + ["--out-dir", tiny_warm_start(a)]) == 0
    # the wires of the curriculum: each RL step at its stage's block size and planned offset (shifted
    # boundaries), evaluation at offset 0, and the policy and value head carried from stage to stage
    assert [(B, off) for B, off, *_ in steps] == [(4, 0), (4, 2), (8, 0), (8, 4)]
    # evaluation: offset 0, the evaluation temperature, every test problem once per block size and stage;
    # rollouts: the rollout temperature, G samples of each of the step's prompts
    evaluations = [e for e in evals if e["kind"] == "eval"]
    assert len(evaluations) == 3 * 2 and {(e["offset"], e["temperature"], e["prompts"]) for e in evaluations} == {(0, 0.0, 8)}
    assert [e["block_size"] for e in evaluations] == [4, 8] * 3
    rollouts = [e for e in evals if e["kind"] == "rollouts"]
    assert [(e["block_size"], e["offset"]) for e in rollouts] == [(4, 0), (4, 2), (8, 0), (8, 4)]
    assert {(e["temperature"], e["prompts"], e["max_new_tokens"]) for e in rollouts} == {(1.0, 8 * 8, 24)}
    # the data: each step draws --prompts-per-step distinct training problems, another set each step
    questions = [q for *_, q in steps]
    assert all(len(set(q)) == 8 for q in questions) and len({tuple(q) for q in questions}) == 4
    assert len({head_id for _, _, head_id, *_ in steps}) == 1          # one value head for the whole run
    saved = load_file(str(a / "stage1-B4" / "value_head.safetensors"))
    _, _, _, head_w, policy_w, _, _ = steps[2]                            # the first step of stage 2
    assert torch.equal(head_w, saved["weight"].to(head_w.device))
    assert torch.equal(policy_w, weights(a / "stage1-B4")["lm_head.weight"].to(policy_w.device))
    records = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in records) == 4
    assert any(r["kind"] == "train" and r["kept"] > 0 for r in records)          # RL had something to learn
    start, end = weights(a / "warmstart"), weights(a / "stage2-B8")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert {r["stage"] for r in records if r["kind"] == "eval"} == {0, 1, 2}
    assert {(r["dataset"], r["label"]) for r in records if r["kind"] == "eval"} == {
        ("toy", "start"), ("toy", "stage1"), ("toy", "stage2")}
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 0, 2, 2, 4, 4]     # stage x steps per stage
    # a fresh AdamW each stage (the policy at --lr, the value head at --value-lr, no weight decay)
    optimizers = [opt for *_, opt, _ in steps]
    assert len({i for i, _ in optimizers}) == 2 and {i for i, _ in optimizers[:2]} != {i for i, _ in optimizers[2:]}
    assert all(groups == [(3e-4, 0.0), (1e-3, 0.0)] for _, groups in optimizers)
    assert (a / "stage1-B4" / "tstar.json").is_file() and (a / "stage2-B8" / "tstar.json").is_file()
    assert (a / "results.md").is_file() and (a / "curves.png").is_file()
    # an interrupted run (stage 2 never finished, its last log line cut in the middle), resumed, ends with the
    # same weights; it needs no warm start (deleted here: it is not trained again)
    # the same run sampling from a rollout copy (on the CPU forced, in fp32: the GPU's path) writes the same records
    monkeypatch.setattr(tstar.Engine, "force_copy", True)
    assert tstar.main(TINY_RUN + ["--out-dir", tiny_warm_start(b)]) == 0
    assert comparable(b / "metrics.jsonl") == comparable(a / "metrics.jsonl")
    import shutil
    shutil.rmtree(b / "stage2-B8")
    shutil.rmtree(b / "warmstart")
    with (b / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "stage": 2, "accur')
    steps.clear()
    assert tstar.main(TINY_RUN + ["--out-dir", str(b), "--resume"]) == 0
    assert not (b / "warmstart").exists()
    assert [(B, off) for B, off, *_ in steps] == [(8, 0), (8, 4)]            # stage 2 only, from stage 1's state
    assert [q for *_, q in steps] == questions[2:]                        # the problems the first run drew
    assert torch.equal(steps[0][3], load_file(str(b / "stage1-B4" / "value_head.safetensors"))["weight"].to(device))
    wa, wb = weights(a / "stage2-B8"), weights(b / "stage2-B8")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    records_b = [json.loads(l) for l in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records_b if r["kind"] == "train"] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ bad input


def bad_inputs(tmp):
    """The files and out dirs the rows of the bad-input table point at."""
    tiny_config = json.loads((HERE / "tiny_config.json").read_text())
    rows = lambda *rs: "".join(json.dumps(r) + "\n" for r in rs)                     # noqa: E731
    files = {"empty.jsonl": "", "malformed.json": '[{"question": "1+1?", "answer": ', "plain.txt": "x",
             "malformed.jsonl": '{"question": "1+1?", "answer": \n', "malformed.parquet": "PAR1 not parquet",
             "tied.json": json.dumps({**tiny_config, "tie_word_embeddings": True}),
             "list.json": "[1, 2]", "negative.json": json.dumps({**tiny_config, "hidden_size": -64}),
             "null.json": "null", "null-type.json": json.dumps({**tiny_config, "model_type": None}),
             "bool-layers.json": json.dumps({**tiny_config, "num_hidden_layers": True}),
             "null-question.jsonl": rows({"question": None, "answer": "1"}),
             "empty-question.jsonl": rows({"question": " ", "answer": "1"}),
             "no-answer.jsonl": rows({"question": "1+1?", "answer": "2"}, {"question": "2+2?"}),
             "a/test.jsonl": rows({"question": "1+1?", "answer": "2"}),
             "b/test.jsonl": rows({"question": "2+2?", "answer": "4"}),
             "corrupt/config.json": "{not json", "stage-model/tstar.json": "{",
             "runs/corrupt-stage/stage1-B4/tstar.json": '{"config": ',
             "runs/corrupt-warm/warmstart/tstar.json": "",
             "runs/backup/stage-old-B4/tstar.json": "{}", "runs/foreign-warm/warmstart/config.json": "{}",
             # shapes the architecture cannot take
             "kv.json": json.dumps({**tiny_config, "num_key_value_heads": 3}),
             "odd-head.json": json.dumps({**tiny_config, "head_dim": 15}),
             "bad-rope.json": json.dumps({**tiny_config, "rope_scaling": {"rope_type": "linear"}}),
             # results of earlier runs; damaged files of tstar's own
             "runs/evaluated/eval.json": "[]", "runs/tabled/results.md": "| model |\n",
             "runs/list-stage/stage1-B4/tstar.json": "[]", "list-model/config.json": json.dumps(tiny_config),
             "list-model/tstar.json": "[1]"}
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / "bad-utf8.jsonl").write_bytes(b'{"question": "1+1?", "answer": "2"}\n{"question": "\xff\xfe", "answer": "3"}\n')
    (tmp / "dir.jsonl").mkdir()
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    tstar.save_checkpoint(tmp / "no-weights", model, tok)
    (tmp / "no-weights" / "model.safetensors").unlink()
    default = tstar.finalize_config(tstar.Config())             # a warm start of the default settings ...
    tstar.save_checkpoint(tmp / "runs/warm-without-weights/warmstart", model, tok,
                          info=dict(task="toy", settings=tstar.warm_start_settings(default)))
    (tmp / "runs/warm-without-weights/warmstart/model.safetensors").unlink()        # ... that lost its weights
    tstar.save_checkpoint(tmp / "runs/finished/warmstart", model, tok,                # a finished run's warm start
                          info=dict(task="toy", settings=tstar.warm_start_settings(default)))
    tstar.save_checkpoint(tmp / "cut", model, tok)                                  # weights cut short
    weights_file = tmp / "cut" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    small = ["--train-size", "40", "--prompts-per-step", "4"]
    for run, damage in (("odd-log", "metrics.jsonl"), ("cut-head", "value_head.safetensors")):   # stage 1, then ...
        out = tmp / "runs" / run
        cfg = tstar.finalize_config(tstar.parse_args(small + ["--out-dir", str(out)]))
        tstar.save_checkpoint(out / "stage1-B4", model, tok, tstar.new_value_head(model),
                              info=dict(task="toy", stage=1, block_size=4, config=dataclasses.asdict(cfg)))
        (out / "metrics.jsonl").write_text('{"kind": "eval", "stage": 0}\n')
        if damage == "metrics.jsonl":                                             # ... a log line that is JSON,
            (out / damage).write_text('{"kind": "eval", "stage": 0}\n[1, 2]\n{"kind": "eval", "stage": 1}\n')
        else:                                                                     # ... or a value head cut short
            head = out / "stage1-B4" / damage
            head.write_bytes(head.read_bytes()[:40])


def test_a_config_without_head_dim_is_built_as_transformers_builds_it(tmp_path):
    """No head_dim: transformers' Qwen3Config default (128), whatever hidden_size / heads is, so the weights of a
    hub checkpoint with such a config.json fit (a refusal here once claimed hidden_size must divide)."""
    tiny_config = json.loads((HERE / "tiny_config.json").read_text())
    path = tmp_path / "no-head-dim.json"
    path.write_text(json.dumps({**{k: v for k, v in tiny_config.items() if k != "head_dim"}, "hidden_size": 66}))
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(path))
    assert model.config.head_dim == 128 and model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 128, 66)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]                     # the KV cache takes the model's head_dim
    cached, plain = (tstar.generate(model, prompts, **sample_kwargs(tok), kv_cache=c) for c in (True, False))
    assert [g.ids for g in cached] == [g.ids for g in plain]
    assert all(torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5) for a, b in zip(cached, plain))


def test_paths_in_flags_expand_the_home_directory(tmp_path, monkeypatch):
    """The shell leaves --model=~/x and --out-dir=~/x as typed: tstar expands the ~ of every path flag."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tstar.parse_args(["--model=~/m.json", "--out-dir=~/out", "--train-dataset=~/t.jsonl",
                            "--eval-datasets=toy,~/a.jsonl"])
    assert (cfg.model, cfg.out_dir, cfg.train_dataset, cfg.eval_datasets) == (
        f"{tmp_path}/m.json", f"{tmp_path}/out", f"{tmp_path}/t.jsonl", f"toy,{tmp_path}/a.jsonl")


def disk(tmp):
    """Every file under tmp with its size and modification time (tstar.lock, which a run leaves, aside)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp.rglob("*") if p.is_file() and p.name != "tstar.lock"}


@pytest.mark.parametrize("argv,message", [
    (["--model", "no/such/dir"], "no such model directory"),
    (["--model", ""], "--model is empty"),
    (["--model", "{tmp}/list.json"], "list.json is not a model config: it holds an array, not an object"),
    (["--model", "{tmp}/null.json"], "null.json is not a model config: it holds null, not an object"),
    (["--model", "{tmp}/null-type.json"], "null-type.json has model_type null"),
    (["--model", "{tmp}/bool-layers.json"], "num_hidden_layers must be a positive integer, got true"),
    (["--model", "{tmp}/negative.json"], "negative.json: hidden_size must be a positive integer, got -64"),
    (["--model", "{tmp}/corrupt"], "corrupt/config.json cannot be read (JSONDecodeError: Expecting property name"),
    (["--model", "{tmp}/tied.json"], "tied.json ties its LM head to its input embedding"),
    (["--model", "{tmp}/no-weights"], "no-weights cannot be read (OSError: Error no file named model.safetensors"),
    (["--model", "{tmp}/stage-model"], "stage-model/tstar.json cannot be read back"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "CPU"], "--device must be auto, cpu, cuda or cuda:N, got 'CPU'"),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--seed", "12345678901234567890"], "--seed must be in [0, 4294967295]"),
    (["--seed", "100000000000000"], "--seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--seed", "1e14"], "invalid int value: '1e14'"),
    (["--block-sizes", ""], "--block-sizes must be increasing block sizes >= 1, got ''"),
    (["--block-sizes", "8,4"], "increasing"),
    (["--block-sizes", "0,4"], ">= 1"),
    (["--block-sizes", "4,512"], "exceeds the model's 256 positions"),
    (["--steps-per-block", "0"], "--steps-per-block must be >= 1, got 0"),
    (["--steps-per-block", "8", "--block-sizes", "4,8"], "between 1 and the block size 4"),
    (["--shift-fraction", "1.5"], "--shift-fraction"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--max-new-tokens", "250"], "exceeds the model's 256 positions"),
    (["--rollout-batch", "0"], "--rollout-batch must be >= 1"),
    (["--rollout-batch", "1000000000"], "--rollout-batch 1000000000 needs"),
    (["--eval-batch", "0"], "--eval-batch must be >= 1"),
    (["--eval-datasets", "{tmp}/empty.jsonl"], "empty.jsonl is empty"),
    (["--eval-datasets", "{tmp}/malformed.json"], "malformed.json cannot be read as JSON"),
    (["--eval-datasets", "{tmp}/malformed.jsonl"], "malformed.jsonl cannot be read as JSONL"),
    (["--eval-datasets", "{tmp}/malformed.parquet"], "malformed.parquet cannot be read as PARQUET"),
    (["--eval-datasets", "{tmp}/dir.jsonl"], "dir.jsonl is a directory, not a .jsonl file"),
    (["--eval-datasets", "{tmp}/null-question.jsonl"], "null-question.jsonl: row 1 has no question (found null)"),
    (["--eval-datasets", "{tmp}/empty-question.jsonl"], "empty-question.jsonl: row 1 has no question"),
    (["--eval-datasets", "{tmp}/no-answer.jsonl"], "no-answer.jsonl: row 2 has no answer (found null)"),
    (["--eval-datasets", "{tmp}/a/test.jsonl,{tmp}/b/test.jsonl"], "share the name 'test'"),
    (["--out-dir", "{tmp}/plain.txt"], "plain.txt is a file, not a directory"),
    (["--out-dir", ""], "--out-dir is empty"),
    (["--out-dir", "{tmp}/runs/corrupt-stage", "--resume"], "stage1-B4/tstar.json cannot be read back"),
    (["--out-dir", "{tmp}/runs/corrupt-warm"], "warmstart/tstar.json cannot be read back"),
    (["--out-dir", "{tmp}/runs/backup", "--resume"], "no finished stage"),
    (["--out-dir", "{tmp}/runs/warm-without-weights"], "warmstart cannot be read (OSError: Error no file named"),
    # every file tstar reads passes one boundary: damage nobody listed is one line naming the file
    (["--eval-datasets", "{tmp}/bad-utf8.jsonl"], "bad-utf8.jsonl cannot be read (UnicodeDecodeError: 'utf-8' codec"),
    (["--model", "{tmp}/cut"], "cut cannot be read (SafetensorError: Error while deserializing header"),
    (["--model", "{tmp}/list-model"], "list-model/tstar.json cannot be read back (ValueError: it holds an array, not an object)"),
    (["--out-dir", "{tmp}/runs/list-stage", "--resume"], "tstar.json cannot be read back (ValueError: it holds an array"),
    (["--out-dir", "{tmp}/runs/odd-log", "--resume", "--train-size", "40", "--prompts-per-step", "4"],
     "metrics.jsonl cannot be read back (ValueError: line 2 is not a record of tstar's): delete that line"),
    (["--out-dir", "{tmp}/runs/cut-head", "--resume", "--train-size", "40", "--prompts-per-step", "4"],
     "value_head.safetensors cannot be read back (SafetensorError"),
    # shapes the architecture cannot take: at load, not in the first forward
    (["--model", "{tmp}/kv.json"], "kv.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (["--model", "{tmp}/odd-head.json"], "odd-head.json is not a valid Qwen3 config (RoPE requires an even rotary dim"),
    (["--model", "{tmp}/bad-rope.json"], "bad-rope.json is not a valid Qwen3 config (Missing required keys in `rope_par"),
    # results already on disk are never replaced; an out dir that cannot be written
    (["--out-dir", "{tmp}/runs/evaluated", "--eval-only"], "holds the results of an earlier evaluation (eval.json)"),
    (["--out-dir", "{tmp}/runs/tabled"], "holds the results of an earlier run (results.md)"),
    (["--out-dir", "/proc/self", "--eval-only"], "--out-dir /proc/self cannot be written"),
    (["--out-dir", "{tmp}/runs/foreign-warm"], "warmstart exists but is not a warm start tstar finished"),
    (["--out-dir", "{tmp}/runs/finished", "--eval-only", "--warm-start-steps", "3"],
     "is a warm start made with other settings (steps 600 then, 3 now)"),
    (["--train-size", "0"], "--train-size must be >= 1"),
    (["--test-size", "0"], "--test-size must be >= 1"),
    (["--warm-start-steps", "0"], "--warm-start-steps must be >= 1"),
    (["--train-size", "5"], "--prompts-per-step 32 is more than the 5 training problems of toy"),
    (["--eval-limit", "-1"], "--eval-limit must be >= 0"),
    (["--threshold", "-1"], "--threshold must be in [0, 1]"),
    (["--threshold", "2"], "--threshold must be in [0, 1]"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--value-lr", "0"], "--value-lr must be > 0"),
    *[([flag, "inf"], f"{flag} must be a finite number, got inf")
      for flag in ("--lr", "--value-lr", "--clip-eps", "--beta", "--grad-clip", "--warm-start-lr")],
    (["--threshold", "nan"], "--threshold must be a finite number, got nan"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["--gae-lambda", "-0.5"], "--gae-lambda must be in [0, 1], got -0.5"),
    (["--remasking", "greedy"], "invalid choice: 'greedy'"),
    (["--base-block-size", "x"], "invalid int value: 'x'"),
    (["--eoser-gamma-min", "0"], "(0, 1]"),
    (["--eoser-gamma-max", "1.5"], "(0, 1]"),
    (["--eoser-gamma-min", "0.9", "--eoser-gamma-max", "0.5"], "larger than"),
])
def test_bad_input_is_one_line_before_any_work_and_changes_nothing_on_disk(tmp_path, capfd, argv, message):
    """Each gets exit code 2 and one line on stderr (no traceback, no library's log line), before the warm start
    starts, and leaves every file as it was (an out dir the run made for itself is removed again)."""
    bad_inputs(tmp_path)
    before = disk(tmp_path)
    capfd.readouterr()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "out")]
    assert tstar.main(argv + out) == 2
    captured = capfd.readouterr()                    # (what libraries write to the file descriptors, too)
    err = captured.err.strip()
    assert err.startswith("tstar: error:") and message in err and "\n" not in err, err
    assert not captured.out.strip() or captured.out.startswith("config:"), captured.out
    assert disk(tmp_path) == before and not (tmp_path / "out").exists()


def test_under_torchrun_a_usage_error_is_printed_once_and_every_process_exits_2(tmp_path, monkeypatch, capsys):
    done = torchrun(2, HERE / "tstar.py", "--lr", "-1", "--out-dir", tmp_path / "out", timeout=240, threads=1)
    assert done.returncode != 0 and done.stderr.count("tstar: error:") == 1, done.stderr[-2000:]
    assert "tstar: error: --lr must be > 0, got -1.0" in done.stderr and "exitcode  : 2" in done.stderr
    for rank, printed in (("1", ""), ("0", "tstar: error: --lr must be > 0, got -1.0\n")):   # (torchrun stops the
        monkeypatch.setenv("RANK", rank)                                                  # others at the first exit)
        assert tstar.main(["--lr", "-1", "--out-dir", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == printed


def test_the_default_model_is_the_file_beside_tstar_from_any_working_directory(tmp_path, monkeypatch, tiny_warm_start):
    monkeypatch.chdir(tmp_path)                                   # (no tiny_config.json here)
    assert tstar.finalize_config(tstar.parse_args([])).model == str((HERE / "tiny_config.json").resolve())
    assert tstar.finalize_config(tstar.parse_args(["--model", "tiny_config.json"])).model == "tiny_config.json"
    out = tiny_warm_start(tmp_path / "run")
    assert tstar.main(TINY + ["--device", "cpu", "--eval-only", "--eval-block-sizes", "4", "--out-dir", out]) == 0
    assert (tmp_path / "run" / "eval.json").is_file()
    # and a second evaluation into the same out dir leaves the first one's results as they are
    before = (tmp_path / "run" / "eval.json").read_bytes()
    assert tstar.main(TINY + ["--device", "cpu", "--eval-only", "--eval-block-sizes", "8", "--out-dir", out]) == 2
    assert (tmp_path / "run" / "eval.json").read_bytes() == before


def test_a_library_cache_that_cannot_be_written_is_named_with_the_variable_that_moves_it(tmp_path, monkeypatch, capsys):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", "/proc/self/hf-cache")     # (root can write anywhere else)
    data = write_problems(tmp_path / "data.jsonl", GSM8K_ROWS)
    assert tstar.main(["--eval-only", "--eval-datasets", data, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tstar: error: the cache directory /proc/self/hf-cache cannot be written (")
    assert err.endswith("set HF_DATASETS_CACHE to a directory that can") and "data.jsonl" not in err
    assert not (tmp_path / "out").exists()


def test_help_is_grouped_by_section_and_lists_choices(capsys):
    with pytest.raises(SystemExit):
        tstar.main(["--help"])
    text = capsys.readouterr().out
    for heading in ("sampler", "warm start", "evaluation", "T* curriculum and TraceRL"):
        assert f"\n{heading}" in text
    assert "{static,dynamic,ass}" in text and "{gae,group}" in text and "(default: None)" not in text


def test_json_logs_hold_null_where_a_metric_is_nan(tmp_path):
    log = tstar.Recorder(tstar.Config(), tmp_path, None, "m.jsonl")
    log.write(dict(kind="eval", stage=0, local_strict=float("nan"), tpf=2.0))
    strict = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict == dict(kind="eval", stage=0, local_strict=None, tpf=2.0)


def test_a_second_run_in_the_same_out_dir_stops_and_a_killed_runs_lock_is_released(tmp_path, capsys,
                                                                                     tiny_warm_start):
    """The lock is the OS's: a second run stops with one line naming the first; a killed run's lock is released
    by the OS, and a lock file that nobody holds (e.g. 0 bytes) is no lock."""
    import socket
    import time
    out = tmp_path / "run"
    tiny_warm_start(out)
    (out / "tstar.lock").write_text("")
    first = subprocess.Popen([sys.executable, str(HERE / "tstar.py"), *TINY, "--device", "cpu",
                              "--out-dir", str(out)], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()                        # wait until the first run holds the lock (however loaded the
        while not (out / "tstar.lock").read_text().startswith("pid") and first.poll() is None:   # machine is)
            assert time.monotonic() - t0 < 600
            time.sleep(0.1)
        assert tstar.main(TINY + ["--device", "cpu", "--eval-only", "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {first.pid} on {socket.gethostname()}" in err
    finally:
        first.kill()
        first.wait()
    assert tstar.main(TINY + ["--device", "cpu", "--eval-only", "--out-dir", str(out)]) == 0


def test_a_fresh_run_refuses_an_old_runs_checkpoints_and_resume_needs_the_same_settings(tmp_path, capsys):
    old = tstar.finalize_config(tstar.Config(lr=1e-3, out_dir=str(tmp_path)))
    (tmp_path / "stage1-B4").mkdir()
    (tmp_path / "stage1-B4" / "tstar.json").write_text(tstar.json_text(dict(config=dataclasses.asdict(old))))
    assert tstar.main(["--out-dir", str(tmp_path)]) == 2
    assert "holds the checkpoints of an earlier run (stage1-B4): continue it with --resume" in capsys.readouterr().err
    assert tstar.main(["--out-dir", str(tmp_path), "--resume"]) == 2
    assert "--lr 0.001 then, 0.0003 now" in capsys.readouterr().err
    assert tstar.main(["--out-dir", str(tmp_path), "--resume", "--lr", "0.001", "--block-sizes", "4,8,16,32,64"]) == 2
    err = capsys.readouterr().err                                   # (the flag, not the value derived from it)
    assert "other settings (" in err and "--block-sizes 4,8,16,32 then, 4,8,16,32,64 now" in err


def test_an_interrupted_warm_start_advises_running_the_command_again(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(tstar, "warm_start", interrupted)
    assert tstar.main(["--out-dir", str(tmp_path), "--train-size", "40", "--prompts-per-step", "4"]) == 130
    err = capsys.readouterr().err
    assert "no stage was finished; run the same command again" in err and "--resume" not in err


def test_a_stage_checkpoint_without_its_value_head_is_a_clear_error(tmp_path, tiny):
    """--resume would otherwise go on with a fresh value head, silently."""
    from safetensors.torch import save_file
    model = tiny[0]
    with pytest.raises(tstar.UsageError, match="value_head.safetensors is missing: delete"):
        tstar.load_value_head(model, tmp_path)
    head = tstar.new_value_head(model)
    torch.nn.init.normal_(head.weight)
    save_file(head.state_dict(), str(tmp_path / "value_head.safetensors"))
    assert torch.equal(tstar.load_value_head(model, tmp_path).weight, head.weight)


def test_resume_without_a_finished_stage_is_a_clear_error(tmp_path, capsys):
    assert tstar.main(["--resume", "--out-dir", str(tmp_path)]) == 2
    assert "no finished stage" in capsys.readouterr().err


def test_unreachable_hub_id_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)      # fail at once, no retries
    assert tstar.main(["--model", "nobody-xyz/no-such-model", "--out-dir", str(tmp_path)]) == 2
    assert "local directory" in capsys.readouterr().err


def test_a_sharded_checkpoint_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    (tmp_path / "dcp" / "__0_0.distcp").write_bytes(b"")
    assert tstar.main(["--model", str(tmp_path / "dcp"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "sharded torch.distributed.checkpoint directory" in capsys.readouterr().err


def test_a_tokenizer_without_mask_token_is_a_clear_error(tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    model.save_pretrained(tmp_path / "ar")
    plain.save_pretrained(tmp_path / "ar")
    assert tstar.main(["--model", str(tmp_path / "ar"), "--eval-only", "--out-dir", str(tmp_path)]) == 2
    assert "no mask token" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ full scale


def test_two_processes_with_gloo_end_with_identical_weights(tmp_path, tiny_warm_start):
    """torchrun --nproc_per_node 2 on CPU (FSDP2): prompts are split, every process samples from the same
    whole weights, only rank 0 writes; the run then resumes with one process."""
    done = torchrun(2, HERE / "tstar.py", *TINY, "--device", "cpu", "--out-dir", tiny_warm_start(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    train = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert len(train) == 4                                           # one line per step, written by rank 0 only
    start, end = weights(tmp_path / "warmstart"), weights(tmp_path / "stage2-B8")
    assert any(not torch.equal(start[k], end[k]) for k in start)    # the ranks trained, and stayed identical
    # the checkpoints are whole: a run interrupted in stage 2 resumes with one process
    import shutil
    shutil.rmtree(tmp_path / "stage2-B8")
    assert tstar.main(TINY + ["--device", "cpu", "--out-dir", str(tmp_path), "--resume"]) == 0
    assert (tmp_path / "stage2-B8" / "tstar.json").is_file()


UPDATE_WORKER = """
import sys, torch, tstar
torch.set_num_threads(1)
rollouts, out, G = sys.argv[1], sys.argv[2], 4
if len(sys.argv) > 5:                            # micro-batches of a few targets each
    tstar.LOGIT_BYTES = int(sys.argv[5])
if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
    torch.distributed.init_process_group("gloo")
rank, size = tstar.world()
ro = torch.load(rollouts, weights_only=False)
a, b = [(0, 4)] [rank] if size == 1 else [(0, 1), (1, 4)][rank]          # 1 prompt vs 3 prompts
mine = tstar.Rollouts(ro.prompts[a * G: b * G], ro.gens[a * G: b * G], ro.rewards[a:b], ro.block_size, ro.offset)
torch.manual_seed(0)
model, tok = tstar.load_model_and_tokenizer(sys.argv[3])
head = tstar.new_value_head(model)
if size > 1:
    tstar.shard(model, head, torch.device("cpu"))
opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.5}, {"params": head.parameters(), "lr": 0.5}])
cfg = tstar.Config(group_size=G, minibatches=1, micro_batch_tokens=150, grad_clip=100.0, advantage=sys.argv[4])
reductions, micro = [], []                           # FSDP's reduce-scatters, the update's micro-batches
real_reduce, real_score = torch.distributed.reduce_scatter_single, tstar.forward_sequences
torch.distributed.reduce_scatter_single = lambda *a, **k: reductions.append(1) or real_reduce(*a, **k)
tstar.forward_sequences = lambda *a, **k: micro.append(len(a[3])) or real_score(*a, **k)
stats = tstar.ppo_update(model, head, opt, mine, cfg, tok.mask_token_id, tok.eos_token_id, torch.Generator().manual_seed(0))
stats.update(reductions=len(reductions), units=len(tstar.fsdp_units(model, head)), micro_batches=micro[-1])
weights = {**tstar.full_state_dict(model), **{"value_head." + k: v for k, v in tstar.full_state_dict(head).items()}}
if rank == 0:
    torch.save((weights, stats), out)
if size > 1:
    torch.distributed.barrier()                   # (both done before either tears gloo down)
    torch.distributed.destroy_process_group()
sys.stdout.flush()
__import__("os")._exit(0)     # (the results are on disk; gloo's threads sometimes abort at interpreter teardown)
"""


@pytest.mark.parametrize("advantage", ["gae", "group"])
def test_two_processes_make_the_update_of_one_process_on_their_union(tmp_path, tiny, advantage):
    """FSDP over two gloo processes holding 1 and 3 of 4 prompts (uneven token counts, micro-batch counts and
    a dummy micro-batch on the smaller process) makes the same update as one process on all 4: every loss is
    a mean over all processes' tokens (or, for CJ-GRPO, samples), not a mean of per-process means. The two
    processes cut their micro-batches at 5 targets (more, and uneven, micro-batches), the one process does not."""
    model, tok = tiny
    with torch.no_grad():
        ro = tstar.collect_rollouts(tstar.Engine(model, tok, torch.float32, 64), tok,
                                    [{"question": q, "answer": ""} for q in PROMPTS[:4]], lambda t, p: 0.0,
                                    rl_config(group_size=4), 4, 0, torch.Generator().manual_seed(5))
    ro.rewards = torch.tensor([text_parity_reward(tok.decode(g.ids), None) for g in ro.gens]).view(4, 4)
    ro.rewards[:, 0], ro.rewards[:, 1] = 1.0, 0.0                    # every group disagrees: all are kept
    torch.save(ro, tmp_path / "ro.pt")
    (tmp_path / "worker.py").write_text(UPDATE_WORKER)
    results = []
    for n in (1, 2):
        chunk = [] if n == 1 else [4 * model.config.vocab_size * 5]
        done = torchrun(n, tmp_path / "worker.py", tmp_path / "ro.pt", tmp_path / f"w{n}.pt", HERE / "tiny_config.json",
                        advantage, *chunk)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(torch.load(tmp_path / f"w{n}.pt", weights_only=False))
    (one, s1), (two, s2) = results
    torch.manual_seed(0)
    start = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))[0].state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in start) > 1e-3        # the update moved weights
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5
    assert s1["kept"] == s2["kept"] and s1["clipfrac"] == pytest.approx(s2["clipfrac"])
    # one reduce-scatter per FSDP unit per optimizer step, however many micro-batches (CJ-GRPO has no value head)
    assert s2["micro_batches"] >= 4 and s2["units"] == 4 + 3
    assert s2["reductions"] == s2["units"] - (advantage == "group")


def test_a_warm_start_trained_under_torchrun_is_shared_by_the_processes(tmp_path):
    """Rank 0 trains and saves the warm start, the other processes wait and load it; the run then trains
    (a mismatched barrier here would hang, and the timeout would fail the test)."""
    done = torchrun(2, HERE / "tstar.py", "--device", "cpu", "--warm-start-steps", "3", "--warm-start-batch", "4",
                    "--train-size", "40", "--test-size", "4", "--block-sizes", "4", "--steps-per-stage", "1",
                    "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "24", "--out-dir", tmp_path,
                    timeout=240, threads=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "warmstart" / "tstar.json").is_file() and (tmp_path / "stage1-B4" / "tstar.json").is_file()


@CUDA
def test_more_torchrun_processes_than_gpus_is_a_clear_error(tmp_path):
    n = torch.cuda.device_count() + 1
    done = torchrun(n, HERE / "tstar.py", "--device", "cuda", "--out-dir", tmp_path)
    assert done.returncode != 0 and done.stderr.count("tstar: error: torchrun started") == 1
    assert "tstar.py\", line" not in done.stderr        # (torchrun adds its own report of the failed children)


@CUDA
def test_a_rollout_batch_that_cannot_fit_is_a_clear_error(tmp_path, capsys):
    assert tstar.main(["--device", "cuda", "--rollout-batch", "100000000", "--warm-start-steps", "1",
                       "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--rollout-batch 100000000 needs" in err and "rows fit" in err


GRADING = [  # (response, gold, expected verdict)
    ("so \\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{2/3}", "\\frac{3}{4}", 0.0),
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{30^{\\circ}}", "30^\\circ", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),
    ("\\boxed{(0,1]}", "[0,1)", 0.0),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{(2, 1)}", "(1,2)", 0.0),
    ("\\boxed{\\text{Monday}}", "Monday", 1.0),
    ("\\boxed{Tuesday}", "\\text{Monday}", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{12,345}", "12345", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{-3}", "-3.0", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{2\\pi}", "2 \\pi", 1.0),
    ("\\boxed{a+b}", "b+a", 1.0),
    ("\\boxed{\\frac{a}{b}}", "\\frac{b}{a}", 0.0),
    ("\\boxed{\\frac{\\frac{1}{2}}{3}}", "\\frac{1}{6}", 1.0),                    # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", 1.0),
    ("first \\boxed{4}, on reflection \\boxed{5}", "5", 1.0),                 # the last box wins
    ("first \\boxed{5}, on reflection \\boxed{4}", "5", 0.0),
    ("The answer is 5.", "5", 0.0),                                           # no box, no credit
    ("\\boxed{5", "5", 0.0),                                                  # cut inside the box
    ("\\boxed{}", "5", 0.0),
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{1 \\text{ cm}}", "1", 1.0),
    ("\\boxed{18}", tstar.gold_answer("She pays 3 * 6 = <<3*6=18>>18 dollars.\n#### 18"), 1.0),  # GSM8K gold
    ("\\boxed{1200}", tstar.gold_answer("so 1,200 in all\n#### 1,200"), 1.0),
    ("\\boxed{17}", tstar.gold_answer("#### 18"), 0.0),
    ("\\boxed{\\frac{1}{3}}", tstar.gold_answer("Thus it is $\\boxed{\\frac13}$."), 1.0),  # MATH gold
]


# Right answers in the forms models write them, and wrong answers that must stay wrong.
GRADING_MORE = [
    # a period or other punctuation inside the box
    ("\\boxed{104.}", "104", 1.0), ("\\boxed{3\\sqrt{13}.}", "3\\sqrt{13}", 1.0),
    ("\\boxed{\\text{Evelyn}.}", "\\text{Evelyn}", 1.0), ("\\boxed{\\text{Evelyn.}}", "Evelyn", 1.0),
    ("\\boxed{42;}", "42", 1.0), ("\\boxed{105.}", "104", 0.0), ("\\boxed{104.\\,}", "104", 1.0),
    # a unit word after a complete number
    ("\\boxed{18 dollars}", "18", 1.0), ("\\boxed{3 bolts}", "3", 1.0), ("\\boxed{2000 calories}", "2000", 1.0),
    ("\\boxed{13 years}", "13", 1.0), ("\\boxed{18 \\text{dollars}}", "18", 1.0), ("\\boxed{1,200 miles}", "1200", 1.0),
    ("\\boxed{19 dollars}", "18", 0.0), ("\\boxed{3 pi}", "3", 0.0), ("\\boxed{5 \\text{ or } 6}", "5", 0.0),
    # degrees
    ("\\boxed{90°}", "90", 1.0), ("\\boxed{90°}", "90^\\circ", 1.0), ("\\boxed{45°}", "90", 0.0),
    # thousands separators
    ("\\boxed{1\\,000}", "1000", 1.0), ("\\boxed{1\\ 000}", "1000", 1.0), ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{5\\,}", "5", 1.0), ("\\boxed{12\\,345\\,678}", "12345678", 1.0),
    ("\\boxed{1\\,001}", "1000", 0.0), ("\\boxed{2\\,x}", "2x", 1.0),
    # \boxed without braces
    ("so the answer is \\boxed 18", "18", 1.0), ("\\boxed 18.", "18", 1.0), ("\\boxed 17", "18", 0.0),
    ("$\\boxed 5$ apples", "5", 1.0),
    # \textbf / \mathbf wrappers and parenthesised choices
    ("\\boxed{\\textbf{(C)}}", "C", 1.0), ("\\boxed{\\textbf{(073)}}", "73", 1.0), ("\\boxed{\\mathbf{12}}", "12", 1.0),
    ("\\boxed{\\textbf{(B)}}", "C", 0.0), ("\\boxed{(C)}", "\\text{(C)}", 1.0), ("\\boxed{\\textbf{(074)}}", "73", 0.0),
    # an inequality for an interval
    ("\\boxed{-2 \\le x \\le 7}", "[-2, 7]", 1.0), ("\\boxed{-2 < x < 7}", "(-2,7)", 1.0),
    ("\\boxed{-2 \\le x < 7}", "[-2, 7)", 1.0), ("\\boxed{-2 < x \\le 7}", "[-2, 7]", 0.0),
    ("\\boxed{-3 \\le x \\le 7}", "[-2, 7]", 0.0),
    # wrong answers that must stay wrong
    ("\\boxed{G+1}", "G", 0.0), ("\\boxed{G \\text{ or } G+1}", "G", 0.0), ("\\boxed{-G}", "G", 0.0),
    ("\\boxed{1001}", "1000", 0.0), ("\\boxed{99999}", "100000", 0.0), ("\\boxed{1, 2}", "1, 2, 3", 0.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}", 0.0), ("\\boxed{(0, 1]}", "[0, 1)", 0.0), ("\\boxed{[0, 1]}", "(0, 1)", 0.0),
    ("\\boxed{0.25}", "25", 0.0), ("\\boxed{0.25}", "25\\%", 1.0), ("\\boxed{\\frac{25}{100}}", "25", 0.0), ("\\boxed{x+1}", "x-1", 0.0),
    ("\\boxed{\\sqrt{2}}", "2", 0.0), ("\\boxed{2\\pi}", "\\pi", 0.0), ("\\boxed{\\text{Tuesday}}", "\\text{Monday}", 0.0),
    ("\\boxed{3 \\text{ or } 4}", "3", 0.0), ("\\boxed{12.}", "1.2", 0.0), ("\\boxed{(2)}", "3", 0.0),
    # plain right answers in other forms
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0), ("\\boxed{25\\%}", "25", 1.0), ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{073}", "73", 1.0), ("\\boxed{\\$18}", "18", 1.0), ("\\boxed{18.00}", "18", 1.0),
]


@pytest.mark.parametrize("response,gold,verdict", GRADING + GRADING_MORE)
def test_grading_hand_written_cases(response, gold, verdict):
    assert tstar.grade(response, gold) == verdict


# (answer, gold): for each rewrite of normalize_answer, a right answer math-verify alone grades wrong
NEEDS_A_REWRITE = [
    ("104.", "104"), ("\\text{Evelyn.}", "Evelyn"), ("90°", "90"), ("1\\,000", "1000"), ("1\\ 000", "1000"),
    ("\\textbf{(073)}", "73"), ("18 dollars", "18"), ("-2 \\le x \\le 7", "[-2, 7]"), ("-2 < x \\le 7", "(-2, 7]")]


@pytest.mark.parametrize("answer,gold", NEEDS_A_REWRITE)
def test_each_rewrite_of_an_answer_is_one_math_verify_alone_grades_wrong(answer, gold):
    """normalize_answer keeps only what math-verify (0.9) cannot do itself: a case that math-verify alone
    accepts means that rewrite is no longer needed; one that grade() rejects, that it is broken."""
    assert tstar.verify_answer(gold, answer, timeout=8) == 0.0
    assert tstar.grade("\\boxed{" + answer + "}", gold) == 1.0


def test_grading_off_the_main_thread_is_refused_not_graded_wrong():
    """math-verify's time limit uses SIGALRM, which only a main thread may set: off it math-verify would fail
    and the answer be scored 0 in silence. \\dfrac vs \\frac needs math-verify (not the string comparison)."""
    import threading
    out = {}

    def attempt():
        try:
            out["score"] = tstar.grade("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")
        except RuntimeError as e:
            out["error"] = str(e)
    worker = threading.Thread(target=attempt)
    worker.start()
    worker.join()
    assert list(out) == ["error"] and "main thread" in out["error"]
    assert tstar.grade("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}") == 1.0


def test_a_pathological_answer_is_graded_wrong_within_ten_seconds():
    import time
    t0 = time.time()
    assert tstar.grade("\\boxed{9^{9^{9^{9^{9}}}}}", "1") == 0.0
    assert time.time() - t0 < 10


def test_the_prompt_asks_for_a_box_once():
    asked = "Return your final response within \\boxed{}. What is $1+1$?"
    assert tstar.math_problem(asked, "2")["question"] == asked
    plain = tstar.math_problem("What is $1+1$?", "2")["question"]
    assert plain.count("\\boxed") == 1 and plain.endswith(tstar.MATH_INSTRUCTION)


def test_extract_boxed_keeps_nested_braces_and_takes_the_last():
    assert tstar.extract_boxed("a \\boxed{1} b \\boxed{\\frac{x^{2}}{y}} c") == "\\frac{x^{2}}{y}"
    assert tstar.extract_boxed("no box here") is None


def write_problems(path, rows):
    path = Path(path)
    if path.suffix == ".parquet":
        from datasets import Dataset
        Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
               "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
              for a, b in ((3, 4), (10, 5), (7, 7), (1200, 34))]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_dataset_files_load_and_are_normalised(tmp_path, suffix):
    problems = tstar.load_problems(write_problems(tmp_path / f"gsm{suffix}", GSM8K_ROWS))
    assert [p["answer"] for p in problems] == ["7", "15", "14", "1234"]
    assert all(p["question"].endswith("\\boxed{}.") and p["task"] == "math" for p in problems)
    math_rows = [{"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$."}]
    assert tstar.load_problems(write_problems(tmp_path / f"math{suffix}", math_rows))[0]["answer"] == "2"
    assert len(tstar.load_problems(write_problems(tmp_path / f"lim{suffix}", GSM8K_ROWS), limit=2)) == 2


def test_a_dataset_without_the_expected_field_is_a_clear_error(tmp_path, capsys):
    bad = write_problems(tmp_path / "bad.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    with pytest.raises(tstar.UsageError, match="no 'question' field.*columns found: prompt, answer"):
        tstar.load_problems(bad)
    assert tstar.main(["--eval-only", "--eval-datasets", bad, "--out-dir", str(tmp_path)]) == 2
    assert "columns found" in capsys.readouterr().err
    bad = write_problems(tmp_path / "bad2.jsonl", [{"question": "1+1?", "solution": "2"}])   # (solution: problem's)
    with pytest.raises(tstar.UsageError, match="has no 'answer' field; columns found: question, solution"):
        tstar.load_problems(bad)
    assert tstar.main(["--eval-only", "--eval-datasets", "no-such-set", "--out-dir", str(tmp_path)]) == 2
    assert "unknown dataset 'no-such-set'" in capsys.readouterr().err


IM_END = 151645                 # SDAR's end of a chat turn: a stop id from generation_config.json only


def im_end_likely(monkeypatch):
    """Every sampler step sees <|im_end|> one nat below each position's most likely token (about one candidate in
    five at temperature 1 on the fixture's random weights): rows end at it, in the sampler only (the trainer
    sees the checkpoint's own logits)."""
    real = tstar.propose

    def propose(logits, *a, **k):
        logits = logits.clone()
        logits[:, IM_END] = logits.max(-1).values - 1.0
        return real(logits, *a, **k)
    monkeypatch.setattr(tstar, "propose", propose)


def comparable(path):
    """The records of a metrics.jsonl without the wall-clock figures."""
    return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "tokens_per_s")}
            for l in Path(path).read_text().splitlines()]


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/sdar-tiny is absent (a user's clone has no ../shared)")
def test_full_scale_pipeline_on_the_sdar_fixture(tmp_path, monkeypatch):
    """The checkpoint path end to end: SDAR-format model and tokenizer, chat-template prompts from a local
    GSM8K-format file, one RL step at B=4 then one at B=8, evaluation, checkpoints; reload gives equal logits.
    The same run sampling from a rollout copy (forced, in fp32: the GPU's path) writes the same records, every
    one: any state the copy lacked (its stop ids: rows here end at <|im_end|>, a refresh, a buffer) would
    show."""
    data = write_problems(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    out = tmp_path / "run"
    argv = ["--model", str(FIXTURE), "--device", "cpu", "--train-dataset", data, "--eval-datasets", data,
            "--block-sizes", "4,8", "--steps-per-stage", "1", "--prompts-per-step", "2", "--group-size", "2",
            "--max-new-tokens", "16", "--eval-samples", "2", "--eval-batch", "4", "--acc-band", "0,1"]
    im_end_likely(monkeypatch)
    assert tstar.main(argv + ["--out-dir", str(out)]) == 0
    monkeypatch.setattr(tstar.Engine, "force_copy", True)
    assert tstar.main(argv + ["--out-dir", str(tmp_path / "copy")]) == 0
    records = comparable(out / "metrics.jsonl")
    assert comparable(tmp_path / "copy" / "metrics.jsonl") == records
    assert any(r["kind"] == "train" and 0 < r["length"] < 16 and r["truncated"] < 1 for r in records)   # rows ended
    evals = [r for r in records if r["kind"] == "eval"]
    assert {(r["stage"], r["block_size"]) for r in evals} == {(s, B) for s in (0, 1, 2) for B in (4, 8)}
    assert all(r["problems"] == 4 and "pass@2" in r for r in evals)
    saved = out / "stage2-B8"
    model, tok = tstar.load_model_and_tokenizer(str(saved))
    assert tok.mask_token_id == 151669 and (saved / "value_head.safetensors").is_file()
    assert tstar.stop_token_ids(model, tok) == [151643, IM_END]         # (a resumed run stops where this one did)
    again, _ = tstar.load_model_and_tokenizer(str(saved))
    ids = torch.tensor([tstar.encode_prompt(tok, "What is 2+2?")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    # and a save/reload round trip of the loaded model itself
    tstar.save_checkpoint(tmp_path / "copy", model, tok)
    copy, _ = tstar.load_model_and_tokenizer(str(tmp_path / "copy"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, copy(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------ EOSER, ASS, CJ-GRPO


def test_ass_step_quotas_hand_worked():
    q = tstar.step_quotas(torch.tensor([4, 8, 32, 5, 1]), 99, "ass")
    assert [row[row > 0].tolist() for row in q] == [[1, 3], [1, 2, 5], [1, 2, 4, 8, 17], [1, 2, 2], [1]]


@pytest.mark.parametrize("B", [4, 8, 12, 32])
def test_ass_never_takes_more_steps_than_its_schedule(tiny, B):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, block_size=B, remasking="ass", max_new_tokens=40,
                                                         temperature=1.0), generator=torch.Generator().manual_seed(0))
    for g in gens:
        blocks = tstar.block_index(g.prompt_len + torch.arange(len(g.ids)), B)
        for b in blocks.unique():
            in_block = blocks == b
            steps = torch.tensor(g.step_map)[in_block].unique()
            assert len(steps) <= max(1, math.ceil(math.log2(int(in_block.sum()))))


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits depend only on the position: logits[p] = table[p]."""

    def __init__(self, table):
        super().__init__()
        from types import SimpleNamespace
        self.config = SimpleNamespace(max_position_embeddings=table.shape[0])
        self.lm_head = torch.nn.Linear(table.shape[0], table.shape[1], bias=False)
        self.lm_head.weight.data = table.T.clone()
        self.model = lambda input_ids, position_ids, **kw: SimpleNamespace(
            last_hidden_state=torch.nn.functional.one_hot(position_ids, table.shape[0]).float())


def eos_first_case():
    """Prompt of 4 tokens, one block of 4: position 5 would be an eos committed first (confidence 0.95)."""
    V, eos = 6, 5
    table = torch.full((8, V), -20.0)
    for pos, tok, p in ((4, 1, 0.6), (5, eos, 0.95), (6, 2, 0.7), (7, 3, 0.8)):
        table[pos, tok] = math.log(p)
        table[pos, 4] = math.log(1 - p)               # the rest of the mass on a filler token
    return FixedLogits(table), eos


def test_eoser_with_gamma_one_changes_nothing(tiny):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    plain = tstar.generate(model, prompts, **sample_kwargs(tok))
    eoser = tstar.generate(model, prompts, **sample_kwargs(tok), eoser=(1.0, 1.0))
    assert [(g.ids, g.step_map) for g in plain] == [(g.ids, g.step_map) for g in eoser]


def test_eoser_commits_an_early_eos_candidate_later():
    model, eos = eos_first_case()
    kw = dict(mask_id=0, stop_ids=[eos], block_size=4, steps=4, remasking="static", max_new_tokens=4,
              kv_cache=False)
    plain = tstar.generate(model, [[1, 2, 3, 1]], **kw)[0]
    late = tstar.generate(model, [[1, 2, 3, 1]], **kw, eoser=(0.1, 1.0))[0]
    assert plain.ids == late.ids == [1, eos, 2, 3]                 # the same tokens ...
    assert plain.step_map == [4, 1, 3, 2]                          # eos (0.95) first without EOSER
    assert late.step_map == [4, 3, 2, 1]                           # ... with EOSER: 0.8, 0.7, then eos (0.95 x 0.7)


def test_group_advantages_are_mean_centred_without_a_value():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    adv, keep = tstar.group_advantages(rewards, "group")
    assert adv.tolist() == [[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, -0.75, 0.25]] and keep.all()


def test_group_weights_average_within_each_round_then_over_rounds_and_samples():
    tb = tstar.TraceBatch([], [], [], torch.zeros(1), *(torch.zeros(6, dtype=torch.long) for _ in range(2)),
                          sample=torch.tensor([0, 0, 0, 1, 1, 1]), token=torch.arange(6),
                          round=torch.tensor([0, 0, 1, 0, 0, 0]), step=torch.zeros(6, dtype=torch.long),
                          sampler_logp=torch.zeros(6))
    w = tstar.token_weights(tb, "group")
    # sample 0: round 0 has two tokens, round 1 one; sample 1: one round of three tokens; each sample
    # weighs 1 in all, spread evenly over its rounds (the caller divides by the total, 2)
    assert torch.allclose(w, torch.tensor([1 / 4, 1 / 4, 1 / 2, 1 / 3, 1 / 3, 1 / 3]))
    assert torch.allclose(tstar.token_weights(tb, "gae"), torch.ones(6))


def test_one_cj_grpo_step_changes_the_policy_and_trains_no_value(every_token_stops):
    model, head, before, stats = one_rl_step(text_parity_reward, advantage="group")
    assert stats["kept"] > 0 and stats["value_loss"] is None and stats.get("explained_var") is None
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert head.weight.abs().sum() == 0                              # no value loss, no value update




# ------------------------------------------------------------------------------------------------ full scale on the CPU
# What a GPU run exercises, each checked by a CPU stand-in: a bf16 copy on the CPU, gloo processes, a second batch
# through one Decoder, a fake CUDA graph that replays eagerly.


def test_a_cuda_run_has_a_process_group_backend_for_every_device_its_collectives_use(tmp_path, monkeypatch):
    """NCCL alone serves CUDA tensors only; the metric sums (dist_reduce) are CPU tensors on every run."""
    import torch.distributed as dist

    def devices_served(backend):
        return {pair.split(":")[0] for pair in backend.split(",")} if ":" in backend else \
            {"nccl": {"cuda"}, "gloo": {"cpu"}}[backend]
    assert tstar.process_group_backend(torch.device("cpu")) == "gloo"
    seen = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (seen.append(t.device.type), real(t, *a, **k))[1])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert tstar.dist_sum(2.0) == 2.0 and tstar.dist_max(3.5) == 3.5
    finally:
        dist.destroy_process_group()
    used = set(seen) | {"cuda"}                     # FSDP's own collectives run on the model's device
    assert seen and used <= devices_served(tstar.process_group_backend(torch.device("cuda")))


def test_every_cuda_run_selects_its_device_and_a_device_beyond_the_count_is_a_clear_error(monkeypatch, capsys, tmp_path):
    """CUDA graphs capture on the current device's streams: --device cuda:1 on one process must make cuda:1
    current (else the graph of a step on cuda:1 is captured empty and replays return stale outputs). The CUDA
    calls are stubbed: two GPUs, cuda:0 current."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append(torch.device(d)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name, want in (("cuda:1", 1), ("cuda", 0), ("auto", 0)):
        selected.clear()
        device = tstar.setup_device(tstar.Config(device=name))
        assert device == torch.device("cuda", want) and selected == [device], name
    assert tstar.main(["--device", "cuda:2", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tstar: error: --device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1"
    assert not (tmp_path / "out").exists()


FSDP_WORKER = """
import json, sys, time, torch, tstar
torch.distributed.init_process_group("gloo")
rank, size = tstar.world()
torch.manual_seed(0)
real_load, spans = tstar.load_model_and_tokenizer, []
def timed_load(*a):
    t0 = time.monotonic()
    out = real_load(*a)
    time.sleep(0.2)                               # (a load long enough to overlap another, were they concurrent)
    spans.append((t0, time.monotonic()))
    return out
tstar.load_model_and_tokenizer = timed_load
model, tok = tstar.load_in_turns(sys.argv[1], "cpu", torch.float32)
every_span = [None] * size
torch.distributed.all_gather_object(every_span, spans)
head = tstar.new_value_head(model)
if size > 1:
    tstar.shard(model, head, torch.device("cpu"))
cfg = tstar.finalize_config(tstar.Config(micro_batch_tokens=256))
plan = tstar.memory_plan(cfg, model, [4, 8], 30, torch.device("cpu"), True, True, True, free=int(sys.argv[2]))
sampler = tstar.Engine(model, tok, torch.float32, 8)             # each process's whole copy of the sharded policy
mine = [float(p.detach().double().sum()) for p in sampler.model.parameters()]
sums = [None] * size
torch.distributed.all_gather_object(sums, mine)
gpu_plan = tstar.memory_plan(cfg, model, [4, 8], 30, torch.device("cuda"), True, True, False, free=int(sys.argv[2]) // 25)
# bf16 mixed precision: the LM head computes with its weights gathered in bf16, and the ratio at the first
# minibatch is still 1 exactly
torch.manual_seed(0)
model, tok = tstar.load_model_and_tokenizer(sys.argv[1])
head = tstar.new_value_head(model)
tstar.shard(model, head, torch.device("cpu"), torch.bfloat16)
dtypes, ratios, steps = set(), [], []
model.lm_head.register_forward_pre_hook(lambda m, args: dtypes.add(str(m.weight.dtype)))
real = tstar.ppo_token_loss
tstar.ppo_token_loss = lambda *a, **k: (lambda out: ratios.append((len(steps), out[1].detach())) or out)(real(*a, **k))
cfg = tstar.Config(group_size=4, minibatches=2, micro_batch_tokens=200, dtype="bfloat16", max_new_tokens=24)
prompts = [tok.encode(q) for q in ("a3 b7=", "a1=", "x", "a0 b9 c2=")[rank::2] for _ in range(4)]
gens = tstar.Engine(model, tok, torch.float32, 8).generate(prompts, generator=torch.Generator().manual_seed(rank),
                                                          stop_ids=list(range(3, 30)),
                                                          **tstar.sampler_kwargs(cfg, 4, rollout=True))
opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1}, {"params": head.parameters(), "lr": 0.1}])
opt.step = lambda *a: steps.append(1)
ro = tstar.Rollouts(prompts, gens, torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2), 4, 0)
stats = tstar.ppo_update(model, head, opt, ro, cfg, tok.mask_token_id, tok.eos_token_id, torch.Generator().manual_seed(0))
first = torch.cat([r for k, r in ratios if k == 0])
mixed = dict(lm_head_dtypes=sorted(dtypes), first_ratios=len(first), ratio_one=bool(torch.equal(first, torch.ones_like(first))),
             traj_gap=stats["traj_gap"])
if rank == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(dict(plan=plan, gpu_plan=gpu_plan, sums=sums, mixed=mixed, spans=every_span), f)
torch.distributed.barrier()                       # (both done before either tears gloo down)
torch.distributed.destroy_process_group()
sys.stdout.flush()
__import__("os")._exit(0)     # (the results are on disk; gloo's threads sometimes abort at interpreter teardown)
"""


def test_under_fsdp_the_memory_plan_counts_each_parameter_once_and_the_rollout_copies_are_one_policy(tmp_path, tiny):
    """Two gloo processes with the policy sharded by FSDP: the plan counts the model's parameters once (a
    DTensor's numel is already the whole tensor's), and equals the one-process plan with the training state
    halved; the processes' whole rollout copies, gathered from the shards, are one policy."""
    model, _ = tiny
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    free = 10 ** 9
    done = torchrun(2, tmp_path / "worker.py", HERE / "tiny_config.json", free, tmp_path / "out.json")
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    cfg = tstar.finalize_config(tstar.Config(micro_batch_tokens=256))
    one = tstar.memory_plan(cfg, model, [4, 8], 30, torch.device("cpu"), True, True, True, free=free)
    two = got["plan"]
    n = sum(p.numel() for p in model.parameters())
    assert one["params"] == two["params"] == n and two["processes"] == 2
    assert two["line"].startswith(tstar.human(n, "") + " parameters")
    assert two["weights"] == one["weights"] / 2 == 2 * n and two["adam"] == one["adam"] / 2 == 4 * n
    assert two["grads"] > one["grads"] == 4 * n          # (whole gradients accumulate until a minibatch's end)
    for key in ("copy", "kv_row", "step_row", "micro_batch", "width"):
        assert two[key] == one[key], key
    assert two["rows"] >= one["rows"]                           # (less of the GPU goes to the training state)
    # a GPU's plan: the free memory is read with the whole fp32 policy loaded; sharding will release half of it
    gpu = tstar.memory_plan(cfg, model, [4, 8], 30, torch.device("cuda"), True, True, False, free=free // 25)
    per_row = gpu["kv_row"] + gpu["step_row"]
    assert gpu["rows"] == int((0.9 * free // 25 - 8 * n - gpu["copy"]) // per_row) // 8 * 8 < 1024
    assert got["gpu_plan"]["rows"] == int((0.9 * (free // 25 + 2 * n) - 4 * n - gpu["copy"]) // per_row) // 8 * 8
    # the two processes of this machine loaded the model one after the other (one copy in host RAM at a time)
    (a0, a1), (b0, b1) = [spans[0] for spans in got["spans"]]
    assert a1 <= b0 or b1 <= a0
    # bf16 mixed precision under FSDP: the weights gathered in bf16, the ratio at the first minibatch 1 exactly
    mixed = got["mixed"]
    assert mixed["lm_head_dtypes"] == ["torch.bfloat16"] and mixed["first_ratios"] > 10 and mixed["ratio_one"]
    assert len(got["sums"]) == 2 and got["sums"][0] == got["sums"][1]         # the copies are one policy


def test_the_memory_plan_uses_the_decoders_width_and_the_samplers_bytes_per_logit(tiny):
    """The plan of a GPU run (bf16; the free memory given, so no CUDA call is made)."""
    model, _ = tiny
    plan = lambda graphs=False, **kw: tstar.memory_plan(tstar.finalize_config(tstar.Config(micro_batch_tokens=256, **kw)),  # noqa: E731
                                                       model, [4, 8], 30, torch.device("cuda"), True, False, graphs,
                                                       free=5 * 10 ** 7)
    eager, graphs = plan(), plan(graphs=True)
    assert eager["width"] == 30 + 64 + 16 and graphs["width"] == tstar.KV_BUCKET     # whole buckets with graphs
    assert graphs["kv_row"] > eager["kv_row"] and graphs["rows"] & (graphs["rows"] - 1) == 0   # a power of two
    V = model.config.vocab_size
    assert plan(top_p=0.9)["step_row"] - plan(rollout_temperature=1.0)["step_row"] == 8 * V * (33 - 12)   # top-p's sort
    assert plan(temperature=0.0, rollout_temperature=0.0)["step_row"] == eager["step_row"] - 8 * V * (12 - 8)
    assert eager["kv_row"] == tstar.kv_cache_bytes_per_row(model.config, 110, torch.bfloat16)
    # keeping the Decoder (CUDA graphs) reserves the gradients, the micro-batch and the graphs: fewer rows
    assert graphs["keep"] and not eager["keep"] and graphs["graphs"] > 0 == eager["graphs"]
    budget = 0.9 * 5 * 10 ** 7 - eager["adam"]                 # (the weights are loaded: outside the free memory)
    assert eager["rows"] == int(budget // (eager["kv_row"] + eager["step_row"])) // 8 * 8
    assert graphs["rows"] <= int((budget - graphs["grads"] - graphs["micro_batch"]) // graphs["kv_row"])
    for p in (eager, graphs):                                   # both peaks within the 90% of the free memory
        assert max(p["sampling"], p["training"]) - p["weights"] <= 0.9 * 5 * 10 ** 7, p["line"]


def live_bytes_peak(fn):
    """The peak of bytes the CPU allocator holds while fn() runs, above what it held when fn started: every
    allocation, those inside a kernel too (torch.multinomial's draw), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, n in MemoryProfile(prof.profiler.kineto_results).timeline:
        live += n if action == Action.CREATE else -n if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/sdar-tiny is absent")
def test_the_memory_plan_is_at_least_what_a_sampler_step_and_a_trainer_micro_batch_allocate():
    """At the fixture's shape (SDAR's vocabulary) the plan's figure for one denoising step of a bf16 copy (greedy,
    sampling, top-p), one trainer micro-batch (old pass and update, under bf16 autocast), AdamW's step and the KV
    cache is at least the measured peak of allocated bytes and at most 25% above it."""
    policy, tok = tstar.load_model_and_tokenizer(str(FIXTURE))
    config = policy.config
    rows, B = 8, 32
    engine = tstar.Engine(policy, tok, torch.bfloat16, rows)
    prompts = [tstar.encode_prompt(tok, f"What is {i}+1?") for i in range(rows)]
    frame = tstar.padded_frame(prompts, B, 0, 64, tok.eos_token_id, "cpu")
    kv_bytes = live_bytes_peak(lambda: setattr(engine, "decoder", tstar.Decoder(engine.model, rows, frame.x.shape[1])))
    decoder = engine.decoder
    assert kv_bytes == rows * tstar.kv_cache_bytes_per_row(config, decoder.width, torch.bfloat16)
    decoder.start(frame, B, 0)
    c = frame.D + B                                              # a later block: 2B queries, all B positions masked
    todo = frame.is_resp[:, c: c + B]
    assert todo.all()
    for settings in (dict(temperature=0.0, rollout_temperature=0.0), dict(), dict(top_p=0.9)):
        cfg = tstar.finalize_config(tstar.Config(model=str(FIXTURE), **settings))
        T = cfg.rollout_temperature

        def step():
            with torch.no_grad():
                h = decoder.step(frame, torch.where(todo, tok.mask_token_id, frame.x[:, c: c + B]), c, True)
                tstar.propose(engine.model.lm_head(h[todo]), T, cfg.top_k, cfg.top_p, torch.Generator().manual_seed(0),
                              tok.mask_token_id)
        decoder.masks = {}                                       # (a fresh block: its masks are made again)
        measured = live_bytes_peak(step)
        planned = rows * tstar.step_bytes_per_row(cfg, config, B, decoder.width, 2)
        assert measured <= planned <= 1.25 * measured, (settings, measured, planned)
    # the trainer: one micro-batch of every trace round of 8 rollouts, bf16 autocast over fp32 weights
    cfg = tstar.finalize_config(tstar.Config(model=str(FIXTURE), dtype="bfloat16", grad_checkpointing=False))
    gens = engine.generate(prompts, generator=torch.Generator().manual_seed(0), **tstar.sampler_kwargs(cfg, 4, True) |
                           dict(max_new_tokens=24))
    tb = tstar.build_trace_batch(prompts, gens, range(rows), 4, 0, 1, tok.mask_token_id)
    head = tstar.new_value_head(policy)
    chunk = [list(range(len(tb.ids)))]
    length, M = max(len(x) for x in tb.ids), len(tb.label)

    def forward(grad):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            for _, logp, values, ent in tstar.forward_sequences(policy, head, tb, chunk, 4, 0, tok.eos_token_id, not grad):
                if grad:
                    (logp.sum() + values.sum()).backward()
    forward(True)                                                # (the gradients exist: they are a term of their own)
    planned = tstar.micro_batch_bytes(cfg, config, len(tb.ids), length, M, 2)
    for grad in (False, True):
        measured = live_bytes_peak(lambda: forward(grad))
        assert measured <= planned <= 1.25 * measured, (grad, measured, planned)
    opt = torch.optim.AdamW(policy.parameters(), foreach=True)
    opt.step()                                                   # (its moments exist: a term of their own)
    measured = live_bytes_peak(opt.step)
    planned = tstar.memory_plan(cfg, policy, [4], 30, torch.device("cpu"), True, False, False, free=10 ** 12)
    assert measured <= planned["adam_step"] <= 1.25 * measured             # (4 P and a few scalars)


def rope_model(max_positions=4096, theta=1e6):
    import json as _json
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = tstar.qwen3_config({**_json.loads((HERE / "tiny_config.json").read_text()),
                              "max_position_embeddings": max_positions, "rope_theta": theta})
    cfg._attn_implementation = tstar.register_attention()
    return Qwen3ForCausalLM(cfg).eval()


def rotation(model, positions):
    x = torch.zeros(1, len(positions), 1, dtype=next(model.parameters()).dtype)
    cos, sin = model.model.rotary_emb(x, torch.tensor(positions)[None])
    return torch.cat([cos, sin], -1).float()


@pytest.mark.parametrize("source", ["tiny", "fixture"])
def test_a_bf16_rollout_copy_keeps_the_rope_frequencies_in_fp32(source):
    """The rotation at positions near 2000 (SDAR: theta 1e6) of the bf16 rollout copy equals the fp32 policy's
    within bf16 rounding of cos and sin; frequencies rounded to bf16 are off by more than 0.1 there."""
    if source == "fixture" and not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures/sdar-tiny is absent")
    policy, tok = (rope_model(), tstar.char_tokenizer()) if source == "tiny" else tstar.load_model_and_tokenizer(str(FIXTURE))
    copy = tstar.Engine(policy, tok, torch.bfloat16, 4).model
    assert next(copy.parameters()).dtype == torch.bfloat16
    for (name, mine), theirs in zip(copy.named_buffers(), policy.buffers()):
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs), name
    positions = list(range(1990, 2048))
    ref = rotation(policy, positions)
    assert (rotation(copy, positions) - ref).abs().max() <= 2 ** -8            # bf16 rounding of cos and sin
    rounded = rope_model() if source == "tiny" else tstar.load_model_and_tokenizer(str(FIXTURE))[0]
    rounded.to(torch.bfloat16)                                                    # (what the copy used to be)
    assert (rotation(rounded, positions) - ref).abs().max() > 0.1


@pytest.mark.parametrize("source", ["tiny", "fixture"])
def test_a_rollout_copy_is_the_policy_in_all_but_its_parameters_dtype(source):
    """What the sampler reads from its model (config, generation config, stop and mask ids, buffers, parameter
    names and values) is the same for a bf16 rollout copy as for the policy; only the parameters' dtype differs."""
    if source == "fixture" and not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures/sdar-tiny is absent")
    policy, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json" if source == "tiny" else FIXTURE))
    engine = tstar.Engine(policy, tok, torch.bfloat16, 4)
    copy = engine.model
    assert copy is not policy
    assert copy.config.to_dict() == policy.config.to_dict()
    assert copy.generation_config.to_dict() == policy.generation_config.to_dict()
    assert engine.stop_ids == tstar.stop_token_ids(copy, tok) == tstar.stop_token_ids(policy, tok)
    assert engine.stop_ids == ([151643, IM_END] if source == "fixture" else [tok.eos_token_id])
    assert engine.mask_id == tok.mask_token_id
    assert [n for n, _ in copy.named_buffers()] == [n for n, _ in policy.named_buffers()]
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(copy.buffers(), policy.buffers()))
    mine, theirs = dict(copy.named_parameters()), dict(policy.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(mine[k].dtype == torch.bfloat16 and torch.equal(mine[k], theirs[k].to(torch.bfloat16)) for k in mine)


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/fixtures/sdar-tiny is absent")
def test_rows_sampled_from_a_bf16_copy_stop_at_im_end(monkeypatch):
    """<|im_end|> is a stop id of SDAR's generation_config.json, not of its config.json: a copy built from the
    config alone would decode past the end of the chat turn."""
    policy, tok = tstar.load_model_and_tokenizer(str(FIXTURE))
    im_end_likely(monkeypatch)
    prompts = [tstar.encode_prompt(tok, q) for q in ("What is 1+1?", "Name a prime.", "Say hi", "2*3=?")] * 2
    gens = tstar.Engine(policy, tok, torch.bfloat16, 8).generate(
        prompts, generator=torch.Generator().manual_seed(0), **tstar.sampler_kwargs(tstar.Config(max_new_tokens=24), 4,
                                                                                    rollout=True))
    ended = [g for g in gens if IM_END in g.ids[:24]]
    assert len(ended) >= 4
    for g in ended:
        assert g.stopped and g.ids[g.n_tokens - 1] == IM_END and IM_END not in g.ids[: g.n_tokens - 1]
        assert len(g.ids) <= tstar.block_start(g.prompt_len + g.n_tokens - 1, 4) + 4 - g.prompt_len   # its block, no more


def test_models_loaded_in_bf16_keep_their_buffers_in_fp32():
    model, _ = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"), "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in model.buffers())


def test_batches_of_other_padding_through_one_decoder_equal_fresh_decoders(tiny):
    """Block masks depend on a batch's padding: two batches with the same first block column and row count but
    other prompt lengths, through one Decoder, give exactly the tokens, step maps and log-probs of a fresh
    Decoder per batch; also with compaction (rows stopping at different blocks) and the graph path's shapes."""
    model, tok = tiny
    a, b = tok.encode("a3 b"), tok.encode("a3 b7 c1")                  # 4 and 8 tokens: both decode from column 8
    batches = [[a, b, a, b], [b, a, b, b]]
    kw = sample_kwargs(tok, stop_ids=STOPS, max_new_tokens=40, temperature=1.0)
    for graphs in (False, True):
        shared = tstar.Engine(model, tok, torch.float32, 4, graphs).generate(
            batches[0] + batches[1], generator=torch.Generator().manual_seed(0), **kw)
        gen, fresh = torch.Generator().manual_seed(0), []
        for batch in batches:
            fresh += tstar.Engine(model, tok, torch.float32, 4, graphs).generate(batch, generator=gen, **kw)
        assert len({len(g.ids) for g in fresh}) >= 2                         # rows finish at different blocks
        assert [(g.ids, g.step_map, g.logprobs) for g in shared] == [(g.ids, g.step_map, g.logprobs) for g in fresh]


def test_the_ratio_is_exactly_one_at_the_first_minibatch_under_bf16_autocast(tiny, monkeypatch):
    """bf16 kernels are not batch-invariant: the old pass forwards the update's own micro-batches, so before the
    first optimizer step p / p_old is 1 exactly (sequences of other lengths in other groups: off by rounding)."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS for _ in range(4)]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0),
                          generator=torch.Generator().manual_seed(1))
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * len(PROMPTS))
    ratios, steps = [], []
    real = tstar.ppo_token_loss
    monkeypatch.setattr(tstar, "ppo_token_loss", lambda *a, **k: (lambda out: ratios.append((len(steps), out[1])) or out)(real(*a, **k)))
    head = tstar.new_value_head(model)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.0}, {"params": head.parameters(), "lr": 0.0}])
    monkeypatch.setattr(opt, "step", lambda *a: steps.append(1))
    cfg = rl_config(group_size=4, minibatches=2, micro_batch_tokens=200, dtype="bfloat16")
    assert tstar.compute_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    tstar.ppo_update(model, head, opt, tstar.Rollouts(prompts, gens, rewards, 4, 0), cfg, tok.mask_token_id,
                     tok.eos_token_id, torch.Generator().manual_seed(0))
    first = torch.cat([r for k, r in ratios if k == 0])
    assert len(steps) == 2 and len(first) > 20 and torch.equal(first, torch.ones_like(first))


def test_the_value_head_runs_in_fp32_under_bf16_autocast(tiny):
    model, tok = tiny
    head = tstar.new_value_head(model)
    torch.nn.init.normal_(head.weight)
    ids = torch.tensor([tok.encode("a3 b7=12")])
    pos, noisy = torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.bool)
    rows, cols = torch.zeros(3, dtype=torch.long), torch.tensor([5, 6, 7])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, values, _ = tstar.forward_targets(model, ids, pos, noisy, ~noisy, rows, cols, ids[0, 5:], 4, 0, head)
        mask = tstar.block_attention_mask(pos, noisy, pos, noisy, ~noisy, 4, 0)
        h = tstar.hidden_states(model, ids, pos, mask)[rows, cols]
    assert values.dtype == torch.float32
    assert torch.equal(values, (h.float() @ head.weight.T + head.bias).squeeze(-1))


def test_micro_batches_hold_at_most_their_tokens_padded_and_the_logit_budget(monkeypatch):
    lengths = [10, 40, 25, 30, 12]                                                  # tokens per sequence
    tb = tstar.TraceBatch([torch.zeros(n) for n in lengths], None, None, torch.tensor([0, 3, 8, 9, 13, 20]),
                          *(torch.zeros(20, dtype=torch.long) for _ in range(6)), sampler_logp=torch.zeros(20))
    # targets per sequence: 3 5 1 4 7; longest first: 1 (40), 3 (30), 2 (25), 4 (12), 0 (10)
    assert tstar.micro_batches(tb, range(5), (60, 100)) == [[1], [3, 2], [4, 0]]      # 2 x 30 <= 60 < 3 x 30
    assert tstar.micro_batches(tb, range(5), (100, 100)) == [[1, 3], [2, 4, 0]]       # 3 x 25 <= 100
    assert tstar.micro_batches(tb, range(5), (100, 8)) == [[1], [3, 2], [4], [0]]     # (7 targets: alone)
    assert tstar.micro_batches(tb, [0, 4], (5, 100)) == [[4], [0]]                    # each over budget: alone
    assert tstar.trainer_budget(tstar.Config(micro_batch_tokens=77), 10) == (77, 2 ** 30 // 40)


def test_micro_batches_cut_by_targets_give_the_log_probs_of_larger_ones(tiny, monkeypatch):
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, temperature=1.0), generator=torch.Generator().manual_seed(3))
    tb = tstar.build_trace_batch(prompts, gens, range(len(gens)), 4, 0, 1, tok.mask_token_id)

    def scores():
        chunks = tstar.micro_batches(tb, range(len(tb.ids)), tstar.trainer_budget(tstar.Config(), model.config.vocab_size))
        out = torch.full((len(tb.label),), float("nan"))
        with torch.no_grad():
            for tgt, logp, _, _ in tstar.forward_sequences(model, None, tb, chunks, 4, 0, tok.eos_token_id):
                out[tgt] = logp
        return len(chunks), out
    n_whole, whole = scores()
    monkeypatch.setattr(tstar, "LOGIT_BYTES", 4 * model.config.vocab_size * 8)      # at most 8 targets
    n_cut, cut = scores()
    assert n_whole == 1 and n_cut > 3 and torch.allclose(whole, cut, atol=1e-6)


def test_prefill_runs_a_few_rows_at_a_time_with_the_same_tokens(tiny, monkeypatch):
    model, tok = tiny
    prompts = many_prompts(tok)
    whole = decode(model, tok, prompts)
    widths = []
    real = tstar.hidden_states
    monkeypatch.setattr(tstar, "hidden_states", lambda m, ids, *a, **k: (widths.append(ids.shape), real(m, ids, *a, **k))[1])
    monkeypatch.setattr(tstar, "PREFILL_TOKENS", 40)
    assert decode(model, tok, prompts) == whole
    D = widths[0][1]                                                 # the first forwards: the prefill, D columns
    prefill = [n for n, w in widths if w == D]
    assert sum(prefill) == 16 and max(prefill) == max(1, 40 // D) and len(prefill) > 1


class FakeGraph:
    """A stand-in for a captured CUDA graph on the CPU: replay() reruns the captured call on its static input
    tensors, with the cache state the capture saw (a real graph bakes both in)."""

    def __init__(self, decoder, g):
        self.decoder, self.g = decoder, g

    def replay(self):
        d, g = self.decoder, self.g
        d.cache.rows, d.cache.kv_len, d.cache.write_at = slice(0, g["ids"].shape[0]), g["mask"].shape[-1], g["write_at"]
        g["out"] = tstar.hidden_states(d.model, g["ids"], g["pos"], g["mask"], d.cache)


def test_a_kept_decoder_captures_each_graph_shape_once_over_many_calls(tiny, monkeypatch):
    """With graphs the Engine keeps one Decoder (row capacity a power of two) for every call: each step shape
    is captured once, a second call captures nothing new, and replays give the eager tokens."""
    model, tok = tiny
    captures = []

    def capture(self, ids, pos, mask, write_at):
        captures.append((ids.shape[0], ids.shape[1], mask.shape[-1]))
        g = dict(ids=ids.clone(), pos=pos.clone(), mask=mask.clone(), write_at=write_at.clone())
        g["graph"] = FakeGraph(self, g)
        return g
    init = tstar.Decoder.__init__

    def init_capturing(self, *a, **k):
        init(self, *a, **k)
        self.capture = self.graphs                     # as on CUDA
    monkeypatch.setattr(tstar.Decoder, "capture_graph", capture)
    monkeypatch.setattr(tstar.Decoder, "__init__", init_capturing)
    prompts = many_prompts(tok)
    eager = decode(model, tok, prompts)
    sampler = tstar.Engine(model, tok, torch.float32, 6, graphs=True)
    kw = sample_kwargs(tok, stop_ids=STOPS, max_new_tokens=40)
    first = sampler.generate(prompts, **kw)
    decoder, n_captures = sampler.decoder, len(captures)
    assert decoder.rows == 4 and len(set(captures)) == n_captures > 0        # 6 rows -> 4; each shape once
    second = sampler.generate(prompts, **kw)
    assert sampler.decoder is decoder and len(captures) == n_captures
    assert [(g.ids, g.step_map, g.nfe, g.n_tokens, g.stopped) for g in first] == eager
    assert [(g.ids, g.step_map) for g in second] == [(g.ids, g.step_map) for g in first]
    assert {rows for rows, _, _ in captures} <= {1, 2, 4}                   # compaction halves into known shapes
    assert all(keys % tstar.KV_BUCKET == 0 for _, _, keys in captures)       # keys in whole buckets
    # the memory plan's graph term: each graph's tensors, and at least all of them together
    held = {key: sum(t.nbytes for t in g.values() if isinstance(t, torch.Tensor)) for key, g in decoder.captured.items()}
    assert held == {(r, q, k): tstar.graph_bytes(model.config, r, q, k, 4) for r, q, k in decoder.captured}
    assert sum(held.values()) <= tstar.graphs_bytes(model.config, decoder.rows, [4], decoder.width, 4)


def test_a_kept_decoder_is_released_before_a_larger_one_is_allocated(tiny, monkeypatch):
    """A kept Decoder (CUDA graphs) that must grow (a larger evaluation batch, a longer prompt) frees its KV cache
    first: the memory plan counts one cache, never two."""
    import weakref
    model, tok = tiny
    alive, seen = [], []
    init = tstar.KVCache.__init__

    def counting_init(self, *a, **k):
        seen.append(sum(ref() is not None for ref in alive))          # caches alive while this one is made
        init(self, *a, **k)
        alive.append(weakref.ref(self))
    monkeypatch.setattr(tstar.KVCache, "__init__", counting_init)
    engine = tstar.Engine(model, tok, torch.float32, 2, keep=True)
    kw = sample_kwargs(tok, stop_ids=STOPS, max_new_tokens=8)
    engine.generate(many_prompts(tok, 2), **kw)
    engine.generate(many_prompts(tok, 4), rows=4, **kw)                # more rows: a new cache
    engine.generate([tok.encode("a3 b7 " * 14)], rows=4, **kw)         # a longer prompt: wider rows, a new cache
    assert len(seen) == 3 and seen == [0, 0, 0]


def test_the_trajectory_gap_is_logged_as_its_mean_its_share_above_a_tenth_and_its_max(tiny):
    """Two targets whose sampler log-probs are off by 0.5 and 0.05 (the rest agree to ~1e-7 in fp32): the log
    shows the mean gap, the share of targets above 0.1 and the largest gap."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS[:2] for _ in range(4)]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0),
                          generator=torch.Generator().manual_seed(1))
    gens[0].logprobs[0] += 0.5
    gens[5].logprobs[-1] -= 0.05
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])              # every sample is kept
    head = tstar.new_value_head(model)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.0)
    stats = tstar.ppo_update(model, head, opt, tstar.Rollouts(prompts, gens, rewards, 4, 0), rl_config(group_size=4),
                             tok.mask_token_id, tok.eos_token_id, torch.Generator().manual_seed(0))
    M = sum(len(g.ids) for g in gens)
    assert stats["traj_gap_max"] == pytest.approx(0.5, abs=1e-4)
    assert stats["traj_gap_over"] == pytest.approx(1 / M)
    assert stats["traj_gap"] == pytest.approx(0.55 / M, abs=1e-4)


# ------------------------------------------------------------------------------------------------ properties of the method


def test_toy_reward_checks_every_rule_of_the_hand_worked_example():
    q, right = "?604??764??593??242?=", "62712852137869580103"      # (the example of section 3)
    assert tstar.toy_reward(right, q) == 1.0 and tstar.toy_reward(" " + right + "\n", q) == 1.0
    assert tstar.toy_reward("02717" + right[5:], q) == 1.0                 # another free digit, its own check
    assert tstar.toy_reward("62713" + right[5:], q) == 0.0                 # a wrong check digit
    assert tstar.toy_reward("63712" + right[5:], q) == 0.0                 # a wrong substitution
    assert tstar.toy_reward(right[:-1] + "4", q) == 0.0                    # the last group's check
    assert tstar.toy_reward(right[:-2] + "1" + right[-1], q) == 0.0        # the last group's substitution
    for wrong in (right[:-1], right + "0", right[:-1] + "x", ""):
        assert tstar.toy_reward(wrong, q) == 0.0


def test_toy_problems_are_answered_by_their_answer_and_the_splits_are_disjoint():
    rng = random.Random(1)
    for _ in range(50):
        p = tstar.toy_problem(rng)
        assert len(p["question"]) == 21 and tstar.toy_reward(p["answer"], p["question"]) == 1.0
    splits = tstar.toy_splits(300, 40, seed=3)
    train, test = set(splits["train"]["question"]), splits["test"]["question"]
    assert len(splits["train"]) == 300 and len(test) == len(set(test)) == 40 and not train & set(test)
    assert tstar.toy_splits(300, 40, seed=3)["train"]["question"] == splits["train"]["question"]


def test_top_p_samples_only_inside_the_nucleus_and_renormalises_the_confidence():
    """probabilities 0.5 / 0.3 / 0.15 / 0.05: top-p 0.7 and 0.5 keep the first two (a token is dropped when
    the mass before it already exceeds p), 0.45 the first alone."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for top_p, kept in ((0.7, 2), (0.5, 2), (0.45, 1), (1.0, 4)):
        seen = set()
        for seed in range(40):
            cand, conf, logp = tstar.propose(logits, 1.0, 0, top_p, torch.Generator().manual_seed(seed))
            c = cand.item()
            seen.add(c)
            assert conf.item() == pytest.approx(logits.exp()[0, c].item() / logits.exp()[0, :kept].sum().item(), rel=1e-5)
            assert logp.item() == pytest.approx(logits[0, c].item(), rel=1e-5)          # the model's own log-prob
        assert seen == set(range(kept)), (top_p, seen)


def test_a_stop_token_in_the_prompt_stops_nothing_and_one_in_the_response_ends_it_there():
    V, stop = 6, 5
    table = torch.full((16, V), -20.0)
    for pos in range(16):
        table[pos, 1 + pos % 3] = 5.0 - 0.1 * pos
    kw = dict(mask_id=0, stop_ids=[stop], block_size=4, steps=4, remasking="static", max_new_tokens=7,
              kv_cache=False)
    prompt = [1, 2, 3, 1, stop]                        # the prompt's last token shares the first block
    g = tstar.generate(FixedLogits(table), [prompt], **kw)[0]
    assert not g.stopped and g.n_tokens == 7 and len(g.ids) == 7 and stop not in g.ids
    table[9, stop] = 9.0                               # response token 5 (position 9) is a stop token
    g = tstar.generate(FixedLogits(table), [prompt], **kw)[0]
    assert g.stopped and g.n_tokens == 5 and g.ids[4] == stop and len(g.ids) == 7    # the block is finished


def test_block_diffusion_loss_is_sdars_formula_on_the_same_random_draws(monkeypatch):
    """SDAR's loss recomputed beside tstar's from the same generator: responses padded with eos to the end of
    their last block, p = (1 - eps) t + eps, each token masked with probability p (at least one), the masked
    tokens' cross-entropy over p, summed, over the number of (padded) response tokens."""
    B, eps, mask, eos = 4, 1e-3, 99, 0
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12])]
    responses = [torch.tensor([20, 21, 22, 23, 24]), torch.tensor([30, 31])]
    seen = {}

    def known_logp(model, ids, pos, noisy, valid, rows, cols, labels, *a, **k):
        seen.update(ids=ids, rows=rows, cols=cols, labels=labels)
        return -(labels.float() + 1) / 100, None, None
    monkeypatch.setattr(tstar, "forward_targets", known_logp)
    loss = tstar.block_diffusion_loss(None, prompts, responses, B, mask, eos, torch.Generator().manual_seed(7), eps)
    g, total, expected, labels = torch.Generator().manual_seed(7), 0, 0.0, []
    for P, R in zip(prompts, responses):
        L = B * math.ceil((len(P) + len(R)) / B) - len(P)
        full = torch.cat([R, torch.full((L - len(R),), eos)])
        p = (1 - eps) * torch.rand((), generator=g) + eps
        u = torch.rand(L, generator=g)
        masked = (u < p) | (u == u.min())
        expected += float(((full[masked].float() + 1) / 100).sum() / p)
        total += L
        labels.append(full[masked])
    assert torch.equal(seen["labels"], torch.cat(labels))
    assert loss.item() == pytest.approx(expected / total, rel=1e-6)
    assert (seen["ids"][seen["rows"], seen["cols"]] == mask).all()          # the noisy copy masks the targets
    assert torch.equal(seen["rows"], torch.cat([torch.full((len(t),), j) for j, t in enumerate(labels)]))  # its own


def test_rollout_stats_are_ratios_of_sums_over_the_samples_hand_worked():
    def gen(step_map, n_tokens, nfe, stopped, prompt_len):
        return tstar.Generation(ids=[1] * len(step_map), step_map=step_map, logprobs=[0.0] * len(step_map), nfe=nfe,
                                n_tokens=n_tokens, stopped=stopped, prompt_len=prompt_len, offset=0)
    # B=4. Sample 1: prompt 2, response positions 2..5, of which 3 count (a stop at the third); in-block pairs
    # of the counted tokens: (1,1) -> 1 of 1 (the pair (2,1) after the stop is not counted).
    # Sample 2: prompt 0, cut by the limit at 5 tokens: pairs (1,3) (3,2) (2,4) -> 2 of 3.
    gens = [gen([1, 1, 2, 1], 3, 2, True, 2), gen([1, 3, 2, 4, 5], 5, 5, False, 0)]
    s = tstar.rollout_stats(gens, torch.tensor([1.0, 0.0]), 4)
    assert s == pytest.approx(dict(accuracy=0.5, tpf=8 / 7, local_strict=3 / 4, length=4.0, nfe=3.5, truncated=0.5))


def test_each_optimizer_step_follows_a_backward_and_a_clip_and_the_gradients_are_freed(every_token_stops):
    """--minibatches 2: two optimizer steps, each on clipped gradients (norm <= --grad-clip) of the policy,
    each followed by zero_grad; after the step no gradient is held (the rollouts need the memory)."""
    events = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            policy = [p for p in self.param_groups[0]["params"] if p.grad is not None]
            events.append(("step", float(torch.nn.utils.get_total_norm([p.grad for p in policy])), len(policy)))
            return super().step(closure)

        def zero_grad(self, set_to_none=True):
            events.append(("zero",))
            return super().zero_grad(set_to_none)
    model, head, before, stats = one_rl_step(text_parity_reward, optimizer=Spy, minibatches=2, grad_clip=1e-3)
    n_policy = len(list(model.parameters()))
    assert [e[0] for e in events] == ["step", "zero", "step", "zero"]
    assert all(0 < e[1] <= 1e-3 * (1 + 1e-4) and e[2] == n_policy for e in events if e[0] == "step")
    assert stats["grad_norm"] > 1e-3                                      # (logged before clipping)
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters()])



def test_clipped_value_loss_is_the_larger_of_the_two_errors_for_any_old_value():
    g = torch.Generator().manual_seed(0)
    v, v_old, ret = (torch.randn(200, generator=g) for _ in range(3))
    clipped = v_old + torch.clamp(v - v_old, -0.2, 0.2)
    want = 0.5 * torch.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    assert torch.allclose(tstar.clipped_value_loss(v, v_old, ret, 0.2), want)


def test_rollouts_are_drawn_from_the_generator_they_are_given(tiny):
    """The same generator seed gives the same rollouts; another seed, others (the step's own random stream)."""
    model, tok = tiny
    engine = tstar.Engine(model, tok, torch.float32, 64)
    draw = lambda seed: [g.ids for g in tstar.collect_rollouts(  # noqa: E731
        engine, tok, [{"question": q} for q in PROMPTS[:3]], lambda t, p: 0.0, rl_config(group_size=4), 4, 0,
        torch.Generator().manual_seed(seed)).gens]
    torch.manual_seed(1)
    first = draw(7)
    torch.manual_seed(2)                                # (the global random state must not matter)
    assert draw(7) == first and draw(8) != first
    ro = tstar.collect_rollouts(engine, tok, [{"question": q} for q in PROMPTS[:3]], lambda t, p: 0.0,
                                rl_config(group_size=4), 4, 0, torch.Generator().manual_seed(7))
    assert ro.prompts == [tok.encode(q) for q in PROMPTS[:3] for _ in range(4)]     # a group's samples in a row
    assert [g.prompt_len for g in ro.gens] == list(map(len, ro.prompts)) and ro.rewards.shape == (3, 4)


def test_eoser_factor_hand_worked():
    """g_s = g_min + (g_max - g_min) s / (n - 1) for a block of n planned steps; g_max when n = 1."""
    n = torch.tensor([1, 2, 3, 5])
    assert torch.allclose(tstar.eoser_factor(0, n, 0.4, 1.0), torch.tensor([1.0, 0.4, 0.4, 0.4]))
    assert torch.allclose(tstar.eoser_factor(1, n, 0.4, 1.0), torch.tensor([1.0, 1.0, 0.7, 0.55]))
    assert torch.allclose(tstar.eoser_factor(2, n[2:], 0.2, 1.0), torch.tensor([1.0, 0.6]))   # (s < n only)


def test_explained_variance_hand_worked_and_none_when_undefined():
    R, V = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0])
    # Var(R) = 1.25; R - V = (0, 0, 0, -1): mean -0.25, Var = 0.1875; 1 - 0.1875 / 1.25 = 0.85
    assert tstar.explained_variance(R, V) == pytest.approx(0.85)
    assert tstar.explained_variance(R, R) == pytest.approx(1.0)
    assert tstar.explained_variance(R, torch.zeros(4)) == pytest.approx(0.0)
    assert tstar.explained_variance(torch.ones(4), V) is None and tstar.explained_variance(R[:1], V[:1]) is None
    # two targets, and returns that vary little: R = (0, 2), V = (0, 1): Var(R) = 1, Var(R - V) = 0.25
    assert tstar.explained_variance(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.75)
    assert tstar.explained_variance(torch.tensor([0.0, 0.1]), torch.tensor([0.0, 0.05])) == pytest.approx(0.75)


def test_the_logged_entropy_is_the_entropy_of_the_policy_at_the_targets(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode("a3 b7=12")])
    pos, noisy = torch.arange(8)[None], torch.zeros(1, 8, dtype=torch.bool)
    rows, cols = torch.zeros(3, dtype=torch.long), torch.tensor([5, 6, 7])
    with torch.no_grad():
        _, _, ent = tstar.forward_targets(model, ids, pos, noisy, ~noisy, rows, cols, ids[0, 5:], 4, 0, entropy=True)
        mask = tstar.block_attention_mask(pos, noisy, pos, noisy, ~noisy, 4, 0)
        p = model.lm_head(tstar.hidden_states(model, ids, pos, mask)[rows, cols]).softmax(-1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5) and (ent > 0).all()


def test_the_trainer_forwards_at_most_micro_batch_tokens_at_a_time(every_token_stops, monkeypatch):
    shapes = []
    real = tstar.forward_targets
    monkeypatch.setattr(tstar, "forward_targets", lambda model, ids, *a, **k: shapes.append(ids.shape) or
                        real(model, ids, *a, **k))
    model, head, before, stats = one_rl_step(text_parity_reward, micro_batch_tokens=60, minibatches=1)
    assert stats["kept"] > 0 and len(shapes) >= 4
    assert max(n * T for n, T in shapes) <= 60 and max(n for n, _ in shapes) >= 2     # (padding counted)


def test_the_value_head_moves_toward_the_returns(tiny):
    """Updates of the value head alone (policy learning rate 0) lower the value loss of the same rollouts."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS[:2] for _ in range(4)]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0),
                          generator=torch.Generator().manual_seed(1))
    ro = tstar.Rollouts(prompts, gens, torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]), 4, 0)
    head = tstar.new_value_head(model)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.0}, {"params": head.parameters(), "lr": 0.02}])
    losses = [tstar.ppo_update(model, head, opt, ro, rl_config(group_size=4, minibatches=1), tok.mask_token_id,
                               tok.eos_token_id, torch.Generator().manual_seed(0))["value_loss"] for _ in range(3)]
    assert losses[0] > losses[1] > losses[2]


def test_more_minibatches_than_sequences_still_make_one_update(every_token_stops):
    model, head, before, stats = one_rl_step(text_parity_reward, minibatches=50)
    assert stats["kept"] > 0 and math.isfinite(stats["policy_loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_rewards_see_each_problem_and_the_response_without_special_tokens(tiny):
    """The reward gets the response text up to its stop token, without the stop token, and its own problem;
    a truncated response scores 0 whatever the reward function says."""
    _, tok = tiny
    answer = "62712852137869580103"
    ids = tok.encode(answer) + [tok.eos_token_id, tok.encode("7")[0]]           # decoded past the stop token
    gen = lambda stopped: tstar.Generation(ids=ids, step_map=list(range(1, len(ids) + 1)),  # noqa: E731
                                           logprobs=[0.0] * len(ids), nfe=len(ids), n_tokens=len(answer) + 1,
                                           stopped=stopped, prompt_len=3, offset=0)
    q = "?604??764??593??242?="
    problems = [{"question": q, "ok": 1.0}, {"question": q, "ok": 0.0}, {"question": q, "ok": 1.0}]
    seen = []
    reward = lambda text, p: seen.append(text) or p["ok"] * tstar.toy_reward(text, p["question"])   # noqa: E731
    rewards = tstar.rewards_of([gen(True), gen(True), gen(False)], problems, tok, reward)
    assert rewards.tolist() == [1.0, 0.0, 0.0] and seen == [answer, answer]


def test_an_rl_step_reports_its_own_duration(every_token_stops):
    import time
    t0 = time.time()
    *_, stats = one_rl_step(text_parity_reward)
    assert 0 < stats["seconds"] <= time.time() - t0


def test_cj_grpo_weights_of_an_empty_batch_are_empty():
    tb = tstar.TraceBatch([], [], [], torch.zeros(1, dtype=torch.long),
                          *(torch.zeros(0, dtype=torch.long) for _ in range(6)), sampler_logp=torch.zeros(0))
    assert tstar.token_weights(tb, "group").shape == (0,) and tstar.token_weights(tb, "gae").shape == (0,)


def test_the_warm_start_learning_rate_is_a_warm_up_times_a_cosine_from_step_0(monkeypatch, tiny):
    """lr_s = peak x min(1, (s+1)/warmup) x (0.1 + 0.9 (1 + cos(pi s/T)) / 2), warmup = T // 20 (at least 1)."""
    model, tok = tiny
    lrs = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"]) or
                        real_step(self, *a, **k))
    monkeypatch.setattr(tstar, "block_diffusion_loss", lambda model, *a: next(model.parameters()).sum() * 0.0)
    data = tstar.toy_splits(8, 2, 0)["train"]
    for T in (60, 30):                                   # warm-up of 3 steps, and of 1
        lrs.clear()
        tstar.warm_start(model, tok, data[:], tstar.Config(warm_start_steps=T, warm_start_lr=0.01), "cpu")
        warmup = max(1, T // 20)
        want = [0.01 * min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / T))) for s in range(T)]
        assert lrs == pytest.approx(want)


def test_the_value_loss_is_a_mean_over_the_target_tokens(tiny, monkeypatch):
    """One SGD step on a value head that says c everywhere moves its bias by lr x d/db mean_i 0.5 (V_i - R_i)^2
    = lr (c - mean_i R_i): to c - lr (c - mean R) (a sum, or a mean over another count, moves it elsewhere)."""
    model, tok = tiny
    seen, inner = {}, tstar.ppo_minibatches

    def spy(*args, **kwargs):
        seen["ret"] = args[8]                  # (policy, value_head, opt, tb, plan, logp_old, v_old, adv, ret, ...)
        return inner(*args, **kwargs)
    monkeypatch.setattr(tstar, "ppo_minibatches", spy)
    prompts = [tok.encode(p) for p in PROMPTS[:2] for _ in range(4)]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0),
                          generator=torch.Generator().manual_seed(1))
    ro = tstar.Rollouts(prompts, gens, torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]), 4, 0)
    head, c, lr = tstar.new_value_head(model), 0.4, 0.5
    torch.nn.init.constant_(head.bias, c)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.0}, {"params": head.parameters(), "lr": lr}])
    tstar.ppo_update(model, head, opt, ro, rl_config(group_size=4, minibatches=1), tok.mask_token_id,
                     tok.eos_token_id, torch.Generator().manual_seed(0))
    assert len(seen["ret"]) > 8
    assert head.bias.item() == pytest.approx(c - lr * (c - seen["ret"].mean().item()), rel=1e-5)


def test_an_evaluation_scores_each_problems_samples_together(tiny, monkeypatch):
    """--eval-samples n: a problem's n samples are its own (pass@n per problem). A reward of 1 for one problem
    of three: pass@2 1/3; samples grouped across problems would make it 2/3."""
    model, tok = tiny
    monkeypatch.setattr(tstar, "stop_token_ids", lambda model, tokenizer: STOPS)     # (responses that end)
    cfg = tstar.finalize_config(tstar.Config(temperature=1.0, max_new_tokens=24, eval_samples=2))
    problems = [{"question": q, "answer": "", "task": "toy"} for q in PROMPTS[:3]]
    metrics, gens = tstar.evaluate(tstar.Engine(model, tok, torch.float32, 64), tok, problems,
                                   lambda text, p: float(p is problems[0]), cfg, 4)
    assert len(gens) == 6 and [g.prompt_len for g in gens[:2]] == [len(tok.encode(PROMPTS[0]))] * 2
    assert metrics["pass@2"] == pytest.approx(1 / 3) and metrics["problems"] == 3
    clock = itertools.count(100.0, 2.5)              # the sampling took 2.5 s: tokens/s = tokens / 2.5
    monkeypatch.setattr(tstar, "time", type("Clock", (), {"time": staticmethod(lambda: next(clock))}))
    metrics, gens = tstar.evaluate(tstar.Engine(model, tok, torch.float32, 64), tok, problems, lambda t, p: 0.0, cfg, 4)
    assert metrics["tokens_per_s"] == pytest.approx(sum(g.n_tokens for g in gens) / 2.5)


def test_a_trace_batchs_targets_are_the_flat_indices_of_its_sequences():
    tb = tstar.TraceBatch(None, None, None, torch.tensor([0, 2, 2, 5]), *[None] * 7)    # sequences of 2, 0, 3
    assert tb.targets([2, 0]).tolist() == [2, 3, 4, 0, 1] and tb.targets([1]).tolist() == []
    assert tb.targets([]).tolist() == [] and tb.targets([]).dtype == torch.long       # (an empty minibatch)


def test_every_evaluation_at_a_block_size_draws_the_same_random_numbers(tiny):
    """With sampling (the SDAR preset's temperature 1.0), two evaluations of the same weights give the same
    samples whatever the global random state: stages differ by their weights only."""
    model, tok = tiny
    cfg = tstar.finalize_config(tstar.Config(temperature=1.0, max_new_tokens=24, eval_samples=2))
    engine = tstar.Engine(model, tok, torch.float32, 64)
    problems = [{"question": q, "answer": "", "task": "toy"} for q in PROMPTS]

    def samples(global_seed):
        torch.manual_seed(global_seed)
        metrics, gens = tstar.evaluate(engine, tok, problems, lambda t, p: 0.0, cfg, 4)
        assert metrics["problems"] == len(PROMPTS) and "pass@2" in metrics
        return [g.ids for g in gens]
    first = samples(1)
    assert samples(2) == first and len(set(map(tuple, first))) > 1



def test_every_random_stream_of_a_run_has_its_own_seed():
    """The rollouts of every (stage, step, process) of a 4-stage run of 300 steps a stage on 16 processes, and its
    evaluations at each block size (the stage after the last), draw from distinct seeds."""
    for seed in (0, 1, 7):
        seeds = [tstar.seed_for(seed, k, step, rank) for k in range(4) for step in range(300) for rank in range(16)]
        seeds += [tstar.seed_for(seed, 4, B, rank) for B in (4, 8, 16, 32) for rank in range(16)]
        assert len(set(seeds)) == len(seeds)
    assert len({tstar.seed_for(seed) for seed in range(100)}) == 100 and tstar.seed_for(0) == 0



def test_a_capture_that_fails_is_not_tried_again_and_the_sampler_runs_eagerly(tiny, monkeypatch):
    model, tok = tiny
    tries = []

    def failing_capture(self, *a):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")
    init = tstar.Decoder.__init__

    def init_capturing(self, *a, **k):
        init(self, *a, **k)
        self.capture = self.graphs and not tstar.Decoder.capture_failed          # (as on CUDA)
    monkeypatch.setattr(tstar.Decoder, "capture_failed", False)
    monkeypatch.setattr(tstar.Decoder, "capture_graph", failing_capture)
    monkeypatch.setattr(tstar.Decoder, "__init__", init_capturing)
    prompts = many_prompts(tok)
    eager = decode(model, tok, prompts)
    for _ in range(2):                                   # two Engines: a new Decoder each
        assert decode(model, tok, prompts, 4, graphs=True) == eager
    assert tries == [1] and tstar.Decoder.capture_failed


def test_the_tiny_warm_start_trains_in_fp32_whatever_the_compute_dtype(tmp_path):
    """--eval-only in bf16 (as on a GPU) without a warm start on disk trains it in fp32, the same one a training
    run trains, and evaluates a bf16 cast of it."""
    small = ["--warm-start-steps", "3", "--warm-start-batch", "4", "--train-size", "40", "--test-size", "4",
             "--eval-block-sizes", "4", "--max-new-tokens", "24", "--device", "cpu", "--eval-only"]
    assert tstar.main(small + ["--dtype", "bfloat16", "--out-dir", str(tmp_path / "bf16")]) == 0
    assert tstar.main(small + ["--out-dir", str(tmp_path / "fp32")]) == 0
    a, b = weights(tmp_path / "bf16" / "warmstart"), weights(tmp_path / "fp32" / "warmstart")
    assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------------------ every setting reaches its place
# For every Config field that Part I reads, a distinctive value changes what it must change, observed through the
# public path (the sampler through evaluate and collect_rollouts, the update through ppo_update, the curriculum
# through train, the warm start through warm_start), never by reading an argument list. Two settings of one type
# passed in each other's place, or one dropped, fail a row.

def sampled(tiny, monkeypatch, rollout=False, stops=STOPS, B=8, **settings):
    """(ids, step map, nfe) of every sample of three problems at block size B, from evaluate (or collect_rollouts)."""
    model, tok = tiny
    monkeypatch.setattr(tstar, "stop_token_ids", lambda model, tok: stops)      # (EOSER acts on stop tokens)
    cfg = tstar.finalize_config(tstar.Config(**{"max_new_tokens": 24, **settings}))
    problems = [{"question": q, "answer": "", "task": "toy"} for q in PROMPTS[:3]]
    engine = tstar.Engine(model, tok, torch.float32, 64)
    if rollout:
        gens = tstar.collect_rollouts(engine, tok, problems, lambda t, p: 0.0, cfg, B, 0,
                                      torch.Generator().manual_seed(0)).gens
    else:
        gens = tstar.evaluate(engine, tok, problems, lambda t, p: 0.0, cfg, B)[1]
    return [(g.ids, g.step_map, g.nfe) for g in gens]


def block_steps(samples, B=8, P=None):
    """The number of distinct steps of every (sample, block) (prompts of PROMPTS[:3], offset 0)."""
    out = []
    for (ids, steps, _), prompt in zip(samples, [p for p in PROMPTS[:3] for _ in range(len(samples) // 3)]):
        blocks = tstar.response_blocks(len(prompt), len(steps), B, 0)
        out += [len(set(torch.tensor(steps)[blocks == b].tolist())) for b in blocks.unique()]
    return out


greedy = dict(temperature=0.0)
SAMPLER_ROWS = [                  # (settings, how the samples must differ from the defaults')
    (dict(steps_per_block=2, remasking="static"), lambda s, d: max(block_steps(s)) == 2 < max(block_steps(d))),
    (dict(remasking="ass"), lambda s, d: max(block_steps(s)) == 3 < max(block_steps(d))),       # 1, 2, 5
    (dict(threshold=0.0), lambda s, d: max(block_steps(s)) == 1 < max(block_steps(d))),
    (dict(temperature=1.0), lambda s, d: s != d),
    (dict(temperature=1.0, top_k=1), lambda s, d: max(block_steps(s)) == 1 < max(block_steps(d))),   # confidence 1:
    (dict(temperature=1.0, top_p=1e-9), lambda s, d: max(block_steps(s)) == 1 < max(block_steps(d))),  # a block a step
    (dict(max_new_tokens=1), lambda s, d: max(len(ids) for ids, _, _ in s) <= 8 < max(len(ids) for ids, _, _ in d)),
    (dict(eval_samples=3), lambda s, d: len(s) == 3 * len(d) and s[::3] == d),
]


@pytest.mark.parametrize("settings,differs", SAMPLER_ROWS, ids=[" ".join(r[0]) for r in SAMPLER_ROWS])
def test_every_sampler_setting_changes_the_samples_as_it_must(tiny, monkeypatch, settings, differs):
    default = sampled(tiny, monkeypatch)
    assert differs(sampled(tiny, monkeypatch, **settings), default)


def test_eosers_two_factors_and_the_rollout_settings_each_reach_the_sampler(tiny, monkeypatch):
    # EOSER: with every token a stop token and tau just under the random model's confidences (~1/128), each
    # factor g_s decides how many candidates pass tau at each step
    every = list(range(tiny[0].config.vocab_size))
    runs = [sampled(tiny, monkeypatch, stops=every, B=32, threshold=0.006, **kw) for kw in (
        dict(), dict(eoser=True, eoser_gamma_min=0.3), dict(eoser=True, eoser_gamma_min=0.3, eoser_gamma_max=0.6),
        dict(eoser=True, eoser_gamma_min=0.5))]
    assert len({repr(r) for r in runs}) == 4
    assert sum(r[2] for r in runs[1]) > sum(r[2] for r in runs[0])          # (confidences lowered: more steps)
    # rollouts: the rollout temperature (not the evaluation's), G samples per problem
    same = sampled(tiny, monkeypatch, rollout=True, rollout_temperature=0.0, temperature=1.0, group_size=3)
    assert len(same) == 9 and all(same[k] == same[k - k % 3] for k in range(9))          # greedy: a group agrees
    hot = sampled(tiny, monkeypatch, rollout=True, rollout_temperature=1.0, temperature=0.0, group_size=3)
    assert len(hot) == 9 and any(hot[k] != hot[k - k % 3] for k in range(9))
    # rows per evaluation call: the KV cache the evaluation allocates
    rows = []
    init = tstar.KVCache.__init__
    monkeypatch.setattr(tstar.KVCache, "__init__", lambda self, config, n, *a: rows.append(n) or init(self, config, n, *a))
    model, tok = tiny
    cfg = tstar.finalize_config(tstar.Config(max_new_tokens=8, eval_batch=2))
    tstar.evaluate(tstar.Engine(model, tok, torch.float32, 64), tok, [{"question": q, "task": "toy", "answer": ""}
                                                                     for q in PROMPTS], lambda t, p: 0.0, cfg, 4)
    assert rows and set(rows) == {2}


def updated(settings, optimizer_steps=None, shapes=None):
    """One ppo_update (SGD) of fixed rollouts of a fresh tiny model: its stats, its weights afterwards and the value
    head's change."""
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    head = tstar.new_value_head(model)
    prompts = [tok.encode(p) for p in PROMPTS[:3] for _ in range(4)]
    gens = tstar.generate(model, prompts, **sample_kwargs(tok, stop_ids=STOPS, temperature=1.0, threshold=0.3),
                          generator=torch.Generator().manual_seed(2))
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.nn.init.normal_(head.weight, std=0.1)                # (values that vary: explained variance is defined)
    head_before = head.weight.detach().clone()
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 3.0}, {"params": head.parameters(), "lr": 0.5}])
    if optimizer_steps is not None:
        real = opt.step
        opt.step = lambda *a: optimizer_steps.append(1) or real(*a)
    cfg = rl_config(**{"group_size": 4, "minibatches": 2, "grad_clip": 100.0, **settings})
    stats = tstar.ppo_update(model, head, opt, tstar.Rollouts(prompts, gens, rewards, 4, 0), cfg, tok.mask_token_id,
                             tok.eos_token_id, torch.Generator().manual_seed(0))
    return stats, torch.cat([p.detach().flatten() for p in model.parameters()]), head.weight.detach() - head_before


def test_every_update_setting_changes_the_update_as_it_must(monkeypatch):
    base, policy, value = updated({})
    moved = lambda w: (w - policy).abs().max() > 1e-6                      # noqa: E731
    s, p, v = updated(dict(clip_eps=1e-4))                                 # clipping: the second minibatch clips
    assert s["clipfrac"] > base["clipfrac"] + 0.1
    s, p, v = updated(dict(beta=5.0))                                      # the KL term: the second minibatch's loss
    assert s["policy_loss"] != base["policy_loss"] and s["clipfrac"] == base["clipfrac"]
    s, p, v = updated(dict(gamma=0.5))                                     # gamma discounts the returns: value targets
    assert s["explained_var"] != pytest.approx(base["explained_var"]) and moved(p)
    s, p, v = updated(dict(gae_lambda=0.5))                                # lambda: the advantages, not the returns
    assert moved(p) and s["explained_var"] == pytest.approx(base["explained_var"])
    s, p, v = updated(dict(shrink=2))                                      # merged rounds: other states than visited
    assert s["traj_gap"] > 1e-3 > 1e-5 > base["traj_gap"]
    s, p, v = updated(dict(advantage="group"))                             # CJ-GRPO: no value head
    assert s["value_loss"] is None and not v.any() and moved(p)
    s, p, v = updated(dict(acc_band=(0.3, 0.6)))                            # only groups with accuracy 0.5 kept
    assert s["kept"] == pytest.approx(4 / 12) and base["kept"] == pytest.approx(1.0)
    steps = []
    updated(dict(minibatches=3), optimizer_steps=steps)
    assert len(steps) == 3
    torch.manual_seed(0)
    start = torch.cat([w.flatten() for w in tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))[0].parameters()])
    s, p, v = updated(dict(grad_clip=1e-6))             # two SGD steps of lr 3 on a gradient clipped to norm 1e-6
    assert (policy - start).norm() > 1e-2 and (p - start).norm() <= 2 * 3.0 * 1e-6 * 1.01
    shapes = []
    real = tstar.forward_targets
    monkeypatch.setattr(tstar, "forward_targets", lambda m, ids, *a, **k: shapes.append(ids.shape) or real(m, ids, *a, **k))
    updated(dict(micro_batch_tokens=50))
    assert max(n * T for n, T in shapes) <= 50 or min(n for n, T in shapes if n * T > 50) == 1


def test_every_curriculum_and_warm_start_setting_reaches_train(tmp_path, monkeypatch):
    """train() with distinct values: stages at --block-sizes, --steps-per-stage steps each, shifted offsets at the
    planned fraction, evaluations at --eval-block-sizes, --prompts-per-step problems x G samples drawn from the
    seed's stream; --direct: every stage at the last block size. And warm_start: its steps, batch and peak lr."""
    torch.manual_seed(0)
    model, tok = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))
    shapes, drawn = [], []
    real = tstar.collect_rollouts

    def spy(engine, tokenizer, problems, *a):
        ro = real(engine, tokenizer, problems, *a)
        shapes.append(tuple(ro.rewards.shape))
        drawn.append([p["question"] for p in problems])
        return ro
    monkeypatch.setattr(tstar, "collect_rollouts", spy)
    problems = [{"question": q + str(i), "answer": "", "task": "toy"} for i, q in enumerate(PROMPTS * 4)]

    def run(name, **settings):
        cfg = tstar.finalize_config(tstar.Config(**{"max_new_tokens": 8, "out_dir": str(tmp_path / name), **settings}))
        (tmp_path / name).mkdir()
        rec = tstar.Recorder(cfg, tmp_path / name, tok)
        engine = tstar.Engine(model, tok, torch.float32, 64)
        shapes.clear(), drawn.clear()
        tstar.train(cfg, model, tstar.new_value_head(model), engine, tok, problems, {"toy": problems[:2]},
                    lambda t, p: float(len(t) % 2), rec)
        return [r for r in rec.records if r["kind"] == "train"], [r for r in rec.records if r["kind"] == "eval"]
    settings = dict(block_sizes=(2, 4), steps_per_stage=3, shift_fraction=1 / 3, eval_block_sizes=(3, 5),
                    prompts_per_step=2, group_size=3, seed=7)
    train_records, evals = run("a", **settings)
    assert [(r["block_size"], r["offset"]) for r in train_records] == [(2, 0), (2, 0), (2, 1), (4, 0), (4, 0), (4, 2)]
    assert [(r["stage"], r["block_size"]) for r in evals] == [(s, B) for s in (0, 1, 2) for B in (3, 5)]
    assert set(shapes) == {(2, 3)} and len(shapes) == 6
    first = list(drawn)
    train_records, _ = run("b", **{**settings, "seed": 8})
    assert drawn != first and len(drawn) == 6                              # the seed's own draws
    train_records, evals = run("c", **{**settings, "direct": True})
    assert [r["block_size"] for r in train_records] == [4] * 6
    # the warm start: --warm-start-steps steps of --warm-start-batch sequences at --warm-start-lr, at --base-block-size
    batches, sizes = [], []
    loss, mask = tstar.block_diffusion_loss, tstar.block_attention_mask
    monkeypatch.setattr(tstar, "block_diffusion_loss", lambda m, prompts, *a: batches.append(len(prompts)) or loss(m, prompts, *a))
    monkeypatch.setattr(tstar, "block_attention_mask", lambda *a, **k: sizes.append(a[5]) or mask(*a, **k))
    data = {"question": [p["question"] for p in problems], "answer": ["1234"] * len(problems)}

    def warm(**settings):
        torch.manual_seed(0)
        fresh = tstar.load_model_and_tokenizer(str(HERE / "tiny_config.json"))[0]
        before = fresh.lm_head.weight.detach().clone()
        losses = tstar.warm_start(fresh, tok, data, tstar.Config(**settings), "cpu")
        return len(losses), (fresh.lm_head.weight.detach() - before).abs().max().item()
    batches.clear(), sizes.clear()
    steps, moved = warm(warm_start_steps=2, warm_start_batch=3, warm_start_lr=1e-3, base_block_size=5)
    assert steps == 2 and batches == [3, 3] and set(sizes) == {5}
    assert warm(warm_start_steps=1, warm_start_lr=1e-2)[1] > 3 * warm(warm_start_steps=1, warm_start_lr=1e-3)[1]
