"""tstar: a single-file reference implementation of T* (arXiv 2601.11214).

T* in five sentences. A masked diffusion language model (MDM) decodes a block of B tokens at a time: the
block starts fully masked and a few denoising steps fill it in, several tokens per forward pass, while
attention stays causal across blocks so finished blocks can be cached. Larger blocks mean more tokens per
forward (faster decoding), but a model trained at a small block size (SDAR, B=4) loses accuracy when
asked to decode at B=32. T* fixes this with a curriculum: run TraceRL (trajectory-aware PPO, which trains
on exactly the intermediate states the sampler visited) at B=4, then double the block size, 4 -> 8 -> 16
-> 32, re-optimising the policy at every stage, with half of the RL steps using shifted block boundaries.
The result decodes at B=32 with more tokens per forward and, on math, higher accuracy than the start.

Two commands:
    python tstar.py                                           # tiny model, toy task, CPU, a few minutes
    python tstar.py --model JetLM/SDAR-1.7B-Chat --device cuda   # the paper's setting on a GPU

The file has two parts. Part I is T* itself, in the order the method runs; Part II, after a fence, is what
it takes to run it for real (command line, SDAR checkpoints, math data, a fast sampler, many GPUs, files).

Glossary (used in names and comments throughout):
    B         block size: tokens decoded together; bidirectional attention inside a block, causal across.
    K         denoising steps per block (the step budget; the threshold may finish a block sooner).
    tau       confidence threshold of dynamic remasking.
    offset    block boundaries fall at absolute positions offset + k*B (0 is SDAR's convention).
    step map  for each response token, the denoising step (1, 2, ...) of its row at which it was finalized.
    NFE       number of denoising forward passes (the extra pass that only caches a finished block's
              keys and values is not counted).
    TPF       tokens per forward = response tokens / NFE, over a batch as a ratio of sums. "Response
              tokens" are the tokens up to and including the first stop token.
    trace round  one training state rebuilt from the step map (section 5).

Where this file departs from the papers (choices where they are silent, and simplifications), and why:
    * Model: transformers' Qwen3ForCausalLM with a 4D block mask, not SDAR's remote code (flash-attn only);
      untied LM heads only, as SDAR's checkpoints have.
    * Tiny run: a character tokenizer and a toy task (section 1), so that the method runs on a laptop CPU.
    * Tiny run: the "AR-initialised B=4 model" is a short block-diffusion SFT at B=4 (section 4), no AR stage.
    * Sampler: a block with m < K masks takes m steps, so every step commits (SDAR may spend empty forwards).
    * Sampler: a finished block's keys and values ride along with the next block's first forward.
    * Sampler: confidence is the probability under the sampling distribution; the mask is never proposed.
    * Trainer: the noisy copy uses the rollout's own block offset (the reference drifts when P mod B != 0).
    * Trainer: every decoded token is trained, eos and the rest of its block too (the reference skips eos).
    * Trainer: all trace rounds of a sample in one sequence (section 5), not one sequence per round as dLLM-RL.
    * Value: a linear head on the policy's detached hidden states, own learning rate, not a second model.
    * Loss: a mean over all target tokens of all processes, not over a padded length (CJ-GRPO: per round).
    * PPO: --minibatches (2) optimizer steps per RL step; old log-probs from one pass before the first.
    * T*: shifted boundaries = offset B/2 for rollout and training of half of each stage's RL steps.
    * Direct baseline: as many stages and steps as T*, all at the last block size, fresh optimizers alike.
    * GPU: fp32 master weights, bf16 autocast (FSDP: weights gathered in bf16); rollouts from a bf16 copy, so
      log-probs differ by rounding.
    * LocalStrict: the paper gives no formula; here, in-block adjacent pairs decoded in order (section 7).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import filelock
import numpy as np

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (read at CUDA start)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


# ######################################################################################################
# PART I: T*
# ######################################################################################################
# Ten sections in the order the method runs: the toy task, block attention, the sampler, the warm start,
# trace rounds, the TraceRL loss, metrics, the RL step, the curriculum, evaluation. Part I's code calls ten
# names of Part II, each a piece a reader can take on trust:
#     encode_prompt, hidden_states   a question's token ids (a chat template for checkpoints); the model's
#                                    final hidden states under an explicit 4D mask
#     Decoder                        the sampler's forward passes: an in-place KV cache (CUDA graphs with --compile)
#     autocast                       forward passes in the compute dtype (bf16 on a GPU)
#     world, dist_sum, dist_max, as_many_everywhere, gradient_sync, clip_grad_norm
#                                    (rank, processes), a sum / max over the processes, as many forwards on
#                                    every process (FSDP's rule), whether FSDP reduces the gradients after the
#                                    next backward, the gradient norm
# Its signatures also name Config (every setting, one field per flag), Engine (what rollouts and evaluation
# sample from: the policy, or its bf16 copy) and Recorder (metrics.jsonl, the console, plots).
# On one process (the CPU default) the process helpers are the identity, and the Engine is the policy.


# ======================================================================================================
# 1. The toy task
# ======================================================================================================
# The tiny model's task must be verifiable, have short responses (21 tokens), and make large blocks genuinely hard
# for a model trained at B=4. A problem is four groups of five characters:
#     question "?604??764??593??242?="      one valid answer "62712852137869580103"
# In each group of the answer, the first digit is free (any digit), the next three are the question's digits
# passed through a fixed substitution (TOY_NEXT: 0->7, 1->4, ...), and the fifth is a check digit: the
# substitution of the group's free digit. The reward is 1 if the answer follows every rule. The translated
# digits can all be decoded in parallel. A check digit depends on a free choice made 4 tokens earlier: at B=4
# that choice is always in an earlier, finished block, but at B >= 8 both can sit masked in the same block,
# and committing the check first is a guess that fails 9 times in 10. A B=4 model has never seen that
# situation, so at B=8..32 it fails often and at random (the free digit is sampled), which gives RL a signal.
# Several valid answers per question also make the rollouts of a group differ, as a language model's do.
# (The paper's task, math with a \boxed{} answer, is in Part II, section 13.)


TOY_GROUPS = 4                                  # groups of five digits in the answer
TOY_NEXT = (7, 4, 0, 9, 1, 8, 2, 5, 3, 6)       # digit substitution


def toy_problem(rng: random.Random) -> dict:
    q, a = [], []
    for _ in range(TOY_GROUPS):
        free = rng.randrange(10)
        digits = [rng.randrange(10) for _ in range(3)]
        q.append("?" + "".join(map(str, digits)) + "?")
        a.append(str(free) + "".join(str(TOY_NEXT[d]) for d in digits) + str(TOY_NEXT[free]))
    return {"question": "".join(q) + "=", "answer": "".join(a)}


def toy_reward(response: str, question: str) -> float:
    """1.0 if the response follows every rule of the question (see above), else 0.0."""
    q, r = question.rstrip("="), response.strip()
    if len(r) != len(q) or not r.isdigit():
        return 0.0
    for k in range(0, len(q), 5):
        g, x = q[k:k + 5], [int(c) for c in r[k:k + 5]]
        if any(x[j] != TOY_NEXT[int(g[j])] for j in (1, 2, 3)) or x[4] != TOY_NEXT[x[0]]:
            return 0.0
    return 1.0


# ======================================================================================================
# 2. Block attention
# ======================================================================================================
# Blocks are cut at absolute positions offset + k*B (SDAR's convention is offset 0; T*'s shifted boundaries use
# offset B/2). With offset > 0 the first block [0, offset) is shorter. Block index of position p:
# b(p) = floor((p - offset) / B).
#
# One mask builder serves the sampler, the warm start and the trainer. Every token is either clean (a
# finalized token) or noisy (a token of a block being denoised, some of them masks); a noisy token belongs to
# one noisy copy c >= 1 (the sampler has one; the trainer packs several copies of blocks into one sequence,
# section 5), a clean token to none (c = 0). Rules:
#     clean query i may see clean key j  iff  b(j) <= b(i)                 (block-causal)
#     noisy query i may see clean key j  iff  b(j) <  b(i)                 (finished blocks before it)
#                       and noisy key j  iff  b(j) == b(i), c(j) == c(i)   (its own copy, bidirectional)
# Padding keys are never seen; a padding query sees only itself (a query that may see nothing is a NaN source
# on some attention kernels). The sampler's current block is the noisy part and its KV cache the clean part;
# training sequences are [clean sequence | noisy copy of the response blocks]. Example, B = 2, offset 0: clean
# positions 0..3 (blocks 0 0 1 1) and a noisy copy of block 1 (positions 2' 3'); 1 = the query may see the key:
#                      keys  0 1 2 3 2' 3'
#     queries 0, 1 (clean)   1 1 . .  .  .      block 0 sees itself
#     queries 2, 3 (clean)   1 1 1 1  .  .      block 1 sees block 0 and itself
#     queries 2', 3' (noisy) 1 1 . .  1  1      the noisy block sees block 0 and itself, not its clean twin


def block_index(pos, block_size: int, offset: int = 0):
    """b(p) = floor((p - offset) / B); works on ints and on integer tensors."""
    return (pos - offset) // block_size


def block_start(p: int, block_size: int, offset: int = 0) -> int:
    """First position of the block that holds position p (0 for the short first block when offset > 0)."""
    return max(0, offset + block_index(p, block_size, offset) * block_size)


def response_blocks(prompt_len: int, n: int, block_size: int, offset: int) -> torch.Tensor:
    """(n,) the block index of each of the first n response tokens (response token i sits at position P + i)."""
    return block_index(prompt_len + torch.arange(n), block_size, offset)


def block_attention_mask(q_pos, q_noisy, k_pos, k_noisy, k_valid, block_size: int, offset: int = 0,
                         q_start: int | None = None):
    """Boolean attention mask (batch, 1, Lq, Lk), True = may attend.

    q_pos, q_noisy: (batch, Lq) positions and noisy copies c of the queries (0 = clean; a bool flag is copy 1),
    which are the keys q_start .. q_start + Lq - 1 (default: the last Lq keys).
    k_pos, k_noisy, k_valid: (batch, Lk) positions, noisy copies and real-token flags of the keys."""
    bq = block_index(q_pos, block_size, offset)[:, :, None]                 # (batch, Lq, 1)
    bk = block_index(k_pos, block_size, offset)[:, None, :]                 # (batch, 1, Lk)
    cq, ck = q_noisy.long()[:, :, None], k_noisy.long()[:, None, :]         # copies: (batch, Lq, 1), (batch, 1, Lk)
    # a clean key j: seen by a clean query iff b(j) <= b(i), by a noisy one iff b(j) <= b(i) - 1
    sees_clean_key = bk.masked_fill(ck > 0, torch.iinfo(torch.long).max) <= bq - (cq > 0).long()
    # a noisy key j: seen by the queries of its own copy in its own block (a clean query has no copy: never)
    sees_noisy_key = (ck.masked_fill(ck == 0, -1) == cq) & (bk == bq)
    Lq, Lk = q_pos.shape[1], k_pos.shape[1]
    q_start = Lk - Lq if q_start is None else q_start
    q_real = k_valid[:, q_start: q_start + Lq, None]                        # (batch, Lq, 1)
    allow = (sees_clean_key | sees_noisy_key) & k_valid[:, None, :] & q_real    # (batch, Lq, Lk)
    allow.diagonal(q_start, 1, 2).logical_or_(~q_real[:, :, 0])              # a padding query sees itself
    return allow[:, None]                                                   # (batch, 1, Lq, Lk)


# ======================================================================================================
# 3. The sampler
# ======================================================================================================
# Blockwise masked-diffusion decoding, the protocol of SDAR's generate.py (SDAR, arXiv 2510.06303):
#   * Blocks are aligned at absolute position `offset` (prompt included). The prompt's whole blocks are
#     prefilled once into the KV cache; the prompt's tail shares the first decoded block with masks.
#   * Each block starts fully masked and gets up to K steps. Each step is one forward of the block
#     (queries = block, keys = cache + block), a candidate token and a confidence for every masked
#     position, and a commit of some positions:
#         static   the step's quota n_s of most confident positions,
#         dynamic  every position with confidence > tau, or the n_s most confident if fewer pass,
#         ass      ascending step size: 2^s positions at step s, the rest at the last step (below).
#     Example, dynamic, tau = 0.9, a block of 4 with K = 4 (quota 1 a step): confidences 0.95 0.40 0.92 0.10
#     commit the first and the third position at once; 0.85 0.40 0.60 0.10 commit the first alone. The
#     step map records the row's step of each commit: a block decoded left to right reads s s+1 s+2 s+3, a
#     block decoded in one step s s s s (TPF 4).
#   * A finished block's keys and values must be cached, clean. SDAR spends one extra forward on that;
#     here the first step of the next block carries it: its queries are [finished block, clean | new
#     block, all masks], and under the block mask (section 2) the clean half sees exactly what a separate
#     store pass would see. Same attention, one forward fewer per block, not counted in NFE either way.
#   * A row stops after the block in which it produced a stop id, or after the block that reaches the
#     length limit. Like SDAR, that last block is decoded whole (B masks), then the response is cut at
#     --max-new-tokens for rewards and metrics; the tokens past the cut were decoded, so they stay in
#     the trajectory and are trained like the tokens after a stop token.
#
# Two schedules of the CJ-GRPO paper (arXiv 2509.23924) plug into the same loop:
#   * ASS, ascending step size (--remasking ass): a block with m masked positions takes ceil(log2 m) steps;
#     step s commits the 2^s most confident positions and the last step all that remain (B=8: 1, 2, 5). K is
#     not used.
#   * EOSER (--eoser): at step s of the n steps a block plans, the confidence of every candidate that is a
#     stop token is multiplied by g_s = g_min + (g_max - g_min) s / (n - 1), so the end of the answer is
#     committed late. It changes which positions are committed, never the sampled tokens.
#
# Rows of different prompt lengths share a batch by left padding into one frame (padded_frame): row i is
# shifted right by pad_i so that every row's first decoded block starts at the same column D, which keeps
# the block boundaries of all rows aligned. All per-token decisions are tensor ops over (rows, B); Python
# loops run over blocks and steps only. The forward passes belong to the Decoder (Part II): it keeps the
# keys and values in buffers written in place, and moves the live rows to the front when half are done.


@dataclass
class Generation:
    """One sampled response. `ids` is the whole decoded trajectory: every response position the sampler
    filled, through the end of the last decoded block (after a stop token, or past the length limit, the
    block was still filled)."""
    # e.g. B = 4, a prompt ending 2 tokens into a block (so the first decoded block has 2 response slots), 6
    # tokens of which the 4th is eos: ids x x x eos x x, n_tokens 4, stopped True; the step map
    # counts the row's forwards, so its largest value is nfe (every step commits at least one token)
    ids: list[int]
    step_map: list[int]      # per token of ids: the row's denoising step (1..nfe) that finalized it
    logprobs: list[float]    # per token of ids: log-prob the sampler's model gave it at that step
    nfe: int                 # denoising forwards this row took part in
    n_tokens: int            # the response: through the first stop token, at most max_new_tokens
    stopped: bool            # a stop token within max_new_tokens (False: truncated by the length limit)
    prompt_len: int
    offset: int


def step_quotas(m: torch.Tensor, K: int, remasking: str) -> torch.Tensor:
    """Tokens to commit at each step of a block with m masked positions: (rows,) -> (rows, steps).

    static/dynamic: m split over K' = min(K, m) steps, m // K' each and the remainder one each over the
    first steps (every step commits at least one token).  ass: 1, 2, 4, ... and the remainder at the last
    of ceil(log2 m) steps (B=8: 1, 2, 5)."""
    m = m.long()
    if remasking == "ass":
        n_steps = torch.ceil(torch.log2(m.clamp(min=1).double())).long().clamp(min=1)   # (rows,)
        s = torch.arange(int(n_steps.max()), device=m.device)[None, :]                  # (1, steps)
        last = m[:, None] - (2 ** (n_steps[:, None] - 1) - 1)                           # remainder
        quota = torch.where(s < n_steps[:, None] - 1, 2 ** s, last)                       # 1, 2, 4, ..., last
        return torch.where(s < n_steps[:, None], quota, 0)
    n_steps = m.clamp(min=1, max=K)                                                      # (rows,)
    s = torch.arange(K, device=m.device)[None, :]                                        # (1, K)
    quota = (m // n_steps)[:, None] + (s < (m % n_steps)[:, None]).long()
    return torch.where(s < n_steps[:, None], quota, 0)


def propose(logits, temperature: float, top_k: int, top_p: float, generator=None, mask_id: int | None = None):
    """A candidate token, its confidence and its log-prob for each masked position.

    logits: (M, V). The mask token is removed from the logits first. Greedy (temperature 0): candidate = argmax,
    confidence = its probability under the softmax of the remaining logits. Otherwise the candidate is sampled
    from softmax(logits / T) restricted by top-k / top-p, and the confidence is its probability under that
    distribution. The log-prob is under the model's own full distribution, mask token included: the quantity
    the trainer recomputes. At most three (M, V) fp32 tensors are alive at once (more with top-p:
    propose_bytes_per_logit)."""
    logits = logits.float()                                                   # (M, V)
    if mask_id is not None:
        at_mask = logits[:, mask_id].clone()                                  # (M,) restored below
        logits = logits.index_fill(1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    if temperature == 0:
        cand = logits.argmax(-1)                                              # (M,)
        conf = logits.log_softmax(-1).gather(1, cand[:, None]).squeeze(1).exp()
    else:
        z = logits / temperature
        # top-k keeps the k most likely tokens; top-p the smallest set of most likely tokens whose mass reaches p
        if top_k > 0:
            kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if top_p < 1.0:
            sorted_z, order = z.sort(dim=-1, descending=True)
            p_sorted = sorted_z.softmax(-1)
            drop = p_sorted.cumsum(-1) - p_sorted > top_p                     # mass before it already > p
            z = z.scatter(1, order, sorted_z.masked_fill(drop, float("-inf")))
        probs = z.softmax(-1)
        del z                                                                 # at most three (M, V) alive
        cand = torch.multinomial(probs, 1, generator=generator).squeeze(1)     # (M,)
        conf = probs.gather(1, cand[:, None]).squeeze(1)
        del probs
    if mask_id is not None:                                                   # the model's own logits again
        logits[:, mask_id] = at_mask
    return cand, conf, logits.log_softmax(-1).gather(1, cand[:, None]).squeeze(1)


def choose_commits(todo, conf, quota, remasking: str, threshold: float):
    """Which masked positions a step commits. todo: (n, B) still masked; conf: (M,) the confidence of
    each masked position (row-major over todo); quota: (n,) the step's n_s. Returns (n, B) bool:
    static (and ass, with its own quotas) the n_s most confident; dynamic every position with conf > tau, or
    the n_s most confident if fewer pass (ties broken by position)."""
    score = torch.full(todo.shape, float("-inf"), device=todo.device)
    score[todo] = conf                                                        # (n, B)
    n_commit = torch.maximum(quota, (score > threshold).sum(1)) if remasking == "dynamic" else quota
    n_commit = torch.minimum(n_commit, todo.sum(1))
    rank = score.sort(dim=1, descending=True, stable=True).indices.argsort(dim=1)   # (n, B) 0 = most confident
    return todo & (rank < n_commit[:, None])


def eoser_factor(s: int, n_steps: torch.Tensor, g_min: float, g_max: float) -> torch.Tensor:
    """EOSER's g_s = g_min + (g_max - g_min) s / (n - 1) for each row's n planned steps; g_max if n = 1."""
    frac = s / (n_steps - 1).clamp(min=1)
    return torch.where(n_steps > 1, g_min + (g_max - g_min) * frac, g_max)


@dataclass
class Frame:
    """The state of a batch of rows in one padded frame: row i's position p sits at column pad_i + p."""
    x: torch.Tensor          # (n, W) tokens: prompt, then the decoded response (the fill id elsewhere)
    pos: torch.Tensor        # (n, W) position of each column in its row (0 on left padding)
    valid: torch.Tensor      # (n, W) a real token or response slot
    is_resp: torch.Tensor    # (n, W) a response slot
    end: torch.Tensor        # (n,) column just past the row's last block
    live: torch.Tensor       # (n,) still decoding
    step_map: torch.Tensor   # (n, W) the row's step that finalized each response token
    logp: torch.Tensor       # (n, W) the log-prob the sampler gave it then
    nfe: torch.Tensor        # (n,) denoising forwards so far
    index: torch.Tensor      # (n,) the row's place in the caller's list of prompts
    D: int                   # first decoded column, a block boundary of every row

    def select(self, keep: torch.Tensor) -> "Frame":
        """The frame with only the rows `keep` (for compaction; a row kept twice is a copy)."""
        return Frame(**{f.name: getattr(self, f.name)[keep] if f.name != "D" else self.D
                        for f in dataclasses.fields(self)})


def padded_frame(prompts, block_size: int, offset: int, max_new_tokens: int, fill_id: int, device) -> Frame:
    """Lay the prompts out in one frame, the first decoded block of every row at column D, and each row's response
    rounded up to whole blocks."""
    B = block_size
    P = torch.tensor([len(p) for p in prompts], device=device)                # (n,)
    # the start of the block holding P: < 0 for a virtual block reaching before 0 (only when offset > 0)
    first = offset + block_index(P, B, offset) * B                             # (n,)
    D = max(int(first.max()), 0)
    pad = D - first                                                            # (n,)
    end = D + B * torch.div(pad + P + max_new_tokens - D + B - 1, B, rounding_mode="floor")   # (n,)
    W = int(end.max())
    col = torch.arange(W, device=device)
    pos = col[None, :] - pad[:, None]                                          # (n, W)
    valid = (pos >= 0) & (col[None, :] < end[:, None])
    is_resp = valid & (pos >= P[:, None])
    x = torch.full((len(prompts), W), fill_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):                                            # one copy per row
        x[i, pad[i]: pad[i] + len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    return Frame(x=x, pos=pos.clamp(min=0), valid=valid, is_resp=is_resp, end=end,
                 live=torch.ones_like(P, dtype=torch.bool), step_map=torch.zeros_like(x),
                 logp=torch.zeros_like(x, dtype=torch.float), nfe=torch.zeros_like(P),
                 index=torch.arange(len(prompts), device=device), D=D)


def generation_of(frame: Frame, i: int, c_end: int, stops, max_new_tokens: int, prompt_len: int, offset: int):
    """Row i of the frame, decoded through column c_end, as a Generation: the response runs through its first
    stop token, and at most max_new_tokens (a response without a stop token in them was truncated)."""
    r = frame.is_resp[i, :c_end]
    ids = frame.x[i, :c_end][r]
    hit = torch.isin(ids[:max_new_tokens], stops).nonzero()
    return Generation(ids=ids.tolist(), step_map=frame.step_map[i, :c_end][r].tolist(),
                      logprobs=frame.logp[i, :c_end][r].tolist(), nfe=int(frame.nfe[i]),
                      n_tokens=int(hit[0]) + 1 if len(hit) else min(len(ids), max_new_tokens), stopped=bool(len(hit)),
                      prompt_len=prompt_len, offset=offset)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, mask_id: int, stop_ids: Sequence[int] = (),
             block_size: int = 4, steps: int | None = None, remasking: str = "dynamic", threshold: float = 0.9,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 64,
             offset: int = 0, eoser: tuple[float, float] | None = None, generator=None,
             kv_cache: bool = True, decoder: Decoder | None = None) -> list[Generation]:
    """Decode a response for every prompt (lists of token ids); one Generation per prompt, in order.

    block_size B, steps K (default B), remasking static/dynamic/ass, threshold tau, offset of the block
    boundaries (0 <= offset < B), eoser = (gamma_min, gamma_max) to scale stop-token confidences (EOSER).
    `decoder` reuses one Decoder (its cache and CUDA graphs) over several calls; by default each call
    makes its own. kv_cache=False recomputes the whole sequence at every step (for checks)."""
    B, K = block_size, steps or block_size
    if not 0 <= offset < B or remasking not in ("static", "dynamic", "ass"):
        raise ValueError(f"offset must be in [0, {B}) and remasking static, dynamic or ass; got {offset}, {remasking}")
    was_training = model.training
    model.eval()                       # (training mode with gradient checkpointing would disable the cache)
    dev = next(model.parameters()).device
    frame = padded_frame(prompts, B, offset, max_new_tokens, stop_ids[0] if stop_ids else mask_id, dev)
    decoder = decoder or Decoder(model, len(prompts), frame.x.shape[1], kv_cache)
    frame = decoder.start(frame, B, offset)                 # prefill the prompts' whole blocks (in the decoder's shape)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    results: list[Generation | None] = [None] * len(prompts)

    for c in range(frame.D, int(frame.end.max()), B):                         # block by block: columns c..c+B-1
        todo = frame.is_resp[:, c: c + B] & frame.live[:, None]               # (n, B) still masked
        xb = torch.where(todo, mask_id, frame.x[:, c: c + B])                 # (n, B)
        quotas = step_quotas(todo.sum(1), K, remasking)                       # (n, steps)
        n_steps = (quotas > 0).sum(1)                                         # (n,) steps this block plans
        # one step: a forward of the block, a candidate for every masked position, a commit of some of them (the
        # rest stay masked); the first step of a block also stores the finished block before it (store_previous)
        for s in range(quotas.shape[1]):
            if not todo.any():
                break
            h = decoder.step(frame, xb, c, store_previous=s == 0 and c > frame.D)   # (n, B, H)
            frame.nfe += todo.any(1)
            cand, conf, logp = propose(model.lm_head(h[todo]), temperature, top_k, top_p, generator, mask_id)
            if eoser is not None:      # EOSER: stop-token confidence x g_s, rising to g_max
                g = eoser_factor(s, n_steps, *eoser)[todo.nonzero()[:, 0]]     # (M,) each position's row
                conf = torch.where(torch.isin(cand, stops), conf * g, conf)
            commit = choose_commits(todo, conf, quotas[:, s], remasking, threshold)   # (n, B)
            picked = commit[todo]                          # (M,) which candidates are committed (row-major, as cand)
            xb[commit], frame.logp[:, c: c + B][commit] = cand[picked], logp[picked]
            frame.step_map[:, c: c + B] = torch.where(commit, frame.nfe[:, None], frame.step_map[:, c: c + B])
            todo &= ~commit
        frame.x[:, c: c + B] = xb
        # rows with a stop token in this block, or at their last block, are done
        done = frame.live & ((torch.isin(xb, stops) & frame.is_resp[:, c: c + B]).any(1) | (frame.end <= c + B))
        for i in done.nonzero()[:, 0].tolist():
            j = int(frame.index[i])
            results[j] = generation_of(frame, i, c + B, stops, max_new_tokens, len(prompts[j]), offset)
        frame.live &= ~done
        if not frame.live.any():
            break
        frame = decoder.compact(frame)               # when half the rows are done, the live ones to the front
    model.train(was_training)
    return results


def sampler_kwargs(cfg: Config, block_size: int, rollout: bool = False) -> dict:
    """The sampler settings of the config, for rollouts (rollout temperature) or evaluation; the Engine adds the
    mask and stop ids."""
    return dict(block_size=block_size, steps=cfg.steps_per_block, remasking=cfg.remasking, threshold=cfg.threshold,
                temperature=cfg.rollout_temperature if rollout else cfg.temperature, top_k=cfg.top_k,
                top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                eoser=(cfg.eoser_gamma_min, cfg.eoser_gamma_max) if cfg.eoser else None)


# ======================================================================================================
# 4. Warm start: block-diffusion SFT (SDAR's loss)
# ======================================================================================================
# Training sequences use one layout for the warm start and for TraceRL (section 5):
#     [ prompt | clean response | noisy copy of the response's blocks ]
# with positions repeated for the noisy copy. The noisy copy starts at the first position of the block
# holding the first response token, so it carries the prompt's tail unmasked, exactly as the sampler's
# first block does. Under block_attention_mask a noisy block sees the clean blocks before it and itself,
# which is what the sampler's forward saw: the trainer reproduces the sampler's logits.
#
# SDAR's loss (arXiv 2510.06303): per sample t ~ U(0, 1), p = (1 - eps) t + eps; every response token is masked
# with probability p; the loss is the cross-entropy of the masked tokens divided by p, averaged over response
# tokens. The tiny model's warm start stands in for SDAR's "AR-initialised small-block model".
#
# Example, B = 2, offset 0, prompt "ab=" (P = 3) and response "xy" + eos (L = 3), all of it masked: the noisy
# copy starts at position 2, the start of the block holding the first response token, so the prompt's "="
# rides along unmasked, as in the sampler's first block:
#     ids        a b = x y <eos> | = <M> <M> <M>
#     positions  0 1 2 3 4 5     | 2 3   4   5        (the noisy copy's targets: x, y, <eos>)


def diffusion_layout(prompt, response, masked, block_size: int, offset: int, mask_id: int):
    """R training sequences of one sample, one per noisy version of its response.

    prompt (P,), response (L,) long; masked (R, L) bool, True where the noisy copy shows a mask.
    Returns ids, pos, noisy (R, T) and col (L,), the column of response token i's noisy copy."""
    P, L, R = len(prompt), len(response), masked.shape[0]
    b0 = block_start(P, block_size, offset)
    # every copy: the clean sequence, then the noisy copy's prompt tail (P - b0 tokens) and noisy response
    shared = torch.cat([prompt, response, prompt[b0:]])                          # (P + L + P - b0,)
    ids = torch.cat([shared.expand(R, -1), torch.where(masked, mask_id, response)], 1)   # (R, T)
    pos = torch.cat([torch.arange(P + L), torch.arange(b0, P + L)]).to(prompt.device)
    noisy = torch.arange(len(pos), device=prompt.device) >= P + L
    col = P + L + (P - b0) + torch.arange(L, device=prompt.device)
    return ids, pos.expand(R, -1), noisy.expand(R, -1), col


def block_diffusion_loss(model, prompts, responses, block_size: int, mask_id: int, pad_id: int,
                         generator=None, eps: float = 1e-3):
    """SDAR's loss on a batch of (prompt, response) id tensors, blocks at offset 0.

    Each response is padded with pad_id (warm_start: eos) to the end of its last block (the pads are targets:
    the model learns to finish a block with eos). Per sample t ~ U(0,1), p = (1 - eps) t + eps; every response
    token is masked with probability p (at least one). Loss = sum over masked tokens of CE / p, divided by the
    number of response tokens in the batch."""
    dev = prompts[0].device
    seqs, targets, total = [], [], 0
    for j, (prompt, response) in enumerate(zip(prompts, responses)):
        padded_len = block_size * math.ceil((len(prompt) + len(response)) / block_size) - len(prompt)
        response = torch.cat([response, response.new_full((padded_len - len(response),), pad_id)])
        p = (1 - eps) * torch.rand((), generator=generator) + eps
        u = torch.rand(padded_len, generator=generator)
        masked = ((u < p) | (u == u.min())).to(dev)                                   # (L,)
        ids, pos, noisy, col = diffusion_layout(prompt, response, masked[None], block_size, 0, mask_id)
        seqs.append((ids[0], pos[0], noisy[0]))
        col = col[masked]                                                            # the masked tokens: targets
        targets.append((torch.full_like(col, j), col, response[masked], torch.full(col.shape, 1.0 / float(p))))
        total += padded_len
    ids, pos, noisy, valid = pad_rows(*zip(*seqs), pad_id=pad_id)
    rows, cols, labels, weights = (torch.cat(t).to(dev) for t in zip(*targets))                # (M,) each
    logp, _, _ = forward_targets(model, ids, pos, noisy, valid, rows, cols, labels, block_size, 0)
    return -(logp * weights).sum() / total


def warm_start(model, tokenizer, problems, cfg: Config, device) -> list[float]:
    """Block-diffusion SFT of a freshly initialised model on the toy train split, at cfg.base_block_size
    (SDAR's loss, see above). Returns the loss of every step."""
    B = cfg.base_block_size
    prompts = [torch.tensor(tokenizer.encode(q), dtype=torch.long, device=device) for q in problems["question"]]
    answers = [torch.tensor(tokenizer.encode(a) + [tokenizer.eos_token_id], device=device)
               for a in problems["answer"]]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warm_start_lr, betas=(0.9, 0.98), weight_decay=0.0)
    # lr = peak x min(1, (s+1)/warmup) x (0.1 + 0.9 (1 + cos(pi s/T)) / 2): a linear warm-up times a cosine
    # decay to 10%, both from step 0. (transformers' get_cosine_with_min_lr_schedule_with_warmup starts the
    # cosine after the warm-up: another schedule, and other warm starts than the README's.)
    warmup = max(1, cfg.warm_start_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.warm_start_steps)))))
    gen = torch.Generator().manual_seed(seed_for(cfg.seed))
    model.train()
    # each step: a batch of random problems (with replacement), each with its own noise level p (SDAR's loss)
    losses = []
    bar = tqdm(range(cfg.warm_start_steps), desc=f"warm start (B={B})", mininterval=10)
    for _ in bar:
        pick = torch.randint(len(prompts), (cfg.warm_start_batch,), generator=gen).tolist()
        loss = block_diffusion_loss(model, [prompts[i] for i in pick], [answers[i] for i in pick], B,
                                    tokenizer.mask_token_id, tokenizer.eos_token_id, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return losses


# ======================================================================================================
# 5. Trace rounds (TraceRL, arXiv 2509.06949)
# ======================================================================================================
# The rollout recorded, for every response token, the step at which it was finalized. Training rebuilds
# the states the sampler actually visited. Inside each block, sort the block's distinct step ids; round r
# takes the r-th of them in every block at once:
#     targets  the tokens finalized at that step,
#     masked   every token of the block finalized at that step or later (earlier ones stay visible).
# Blocks that have run out of steps are fully visible in later rounds. Example, B=4 (x target, M masked,
# . visible), step map [1,1,2,1 | 3,5,4,6 | 7,7,7,7]:
#     round 1  xxMx xMMM xxxx     round 2  ..x. .MxM ....     round 3  .... .x.M ....     round 4  .... ...x ....
# (the second block's steps are 3, 4, 5, 6: in round 1 step 3 is the target and the rest masked, and so on.)
# A shrink of s (--shrink) merges each run of s consecutive distinct steps of a block into one round: its
# targets are predicted together from the state before the run (s = 1 reproduces the trajectory exactly).
#
# The training layout. The obvious one (the warm start's, section 4) is one sequence per round, [prompt |
# clean response | noisy copy of every block]: R rounds cost R (P + 2L) tokens, though the prompt and the
# clean response are the same in every round, and in round r only the blocks with a target need a noisy copy
# (a noisy block sees the clean blocks before it and itself, never another noisy block). So each sample is
# laid out once, [prompt | clean response | one noisy copy per (round, block with a target in it)], each copy
# at its block's positions and with its own copy id c (section 2): P + L + B x (the blocks' steps) tokens,
# the same logits at every target. Example, B = 2, prompt "ab", response x y z w, step map [1 2 | 3 3]
# (round 1: x, and z w together; round 2: y, with x visible). Copies: c1 = block 1 in round 1, c2 = block 2 in
# round 1, c3 = block 1 in round 2; 1 = the query may see the key:
#                              keys  a b x y z w | c1: M M | c2: M M | c3: x M
#     positions                      0 1 2 3 4 5 |     2 3 |     4 5 |     2 3
#     queries a b      (clean)       1 1 . . . . |     . . |     . . |     . .
#     queries x y      (clean)       1 1 1 1 . . |     . . |     . . |     . .
#     queries z w      (clean)       1 1 1 1 1 1 |     . . |     . . |     . .
#     copy c1: M M     (targets x)   1 1 . . . . |     1 1 |     . . |     . .
#     copy c2: M M     (targets z w) 1 1 1 1 . . |     . . |     1 1 |     . .
#     copy c3: x M     (target y)    1 1 . . . . |     . . |     . . |     1 1
# 12 tokens where one sequence per round takes 2 x 10. A sample whose copies would make a sequence longer than
# --micro-batch-tokens is cut into several such sequences, each with its own prompt and clean response.


def trace_rounds(step_map: Sequence[int], block_size: int, offset: int = 0, prompt_len: int = 0,
                 shrink: int = 1):
    """Step map of one response -> (targets, masked), two (rounds, L) bool tensors (see above): targets[r]
    are the tokens committed at round r, masked[r] the tokens still masked in the state round r starts from.
    The blocks are those of the rollout: the response's token i sits at position prompt_len + i."""
    L, rnd, i = len(step_map), [], 0
    while i < L:                                 # block by block: tokens i .. end-1 of the response
        end = min(L, offset + (block_index(prompt_len + i, block_size, offset) + 1) * block_size - prompt_len)
        steps = list(step_map[i:end])
        order = sorted(set(steps))               # the block's distinct steps, in order
        rnd += [order.index(t) // shrink for t in steps]     # the r-th of them is round r (with shrink: r // s)
        i = end
    rnd = torch.tensor(rnd)                                                            # (L,)
    rounds = torch.arange(int(rnd.max()) + 1)[:, None]                                 # (R, 1)
    return rnd[None, :] == rounds, rnd[None, :] >= rounds


@dataclass
class TraceBatch:
    """Training sequences of a rollout batch (the packed layout above: one per sample, or a few) and their targets.

    Target arrays are flat over the whole batch and ordered by sequence: the targets of sequence k are
    ptr[k]:ptr[k+1]. Every response token is the target of exactly one noisy copy (the round of its step), so a
    batch's targets are its samples' tokens, each once."""
    ids: list                    # per sequence: (T,) tokens of [prompt | clean response | noisy copies]
    pos: list                    # per sequence: (T,) positions
    noisy: list                  # per sequence: (T,) noisy copy ids (0 = clean)
    ptr: torch.Tensor            # (n_seq + 1,)
    col: torch.Tensor            # (M,) column of the target in its sequence
    label: torch.Tensor          # (M,) target token
    sample: torch.Tensor         # (M,) which rollout sample
    token: torch.Tensor          # (M,) index of the token in its response
    round: torch.Tensor          # (M,) trace round (0-based)
    step: torch.Tensor           # (M,) denoising step at which the sampler committed the target
    sampler_logp: torch.Tensor   # (M,) log-prob the sampler saw

    def targets(self, seqs: Sequence[int]) -> torch.Tensor:
        """The indices in the flat arrays of the targets of the sequences `seqs`."""
        return torch.cat([torch.arange(int(self.ptr[k]), int(self.ptr[k + 1])) for k in seqs] or
                         [torch.zeros(0, dtype=torch.long)])


def noisy_copies(prompt, response, targets, masked, block_size: int, offset: int, mask_id: int):
    """The noisy copies of one sample (section 5): for every round r and block with a target in it, in round
    order, (ids, pos, token) of the copy and the response tokens it targets. prompt (P,), response (L,);
    targets, masked (R, L) from trace_rounds. A copy of the first block carries the prompt's tail, unmasked, as
    the sampler's first block did."""
    P, L = len(prompt), len(response)
    blocks = response_blocks(P, L, block_size, offset)                            # (L,)
    copies = []
    for r in range(targets.shape[0]):
        for k in blocks[targets[r]].unique().tolist():
            i = (blocks == k).nonzero()[:, 0]                                     # the block's response tokens
            start = block_start(P + int(i[0]), block_size, offset)                # (< P: the prompt's tail)
            ids = torch.cat([prompt[start:P], torch.where(masked[r, i], mask_id, response[i])])
            copies.append((ids, torch.arange(start, P + int(i[-1]) + 1), i[targets[r, i]]))
    return copies


def build_trace_batch(prompts, gens: Sequence[Generation], samples: Sequence[int], block_size: int, offset: int,
                      shrink: int, mask_id: int, budget: tuple[int, int] | None = None) -> TraceBatch:
    """Trace rounds of the chosen samples in the packed layout (section 5): per sample [prompt | clean response |
    its noisy copies], cut into several sequences where one would exceed the budget of a forward (tokens,
    targets), each sequence holding at least one copy. The layout uses the rollout's own offset, so every
    noisy block sees exactly what the sampler saw when it committed the targets."""
    max_tokens, max_targets = budget or (math.inf, math.inf)
    sequences = []      # each: its pieces (ids, pos, copy id), its length, its targets (col, sample, token, round)
    for j in samples:
        g = gens[j]
        prompt, response = torch.tensor(prompts[j], dtype=torch.long), torch.tensor(g.ids, dtype=torch.long)
        P, L = len(prompt), len(response)
        targets, masked = trace_rounds(g.step_map, block_size, offset, P, shrink)               # (R, L)
        round_of = targets.long().argmax(0)                                                     # (L,)
        clean = (torch.cat([prompt, response]), torch.arange(P + L), torch.zeros(P + L, dtype=torch.long))
        seq = None
        for ids, pos, tokens in noisy_copies(prompt, response, targets, masked, block_size, offset, mask_id):
            if seq is None or seq["length"] + len(ids) > max_tokens or seq["n"] + len(tokens) > max_targets:
                seq = dict(pieces=[clean], length=P + L, targets=[], n=0)                    # a new sequence
                sequences.append(seq)
            col = seq["length"] + P + tokens - pos[0]                            # the targets' columns
            seq["targets"].append(torch.stack([col, torch.full_like(col, j), tokens, round_of[tokens]], 1))
            seq["pieces"].append((ids, pos, torch.full_like(ids, len(seq["pieces"]))))   # copy ids 1, 2, ...
            seq["length"] += len(ids)
            seq["n"] += len(tokens)
    ids, pos, noisy = ([torch.cat([piece[f] for piece in seq["pieces"]]) for seq in sequences] for f in range(3))
    flat = torch.cat([t for seq in sequences for t in seq["targets"]] or [torch.zeros(0, 4, dtype=torch.long)])
    col, sample, token, rnd = flat.unbind(1)                                                    # (M,) each

    def per_target(field: str, dtype) -> torch.Tensor:      # a field of each target's Generation, (M,)
        return torch.tensor([getattr(gens[j], field)[i] for j, i in zip(sample.tolist(), token.tolist())], dtype=dtype)
    ptr = torch.tensor([0] + [seq["n"] for seq in sequences], dtype=torch.long).cumsum(0)
    return TraceBatch(ids, pos, noisy, ptr, col, per_target("ids", torch.long), sample, token, rnd,
                      per_target("step_map", torch.long), per_target("logprobs", torch.float))


# ======================================================================================================
# 6. TraceRL loss, value head and GAE (TraceRL, arXiv 2509.06949)
# ======================================================================================================
# Rewards to advantages. Each prompt has G samples with 0/1 rewards r. Prompts whose samples all agree
# (reward variance 0) carry no signal and are dropped, as are prompts whose accuracy lies outside
# --acc-band (TraceRL keeps [0.2, 0.8]). Per kept group:
#     gae    (TraceRL)   z = (r - mean) / std, placed on the tokens of the last denoising step, then GAE
#     group  (CJ-GRPO)   A = r - mean on every token, no value head
#
# The value head is a linear layer on the policy's final hidden states, read at the same noisy positions
# as the targets. Its input is detached: value gradients do not reach the trunk. TraceRL trains a
# separate value model; sharing the trunk would let a fresh, noisy value loss move the policy's weights
# at a learning rate chosen for the policy, so we keep them apart and give the head its own (larger)
# learning rate. The price: the value is a linear probe of features learned for the policy.
#
# GAE over denoising steps. For one sample, t runs over its distinct steps in chronological order (all
# blocks together). With per-step means r*_t and V*_t of the token rewards and values finalized at t,
#     delta_t = r*_t - V*_t + gamma V*_{t+1}   A*_t = delta_t + gamma lambda A*_{t+1}   R*_t = r*_t + gamma R*_{t+1}
#     A_i = r_i - V_i + gamma V*_{t+1} + gamma lambda A*_{t+1}        R_i = r_i + gamma R*_{t+1}
# for token i finalized at t (the values after the last step are 0). With gamma = lambda = 1 this is
# A_i = R - V_i: the outcome minus the token's own value. Example, gamma = lambda = 1, a sample decoded in steps
# 1, 2, 3 with z = 0.6: the tokens of step 3 get reward 0.6, all others 0; every token's return is R = 0.6, and a
# token whose value head says V_i = 0.2 gets advantage 0.4. With gamma < 1 a token of step t gets R = gamma^(3-t)
# z: a reward discounted by the steps between its commit and the end of the answer.
#
# Policy loss per target token (PPO clip, k3 KL to the pre-update policy):
#     rho = exp(logp - logp_old)      L_i = -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta (e^d - 1 - d),
#     d = logp_old - logp.
# Normalisation: TraceRL (gae) averages over all target tokens of the minibatch (not a padded length);
# CJ-GRPO (group) averages within each trace round, then over the rounds of a sample, then over samples (a
# minibatch holding some of a sample's rounds weighs it by that share).
# Value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2), averaged over tokens.


def group_advantages(rewards: torch.Tensor, mode: str, band: tuple[float, float] = (0.0, 1.0)):
    """rewards (prompts, G) -> (advantages, signal), both (prompts, G): gae  z = (r - mean) / std,  group
    A = r - mean, per group (std over the G samples, not unbiased). Dropped groups (all equal, or an accuracy
    outside the band) have no signal and advantage 0. Example: rewards 1 0 1 0 give z = 1 -1 1 -1."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, unbiased=False, keepdim=True)
    signal = ((std > 0) & (mean >= band[0]) & (mean <= band[1])).expand_as(rewards)
    adv = (rewards - mean) / std.clamp(min=1e-8) if mode == "gae" else rewards - mean
    return torch.where(signal, adv, 0.0), signal


def gae_over_steps(rewards, values, step_map, gamma: float = 1.0, lam: float = 1.0):
    """Per-token advantages and returns by GAE over denoising steps (equations above).

    rewards, values: (N, L) float; step_map: (N, L) long, the step of each token, 0 for padding. 1-D
    inputs are one sample. Returns (advantages, returns) shaped like rewards (0 at padding)."""
    one = rewards.dim() == 1
    if one:
        rewards, values, step_map = rewards[None], values[None], step_map[None]
    N, T = rewards.shape[0], int(step_map.max())
    zeros = torch.zeros(N, T + 1, dtype=rewards.dtype, device=rewards.device)
    count = zeros.scatter_add(1, step_map, torch.ones_like(rewards))                 # (N, T+1); slot 0 = padding
    r_star = zeros.scatter_add(1, step_map, rewards) / count.clamp(min=1)            # per-step means
    v_star = zeros.scatter_add(1, step_map, values) / count.clamp(min=1)
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    next_v, next_a, next_r = (torch.zeros(N, 1, dtype=rewards.dtype, device=rewards.device) for _ in range(3))
    for t in range(T, 0, -1):                       # backwards over steps; the same for every sample
        at = step_map == t                                                           # (N, L)
        adv = torch.where(at, rewards - values + gamma * next_v + gamma * lam * next_a, adv)
        ret = torch.where(at, rewards + gamma * next_r, ret)
        has = count[:, t: t + 1] > 0                # a sample whose step t exists moves its "next"
        a_t = r_star[:, t: t + 1] - v_star[:, t: t + 1] + gamma * next_v + gamma * lam * next_a
        next_r = torch.where(has, r_star[:, t: t + 1] + gamma * next_r, next_r)
        next_a = torch.where(has, a_t, next_a)
        next_v = torch.where(has, v_star[:, t: t + 1], next_v)
    return (adv[0], ret[0]) if one else (adv, ret)


def token_advantages(outcome, sample, token, step, values, *, gamma: float = 1.0, lam: float = 1.0):
    """Per-target advantages and returns of TraceRL (equations above), for the targets of S samples.

    outcome: (S,) each sample's z-scored reward; sample, token, step, values: (M,) per target its sample
    (0..S-1; a sample without targets adds nothing), its index in the response, the denoising step that
    committed it, and V_old. The outcome is the reward of the tokens of the sample's last step; every other
    token's reward is 0. Returns (M,), (M,)."""
    steps = torch.zeros(len(outcome), int(token.max()) + 1, dtype=torch.long)     # (S, L) step maps, 0 = none
    steps[sample, token] = step
    v = torch.zeros(steps.shape)
    v[sample, token] = values
    last = steps.max(1, keepdim=True).values                                    # (S, 1) each sample's final step
    reward = torch.where(steps == last, outcome[:, None].float(), 0.0)            # (S, L)
    adv, ret = gae_over_steps(reward, v, steps, gamma, lam)
    return adv[sample, token], ret[sample, token]


def ppo_token_loss(logp, logp_old, adv, *, clip_eps: float, beta: float):
    """Per-token PPO-clip loss plus beta * k3 KL to the old policy. Returns (loss, ratio, kl), each (M,):
        rho = exp(logp - logp_old),  L = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta (e^d - 1 - d),
        d = logp_old - logp.
    Where the clipped term is the smaller one, the surrogate's gradient is 0: a token already moved far enough
    (rho beyond 1 + eps with A > 0, or below 1 - eps with A < 0) is not pushed further (only the KL pulls it)."""
    ratio = torch.exp(logp - logp_old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    d = logp_old - logp
    kl = torch.exp(d) - 1 - d
    return -surrogate + beta * kl, ratio, kl


def clipped_value_loss(values, values_old, returns, clip_eps: float):
    """Per-token PPO value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped = values_old + (values - values_old).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def token_weights(tb: TraceBatch, mode: str) -> torch.Tensor:
    """Weight of each target in the policy loss, before normalisation (section 6 header):
    gae: 1 per token (the loss is a mean over tokens); group: 1 / (tokens in its round) / (rounds of its
    sample), so that each sample weighs 1 in the whole batch, spread evenly over its rounds. The caller
    divides by the sum of the weights over all processes, which makes the loss of N processes that of one on
    their union."""
    M = len(tb.label)
    if mode == "gae" or M == 0:
        return torch.ones(M)
    key = tb.sample * (int(tb.round.max()) + 1) + tb.round                      # (M,) one per (sample, round)
    _, inv, per_round = torch.unique(key, return_inverse=True, return_counts=True)
    rounds = torch.zeros(int(tb.sample.max()) + 1).scatter_reduce(0, tb.sample, tb.round.float() + 1, "amax")
    return 1.0 / (per_round[inv].float() * rounds[tb.sample])


def explained_variance(returns, values) -> float | None:
    """1 - Var(R - V) / Var(R) over the targets of all processes; None when the returns do not vary (one
    target, or all alike): then no value explains anything."""
    var_r, resid = global_mean((returns - global_mean(returns)) ** 2), returns - values      # over processes
    return 1 - global_mean((resid - global_mean(resid)) ** 2) / var_r if var_r > 1e-8 else None


def new_value_head(model) -> torch.nn.Linear:
    head = torch.nn.Linear(model.config.hidden_size, 1).to(next(model.parameters()).device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


# ======================================================================================================
# 7. Metrics
# ======================================================================================================
# accuracy     mean reward over all samples;  pass@k  P(at least one of k samples right), unbiased
# TPF          tokens per forward: sum of response tokens / sum of NFE (a ratio of sums over the batch)
# LocalStrict  over adjacent response-token pairs (i, i+1) inside one block, the fraction decoded in
#              left-to-right order, s_i <= s_{i+1} (1 = never right to left). T* (arXiv 2601.11214)
#              reports LocalStrict without a formula; this is this file's definition. Example, B = 4, a
#              prompt of 2, step map 1 2 | 3 3 5 4 | 6 6: of the in-block pairs (1,2) (3,3) (3,5) (5,4) (6,6)
#              all but (5,4) are in order: LocalStrict 4/5.
# truncated    the fraction of responses cut by the length limit (they score 0)
# Every one but pass@k is a ratio of sums over the samples of all processes (rollout_stats), for RL steps and
# evaluation alike; pass@k (evaluation only) is a mean over problems.


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def tokens_per_forward(tokens: float, nfe: float) -> float:
    """TPF = response tokens / denoising forwards, each summed over a batch (and over processes)."""
    return tokens / max(1.0, nfe)


def local_strict(step_maps: Sequence[Sequence[int]], prompt_lens: Sequence[int], block_size: int,
                 offset: int = 0) -> tuple[int, int]:
    """(ordered, pairs): the adjacent response-token pairs inside one block with s_i <= s_{i+1}, and all of them.
    LocalStrict is ordered / pairs, summed over processes first."""
    ordered = pairs = 0
    for steps, P in zip(step_maps, prompt_lens):
        s = torch.as_tensor(steps)
        blocks = response_blocks(P, len(s), block_size, offset)
        same = blocks[1:] == blocks[:-1]                                   # (L-1,) pairs inside one block
        ordered += int(((s[:-1] <= s[1:]) & same).sum())
        pairs += int(same.sum())
    return ordered, pairs


def global_mean(x: torch.Tensor) -> float:
    """The mean of x's elements over all processes: a ratio of sums (0 when there are none)."""
    return dist_sum(x.double().sum().item()) / max(1.0, dist_sum(x.numel()))


def rollout_stats(gens: Sequence[Generation], rewards, block_size: int, offset: int = 0) -> dict:
    """accuracy, TPF, LocalStrict (None without pairs), mean length and NFE, and the fraction of responses
    truncated by the length limit, each a ratio of sums over the samples of all processes."""
    ordered, pairs = local_strict([g.step_map[: g.n_tokens] for g in gens], [g.prompt_len for g in gens],
                                  block_size, offset)
    # every count a sum over this process's samples, then over all processes; the ratios are taken last
    s = {k: dist_sum(v) for k, v in dict(
        samples=len(gens), correct=float(torch.as_tensor(rewards).sum()), tokens=sum(g.n_tokens for g in gens),
        nfe=sum(g.nfe for g in gens), ordered=ordered, pairs=pairs, cut=sum(not g.stopped for g in gens)).items()}
    n = max(1.0, s["samples"])
    return dict(accuracy=s["correct"] / n, tpf=tokens_per_forward(s["tokens"], s["nfe"]),
                local_strict=s["ordered"] / s["pairs"] if s["pairs"] else None,
                length=s["tokens"] / n, nfe=s["nfe"] / n, truncated=s["cut"] / n)


# ======================================================================================================
# 8. The RL step
# ======================================================================================================
# One TraceRL step (rl_step):
#   1. rollouts: G samples per prompt at temperature 1 from the Engine, and their rewards (collect_rollouts);
#   2. the states the sampler visited, as training sequences (trace rounds, section 5);
#   3. old log-probs and values at the pre-update weights, in the same layout (old_policy_pass); their
#      difference to the log-probs the sampler saw is logged as the trajectory gap. PPO's ratio uses these
#      recomputed log-probs, not the sampler's: with a bf16 rollout copy the two differ by rounding, and the
#      ratio must be 1 at the first minibatch for the clipping to mean what it says;
#   4. advantages per target token (section 6);
#   5. PPO: --minibatches optimizer steps on shuffled shares of the sequences (ppo_minibatches).
# The Engine samples from the policy itself on one process in fp32 (the CPU default: the trainer then
# recomputes the sampler's log-probs up to rounding, a mean gap ~1e-8), else from a copy of its weights in the
# compute dtype, refreshed before every rollout: rollouts run at inference speed in bf16 while training keeps
# fp32 weights.


@dataclass
class Rollouts:
    """The samples of one RL step on this process, G per problem."""
    prompts: list            # per sample: the prompt's token ids
    gens: list               # per sample: its Generation
    rewards: torch.Tensor    # (problems, G): 1/0 correctness; a response truncated by the length limit scores 0
    block_size: int
    offset: int


def rewards_of(gens: Sequence[Generation], problems: Sequence[dict], tokenizer, reward_fn) -> torch.Tensor:
    """(samples,) rewards: reward_fn of each response's text (through its stop token, special tokens removed) and
    its problem; 0 for a response truncated by the length limit."""
    return torch.tensor([reward_fn(tokenizer.decode(g.ids[: g.n_tokens], skip_special_tokens=True), p) if g.stopped
                         else 0.0 for g, p in zip(gens, problems)])


def collect_rollouts(engine: Engine, tokenizer, problems: Sequence[dict], reward_fn, cfg: Config,
                     block_size: int, offset: int, generator) -> Rollouts:
    """G samples per problem at the rollout temperature (1.0; dynamic remasking by default), and rewards."""
    G = cfg.group_size                           # G copies of each prompt: the group whose rewards are compared
    prompts = [ids for p in problems for ids in [encode_prompt(tokenizer, p["question"])] * G]   # encoded once
    per_sample = [p for p in problems for _ in range(G)]
    engine.refresh()                             # the rollout copy: the policy's current weights
    gens = engine.generate(prompts, desc=f"rollouts B={block_size}", offset=offset, generator=generator,
                           **sampler_kwargs(cfg, block_size, rollout=True))
    rewards = rewards_of(gens, per_sample, tokenizer, reward_fn)                                 # (samples,)
    return Rollouts(prompts, gens, rewards.view(-1, G), block_size, offset)


LOGIT_BYTES = 2 ** 30    # one (targets, vocab) fp32 tensor of a micro-batch (1,766 targets at SDAR's vocab)


def pad_rows(ids, pos, noisy, pad_id: int):
    """Right-pad lists of 1-D row tensors into (n, T) tensors plus the real-token mask."""
    valid = pad_sequence([torch.ones(len(r), dtype=torch.bool, device=r.device) for r in ids], batch_first=True)
    return (pad_sequence(list(ids), batch_first=True, padding_value=pad_id),
            pad_sequence(list(pos), batch_first=True), pad_sequence(list(noisy), batch_first=True), valid)


def trainer_budget(cfg: Config, vocab_size: int) -> tuple[int, int]:
    """(tokens, targets) one forward of the trainer may hold: --micro-batch-tokens, padding included, and as many
    targets as have their fp32 logits (targets x vocab x 4 bytes) within LOGIT_BYTES. With real weights dynamic
    decoding commits most of a block at its first step, so a micro-batch of four 2000-token responses would hold
    8,000 targets: 4.9 GB for one (targets, vocab) fp32 tensor at SDAR's vocabulary of 151,936."""
    return cfg.micro_batch_tokens, max(1, LOGIT_BYTES // (4 * vocab_size))


def micro_batches(tb: TraceBatch, seqs: Sequence[int], budget: tuple[int, int]) -> list[list[int]]:
    """The training sequences `seqs` in groups of one forward each, longest first (less padding): as many as fit
    the budget (trainer_budget) padded to the longest (a sequence over budget forms a group alone)."""
    max_tokens, max_targets = budget
    groups, group, targets = [], [], 0
    for k in sorted(seqs, key=lambda k: -len(tb.ids[k])):
        m = int(tb.ptr[k + 1] - tb.ptr[k])
        if group and (len(tb.ids[group[0]]) * (len(group) + 1) > max_tokens or targets + m > max_targets):
            groups.append(group)
            group, targets = [], 0
        group.append(k)
        targets += m
    return groups + [group] if group else groups


def forward_targets(model, ids, pos, noisy, valid, rows, cols, labels, block_size: int, offset: int,
                    value_head=None, entropy: bool = False):
    """log p(label) at (rows, cols) of a padded batch of training sequences, and optionally the value
    head's estimate there and the entropy of the model's distribution there (for the log).
    ids/pos/noisy/valid: (n, T); rows, cols, labels: (M,). Returns logp, values, entropy: (M,) or None."""
    mask = block_attention_mask(pos, noisy, pos, noisy, valid, block_size, offset)    # (n, 1, T, T)
    h = hidden_states(model, ids, pos, mask)[rows, cols]                                # (M, H)
    logp_all = model.lm_head(h).float().log_softmax(-1)                                 # (M, V)
    logp = logp_all.gather(1, labels[:, None]).squeeze(1)                               # (M,)
    values = ent = None
    if value_head is not None:                  # fp32: autocast would run the Linear in bf16 whatever its input
        with torch.autocast(h.device.type, enabled=False):
            values = value_head(h.detach().float()).squeeze(-1)
    if entropy:                                                                         # H = -sum_v p log p
        ent = -(logp_all.detach().exp() * logp_all.detach()).sum(-1)
    return logp, values, ent


def forward_sequences(model, value_head, tb: TraceBatch, chunks: Sequence[Sequence[int]], block_size: int,
                      offset: int, pad_id: int, entropy: bool = False):
    """Forward the training sequences one micro-batch (a list of sequence indices, micro_batches) at a time.
    Yields (targets, logp, values, entropy) per micro-batch: the indices of its targets in tb's flat arrays and
    their log-probs, values and (with entropy=True) the entropy of the policy there, each (M_mb,). An empty
    micro-batch (the padding of as_many_everywhere) forwards a stand-in and yields empty tensors."""
    dev = next(model.parameters()).device
    for chunk in chunks:
        if not chunk:
            # FSDP's padding: one clean token, its own target, and none of it yielded. A loss made of the empty
            # results is 0, and its backward still reaches every weight, as FSDP needs.
            one = torch.tensor([[pad_id]], device=dev)
            z = torch.zeros_like(one)
            out = forward_targets(model, one, z, z, z == 0, z[0], z[0], one[0], 1, 0, value_head, entropy)
            yield (torch.zeros(0, dtype=torch.long), *(t if t is None else t[:0] for t in out))
            continue
        tgt = tb.targets(chunk)
        ids, pos, noisy, valid = (t.to(dev) for t in pad_rows([tb.ids[k] for k in chunk], [tb.pos[k] for k in chunk],
                                                                [tb.noisy[k] for k in chunk], pad_id))
        rows = torch.arange(len(chunk)).repeat_interleave(tb.ptr.diff()[chunk])     # (M_mb,) each target's row
        logp, values, ent = forward_targets(model, ids, pos, noisy, valid, rows.to(dev), tb.col[tgt].to(dev),
                                            tb.label[tgt].to(dev), block_size, offset, value_head, entropy)
        yield tgt, logp, values, ent


def minibatch_plan(tb: TraceBatch, cfg: Config, budget: tuple[int, int], shuffle) -> list[list[list[int]]]:
    """The training sequences in --minibatches shuffled shares, each cut into micro-batches (lists of sequence
    indices, one forward each). The old pass and the update forward these same groups: kernels in bf16 are not
    batch-invariant, and other padded lengths would make the ratio at the first minibatch other than 1."""
    order = torch.randperm(len(tb.ids), generator=shuffle, device=shuffle.device).cpu()
    return [as_many_everywhere(micro_batches(tb, mb.tolist(), budget)) for mb in order.tensor_split(cfg.minibatches)]


@torch.no_grad()
def old_policy_pass(policy, value_head, tb: TraceBatch, plan, cfg: Config, block_size: int, offset: int,
                    pad_id: int):
    """log p_old, V_old (None without a value head) and the policy's entropy at every target, (M,) each, from
    one pass at the pre-update weights over the micro-batches of the plan."""
    dev = next(policy.parameters()).device
    M = len(tb.label)
    logp_old, v_old, entropy = torch.zeros(M), torch.zeros(M), torch.zeros(M)
    with autocast(cfg, dev):
        for tgt, logp, values, ent in forward_sequences(policy, value_head, tb, [c for mb in plan for c in mb],
                                                        block_size, offset, pad_id, entropy=True):
            logp_old[tgt], entropy[tgt] = logp.cpu(), ent.cpu()
            v_old[tgt] = values.cpu() if values is not None else 0.0
    return logp_old, v_old if value_head is not None else None, entropy


def ppo_minibatches(policy, value_head, opt, tb: TraceBatch, plan, logp_old, v_old, adv, ret, weights, cfg: Config,
                    block_size: int, offset: int, pad_id: int) -> dict:
    """One optimizer step per minibatch of the plan. Each micro-batch's loss is divided by the minibatch's
    global weight (gae: its number of target tokens, over all processes) and its gradient accumulated; FSDP
    sums the processes' gradients once, after the minibatch's last backward (gradient_sync): the gradient of
    the global mean. Returns the logged statistics."""
    dev = next(policy.parameters()).device
    policy.train()
    clipped, kls, vlosses, plosses, norms = [], [], [], [], []
    for chunks in plan:
        norm = max(dist_sum(weights[tb.targets([k for c in chunks for k in c])].sum().item()), 1e-12)
        with autocast(cfg, dev):
            scored = forward_sequences(policy, value_head, tb, chunks, block_size, offset, pad_id)
            for i, (tgt, logp, values, _) in enumerate(scored):
                per_tok, ratio, kl = ppo_token_loss(logp, logp_old[tgt].to(dev), adv[tgt].to(dev),
                                                    clip_eps=cfg.clip_eps, beta=cfg.beta)
                loss = (per_tok * weights[tgt].to(dev)).sum() / norm
                plosses.append(loss.item())
                if value_head is not None:
                    vl = clipped_value_loss(values, v_old[tgt].to(dev), ret[tgt].to(dev), cfg.clip_eps)
                    loss = loss + vl.sum() / norm            # a value head means gae: a mean over targets
                    vlosses.append(vl.detach().cpu())
                gradient_sync(policy, value_head, i == len(chunks) - 1)
                loss.backward()
                clipped.append(((ratio - 1).abs() > cfg.clip_eps).detach().cpu())
                kls.append(kl.detach().cpu())
        norms.append(clip_grad_norm(policy, cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)          # freed: no memory held through the next minibatch or rollouts
    return dict(clipfrac=global_mean(torch.cat(clipped)), kl=global_mean(torch.cat(kls)),
                policy_loss=dist_sum(sum(plosses)) / cfg.minibatches, grad_norm=float(np.mean(norms)),
                value_loss=global_mean(torch.cat(vlosses)) if vlosses else None)


def ppo_update(policy, value_head, opt, ro: Rollouts, cfg: Config, mask_id: int, pad_id: int, shuffle) -> dict:
    """The TraceRL update on a batch of rollouts (steps 2-5 of rl_step). Under FSDP each process passes its
    own rollouts; every mean is taken over all processes, so N processes make the update one process would
    make on the union of their rollouts (with --minibatches 1; with more, each process splits its own).
    Statistics that were not measured (no group with a signal; no value head) are absent or None."""
    B, offset = ro.block_size, ro.offset
    value_head = value_head if cfg.advantage == "gae" else None       # CJ-GRPO has no value
    # which samples teach something: per group, z-scored rewards (gae) or rewards minus the mean (group)
    sample_adv, signal = group_advantages(ro.rewards, cfg.advantage, cfg.acc_band)             # (prompts, G)
    sample_adv, learn_from = sample_adv.flatten(), signal.flatten().nonzero()[:, 0].tolist()   # (samples,), indices
    stats = rollout_stats(ro.gens, ro.rewards, B, offset)
    stats.update(kept=dist_sum(len(learn_from)) / max(1.0, dist_sum(len(ro.gens))))

    # 2. the states the sampler visited, as training sequences
    budget = trainer_budget(cfg, policy.config.vocab_size)          # (tokens, targets) of one forward
    tb = build_trace_batch(ro.prompts, ro.gens, learn_from, B, offset, cfg.shrink, mask_id, budget)
    M = len(tb.label)
    if dist_sum(M) == 0:                         # no prompt with signal on any process: nothing to learn
        return stats

    # 3. old log-probs and values: the pre-update weights, the same layout. The trajectory gap |log p_old -
    #    log p_sampler| per target is ~1e-8 when the policy samples itself (fp32), a rounding error with a
    #    bf16 rollout copy: its mean, the share above 0.1 and its largest value are logged.
    plan = minibatch_plan(tb, cfg, budget, shuffle)
    logp_old, v_old, entropy = old_policy_pass(policy, value_head, tb, plan, cfg, B, offset, pad_id)
    gap = (logp_old - tb.sampler_logp).abs()
    stats.update(traj_gap=global_mean(gap), traj_gap_max=dist_max(gap.max().item() if M else 0.0),
                 traj_gap_over=global_mean(gap > 0.1), entropy=global_mean(entropy))

    # 4. advantages per target token: the outcome spread over each sample's denoising steps by GAE
    #    (TraceRL), or the sample's own advantage on every token (CJ-GRPO)
    if value_head is not None:               # (M = 0: a process may hold no sample with a signal while others do)
        adv, ret = token_advantages(sample_adv, tb.sample, tb.token, tb.step, v_old, gamma=cfg.gamma,
                                    lam=cfg.gae_lambda) if M else (torch.zeros(0), torch.zeros(0))
        stats["explained_var"] = explained_variance(ret, v_old)
    else:
        adv, ret = sample_adv[tb.sample], None
    weights = token_weights(tb, cfg.advantage)

    # 5. PPO: --minibatches optimizer steps
    stats.update(ppo_minibatches(policy, value_head, opt, tb, plan, logp_old, v_old, adv, ret, weights, cfg, B,
                                 offset, pad_id))
    return stats


def rl_step(policy, value_head, opt, engine: Engine, tokenizer, problems: Sequence[dict], reward_fn, cfg: Config,
            block_size: int, offset: int, seed: int) -> dict:
    """One TraceRL step: rollouts from the engine, then a PPO update of the policy and the value head. `seed`
    starts the step's one random stream, on the model's device: the rollouts' sampling, then the update's
    shuffle."""
    t0 = time.time()
    generator = torch.Generator(engine.device).manual_seed(seed)
    ro = collect_rollouts(engine, tokenizer, problems, reward_fn, cfg, block_size, offset, generator)
    stats = ppo_update(policy, value_head, opt, ro, cfg, tokenizer.mask_token_id, tokenizer.eos_token_id, generator)
    return {**stats, "seconds": time.time() - t0}


# ======================================================================================================
# 9. The T* curriculum (T*, arXiv 2601.11214)
# ======================================================================================================
# T* runs TraceRL at B, then doubles B (4 -> 8 -> 16 -> 32); each stage starts from the previous stage's
# weights and value head, with a fresh optimizer. Inside a stage a fraction f of the RL steps (default
# half) use shifted block boundaries, offset = B/2, for the rollout and for the training layout alike,
# so the trajectory stays consistent; the other steps use offset 0. Evaluation always uses offset 0.
# The shifted steps are spread evenly over the stage: step k is shifted iff floor((k+1) f) > floor(k f).
# --direct is the paper's baseline: the same number of stages and steps, all at the final block size.
# The default plan: 4 stages of 30 steps at B = 4, 8, 16, 32, with offsets 0, 2, 0, 2, ... at B = 4 and 0, 16,
# 0, 16, ... at B = 32; --direct: the same 4 x 30 steps, all at B = 32.
#
# train() is the whole method: an evaluation of the start model, then per stage --steps-per-stage RL steps at
# the stage's block size and planned offsets, an evaluation at every evaluation block size, and a checkpoint.


def stage_plan(block_sizes: Sequence[int], steps_per_stage: int, shift_fraction: float,
               direct: bool = False) -> list[tuple[int, list[int]]]:
    """[(B, [offset of each RL step])] per stage: the shifted steps (offset B/2) spread evenly, e.g.
    stage_plan([4, 8], 4, 0.5) = [(4, [0, 2, 0, 2]), (8, [0, 4, 0, 4])]."""
    shifted = [math.floor((k + 1) * shift_fraction) > math.floor(k * shift_fraction) for k in range(steps_per_stage)]
    sizes = [block_sizes[-1]] * len(block_sizes) if direct else block_sizes     # direct: every stage at the last B
    return [(B, [B // 2 if s else 0 for s in shifted]) for B in sizes]


def seed_for(seed: int, stage: int = 0, step: int = 0, rank: int = 0) -> int:
    """The seed of one torch random stream of a run: RL step `step` of stage `stage` on process `rank` (its
    rollouts' sampling, then its update's shuffle), and evaluation (as stage: the one after the last; as step: the
    block size). 10,007 and 101 are primes and the processes lie 1,000,000,007 apart, so two of a run's streams
    share a seed only if their steps differ by a multiple of 10,007. The warm start's masks and the initial
    weights use seed_for(seed), the same number as the first RL step's seed; they draw other kinds of numbers,
    so nothing is repeated. The problems of a step are drawn from the same (stage, step) by draw_problems."""
    return seed * 1_000_003 + stage * 10_007 + step * 101 + rank * 1_000_000_007


def draw_problems(problems: Sequence[dict], n: int, seed: int, stage: int, step: int) -> list[dict]:
    """n distinct problems for RL step `step` of stage `stage`: Python's random seeded "seed-stage-step", the same
    draw on every process (each takes every N-th)."""
    return random.Random(f"{seed}-{stage}-{step}").sample(list(problems), n)


def train(cfg: Config, model, value_head, engine: Engine, tokenizer, train_problems, eval_sets, reward_fn,
          rec: Recorder, done: int = 0, save=None) -> None:
    """The T* loop: stages of TraceRL at growing block sizes, an evaluation and a checkpoint after each
    (save(stage, B), from run: Part II's save_stage); `done` stages were finished by an earlier run (--resume).
    Each stage has a fresh AdamW (the policy at --lr, the value head at --value-lr); the weights and the value
    head carry over from stage to stage."""
    plan = stage_plan(cfg.block_sizes, cfg.steps_per_stage, cfg.shift_fraction, cfg.direct)
    if done == 0:
        evaluate_stage(engine, tokenizer, eval_sets, reward_fn, cfg, rec, 0, plan[0][0], 0)
    rank, size = world()
    for k in range(done, len(plan)):
        B, offsets = plan[k]
        opt = torch.optim.AdamW([{"params": model.parameters(), "lr": cfg.lr},
                                 {"params": value_head.parameters(), "lr": cfg.value_lr}], weight_decay=0.0)
        for step, offset in enumerate(offsets):
            # the step's problems: one draw, the same on every process, which takes every N-th of them; its
            # rollouts and its update's shuffle: a random stream of its own (seed_for)
            problems = draw_problems(train_problems, cfg.prompts_per_step, cfg.seed, k, step)
            stats = rl_step(model, value_head, opt, engine, tokenizer, problems[rank::size], reward_fn, cfg, B,
                            offset, seed_for(cfg.seed, k, step, rank))
            rec.rl_step(dict(kind="train", stage=k + 1, block_size=B, offset=offset, stage_step=step,
                             step=k * cfg.steps_per_stage + step + 1, **stats))
        evaluate_stage(engine, tokenizer, eval_sets, reward_fn, cfg, rec, k + 1, B, (k + 1) * cfg.steps_per_stage)
        if save is not None:
            save(k + 1, B)
    rec.finished()


# ======================================================================================================
# 10. Evaluation
# ======================================================================================================
# Evaluation decodes every problem of each evaluation set --eval-samples times at offset 0 and reports the
# metrics of section 7 per block size, summed over processes (each takes every N-th problem). Every stage's
# evaluation at a block size draws the same random numbers: with sampling (the SDAR preset's temperature
# 1.0), stages differ by their weights only. After each stage the decoding order of a few samples at the
# stage's block size is drawn (the paper's Figure 4).


def evaluate(engine: Engine, tokenizer, problems: Sequence[dict], reward_fn, cfg: Config, block_size: int):
    """Metrics of one evaluation set at one block size (offset 0), over all processes. Returns the
    metrics dict and this process's generations (for pictures of the decoding order)."""
    rank, size = world()
    mine = list(problems)[rank::size]
    n = cfg.eval_samples
    prompts = [ids for p in mine for ids in [encode_prompt(tokenizer, p["question"])] * n]     # encoded once
    per_sample = [p for p in mine for _ in range(n)]
    seed = seed_for(cfg.seed, len(cfg.block_sizes), block_size, rank)     # the same for every stage
    t0 = time.time()
    gens = engine.generate(prompts, rows=cfg.eval_batch, desc=f"eval B={block_size}",
                           generator=torch.Generator(engine.device).manual_seed(seed),
                           **sampler_kwargs(cfg, block_size))
    seconds = dist_sum(time.time() - t0) / size                           # the processes ran side by side
    rewards = rewards_of(gens, per_sample, tokenizer, reward_fn).numpy().reshape(-1, n)
    metrics = rollout_stats(gens, rewards, block_size)
    n_problems = dist_sum(len(mine))            # pass@n: per problem from its n samples, then the mean
    metrics.update({f"pass@{n}": dist_sum(sum(pass_at_k(n, int(c), n) for c in rewards.sum(1))) / max(1, n_problems),
                    "tokens_per_s": metrics["length"] * dist_sum(len(gens)) / max(1e-9, seconds),
                    "problems": int(n_problems)})
    return dict(block_size=block_size, **metrics), gens


def evaluate_stage(engine: Engine, tokenizer, eval_sets, reward_fn, cfg: Config, rec: Recorder, stage: int,
                   stage_block_size: int, step: int) -> None:
    """Evaluate after `stage` (0: the start model) at every evaluation block size, and record it."""
    engine.refresh()                              # the rollout copy: the weights this stage ended with
    for name, problems in eval_sets.items():
        for B in cfg.eval_block_sizes:
            metrics, gens = evaluate(engine, tokenizer, problems, reward_fn, cfg, B)
            rec.evaluation(dict(kind="eval", stage=stage, dataset=name, stage_block_size=stage_block_size,
                                step=step, **metrics), gens)


# ######################################################################################################
# PART II: running it for real
# ######################################################################################################
# Everything below runs the method rather than being it: the command line, SDAR checkpoints, math data and
# grading, the fast sampler (Decoder, Engine, the memory plan), devices and FSDP2, checkpoints and the out
# dir, logs, and main. Read on to change how tstar runs, not what it does.


# ======================================================================================================
# 11. Config and the command line
# ======================================================================================================
# One dataclass holds every setting, and the command line is generated from it: each field's docstring is its
# --help text, each "# --- name ---" comment its group (cleanrl's Args style). Defaults are the tiny CPU run;
# with a checkpoint as --model (not the toy's), SDAR_PRESET's values replace them, and any flag given wins. Each
# field's type checks its flag's value (its range beside it, Annotated; paths get their ~ expanded), finalize_config
# the few rules that relate settings, so a bad flag is one line of error before any work starts.


class UsageError(Exception):
    """Bad input from the user: main() prints the message as one line and exits with code 2."""


@contextlib.contextmanager
def reading(path, fix: str = "", own: bool = False):
    """The one boundary for every file tstar reads but did not just write: data, model configs and weights,
    tokenizers, and its own files (own=True) after a person edited them. Whatever goes wrong inside (a parse
    error, bytes that are not UTF-8, a weights file cut short, a record of the wrong shape) is one line of error
    naming the file and what is wrong, with `fix`, what to do; a library's cache directory that cannot be
    written is named as such (cache_failure). Nothing is written before it."""
    try:
        yield
    except (UsageError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        what = (getattr(e, "msg", None) if isinstance(e, json.JSONDecodeError) else None) or str(e).strip()
        what = f"{type(e).__name__}: {what.splitlines()[0][:200]}" if what else type(e).__name__
        message = f"{path} cannot be read{' back' if own else ''} ({what})" + (f": {fix}" if fix else "")
        raise UsageError(cache_failure(e) or message) from None


def cache_failure(error: BaseException) -> str | None:
    """The message for a failure to write a library's cache (e.g. a home directory that cannot be written), which
    names the directory and the variable that moves it; None for any other error."""
    import datasets
    import huggingface_hub.constants as hub

    caches = ((datasets.config.HF_DATASETS_CACHE, "HF_DATASETS_CACHE"), (hub.HF_HUB_CACHE, "HF_HUB_CACHE"),
              (hub.HF_HOME, "HF_HOME"))
    while error is not None:
        name = getattr(error, "filename", None)
        for cache, variable in caches:
            if isinstance(error, OSError) and name and str(name).startswith(str(cache)):
                return (f"the cache directory {cache} cannot be written ({error.strerror or type(error).__name__}): "
                        f"set {variable} to a directory that can")
        error = error.__cause__ or error.__context__
    return None


def user_paths(text: str) -> str:
    """A flag's path, or comma-separated paths, with a leading ~ expanded (the shell leaves --model=~/x alone)."""
    return ",".join(os.path.expanduser(part.strip()) for part in text.split(","))


@dataclass
class Config:
    # --- run ---
    model: Annotated[str, user_paths] = str(Path(__file__).resolve().with_name("tiny_config.json"))
    """a config JSON (random init of that architecture, e.g. tiny_config.json), a local checkpoint
    directory, or a hub id such as JetLM/SDAR-1.7B-Chat"""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda if available, else cpu)"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype: float32, bfloat16, or auto (bfloat16 on cuda, float32 on cpu)"""
    seed: Annotated[int, checked(int, 0, 2 ** 32 - 1)] = 0
    """seed of the toy data, the initial weights, sampling and the curriculum"""
    out_dir: Annotated[str, user_paths] = "runs/tiny"
    """where the warm start, stage checkpoints, metrics.jsonl, tables and plots go"""

    # --- sampler ---
    base_block_size: Annotated[int, checked(int, 1)] = 4
    """B of the model T* starts from (SDAR's 4): the tiny model's warm start trains at it"""
    steps_per_block: Annotated[int | None, checked(int, 1)] = None
    """K, denoising steps per block (default: K = B)"""
    remasking: Literal["static", "dynamic", "ass"] = "dynamic"
    """static: commit the step's quota by confidence; dynamic: also every token above tau; ass: 1, 2, 4, ...
    tokens per step (section 3)"""
    threshold: Annotated[float, checked(float, 0, 1)] = 0.9
    """tau, the confidence threshold of dynamic remasking"""
    temperature: Annotated[float, checked(float, 0)] = 0.0
    """evaluation sampling temperature (0 = greedy)"""
    top_k: Annotated[int, checked(int, 0)] = 0
    """sample only among the k most likely tokens (0 = off)"""
    top_p: Annotated[float, checked(float, above=0, high=1)] = 1.0
    """nucleus sampling: smallest set of tokens with this much probability (1 = off)"""
    max_new_tokens: Annotated[int, checked(int, 1)] = 64
    """length limit of a response; a response cut by it scores 0"""
    eoser: bool = False
    """EOSER (section 3): scale the confidence of stop-token candidates so that the end comes late"""
    eoser_gamma_min: Annotated[float, checked(float, above=0, high=1)] = 0.4
    """EOSER's factor at a block's first step"""
    eoser_gamma_max: Annotated[float, checked(float, above=0, high=1)] = 1.0
    """EOSER's factor at a block's last step"""
    rollout_batch: Annotated[int | None, checked(int, 1)] = None
    """rows per sampler call, for RL rollouts and evaluation (default: as many as fit in 90% of the free GPU
    memory left beside training, by each row's KV cache and block logits, at most 1024; 256 on the CPU)"""
    compile: bool = False
    """run the sampler's forward passes as captured CUDA graphs (CUDA only; the advice on a GPU)"""

    # --- data ---
    train_size: Annotated[int, checked(int, 1)] = 20000
    """problems in the toy task's train split"""
    test_size: Annotated[int, checked(int, 1)] = 256
    """problems in the toy task's test split (disjoint from train)"""

    # --- warm start ---
    warm_start_steps: Annotated[int, checked(int, 1)] = 600
    """optimizer steps of the tiny model's block-diffusion SFT at --base-block-size"""
    warm_start_batch: Annotated[int, checked(int, 1)] = 32
    """sequences per warm-start step"""
    warm_start_lr: Annotated[float, checked(float, above=0)] = 3e-3
    """peak learning rate of the warm start (a linear warm-up times a cosine decay to 10%, from step 0)"""

    # --- evaluation ---
    eval_only: bool = False
    """only evaluate --model (the warm-started tiny model by default) and exit"""
    eval_block_sizes: Annotated[tuple, block_sizes_list] = ()
    """block sizes to evaluate at, comma-separated (default: those of --block-sizes)"""
    eval_samples: Annotated[int, checked(int, 1)] = 1
    """samples per evaluation problem: accuracy is their mean, pass@k uses all k of them"""
    eval_limit: Annotated[int, checked(int, 0)] = 0
    """evaluate only the first N problems of each evaluation set (0 = all)"""
    eval_batch: Annotated[int | None, checked(int, 1)] = None
    """rows per sampler call during evaluation (default: --rollout-batch)"""
    show_trajectory: bool = False
    """print the decoding order of two evaluation samples at each stage's block size (every B with --eval-only)"""

    # --- T* curriculum and TraceRL ---
    block_sizes: Annotated[tuple, block_sizes_list] = (4, 8, 16, 32)
    """the curriculum: one RL stage per block size, in this (increasing) order"""
    steps_per_stage: Annotated[int, checked(int, 1)] = 30
    """RL steps per stage"""
    direct: bool = False
    """baseline: as many stages and steps, all at the last block size (direct large-block TraceRL)"""
    shift_fraction: Annotated[float, checked(float, 0, 1)] = 0.5
    """fraction of the RL steps of a stage that use shifted block boundaries (offset B/2)"""
    resume: bool = False
    """continue from the last finished stage in --out-dir"""
    prompts_per_step: Annotated[int, checked(int, 1)] = 32
    """prompts per RL step (over all processes)"""
    group_size: Annotated[int, checked(int, 2)] = 8
    """G, samples per prompt"""
    rollout_temperature: Annotated[float, checked(float, 0)] = 1.0
    """sampling temperature of the rollouts"""
    lr: Annotated[float, checked(float, above=0)] = 3e-4
    """learning rate of the policy (AdamW, no weight decay)"""
    value_lr: Annotated[float, checked(float, above=0)] = 1e-3
    """learning rate of the value head"""
    clip_eps: Annotated[float, checked(float, above=0)] = 0.2
    """PPO clip range of the policy ratio and of the value"""
    beta: Annotated[float, checked(float, 0)] = 0.01
    """coefficient of the k3 KL penalty to the pre-update policy"""
    gamma: Annotated[float, checked(float, 0, 1)] = 1.0
    """discount over denoising steps"""
    gae_lambda: Annotated[float, checked(float, 0, 1)] = 1.0
    """lambda of GAE over denoising steps"""
    shrink: Annotated[int, checked(int, 1)] = 1
    """merge runs of this many consecutive denoising steps of a block into one trace round"""
    advantage: Literal["gae", "group"] = "gae"
    """gae: TraceRL (z-scored reward, value head, GAE); group: CJ-GRPO (reward minus group mean, no value)"""
    acc_band: Annotated[tuple, accuracy_band] = (0.0, 1.0)
    """keep only prompts whose group accuracy lies in [low,high] (TraceRL: 0.2,0.8); groups that all agree
    are always dropped"""
    minibatches: Annotated[int, checked(int, 1)] = 2
    """optimizer steps per RL step, each on a shuffled share of the trace sequences"""
    micro_batch_tokens: Annotated[int, checked(int, 1)] = 4096
    """training tokens per forward pass, padding included (gradients are accumulated over micro-batches): a
    sample's packed sequence (section 5) longer than this is cut into several, and a micro-batch holds as many
    as fit; it also stops at 2^30 bytes of fp32 logits of targets. Activations grow with it: SDAR-1.7B takes
    8192 with --grad-checkpointing on an 80 GB GPU"""
    grad_clip: Annotated[float, checked(float, above=0)] = 1.0
    """clip the policy's gradient norm to this"""
    grad_checkpointing: bool = False
    """recompute activations in the backward pass (saves memory; on by default for checkpoints)"""
    train_dataset: Annotated[str, user_paths] = "toy"
    """training problems: toy, or (section 13) a dataset name or a local JSON/JSONL/Parquet file"""
    eval_datasets: Annotated[str, user_paths] = "toy"
    """evaluation sets, comma-separated: toy, dataset names or local files"""


def checked(kind, low=None, high=None, above=None):
    """An argparse type: a number of `kind` (finite) in [low, high], or above `above` (each bound optional)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
        if (low is not None and value < low) or (above is not None and value <= above) or \
                (high is not None and value > high):
            rule = (f"in [{low}, {high}]" if low is not None and high is not None else f"in ({above}, {high}]"
                    if high is not None else f">= {low}" if low is not None else f"> {above}")
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    parse.__name__ = kind.__name__                  # (argparse names the type in its messages)
    return parse


def block_sizes_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated block sizes, each >= 1, increasing: "4,8,16,32"."""
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise argparse.ArgumentTypeError(f"must be increasing block sizes >= 1, got {text!r}")
    return sizes


def accuracy_band(text: str) -> tuple[float, float]:
    """An argparse type: "low,high" with 0 <= low <= high <= 1."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers low,high; got {text!r}") from None
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= low <= high <= 1, got {text!r}")
    return low, high


# The paper's setting (TraceRL arXiv 2509.06949, T* arXiv 2601.11214), for a --model that is not the toy's.
SDAR_PRESET = dict(
    out_dir="runs/sdar", train_dataset="math", eval_datasets="math500", block_sizes=(4, 8, 16, 32),
    steps_per_stage=100, prompts_per_step=64, group_size=16, rollout_temperature=1.0, temperature=1.0,
    remasking="dynamic", threshold=0.9, max_new_tokens=2000, lr=1e-6, value_lr=1e-4, grad_clip=1.0,
    acc_band=(0.2, 0.8), eval_samples=3, micro_batch_tokens=8192, grad_checkpointing=True,
)


def build_parser():
    """The command line, one flag per Config field, grouped by the Config's sections; each field's type (its
    Annotated check, its Literal choices) is the flag's. Python keeps neither a field's docstring nor its section
    comment at runtime, so both are read from the class's source."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):          # one line and exit code 2 (main), not argparse's usage block
            raise UsageError(message.replace("argument ", "", 1).replace(": ", " ", 1))

    source = inspect.getsource(Config)
    body = ast.parse(source).body[0].body
    docs = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    sections, section = {}, ""
    for line in source.splitlines():
        name = line.strip().split(":")[0]
        if line.strip().startswith("# ---"):
            section = line.strip().strip("# -")
        elif name in docs:
            sections[name] = section
    parser = Parser(prog="tstar.py", description=__doc__.split("\n\n")[0],
                    epilog="Defaults are the tiny CPU run; with a checkpoint (not the toy's) as --model the "
                           "paper's setting (SDAR_PRESET) replaces them, and any flag given wins.")
    groups = {s: parser.add_argument_group(s) for s in dict.fromkeys(sections.values())}
    hints = typing.get_type_hints(Config, include_extras=True)
    for f in dataclasses.fields(Config):
        group, hint = groups[sections[f.name]], hints[f.name]
        flag, doc = "--" + f.name.replace("_", "-"), docs[f.name].replace("%", "%%")      # (argparse formats it)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
            continue
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        kind = (typing.get_args(hint)[1] if typing.get_origin(hint) is typing.Annotated else
                str if choices else checked(hint) if hint in (int, float) else hint)
        shown = "" if f.default is None or "default" in doc else f" (default: {flag_value(f.default)})"
        group.add_argument(flag, type=kind, default=f.default, choices=choices,
                           metavar=None if choices else f.name.upper(), help=doc + shown)
    return parser


def flag_value(value) -> str:
    """A setting as its flag takes it: (4, 8) -> "4,8"."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Config from the command line: the tiny run's defaults, or with a checkpoint (not the toy's) as --model the
    paper's setting (SDAR_PRESET) as the defaults; any flag given wins."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not is_toy_model(args.model):
        parser.set_defaults(**SDAR_PRESET)
        args = parser.parse_args(argv)
    return Config(**vars(args))


def finalize_config(cfg: Config) -> Config:
    """The checks that relate settings to each other or to the machine (each flag checked its own value), and the
    defaults that name other settings: one clear error for the first bad one."""
    if not cfg.model.strip():
        raise UsageError("--model is empty: give a config JSON, a checkpoint directory or a hub id")
    checks = [
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None,
         f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"),
        (cfg.out_dir.strip() != "", "--out-dir is empty"),
        (cfg.eoser_gamma_min <= cfg.eoser_gamma_max,
         f"--eoser-gamma-min {cfg.eoser_gamma_min} is larger than --eoser-gamma-max {cfg.eoser_gamma_max}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return dataclasses.replace(cfg, eval_block_sizes=cfg.eval_block_sizes or cfg.block_sizes)


def check_fits(prompt_len: int, max_new_tokens: int, max_positions: int, block_size: int, offset: int) -> None:
    """A prompt plus its longest response, rounded up to the end of its last block (the sampler decodes
    that block whole), must fit the model's positions."""
    last = prompt_len + max_new_tokens - 1
    used = offset + (block_index(last, block_size, offset) + 1) * block_size
    if used > max_positions:
        rounded = f" (up to {used} with whole blocks of {block_size})" if used > last + 1 else ""
        raise UsageError(f"a prompt of {prompt_len} tokens plus --max-new-tokens {max_new_tokens}{rounded} "
                         f"exceeds the model's {max_positions} positions")


def check_block_size(B: int, K: int | None, max_positions: int) -> None:
    """The sampler's block settings must make sense for the model: one clear error if not."""
    if B > max_positions:
        raise UsageError(f"block size {B} exceeds the model's {max_positions} positions")
    if K is not None and K > B:
        raise UsageError(f"--steps-per-block must be between 1 and the block size {B}, got {K}")


# ======================================================================================================
# 12. Models and tokenizers
# ======================================================================================================
# Every model is transformers' own Qwen3ForCausalLM. SDAR checkpoints (SDAR, arXiv 2510.06303) are Qwen3
# weights trained for block diffusion, with Qwen3's weight names: their config says model_type "sdar" and
# points at remote code (which needs flash-attn and an old transformers); we read the config as a dict, drop
# the keys that name the remote classes and versions, and build a Qwen3Config from the rest. There is no logit
# shift: the hidden state at position i predicts the token at position i. The token ids come from the
# tokenizer, none is hard-coded: SDAR's mask token is <|MASK|> (151669), <|endoftext|> (151643) is both eos
# and pad, and its generation config adds <|im_end|> (151645), which ends a chat turn, as a stop id. The tiny
# model uses a character tokenizer with the same interface. Compute runs in bf16 on CUDA (autocast over fp32
# master weights when training) and fp32 on the CPU: chosen in compute_dtype, one place.


_DROP_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "torch_dtype", "dtype")


def qwen3_config(config_dict: dict, name: str = "the model"):
    from transformers import Qwen3Config

    if not isinstance(config_dict, dict):
        raise UsageError(f"{name} is not a model config: it holds {json_kind(config_dict)}, not an object")
    kind = config_dict.get("model_type", "qwen3")
    if kind not in ("qwen3", "sdar"):
        raise UsageError(f"tstar runs Qwen3-architecture block-diffusion models (SDAR); {name} has model_type "
                         f"{json_text(kind)}")
    kwargs = {k: v for k, v in config_dict.items() if k not in _DROP_KEYS}
    if kwargs.get("rope_scaling") is None:
        kwargs.pop("rope_scaling", None)       # SDAR writes null; transformers 5 warns about the key
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "head_dim"):
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{name}: {key} must be a positive integer, got {json_text(value)}")
    try:                                       # transformers' own checks (value types, RoPE parameters)
        config = Qwen3Config(**kwargs)
    except Exception as e:                     # (its validators' errors come wrapped: the cause says what)
        why = str(e.__cause__ or e).strip().strip('"')
        raise UsageError(f"{name} is not a valid Qwen3 config ({why.splitlines()[0][:200]})") from None
    # what the architecture needs, which transformers would only find in the first forward
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % kv_heads:
        raise UsageError(f"{name}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if config.tie_word_embeddings:             # (the rollout copy and the FSDP units take the head as its own weight)
        raise UsageError(f"{name} ties its LM head to its input embedding (tie_word_embeddings): tstar trains "
                         f"untied heads, as SDAR's checkpoints have")
    return config


def char_tokenizer():
    """The tiny model's tokenizer: one token per character, plus eos (= pad), mask and unk.

    Built with the `tokenizers` library and wrapped in PreTrainedTokenizerFast, so it has the same
    interface as a checkpoint's tokenizer (mask_token_id, eos_token_id, decode, save_pretrained)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|mask|>", "<|unk|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every character
    backend.decoder = decoders.Fuse()                                                     # join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mask|>", unk_token="<|unk|>")


def is_architecture_file(model: str) -> bool:
    return model.endswith(".json")


def is_toy_model(model: str) -> bool:
    """A config JSON, or a checkpoint that tstar saved from the toy run (its tstar.json says so)."""
    info = Path(model) / "tstar.json"
    return is_architecture_file(model) or (info.is_file() and read_json(
        info, f"restore it, or delete {model}, a checkpoint tstar saved").get("task") == "toy")


# a long sequence's queries attend in tiles of this many, each to the key tiles it may see: small tiles skip more
# masked pairs, and each costs a call (on a GPU, kernel launches: there larger ones; not measured on a GPU)
ATTENTION_TILE = {"cpu": 64, "cuda": 512}


def block_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The attention of every model tstar loads: PyTorch's scaled_dot_product_attention, registered with
    transformers as "tstar_sdpa". It differs from transformers' "sdpa" in two cases:
      * the sampler's: a few queries against a long cache, with grouped-query attention (SDAR-1.7B: 2 query heads
        per key/value head) and a mask. transformers then copies every key and value G times (repeat_kv) in every
        layer at every step, more memory traffic than the attention itself. Here the G query heads that share a
        key/value head become G x q queries of that head instead:
            query (n, H, q, d) -> (n, H/G, G q, d),  mask (n, 1, q, k) -> (n, 1, G q, k)
        which is the same attention without the copy; the Decoder hands every layer its mask folded so (fold_mask).
      * a sequence longer than two tiles under a boolean mask (the trainer's packed sequences, section 5; a long
        prefill): most of its (query, key) pairs are masked, so the queries attend a tile at a time, each to the
        key tiles holding a pair it may see (tiled_sdpa). The same attention, without the masked tiles.
    Everything else takes transformers' own path unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    G = getattr(module, "num_key_value_groups", 1)
    n, H, q, d = query.shape
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool and q == key.shape[2] > 2 * ATTENTION_TILE[query.device.type]:
        return tiled_sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if mask is None or G == 1 or mask.shape[2] != G * q:             # not folded by the sampler (Decoder)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(n, H // G, G * q, d), key, value, attn_mask=mask,
                                         dropout_p=dropout, scale=scaling)               # (n, H/G, G q, d)
    return out.reshape(n, H, q, d).transpose(1, 2).contiguous(), None                    # (n, q, H, d)


def tiled_sdpa(module, query, key, value, mask, **kwargs):
    """Attention of a long sequence under a boolean mask (n, 1, T, T), ATTENTION_TILE queries at a time, each tile
    against only the key tiles where some row of the batch has a pair it may see. Example, the packed layout of
    section 5: a tile of noisy copies sees the clean tiles before its blocks and itself, not the other copies."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T, t = mask.shape[-1], ATTENTION_TILE[query.device.type]
    outs = []
    for i, cols in enumerate(key_tiles(mask, t)):
        rows = slice(i * t, min(T, (i + 1) * t))
        out, _ = sdpa_attention_forward(module, query[:, :, rows], key[:, :, cols], value[:, :, cols],
                                        mask[:, :, rows][..., cols], **kwargs)         # (n, t, H, d)
        outs.append(out)
    return torch.cat(outs, 1), None                                                   # (n, T, H, d)


_KEY_TILES: list = [None, None]        # (a weak reference to the last mask, its key tiles): one mask, every layer


def key_tiles(mask, t: int) -> list[torch.Tensor]:
    """For each tile of t queries of a (n, 1, T, T) mask, the key columns of the key tiles it may see (in some row of
    the batch). Every layer gets the same mask: made once per forward."""
    if _KEY_TILES[0] is not None and _KEY_TILES[0]() is mask:
        return _KEY_TILES[1]
    n, T = mask.shape[0], mask.shape[-1]
    tiles = -(-T // t)
    grid = F.pad(mask[:, 0], (0, tiles * t - T, 0, tiles * t - T)).view(n, tiles, t, tiles, t)
    needed = grid.any(4).any(2).any(0)                                    # (tiles, tiles): query tile -> key tiles
    within = torch.arange(t, device=mask.device)
    cols = [(row.nonzero() * t + within).flatten() for row in needed]
    _KEY_TILES[:] = weakref.ref(mask), [c[c < T] for c in cols]
    return _KEY_TILES[1]


def fold_mask(mask, G: int, dtype):
    """A (n, 1, q, k) boolean mask as block_sdpa's (n, 1, G q, k) additive one (0 = may attend, -inf not).
    The sampler makes it once per block and query span, and hands it to every layer."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")).repeat(1, 1, G, 1)


def register_attention() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register("tstar_sdpa", block_sdpa)
    AttentionMaskInterface.register("tstar_sdpa", sdpa_mask)     # plain calls without a mask stay causal
    return "tstar_sdpa"


def load_model_and_tokenizer(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a config JSON (random init + character tokenizer), a local checkpoint
    directory, or a hub id. One path for all of them: the model is always Qwen3ForCausalLM with SDPA
    attention (block_sdpa)."""
    import transformers
    from transformers import AutoTokenizer, PretrainedConfig, Qwen3ForCausalLM

    transformers.logging.set_verbosity_error()     # "model of type sdar ..." is expected, not news
    transformers.utils.logging.disable_progress_bar()
    path = Path(model)
    if is_architecture_file(model):
        if not path.is_file():
            raise UsageError(f"no such config file: {model}")
        with reading(model):
            config = qwen3_config(json.loads(path.read_text()), model)
        config._attn_implementation = register_attention()
        tokenizer = char_tokenizer()
        if config.vocab_size < len(tokenizer):
            raise UsageError(f"{model}: vocab_size {config.vocab_size} < {len(tokenizer)} tokens of the tokenizer")
        net = cast_weights(Qwen3ForCausalLM(config), dtype)
    else:
        if path.is_dir() and ((path / ".metadata").is_file() or any(path.glob("*.distcp"))):
            raise UsageError(f"{model} is a sharded torch.distributed.checkpoint directory; tstar loads "
                             f"save_pretrained directories (its own stage checkpoints are whole: stageN-B*/)")
        if path.exists() and not (path / "config.json").is_file():
            raise UsageError(f"{model} is not a checkpoint directory (no config.json in it)")
        looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
        if not path.exists() and looks_local:
            raise UsageError(f"no such model directory: {model}")
        if path.is_dir():
            with reading(path / "config.json"):
                config = qwen3_config(json.loads((path / "config.json").read_text()), model)
        else:                                          # a hub id
            try:
                config = qwen3_config(PretrainedConfig.get_config_dict(model)[0], model)
            except OSError as e:
                raise UsageError(cache_failure(e) or f"cannot load {model!r}: not a local directory, and the hub could "
                                 f"not be reached or has no such model; download it and pass the local directory"
                                 ) from None
        with reading(model):                     # (weights missing or cut short, tokenizer files, a download)
            net = Qwen3ForCausalLM.from_pretrained(model, config=config, dtype=dtype,
                                                   attn_implementation=register_attention())
            tokenizer = AutoTokenizer.from_pretrained(model, config=config, trust_remote_code=False)
    if tokenizer.mask_token_id is None:
        raise UsageError(f"the tokenizer of {model} has no mask token: it is not a masked diffusion model")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {model} has no eos token")
    return net.to(device), tokenizer


def cast_weights(model, dtype: torch.dtype):
    """The model with its parameters in dtype and its buffers left in fp32. The buffers are RoPE's inverse
    frequencies: rounded to bf16 (as model.to(dtype) would), SDAR's (theta 1e6, head dim 128) turn a
    query-key distance of 2000 by up to ~2 radians, and the sampler would attend to other positions than the
    trainer."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def stop_token_ids(model, tokenizer) -> list[int]:
    """eos of the tokenizer plus every eos id of the generation config (SDAR: <|im_end|>, <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Checkpoints with a chat template get it (one user turn, generation prompt); the tiny model's
    character tokenizer reads the question as it is."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return tokenizer.encode(question)


def hidden_states(model, ids, pos, mask, cache=None):
    """Final hidden states (batch, L, H) under an explicit 4D block mask. The LM head is applied by the
    caller to just the positions it needs, which saves most of the vocabulary projection."""
    kwargs = {cache_keyword(type(model.model)): cache} if cache is not None else {}
    out = model.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=cache is not None, **kwargs)
    return out.last_hidden_state


@functools.cache
def cache_keyword(trunk: type) -> str:
    """The name of the trunk's cache argument: `cache` in recent transformers 5.x, `past_key_values` before
    (which recent versions still take, with a FutureWarning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def autocast(cfg: Config, device: torch.device):
    """Forward passes run in the compute dtype; weights stay in float32 when training (master weights:
    an update of lr 1e-6 is below bfloat16's resolution for most weights and would be lost)."""
    dtype = compute_dtype(cfg, device)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


# ======================================================================================================
# 13. Data: the toy's splits, math datasets and grading
# ======================================================================================================
# Problems come from the toy (section 1), a dataset on the hub (DATASETS) or a local JSON/JSONL/Parquet file;
# the toy is graded by its rules, everything else as math (grade: the last \boxed{} against the gold answer).


def toy_splits(train_size: int, test_size: int, seed: int):
    """datasets.DatasetDict with disjoint train and test splits of toy problems."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)
    test, seen = [], set()
    while len(test) < test_size:
        p = toy_problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            test.append(p)
    train = []
    while len(train) < train_size:
        p = toy_problem(rng)
        if p["question"] not in seen:          # repeats inside train are fine; overlap with test is not
            train.append(p)
    return DatasetDict(train=Dataset.from_list(train), test=Dataset.from_list(test))


DATASETS = {            # name -> (hub id, config, split, question field, answer field)
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "train", "problem", "solution"),   # MATH train
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer"),
    "aime2024": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
}


LOCAL_FIELDS = (("question", "answer"), ("problem", "answer"), ("problem", "solution"))   # a local file's fields


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in text (nested braces kept), or of a brace-less `\\boxed 18`; None if
    there is no box, or the response was cut inside it."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\boxed "))
    if start < 0:
        return None
    rest = text[start + len("\\boxed"):].lstrip()
    if not rest.startswith("{"):                       # \boxed 18: one token
        token = re.match(r"[^\s$]+", rest)
        return token.group(0).rstrip(".,;") if token else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i].strip()
    return None                                     # unbalanced: the response was cut inside the box


UNIT_WORD = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s*([A-Za-z]{2,}(?:\s+[A-Za-z]+)*)")      # 18 dollars


NOT_UNITS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "or", "and", "to", "of", "times", "cdot", "div", "mod",
             "degrees", "degree", "deg", "percent", "radians"}          # (the last few: math-verify reads them)


RELATION = r"(\\le|\\leq|\\leqslant|<=|\\lt|<)"


def normalize_answer(ans: str) -> str:
    """The forms of a right answer that math-verify 0.9 alone grades wrong, rewritten where that cannot make a
    wrong answer right: trailing punctuation (`104.`, `\\text{Evelyn.}`), the degree sign (`90°`), thousands
    separated by a space (`1\\,000`, `1\\ 000`), a bold wrapper around parentheses (`\\textbf{(073)}`), a unit
    word after a complete number (`18 dollars`; never after anything else: `G \\text{ or } G+1` stays), and a
    double inequality for an interval (`-2 \\le x \\le 7` -> `[-2, 7]`). Each has a test case that math-verify
    alone gets wrong; the forms it reads itself (`1{,}000`, `\\textbf{(C)}`, `18 \\text{ dollars}`) are left."""
    a = re.sub(r"(?<!\\)[.,;:]+(?:\s|\\[,!;: ])*$", "", ans.strip()).strip()   # 104.  104.\,  (not 5\,)
    a = re.sub(r"\\text\{([^{}]*?)[.,;:]+\s*\}$", r"\\text{\1}", a)   # \text{Evelyn.}
    a = a.replace("°", "^\\circ")
    a = re.sub(r"(?<=\d)(?:\\,|\\ )(?=\d{3}(?!\d))", "", a)          # 1\,000  1\ 000
    a = re.sub(r"^\\(?:textbf|mathbf|boldsymbol|bf)\s*\{(.*)\}$", r"\1", a).strip()   # \textbf{(073)}
    m = UNIT_WORD.fullmatch(a)
    if m and m.group(2).split()[0].lower() not in NOT_UNITS:          # 18 dollars
        a = m.group(1)
    num = r"(-?\d+(?:\.\d+)?|-?\\frac\{\d+\}\{\d+\}|-?\\infty)"
    m = re.fullmatch(rf"{num}\s*{RELATION}\s*[a-zA-Z]\s*{RELATION}\s*{num}", a)
    if m:                                                             # -2 \le x \le 7  ->  [-2, 7]
        low, r1, r2, high = m.groups()
        closed = ("\\le", "\\leq", "\\leqslant", "<=")
        a = f"{'[' if r1 in closed else '('}{low}, {high}{']' if r2 in closed else ')'}"
    return a


def gold_answer(answer: str) -> str:
    """The gold answer of a dataset row: GSM8K's "#### 42", else the last \\boxed{} (MATH solutions),
    else the text itself."""
    if "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    return extract_boxed(answer) or answer.strip()


def math_problem(question: str, answer: str) -> dict:
    """A math problem: the question with the instruction to box the answer (once: some copies of MATH500
    already ask for \\boxed{}), and the gold answer."""
    q = question.strip()
    return {"question": q if "\\boxed" in q else q + "\n" + MATH_INSTRUCTION, "answer": gold_answer(str(answer)),
            "task": "math"}


def verify_answer(gold: str, pred: str, timeout: int) -> float:
    """math-verify's equivalence of two answers, its two parses and its comparison each bounded (in all
    at most `timeout` s). A malformed answer, or one too slow to check, is a wrong answer."""
    from math_verify import parse, verify

    quarter = max(1, timeout // 4)
    try:
        ok = verify(parse("\\boxed{" + gold + "}", parsing_timeout=quarter),
                    parse("\\boxed{" + pred + "}", parsing_timeout=quarter),
                    timeout_seconds=max(1, timeout - 2 * quarter))
    except Exception:
        return 0.0
    return float(bool(ok))


def grade(response: str, gold: str, timeout: int = 8) -> float:
    """1.0 if the last \\boxed{} of the response is equivalent to the gold answer, else 0.0 (also when there
    is no boxed answer). Both are normalised (normalize_answer), then compared by math-verify (fractions,
    LaTeX forms, intervals, sets, units...) in at most `timeout` seconds. math-verify bounds its work with
    SIGALRM, which only a main thread may set: tstar grades in its main thread, and refuses any other."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("grade() runs in the main thread only (math-verify's time limit is a SIGALRM)")
    pred = extract_boxed(response)
    if pred is None:
        return 0.0
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    if pred.replace(" ", "") == gold.replace(" ", ""):
        return 1.0
    return verify_answer(gold, pred, timeout)


def load_problems(name: str, limit: int = 0) -> list[dict]:
    """Problems {question, answer, task} of a named dataset (DATASETS, from the hub) or a local file."""
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()                # ("Generating train split" on every load)
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)   # (a malformed file: tstar's own line says it)

    path = Path(name)
    if path.suffix in (".json", ".jsonl", ".parquet"):           # a local file: check it before the loader does
        if path.is_dir():
            raise UsageError(f"dataset file {name} is a directory, not a {path.suffix} file")
        if not path.is_file():
            raise UsageError(f"no such dataset file: {name}")
        kind = "parquet" if path.suffix == ".parquet" else "json"
        if path.stat().st_size == 0 or (kind == "json" and not path.read_text(errors="replace").strip()):
            raise UsageError(f"dataset file {name} is empty")
        try:
            ds = load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:                          # the loader's own error is many lines deep
            cause = e.__cause__ or e
            raise UsageError(cache_failure(e) or f"dataset file {name} cannot be read as {path.suffix[1:].upper()} "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
        if len(ds) == 0:
            raise UsageError(f"dataset file {name} has no rows")
        fields = next((f for f in LOCAL_FIELDS if set(f) <= set(ds.column_names)), None)
        if fields is None:
            cols = set(ds.column_names)            # (a solution field pairs with problem only)
            missing = ("'question' field (nor 'problem')" if not {"question", "problem"} & cols else
                       "'answer' field" + (" (nor 'solution')" if "problem" in cols else ""))
            raise UsageError(f"{name} has no {missing}; columns found: {', '.join(ds.column_names)}")
    elif name in DATASETS:                        # a name from the table above: the hub (or its cache)
        hub_id, config, split, *fields = DATASETS[name]
        try:
            ds = load_dataset(hub_id, config, split=split)
        except Exception as e:
            raise UsageError(f"cannot load dataset {name!r} ({hub_id}) from the hub ({type(e).__name__}); "
                             f"save it as a local JSON/JSONL/Parquet file and pass its path") from None
        for f in fields:
            if f not in ds.column_names:
                raise UsageError(f"{hub_id} has no {f!r} field; columns found: {', '.join(ds.column_names)}")
    else:
        raise UsageError(f"unknown dataset {name!r}: not one of {', '.join(['toy', *DATASETS])} "
                         f"and not a .json/.jsonl/.parquet file")
    if limit:                                     # --eval-limit: the first N problems
        ds = ds.select(range(min(limit, len(ds))))
    question, answer = fields
    with reading(name):                           # (the rows are decoded here: bytes that are not UTF-8, ...)
        rows = list(zip(ds[question], ds[answer]))
    for i, (q, a) in enumerate(rows):             # a row a problem can be made of
        if not isinstance(q, str) or not q.strip():
            raise UsageError(f"{name}: row {i + 1} has no {question} (found {json_text(q)})")
        if a is None or not str(a).strip():
            raise UsageError(f"{name}: row {i + 1} has no {answer} (found {json_text(a)})")
    return [math_problem(q, a) for q, a in rows]


def load_task(cfg: Config):
    """(train problems, {name: evaluation problems}, reward function); problems are dicts question/answer/task.
    The toy is graded by its rules, everything else as math (grade)."""
    def problems(name: str, split: str, limit: int = 0) -> list[dict]:
        if name != "toy":
            return load_problems(name, limit)
        rows = [{**p, "task": "toy"} for p in toy_splits(cfg.train_size, cfg.test_size, cfg.seed)[split]]
        return rows[:limit] if limit else rows

    def reward(response: str, problem: dict) -> float:
        if problem["task"] == "toy":
            return toy_reward(response, problem["question"])
        return grade(response, problem["answer"])

    names = [n.strip() for n in cfg.eval_datasets.split(",") if n.strip()]
    if not names:
        raise UsageError("--eval-datasets is empty")
    keys = [Path(n).stem if Path(n).suffix else n for n in names]            # an evaluation set's name in the logs
    twins = [n for n, k in zip(names, keys) if keys.count(k) > 1]
    if twins:
        raise UsageError(f"--eval-datasets {', '.join(twins)} share the name {Path(twins[0]).stem!r} in the results: "
                         f"rename one of the files")
    evals = {k: problems(n, "test", cfg.eval_limit) for k, n in zip(keys, names)}
    needs_train = not cfg.eval_only or is_architecture_file(cfg.model)          # training, or the warm start
    train = problems(cfg.train_dataset, "train") if needs_train else []
    return train, evals, reward


# ======================================================================================================
# 14. The fast sampler: frames, an in-place KV cache, CUDA graphs, the rollout copy
# ======================================================================================================
# generate (section 3) lays a batch out in one padded frame (Frame) and steps a Decoder through it: a KV cache
# written in place (KVCache), finished rows moved out of the way (Decoder.compact), with --compile each step
# shape captured once as a CUDA graph. The Engine is what rollouts and evaluation sample from: the policy, or a
# copy of its weights in the compute dtype, --rollout-batch rows at a time.


class KVCache:
    """Keys and values of every layer in buffers allocated once, (rows, kv heads, width, head dim), and
    written in place. The model's attention calls update() with the keys and values of its queries; they
    go to the slots `write_at`, and attention reads the slots [0, kv_len) of the rows `rows` (a slice), views
    of the buffers. (transformers' StaticCache appends at a running length and returns the whole buffer;
    a denoising step must rewrite the same slots at every step, and an early block should not read the
    empty slots after it.)"""

    def __init__(self, config, rows: int, width: int, dtype, device):
        shape = (rows, config.num_key_value_heads, width, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows, self.kv_len, self.write_at = slice(0, rows), 0, None

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        k.index_copy_(2, self.write_at, key.to(k.dtype))
        v.index_copy_(2, self.write_at, value.to(v.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Move rows keep[0], keep[1], ... (increasing) to the front of the buffers. Chunked, so that the
        temporary copy stays small; a chunk's sources lie at or after its destination, so no row is
        overwritten before it is moved."""
        for buf in self.keys + self.values:
            for lo in range(0, len(keep), 16):
                chunk = keep[lo: lo + 16]
                buf[lo: lo + len(chunk)] = buf[chunk]


def kv_cache_bytes_per_row(config, width: int, dtype) -> int:
    """Bytes of keys and values one row of width tokens needs: layers x 2 x kv heads x head dim x width."""
    return (config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * width
            * torch.empty((), dtype=dtype).element_size())


KV_BUCKET = 256        # with CUDA graphs, a step attends to a multiple of this many slots (one graph each)
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward (its activations: ~40 KB per token at SDAR-1.7B)


def decoder_width(width: int, graphs: bool) -> int:
    """Key slots per row a Decoder allocates for `width` tokens: with graphs, whole KV_BUCKETs."""
    return KV_BUCKET * math.ceil(width / KV_BUCKET) if graphs else width


def row_width(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    """Tokens a Decoder holds per row for a prompt of prompt_len: the prompt, the response, and two blocks for
    the rounding at both ends (the prompt's tail shares the first block; the last block is decoded whole)."""
    return prompt_len + max_new_tokens + 2 * block_size


def graph_capacity(rows: int) -> int:
    """The rows of a CUDA-graph Decoder: rows rounded down to a power of two, which compaction halves into
    shapes already captured."""
    return 1 << (rows.bit_length() - 1)


def row_bucket(n: int, capacity: int) -> int:
    """Rows a CUDA-graph frame keeps for n live rows: the next power of two, at most the capacity."""
    return min(capacity, 1 << max(0, n - 1).bit_length())


class Decoder:
    """The sampler's forward passes. One serves a batch of generate calls (all rollouts of an RL step; with graphs
    kept by the Engine, every call of the run): it holds the KV cache, sized for `rows` x `width`. With
    graphs=True the steps have fixed shapes (rows in powers of two, padded with finished rows; keys in multiples
    of KV_BUCKET, later slots masked), and on CUDA each shape (rows, query width, key length) is captured once
    as a CUDA graph and replayed at every step of that shape: one launch instead of ~50 kernel launches per
    layer. Without a cache (kv_cache=False) every step recomputes the whole prefix: slow, for checks and
    benchmarks only."""

    capture_failed = False        # a capture that failed once is not tried again, in this Decoder or any later one

    def __init__(self, model, rows: int, width: int, kv_cache: bool = True, graphs: bool = False):
        self.model, self.rows, self.graphs = model, rows, graphs
        p = next(model.parameters())
        self.capture = graphs and p.device.type == "cuda" and not Decoder.capture_failed
        self.width = width = decoder_width(width, graphs)
        self.cache = KVCache(model.config, rows, width, p.dtype, p.device) if kv_cache else None
        self.captured: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def start(self, frame: Frame, block_size: int, offset: int) -> Frame:
        """The frame in this Decoder's shape (with graphs, rows padded to a row bucket with copies of a row marked
        finished; columns to its width), after the prefill: the clean keys and values of the prompts' whole blocks,
        columns [0, D), cached a few rows at a time (at most PREFILL_TOKENS tokens per forward, or one row, so that
        its activations stay small)."""
        self.B, self.offset = block_size, offset
        self.masks = {}                               # (a mask depends on the batch's padding: never reuse one)
        n, W = frame.x.shape
        if self.cache is not None and (self.cache.keys[0].shape[2] < W or self.rows < n):
            raise ValueError(f"a frame of {n} x {W} does not fit the decoder's cache "
                             f"({self.rows} x {self.cache.keys[0].shape[2]})")
        rows = row_bucket(n, self.rows) if self.graphs else n
        frame = frame.select(torch.cat([torch.arange(n), torch.zeros(rows - n, dtype=torch.long)]))
        frame.live[n:] = False
        if self.width > W:                            # new columns: token 0 at position 0, not valid: never seen
            frame = dataclasses.replace(frame, **{k: F.pad(getattr(frame, k), (0, self.width - W))
                                                  for k in ("x", "pos", "valid", "is_resp", "step_map", "logp")})
        n, D = rows, frame.D
        if self.cache is None or D == 0:
            return frame
        self.cache.kv_len, self.cache.write_at = D, torch.arange(D, device=frame.x.device)
        per_forward = max(1, PREFILL_TOKENS // D)
        for lo in range(0, n, per_forward):
            r = self.cache.rows = slice(lo, min(n, lo + per_forward))
            pos, clean = frame.pos[r, :D], torch.zeros_like(frame.valid[r, :D])
            mask = block_attention_mask(pos, clean, pos, clean, frame.valid[r, :D], block_size, offset)
            hidden_states(self.model, frame.x[r, :D], pos, mask, self.cache)
        return frame

    def step(self, frame: Frame, xb, c: int, store_previous: bool):
        """Hidden states (n, B, H) of the noisy block xb at columns [c, c + B). With store_previous, the
        previous block (final, clean) rides along as extra queries, which writes its keys and values."""
        B = self.B
        q0 = 0 if self.cache is None else c - B if store_previous else c     # (recompute: the whole prefix)
        ids = torch.cat([frame.x[:, q0:c], xb], 1)                                  # (n, c + B - q0)
        kv = decoder_width(c + B, self.graphs)          # keys [0, c + B), with graphs whole buckets (rest masked)
        mask, write_at = self.block_mask(frame, c, q0, kv)
        pos = frame.pos[:, q0: c + B]
        if self.cache is None:
            return hidden_states(self.model, ids, pos, mask)[:, -B:]
        if self.capture:
            try:
                return self.replay(ids, pos, mask, write_at)[:, -B:]
            except RuntimeError as e:                 # an op the capture cannot take: run eagerly from now on
                self.capture, Decoder.capture_failed = False, True        # (and in every later Decoder)
                print(f"--compile: the step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                      f"the sampler runs eagerly", file=sys.stderr)
        self.cache.rows, self.cache.kv_len, self.cache.write_at = slice(0, ids.shape[0]), kv, write_at
        return hidden_states(self.model, ids, pos, mask, self.cache)[:, -B:]

    def block_mask(self, frame: Frame, c: int, q0: int, kv: int):
        """The attention mask of queries [q0, c + B) over keys [0, kv), the new block noisy, and the slots the
        queries write; the same for every later step of a block, so made once per query span (for the cache:
        folded, additive)."""
        key = (c, q0, kv, frame.x.shape[0])
        if key not in self.masks:
            B, dev = self.B, frame.x.device
            col = torch.arange(kv, device=dev)
            noisy = ((col >= c) & (col < c + B)).expand(frame.x.shape[0], -1)      # (n, kv) the new block
            mask = block_attention_mask(frame.pos[:, q0: c + B], noisy[:, q0: c + B], frame.pos[:, :kv], noisy,
                                        frame.valid[:, :kv], B, self.offset, q_start=q0)   # (n, 1, Lq, kv)
            if self.cache is not None:
                cfg = self.model.config
                mask = fold_mask(mask, cfg.num_attention_heads // cfg.num_key_value_heads, self.cache.keys[0].dtype)
            self.masks = {k: v for k, v in self.masks.items() if k[0] == c}          # this block's only
            self.masks[key] = mask, torch.arange(q0, c + B, device=dev)
        return self.masks[key]

    def compact(self, frame: Frame) -> Frame:
        """Once half of the frame's rows or more have finished, the live rows move to the front of the frame and
        of the KV cache (with graphs, plus finished rows up to a row bucket): a few copies per call, never one
        per step. Until then finished rows stay in the batch, masked out."""
        n, n_live = frame.x.shape[0], int(frame.live.sum())
        if n_live > n // 2:
            return frame
        keep = frame.live.nonzero()[:, 0]
        if self.graphs:
            extra = (~frame.live).nonzero()[:, 0][: row_bucket(n_live, self.rows) - n_live]
            keep = torch.cat([keep, extra]).sort().values
        if self.cache is not None:
            self.cache.keep_rows(keep)
        return frame.select(keep)

    # --- CUDA graphs (--compile) ---
    def replay(self, ids, pos, mask, write_at):
        """Run the step as a captured CUDA graph: its inputs are copied into the graph's own tensors, its
        output is the graph's output tensor (valid until the next replay)."""
        key = (ids.shape[0], ids.shape[1], mask.shape[-1])
        g = self.captured.get(key)
        if g is None:
            g = self.captured[key] = self.capture_graph(ids, pos, mask, write_at)
        for static, new in ((g["ids"], ids), (g["pos"], pos), (g["mask"], mask), (g["write_at"], write_at)):
            static.copy_(new)
        g["graph"].replay()
        return g["out"]

    def capture_graph(self, ids, pos, mask, write_at) -> dict:
        g = dict(ids=ids.clone(), pos=pos.clone(), mask=mask.clone(), write_at=write_at.clone())
        self.cache.rows, self.cache.kv_len, self.cache.write_at = slice(0, ids.shape[0]), mask.shape[-1], g["write_at"]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                 # warm-up: lazy initialisation must not be captured
            hidden_states(self.model, g["ids"], g["pos"], g["mask"], self.cache)
        torch.cuda.current_stream().wait_stream(side)
        g["graph"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g["graph"], pool=self.pool):
            g["out"] = hidden_states(self.model, g["ids"], g["pos"], g["mask"], self.cache)
        return g


def fuse_rms_norms(model) -> None:
    """Run every RMSNorm of a model that only samples as torch.rms_norm: one fused CUDA kernel where
    transformers' module launches eight (to fp32, square, mean, add eps, rsqrt, multiply, to bf16, times the
    weight). An eager denoising step of SDAR-1.7B launches ~2000 kernels, 900 of them in these norms, and
    on a GPU the launches, not the arithmetic, set its time. The same function; it rounds to bf16 once,
    after the weight, where the module rounds before it too."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    for m in model.modules():
        if isinstance(m, Qwen3RMSNorm):
            m.forward = lambda x, m=m: torch.rms_norm(x, m.weight.shape, m.weight, m.variance_epsilon)


class Engine:
    """What rollouts and evaluation sample from (nanochat's name for it): the policy itself when its weights are
    already in the compute dtype and not sharded (the CPU default: the trainer then recomputes the sampler's log-
    probs up to rounding), else a copy in the compute dtype (bf16 on CUDA; always under FSDP), refreshed before every
    rollout and evaluation (one gather per RL step). Rows are decoded `rows` at a time (--rollout-batch) through
    one Decoder per call; with keep=True (graphs, where the memory plan allows) one Decoder for the whole run,
    so each CUDA graph is captured once, with a power-of-two row capacity that compaction halves.

    What a row stops on is decided here, once, from the policy as loaded (its checkpoint's generation config) and
    the tokenizer: never from the copy, whose generation config would come from config.json alone."""

    force_copy = False        # sample from a copy even where the policy could (tests: the GPU path on the CPU)

    def __init__(self, policy, tokenizer, dtype: torch.dtype, rows: int, graphs: bool = False, frozen: bool = False,
                 keep: bool | None = None, width: int = 0):
        """frozen: the policy is only evaluated, never trained (--eval-only). width: the tokens per row a kept
        Decoder allocates at least (the longest prompt and response of the run)."""
        from transformers import Qwen3ForCausalLM

        self.policy, self.rows, self.graphs, self.width = policy, rows, graphs, width
        self.keep, self.decoder = graphs if keep is None else keep, None
        self.mask_id, self.stop_ids = tokenizer.mask_token_id, stop_token_ids(policy, tokenizer)
        p = next(policy.parameters())
        self.device = p.device
        if p.dtype == dtype and not is_sharded(policy) and not Engine.force_copy:
            self.model = policy
        else:
            with torch.device("meta"):
                self.model = Qwen3ForCausalLM(policy.config)
            self.model.generation_config = copy.deepcopy(policy.generation_config)     # (the same model, but dtype)
            cast_weights(self.model.to_empty(device=p.device), dtype).eval().requires_grad_(False)
            self.refresh()
        if p.device.type == "cuda" and (self.model is not policy or frozen):
            fuse_rms_norms(self.model)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the policy's current weights and buffers (the rotary frequencies, which no state_dict holds)
        into the copy, by name."""
        if self.model is self.policy:
            return
        theirs = dict(self.policy.named_parameters()) | dict(self.policy.named_buffers())
        for name, mine in [*self.model.named_parameters(), *self.model.named_buffers()]:
            mine.copy_(full_tensor(theirs[name]))

    def generate(self, prompts, *, rows: int | None = None, desc: str = "", **kwargs) -> list[Generation]:
        """generate() over all prompts, `rows` at a time (default --rollout-batch), with one Decoder sized for
        the longest, stopping on the Engine's stop ids (unless kwargs name others); torch's deterministic-
        algorithms switch is off meanwhile (see deterministic)."""
        if not prompts:
            return []
        kwargs = dict(mask_id=self.mask_id, stop_ids=self.stop_ids) | kwargs
        check_fits(max(map(len, prompts)), kwargs["max_new_tokens"], self.model.config.max_position_embeddings,
                   kwargs["block_size"], kwargs.get("offset", 0))
        capacity = rows or self.rows
        capacity = graph_capacity(capacity) if self.graphs else capacity
        rows = min(capacity, len(prompts))
        width = row_width(max(map(len, prompts)), kwargs["max_new_tokens"], kwargs["block_size"])
        if self.keep:
            rows, width = capacity, max(width, self.width)
        if self.decoder is None or self.decoder.rows < rows or self.decoder.width < width:
            if self.decoder is not None:      # the old cache and graphs go before the new ones are allocated
                self.decoder = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # (a graph pool's memory is cached, not reusable, until this)
            self.decoder = Decoder(self.model, rows, width, graphs=self.graphs)
        decoder = self.decoder
        if not self.keep:
            self.decoder = None
        gens = []
        with deterministic(False):
            for i in tqdm(range(0, len(prompts), rows), desc=desc, leave=False,
                          disable=not is_main() or len(prompts) <= rows):
                gens += generate(self.model, prompts[i: i + rows], decoder=decoder, **kwargs)
        return gens


# ======================================================================================================
# 15. Memory: the rollout batch, and what a GPU holds while sampling and while training
# ======================================================================================================
# The rollout batch is chosen from the free memory at start (memory_plan) unless --rollout-batch sets it, and a
# batch that cannot fit is an error at start, not an out-of-memory error an hour later. The trainer's
# micro-batches (section 8) are bounded by tokens (--micro-batch-tokens) and by the logits of their targets.


def human(n: float, unit: str = "B") -> str:
    """1234567 -> '1.23 MB'."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.3g} {prefix}{unit}"
        n /= 1000


def propose_bytes_per_logit(cfg: Config) -> int:
    """Peak bytes per (masked position, vocabulary entry) while a step proposes, measured (test_the_memory_plan_
    is_at_least_what_a_sampler_step_and_a_trainer_micro_batch_allocate): greedy, the fp32 logits and their log-
    softmax (8); sampling, the logits, the probabilities and torch.multinomial's own draw (12), top-k's comparison
    (+1); top-p, the logits, the tempered ones, a sorted copy, its int64 order, the sorted probabilities, their
    cumulative sums and their difference (33)."""
    if max(cfg.temperature, cfg.rollout_temperature) == 0:
        return 8
    return 33 if cfg.top_p < 1 else 12 + (cfg.top_k > 0)


def step_bytes_per_row(cfg: Config, config, block_size: int, width: int, item: int) -> int:
    """What one denoising step allocates per row, beside the KV cache:
        logits   B x vocab x propose_bytes_per_logit (measured)
        masks    the block's two folded masks, G x (2B + B) queries x width keys in the compute dtype
        forward  2B queries x (6 hidden + 3 intermediate) in the compute dtype (one layer's activations at a time;
                 an estimate, small beside the logits)."""
    G = config.num_attention_heads // config.num_key_value_heads
    logits = block_size * config.vocab_size * propose_bytes_per_logit(cfg)
    masks = G * 3 * block_size * width * item
    forward = 2 * block_size * (6 * config.hidden_size + 3 * config.intermediate_size) * item
    return logits + masks + forward


def graph_bytes(config, rows: int, queries: int, keys: int, item: int) -> int:
    """The tensors one captured CUDA graph keeps (Decoder.capture_graph): its folded mask (rows x G queries x keys),
    its output hidden states (rows x queries x hidden), both in the compute dtype, and its int64 ids, positions
    and slots."""
    G = config.num_attention_heads // config.num_key_value_heads
    return rows * queries * (G * keys * item + config.hidden_size * item + 16) + 8 * queries


def graphs_bytes(config, rows: int, sizes: Sequence[int], width: int, item: int) -> int:
    """Every graph a kept Decoder may capture over a run: rows in powers of two up to its capacity, B and 2B
    queries for every block size, keys in whole KV_BUCKETs up to its width."""
    row_buckets = [1 << k for k in range(rows.bit_length()) if 1 << k <= rows]
    return sum(graph_bytes(config, r, q, KV_BUCKET * k, item) for r in row_buckets for B in sizes for q in (B, 2 * B)
               for k in range(1, width // KV_BUCKET + 1))


def micro_batch_bytes(cfg: Config, config, sequences: int, length: int, targets: int, item: int) -> float:
    """What one trainer micro-batch of `sequences` padded to `length` tokens with `targets` targets allocates
    beside the weights and gradients:
        logits   targets x vocab x 12: three fp32 copies at the peak (measured, forward and backward)
        masks    the block mask, bool, and SDPA's additive copy in the compute dtype: sequences x length^2 each
        layers   after Korthikanti et al. (arXiv 2205.05198): ~34 bytes per token and hidden unit in each layer in
                 bf16 (SDPA's fused kernels keep no attention scores); with gradient checkpointing each layer keeps
                 its fp32 input and one layer is recomputed, at twice that (the residual stream stays fp32 under
                 autocast). An estimate, not measured.
        weight   the gradient of the largest weight (vocab x hidden, fp32) before it is added to .grad"""
    tokens, H, L = sequences * length, config.hidden_size, config.num_hidden_layers
    logits = 12 * targets * config.vocab_size
    masks = sequences * length ** 2 * (1 + item)
    layers = 4 * tokens * H * L + 2 * 34 * tokens * H if cfg.grad_checkpointing else 34 * tokens * H * L
    return logits + masks + layers + 4 * config.vocab_size * H


def free_memory(device) -> int | None:
    """Bytes free for the run: CUDA's count on a GPU, MemAvailable of /proc/meminfo on a CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return 1024 * int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1])
    except (OSError, TypeError):
        return None


def memory_plan(cfg: Config, model, sizes: Sequence[int], longest_prompt: int, device, training: bool,
                copy: bool, graphs: bool, free: int | None = None) -> dict:
    """Rows per sampler call (--rollout-batch, or chosen here), whether the Engine keeps its Decoder between calls
    (keep), and the bytes per GPU of each term (P parameters, N processes, item bytes of the compute dtype):
        weights      the policy: fp32 master weights when training (4 P / N), else item P
        adam         AdamW's two fp32 moments (8 P / N), and its step's temporaries (4 P / N, measured)
        copy         the rollout copy, item P, whole on every GPU
        kv           rows x KV cache per row (kv_cache_bytes_per_row) at the Decoder's width
        step         rows x step_bytes_per_row: the logits of a block while a step proposes
        graphs       with a kept Decoder, every graph it may capture (graphs_bytes)
        grads        4 P / N; under FSDP also 4 P whole, accumulated until a minibatch's last backward, and the
                     gathered fp32 weights of the units in flight (the embedding and LM head, which FSDP2 keeps
                     gathered from the forward to the backward, and two layers)
        micro_batch  the largest micro-batch's activations and logits (micro_batch_bytes)
    The gradients are freed before each rollout, so the two peaks do not add up:
        sampling = weights + adam + copy + kv + step (+ graphs)
        training = weights + adam + copy + grads + max(micro_batch, adam step) (+ kv + graphs if kept)
    On CUDA the automatic batch is as many rows as fit both peaks, beside the weights, in 90% of `free` (read
    when None: the free memory now, with the policy loaded whole; under FSDP the part of it that shard() will
    release counts as free); on the CPU it is 256. The Decoder is kept (graphs) where that costs less than half
    the rows."""
    P = sum(p.numel() for p in model.parameters())       # (a DTensor's numel is the whole tensor's)
    N = world()[1] if training else 1             # the processes FSDP splits the training state over
    config, dtype = model.config, compute_dtype(cfg, device)
    item = torch.empty((), dtype=dtype).element_size()
    B, V, H = max(sizes), config.vocab_size, config.hidden_size
    width = decoder_width(row_width(longest_prompt, cfg.max_new_tokens, B), graphs)
    weights = (4 if training else item) * P / N
    adam = 8 * P / N if training else 0
    copy_bytes = item * P if copy else 0
    kv_row = kv_cache_bytes_per_row(config, width, dtype)
    step_row = step_bytes_per_row(cfg, config, B, width, item)
    layer = P / max(1, config.num_hidden_layers) if N > 1 else 0        # (an upper bound on one layer's weights)
    grads = (4 * P / N + (4 * P + 4 * (2 * V * H + 2 * layer) if N > 1 else 0)) if training else 0
    # the largest micro-batch: sequences x length within --micro-batch-tokens, so at worst one sequence that long
    # (or a prompt, its response and one noisy block, if more), its targets within the logit budget
    tokens, max_targets = trainer_budget(cfg, V)
    length = max(tokens, longest_prompt + cfg.max_new_tokens + 3 * B)
    adam_step = 4 * P / N + 1024                  # (the step's one temporary per weight, a few scalars)
    micro = max(micro_batch_bytes(cfg, config, 1, length, min(length, max_targets), item), adam_step) if training else 0
    training_peak = weights + adam + copy_bytes + grads + micro
    rows, keep, note = cfg.rollout_batch, graphs, ""
    free = free_memory(device) if free is None else free
    if free is not None:
        if training and N > 1:
            free += 4 * P * (1 - 1 / N)                # (the whole fp32 policy now; 1/N of it after shard())
        budget = 0.9 * free - adam - copy_bytes        # (the weights are loaded: no longer free)
        graph_row = 2 * graphs_bytes(config, 1, sizes, width, item)    # (rows 1, 2, 4, ... R sum to under 2 R)
        fit = int(budget // (kv_row + step_row))
        fit_kept = int(min((budget - grads - micro) // (kv_row + graph_row), budget // (kv_row + step_row + graph_row)))
        keep = graphs and fit_kept >= (rows or max(1, fit // 2))     # (not at the price of half the rows)
        fit = min(fit, fit_kept) if keep else fit
        if fit < 1:
            raise UsageError(f"not even one rollout row fits: a row needs {human(kv_row + step_row)} ({width} "
                             f"tokens), and {human(max(budget, 0))} of the {human(free)} free remain beside "
                             f"training; lower --max-new-tokens or use more GPUs")
        for flag, n in (("--rollout-batch", rows), ("--eval-batch", cfg.eval_batch)):
            if n and n > fit:
                raise UsageError(f"{flag} {n} needs {human(n * (kv_row + step_row))} for its KV cache and logits "
                                 f"({human(kv_row + step_row)} per row of {width} tokens); about {fit} rows fit in "
                                 f"the {human(max(budget, 0))} left of {human(free)} free")
        if not rows and device.type == "cuda":
            rows = min(1024, fit if fit < 16 else fit // 8 * 8)
            note = f", chosen from {human(free)} free"
    rows = graph_capacity(rows or 256) if graphs else rows or 256      # (as the Engine will round it)
    kv, step = rows * kv_row, rows * step_row
    graph = graphs_bytes(config, rows, sizes, width, item) if keep else 0
    sampling_peak = weights + adam + copy_bytes + kv + step + graph
    training_peak += kv + graph if keep else 0
    shared = f" (/ {N} processes)" if N > 1 else ""
    line = (f"{human(P, '')} parameters; per GPU{shared}: {'weights + AdamW' if training else 'weights'} "
            f"{human(weights + adam)} + rollout copy {human(copy_bytes)} + KV cache {human(kv)} ({rows} rows x "
            f"{width} tokens) + step logits {human(step)}" + (f" + CUDA graphs {human(graph)}" if keep else "")
            + f" = {human(sampling_peak)} while sampling"
            + (f"; gradients {human(grads)} + micro-batch ~{human(micro)} = {human(training_peak)} while training"
               if training else "")
            + f"; rollout batch {rows} rows{note}"
            + ("; the KV cache and CUDA graphs stay between calls" if keep else ""))
    return dict(params=P, processes=N, weights=weights, adam=adam, copy=copy_bytes, kv_row=kv_row, step_row=step_row,
                grads=grads, micro_batch=micro, adam_step=adam_step if training else 0, graphs=graph, width=width,
                rows=rows, keep=keep, sampling=sampling_peak, training=training_peak, line=line)


# ======================================================================================================
# 16. Devices and processes
# ======================================================================================================
# One process (the CPU, or one GPU) or torchrun. Under torchrun every process samples its share of the prompts
# from a whole copy of the weights (Engine) and trains its share of the sequences on the policy sharded by
# PyTorch's FSDP2 (fully_shard): each decoder layer, the trunk (embedding, final norm) and the LM head are units
# whose fp32 weights, gradients and AdamW state are split over the processes and gathered per unit for each
# forward; gradients are reduce-scattered. The value head is a unit of its own. Every process must run the
# same number of forwards (as_many_everywhere; forward_sequences forwards a stand-in). Metrics are summed (dist_sum);
# only rank 0 prints, logs and saves.


def setup_device(cfg: Config) -> torch.device:
    """The device, selected as the current CUDA device (CUDA graphs capture on the current device's streams: a
    graph captured for cuda:1 while cuda:0 is current records nothing), and under torchrun the process group
    (process_group_backend): one GPU per process."""
    name = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but CUDA is not available")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if torchrun and device.type == "cuda":            # one GPU per process: LOCAL_RANK picks it
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
        if per_node > gpus:
            raise UsageError(f"torchrun started {per_node} processes on this machine but it has {gpus} GPU(s): "
                             f"use --nproc_per_node {gpus} (or --device cpu)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    if torchrun:
        dist.init_process_group(process_group_backend(device), device_id=device if device.type == "cuda" else None)
    return device


@contextlib.contextmanager
def deterministic(on: bool):
    """torch's deterministic-algorithms switch, set for the block and restored after it: on for a CUDA run
    (with cuBLAS's workspace setting, made at import, --resume then reproduces an uninterrupted run), off while
    sampling (the sampler's ops are deterministic as written, and the switch would swap in sort-based kernels
    for its in-place writes that gain nothing)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


def process_group_backend(device: torch.device) -> str:
    """A backend for every device a collective of tstar uses: gloo for CPU tensors (dist_reduce sums numbers as
    CPU tensors, on every run), NCCL for CUDA tensors (FSDP's gathers and reduce-scatters on a GPU run). NCCL
    alone has no CPU backend: the first metric summed would fail."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Only rank 0 prints progress, writes logs and saves checkpoints."""
    return world()[0] == 0


def dist_reduce(x: float, op: str) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.item()


def dist_sum(x: float) -> float:
    """Sum of a number over all processes (the number itself when not distributed)."""
    return dist_reduce(x, "SUM")


def dist_max(x: float) -> float:
    """Largest value of a number over all processes."""
    return dist_reduce(x, "MAX")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t):
    """The whole tensor behind a DTensor shard (a collective: every process must call it), else t."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard(model, value_head, device, dtype: torch.dtype = torch.float32) -> None:
    """FSDP2 over all processes: units per decoder layer, the trunk, the LM head and the value head. With a
    compute dtype below fp32, the policy's units gather their weights in it (MixedPrecisionPolicy: half the
    traffic, and the same bf16 values the rollout copy holds) and reduce gradients in fp32; the value head stays
    fp32 throughout."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world()[1],))      # one flat group: every process holds 1/N
    mixed = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:              # a layer's weights are gathered just before its forward
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    for unit in (model.model, model.lm_head):     # called directly (hidden_states, forward_targets)
        fully_shard(unit, mesh=mesh, mp_policy=mixed)
    fully_shard(value_head, mesh=mesh)
    for unit in fsdp_units(model, value_head):    # gradients summed, not averaged: each loss is already divided
        unit.set_gradient_divide_factor(1.0)      # by the count over all processes (a global mean)
        unit.set_force_sum_reduction_for_comms(True)      # (a plain sum: gloo has no pre-multiplied one)


def load_in_turns(model: str, device, dtype: torch.dtype):
    """load_model_and_tokenizer on every process, those of one machine one at a time: each stages the whole model
    in host RAM on its way to its device, and eight at once would hold eight copies (4B in fp32: 140 GB). A load
    that fails stops every process (the failing one with its own message)."""
    local, per_node = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    loaded = None
    for turn in range(per_node if dist.is_initialized() else 1):
        failed = None
        if turn == local:
            try:
                loaded = load_model_and_tokenizer(model, device, dtype)
            except UsageError as e:
                failed = e
        if failed and not dist.is_initialized():
            raise failed
        if dist_max(failed is not None):          # (a collective: every process learns of it, none waits forever)
            messages = [None] * world()[1]
            dist.all_gather_object(messages, str(failed) if failed else None)
            raise UsageError(next(m for m in messages if m))
    return loaded


def full_state_dict(module) -> dict:
    """The module's whole weights as CPU tensors on rank 0 ({} elsewhere); every process takes part."""
    out = {}
    for k, v in module.state_dict().items():      # one tensor at a time: no process holds two whole copies
        v = full_tensor(v)
        if is_main():
            out[k] = v.detach().cpu()
    return out


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the gradient of the model's weights to a norm of max_norm; returns the norm before clipping (under
    FSDP the norm over every process's shards)."""
    return float(full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))


def fsdp_units(model, value_head) -> list:
    """The FSDP2 units of the policy and the value head (shard), each decoder layer one; [] on one process."""
    from torch.distributed.fsdp import FSDPModule
    return [m for net in (model, value_head) if net is not None for m in net.modules() if isinstance(m, FSDPModule)]


def gradient_sync(model, value_head, sync: bool) -> None:
    """Whether FSDP reduce-scatters the gradients after the next backward: only after a minibatch's last one
    (the others accumulate unsharded gradients locally: one reduction per optimizer step, not per micro-batch)."""
    for unit in fsdp_units(model, value_head):
        unit.set_requires_gradient_sync(sync, recurse=False)


def as_many_everywhere(chunks: list) -> list:
    """The micro-batches, padded with empty ones to as many as the process with most has: under FSDP every
    forward gathers the sharded weights with every other process, so all must run the same number."""
    return list(chunks) + [[]] * (int(dist_max(len(chunks))) - len(chunks))


# ======================================================================================================
# 17. Checkpoints and the out dir: one run at a time, nothing lost
# ======================================================================================================
# A checkpoint is a save_pretrained directory of the whole fp32 weights plus the tokenizer and tstar.json (what
# it is); a stage's also holds the value head, the curriculum and the config. Whole or absent (save_checkpoint). One
# run at a time holds an out dir (claimed_out_dir); a warm start is reused only if made with the same settings
# (warm_started), a finished stage only with --resume and the same settings (stages_done).


def read_json(path: Path, fix: str) -> dict:
    """A JSON object tstar wrote (a checkpoint's tstar.json, ...). One that cannot be read back was damaged
    outside tstar: one line of error naming it and `fix`, what to do (reading)."""
    with reading(path, fix, own=True):
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"it holds {json_kind(data)}, not an object")
        return data


def save_checkpoint(path: Path, model, tokenizer, value_head=None, info: dict | None = None) -> None:
    """save_pretrained of the model's whole fp32 weights and the tokenizer, plus the value head and a JSON
    of what this is, written by rank 0 into a temporary directory that is renamed into place at the end:
    `path` either holds a whole checkpoint or does not exist. A sharded model must be saved by every process
    (FSDP gathers the shards); the callers synchronise after it."""
    weights, head = full_state_dict(model), full_state_dict(value_head) if value_head is not None else {}
    if is_main():
        tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"       # hidden: no stage*-B* glob finds it
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)             # (the whole weights, loadable by transformers)
        tokenizer.save_pretrained(tmp)
        if head:
            save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / "value_head.safetensors"))
        (tmp / "tstar.json").write_text(json_text(info or {}, indent=1))
        if path.exists():                                          # (a stage being redone after --resume)
            shutil.rmtree(path)
        tmp.rename(path)                                           # the one step that makes it visible


def save_stage(cfg: Config, out: Path, stage: int, B: int, model, value_head, tokenizer) -> None:
    """The checkpoint of a finished stage (every process takes part: FSDP gathers the whole weights)."""
    save_checkpoint(stage_dir(cfg, out, stage), model, tokenizer, value_head,
                    info=dict(task=cfg.train_dataset, stage=stage, block_size=B, config=dataclasses.asdict(cfg),
                              plan=stage_plan(cfg.block_sizes, cfg.steps_per_stage, cfg.shift_fraction, cfg.direct)))
    barrier()


def load_value_head(model, path: Path) -> torch.nn.Linear:
    head, file = new_value_head(model), path / "value_head.safetensors"
    if not file.is_file():                        # (save_checkpoint writes it before tstar.json: lost since)
        raise UsageError(f"{file} is missing: delete {path} and run again (--resume if a stage is left)")
    with reading(file, f"delete {path} and run again (--resume if a stage is left)", own=True):
        head.load_state_dict(load_file(str(file)))
    return head


def warm_start_settings(cfg: Config) -> dict:
    """Everything that shapes the warm start: equal settings mean a saved one can be reused as it is."""
    return dict(config=json.loads(Path(cfg.model).read_text()), seed=cfg.seed, steps=cfg.warm_start_steps,
                batch=cfg.warm_start_batch, lr=cfg.warm_start_lr, block_size=cfg.base_block_size,
                train_size=cfg.train_size, test_size=cfg.test_size)


def warm_started(cfg: Config, model, tokenizer, train: list[dict], device, out: Path):
    """The tiny model after its warm start: reused from out/warmstart when it was made with the same
    settings, trained (and saved) otherwise."""
    path = out / "warmstart"
    settings = warm_start_settings(cfg)
    info_file = path / "tstar.json"
    if path.exists() and not info_file.is_file():        # (save_checkpoint writes tstar.json: not tstar's warm start)
        raise UsageError(f"{path} exists but is not a warm start tstar finished (no tstar.json): move it away, or "
                         f"choose another --out-dir")
    reuse = info_file.is_file()
    if reuse:                                     # never replaced: minutes of compute, maybe another run's
        saved = read_json(info_file, f"delete {path} to train the warm start again").get("settings", {})
        differ = [f"{k} {saved.get(k)} then, {v} now" for k, v in settings.items() if saved.get(k) != v]
        if differ:
            raise UsageError(f"{path} is a warm start made with other settings ({', '.join(differ[:3])}): choose "
                             f"another --out-dir, or delete {path} to train a new one")
    if not reuse and is_main():                   # one process trains it; the others wait, then all load it
        t0 = time.time()
        losses = warm_start(model, tokenizer, {k: [p[k] for p in train] for k in ("question", "answer")},
                            cfg, device)
        info = dict(task="toy", settings=settings, seconds=round(time.time() - t0, 1), first_loss=losses[0],
                    final_loss=float(np.mean(losses[-50:])))
        save_checkpoint(path, model, tokenizer, info=info)
        print(f"warm start: {len(losses)} steps in {info['seconds']:.0f}s, "
              f"loss {losses[0]:.3f} -> {info['final_loss']:.3f}; saved to {path}")
    elif is_main():
        print(f"warm start: reusing {path}")
    barrier()              # every process, whatever it found: one that looked late may already see it saved
    return load_model_and_tokenizer(str(path), device, torch.float32)[0]


def stage_dir(cfg: Config, out: Path, stage: int) -> Path:
    """out/stage{k}-B{B}: the checkpoint after stage k (from 1) of cfg's curriculum, at that stage's block size."""
    B = stage_plan(cfg.block_sizes, cfg.steps_per_stage, cfg.shift_fraction, cfg.direct)[stage - 1][0]
    return out / f"stage{stage}-B{B}"


RESUME_MAY_DIFFER = ("out_dir", "resume", "device", "rollout_batch", "eval_batch", "compile", "micro_batch_tokens",
                     "grad_checkpointing", "show_trajectory")     # settings that do not change the method (rows per
# sampler call do change which random numbers a sample draws at temperature > 0: equal ones reproduce a run)


@contextlib.contextmanager
def claimed_out_dir(cfg: Config):
    """--out-dir, created if need be, with an OS lock (filelock) on out/tstar.lock held while the run lasts: a
    second run into the same out dir stops with one line instead of interleaving its files with this one's. The
    OS releases the lock when the process ends, however it ends (a killed run leaves nothing to clean up); the
    file names the holder for that message. An out dir this run created is removed again if the run stops with
    bad input before writing anything into it."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out-dir {out}: {e.strerror}") from None
    if not is_main():                             # only rank 0 writes files, so only it needs the lock
        yield out
        return
    path = out / "tstar.lock"
    try:
        try:
            # The holder's line is read before trying the lock, since a try may empty the file.
            holder = path.read_text(errors="replace").strip() if path.is_file() else ""
            open(path, "a").close()           # filelock reports a file it may not open as held by another run
            lock = filelock.FileLock(path, timeout=0)
            lock.acquire()
            path.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        except filelock.Timeout:
            raise UsageError(f"{out} is in use by another run ({holder or 'starting'}); wait for it, "
                             f"or choose another --out-dir") from None
        except OSError as e:
            raise UsageError(f"--out-dir {out} cannot be written ({e.strerror or type(e).__name__})") from None
        try:
            yield out
        finally:
            lock.release()
    except UsageError:
        if created and [p.name for p in out.iterdir()] in ([], ["tstar.lock"]):
            path.unlink(missing_ok=True)
            out.rmdir()
        raise


STAGE_DIR = re.compile(r"stage(\d+)-B(\d+)")       # stage{k}-B{B}: the checkpoint after stage k, at block size B


def finished_stages(out: Path) -> list[Path]:
    """The stage checkpoints in `out`, by stage. A stage is finished when its tstar.json exists (save_checkpoint
    writes it last); other names (a backup copy such as stage-old-B4/) are not stages of a run."""
    found = [p.parent for p in out.glob("stage*-B*/tstar.json") if STAGE_DIR.fullmatch(p.parent.name)]
    return sorted(found, key=lambda p: int(STAGE_DIR.fullmatch(p.name)[1]))


RESULTS = ("eval.json", "eval.jsonl", "results.md", "curves.png")     # what a finished run or evaluation leaves


def no_results_replaced(cfg: Config, out: Path) -> None:
    """Results on disk are never replaced: an --eval-only into an out dir that holds an evaluation, or a fresh
    training run into one that holds a finished run's table, stops with one line before any work. (A resumed
    run writes its table again, from the records it keeps; the log of a run interrupted before its first stage
    is started over by the same command.)"""
    mine = RESULTS[:2] if cfg.eval_only else () if cfg.resume else RESULTS[2:]
    found = [name for name in mine if (out / name).exists()]
    if found:
        raise UsageError(f"{out} holds the results of an earlier {'evaluation' if cfg.eval_only else 'run'} "
                         f"({', '.join(found)}): choose another --out-dir, or move them away")


def stages_done(cfg: Config, out: Path) -> int:
    """How many stages an earlier run in `out` finished, for --resume (0 for a fresh run). A fresh training
    run refuses an out dir that holds stage checkpoints (they would be taken for its own); --resume takes
    the last finished stage only if it was trained with the same settings."""
    if cfg.eval_only:                             # (evaluation writes no checkpoints; any dir will do)
        return 0
    finished = finished_stages(out)
    if not cfg.resume:                           # a fresh run: nothing of an earlier run may be mistaken for its own
        if finished:
            raise UsageError(f"{out} holds the checkpoints of an earlier run ({', '.join(p.name for p in finished)}): "
                             f"continue it with --resume, or choose another --out-dir")
        return 0
    if not finished:
        raise UsageError(f"--resume: no finished stage in {out} (no stage*-B*/tstar.json)")
    last = finished[-1]
    done = int(STAGE_DIR.fullmatch(last.name)[1])
    fix = f"delete {last} and run again (--resume if a stage is left)"
    saved = read_json(last / "tstar.json", fix).get("config", {})
    now = json.loads(json_text(dataclasses.asdict(cfg)))            # (as saved: tuples become lists)
    # every setting that shapes training must be the one the stage was trained with
    differ = [k for k in now if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]]
    # (and the stage must exist in this curriculum, under the name this curriculum gives it)
    if differ or done > len(cfg.block_sizes) or last != stage_dir(cfg, out, done):
        changes = ", ".join(f"--{k.replace('_', '-')} {flag_value(saved.get(k))} then, {flag_value(now[k])} now"
                            for k in differ[:3])
        raise UsageError(f"--resume: stage {done} in {out} was trained with other settings "
                         f"({changes or 'another --block-sizes'}); resume with the same flags, or choose another "
                         f"--out-dir")
    return done


# ======================================================================================================
# 18. Logs, tables and plots
# ======================================================================================================
# What a run keeps (Recorder): metrics.jsonl, results.md (accuracy, TPF and LocalStrict per stage and block
# size), curves.png (rollout accuracy and TPF per step) and trajectory-*.png (the decoding order).


def json_kind(x) -> str:
    """What a parsed JSON value is, in JSON's words (null, not None)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(x), "a number")


def json_text(obj, **kwargs) -> str:
    """Strict JSON: NaN and infinities (a diverged loss, say) become null."""
    def clean(x):                                 # (json.dumps would write a bare NaN, which strict readers reject)
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(clean(obj), allow_nan=False, **kwargs)    # allow_nan=False: a NaN that slipped through raises


TRAIN_METRICS = ("traj_gap", "traj_gap_max", "traj_gap_over", "entropy", "explained_var", "clipfrac", "kl",
                 "policy_loss", "grad_norm", "value_loss")           # an update's, which a step may not measure


class Recorder:
    """What a run keeps, all of it written by rank 0: metrics.jsonl (one strict-JSON line per RL step and per
    evaluation, appended as it is written), one console line for each, the decoding order of a few samples
    after each evaluation (trajectory-*.png), and at the end results.md (the table) and curves.png (the stage
    checkpoints are save_stage's). A resumed run keeps the lines of its finished stages; a last line cut by an
    interrupted write is dropped."""

    def __init__(self, cfg: Config, out: Path, tokenizer, log_name: str = "metrics.jsonl",
                 keep_stages_below: int | None = None):
        self.cfg, self.out, self.tokenizer, self.path = cfg, out, tokenizer, out / log_name
        self.records = []                         # every record of this run (for the table and the plots)
        if keep_stages_below is not None and self.path.is_file():   # a resumed run: its finished stages' lines
            fix = (f"delete that line (or the file: the resumed run's table then starts at stage "
                   f"{keep_stages_below})")
            with reading(self.path, fix, own=True):
                lines = self.path.read_text().splitlines()
                for i, line in enumerate(lines):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        if i == len(lines) - 1:   # cut by an interrupted write: a line of the unfinished stage
                            break
                        raise ValueError(f"line {i + 1} is not JSON") from None
                    if not (isinstance(record, dict) and type(record.get("stage")) is int
                            and record.get("kind") in ("train", "eval")):
                        raise ValueError(f"line {i + 1} is not a record of tstar's")
                    if record["stage"] < keep_stages_below:
                        self.records.append(record)
        if is_main():                             # rewritten: the kept lines only (a fresh run: none)
            self.path.write_text("".join(json_text(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if is_main():                             # appended line by line: an interrupted run keeps its lines
            with self.path.open("a") as f:
                f.write(json_text(record) + "\n")

    def rl_step(self, r: dict) -> None:
        """An RL step's record; the metrics it did not measure (no group with a signal, no value head) are null."""
        r = dict.fromkeys(TRAIN_METRICS) | r
        self.write(r)
        if is_main():                             # "-" for what was not measured (None)
            f = lambda key, spec: shown(r[key], spec)          # noqa: E731
            print(f"stage {r['stage']} B={r['block_size']:<2d} off={r['offset']:<2d} step {r['step']:4d} | "
                  f"acc {r['accuracy']:.3f} kept {r['kept']:.2f} truncated {r['truncated']:.2f} TPF {r['tpf']:.2f} "
                  f"LS {f('local_strict', '.3f')} len {r['length']:.1f} | loss {f('policy_loss', '+.3f')} "
                  f"ent {f('entropy', '.2f')} clipfrac {f('clipfrac', '.3f')} kl {f('kl', '.1e')} "
                  f"gnorm {f('grad_norm', '.2f')} vloss {f('value_loss', '.3f')} ev {f('explained_var', '+.2f')} "
                  f"gap {f('traj_gap', '.1e')} max {f('traj_gap_max', '.1e')} >0.1 {f('traj_gap_over', '.3f')} | "
                  f"{r['seconds']:.1f}s", flush=True)

    def evaluation(self, r: dict, gens: Sequence[Generation]) -> None:
        """An evaluation at one block size; the decoding order is drawn at the stage's own B (every B with
        --eval-only)."""
        cfg, B = self.cfg, r["block_size"]
        label = r["label"] = "eval" if cfg.eval_only else "start" if r["stage"] == 0 else f"stage{r['stage']}"
        self.write(r)
        if not is_main():
            return
        ls = shown(r["local_strict"], ".3f")
        print(f"  eval {label:>10} {r['dataset']} B={B:<3d} acc {r['accuracy']:.3f}  pass@{cfg.eval_samples} "
              f"{r[f'pass@{cfg.eval_samples}']:.3f}  TPF {r['tpf']:.2f}  LocalStrict {ls}  len {r['length']:.1f}  "
              f"truncated {r['truncated']:.2f}  {r['tokens_per_s']:.0f} tok/s")
        if (B == r["stage_block_size"] or cfg.eval_only) and gens:
            plot_trajectories(gens[:8], B, self.out / f"trajectory-{r['stage']}-{label}-B{B}.png",
                              f"{label}: decoding order at B={B} ({r['dataset']})")
            if cfg.show_trajectory:
                for g in gens[:2]:
                    print(render_trajectory(self.tokenizer, g, B) + "\n")

    def finished(self) -> None:
        if is_main():
            table = results_table(self.records, self.cfg)
            (self.out / "results.md").write_text(table + "\n")
            plot_curves(self.records, self.out / "curves.png")
            print("\n" + table + f"\n\nwrote {self.path}, {self.out / 'results.md'}, {self.out / 'curves.png'}")


def shown(value, spec: str) -> str:
    """A logged value as text: "-" for one that is undefined or was not measured (None)."""
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table: columns are (key, header); floats with 3 decimals, "-" for an undefined metric."""
    def cell(v):
        return shown(v, ".3f") if v is None or isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]   # header, rule
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def results_table(records: Sequence[dict], cfg: Config) -> str:
    """Rows: warm start (or the start model), then each stage; columns: accuracy and TPF at each
    evaluation block size, and LocalStrict at each."""
    sizes = cfg.eval_block_sizes
    rows = {}                                     # (stage, dataset) -> one row of the table
    for r in records:
        if r["kind"] == "eval":                   # one record per (stage, dataset, block size)
            row = rows.setdefault((r["stage"], r["dataset"]), {"model": r["label"], "dataset": r["dataset"]})
            for key in ("accuracy", "tpf", "local_strict"):
                row[f"{key}@{r['block_size']}"] = r[key]
    columns = [("model", "model"), ("dataset", "data")]
    columns += [(f"accuracy@{B}", f"acc B={B}") for B in sizes] + [(f"tpf@{B}", f"TPF B={B}") for B in sizes]
    columns += [(f"local_strict@{B}", f"LS B={B}") for B in sizes]
    return format_table([rows[k] for k in sorted(rows)], columns)


def render_trajectory(tokenizer, g: Generation, block_size: int) -> str:
    """Text picture of one response: per block, its tokens and, under each, the order in which the block's
    tokens were finalized (1 = first step spent on that block)."""
    steps = torch.tensor(g.step_map[: g.n_tokens])
    blocks = response_blocks(g.prompt_len, len(steps), block_size, g.offset)
    lines = []
    for b in blocks.unique().tolist():
        sel = (blocks == b).nonzero()[:, 0]                       # the block's tokens
        order = torch.unique(steps[sel], return_inverse=True)[1] + 1   # its steps renumbered 1, 2, ...
        # (token, order) per position; repr shows a newline or a space as something visible
        cells = [(repr(tokenizer.decode([g.ids[i]]))[1:-1] or " ", str(int(o))) for i, o in zip(sel.tolist(), order)]
        width = [max(len(t), len(o)) for t, o in cells]
        lines.append(" ".join(t.ljust(w) for (t, _), w in zip(cells, width)) + "\n" +
                     " ".join(o.ljust(w) for (_, o), w in zip(cells, width)))
    return "\n".join(lines)


def plot_trajectories(gens: Sequence[Generation], block_size: int, path: Path, title: str) -> None:
    """Heatmap: one row per sample, one column per response token, colour = the row's denoising step at
    which the token was finalized (normalised by its NFE). Left-to-right decoding is a smooth ramp;
    parallel decoding shows flat runs. Block boundaries are drawn in white."""
    from matplotlib.figure import Figure          # (not pyplot: a file, no window, no global state)

    width = max(g.n_tokens for g in gens)
    grid = np.full((len(gens), width), np.nan)                    # (samples, tokens); NaN (blank) past the end
    fig = Figure(figsize=(min(16, 2 + width / 6), 1 + 0.35 * len(gens)))
    ax = fig.subplots()
    for r, g in enumerate(gens):
        grid[r, : g.n_tokens] = np.array(g.step_map[: g.n_tokens]) / g.nfe
        blocks = response_blocks(g.prompt_len, g.n_tokens, block_size, g.offset)
        for i in ((blocks[1:] != blocks[:-1]).nonzero()[:, 0] + 1).tolist():     # each later block's first token
            ax.plot([i - 0.5, i - 0.5], [r - 0.5, r + 0.5], color="white", lw=1.5)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("response token")
    ax.set_ylabel("sample")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="finalized at step / NFE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_curves(records: Sequence[dict], path: Path) -> None:
    """Rollout accuracy and TPF against RL step, evaluation points at stage ends, stage boundaries."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    # the evaluation at the stage's own block size: the number a stage is trained to raise
    evals = [r for r in records if r["kind"] == "eval" and r["block_size"] == r["stage_block_size"]]
    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 2)                               # accuracy on the left, TPF on the right
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "tpf", "tokens per forward")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], ".-", lw=0.8, label="rollouts")
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o", label="evaluation at the stage's B")
        for r in train:                           # a grey line and a label where each stage begins
            if r["stage_step"] == 0:
                ax.axvline(r["step"] - 0.5, color="grey", lw=0.6)
                ax.text(r["step"], ax.get_ylim()[1], f" B={r['block_size']}", va="top", fontsize=8)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ======================================================================================================
# 19. run and main
# ======================================================================================================
# run() puts it together: the device and processes, the out dir, the model and the data, every check that
# needs them (block sizes, prompt lengths, memory), the starting point (the warm start, or the stage being
# resumed), the Engine, and then evaluate_only or train. main() turns a UsageError into one line and exit
# code 2, and an interrupt into exit code 130.


def run(cfg: Config) -> None:
    """The whole run for a checked config (finalize_config): train with T*, or --eval-only."""
    device = setup_device(cfg)                    # (and the process group under torchrun)
    torch.manual_seed(seed_for(cfg.seed))         # the tiny model's initial weights
    with claimed_out_dir(cfg) as out, deterministic(device.type == "cuda"):   # this run alone writes into out
        done = stages_done(cfg, out)              # stages an earlier run finished (--resume), else 0
        no_results_replaced(cfg, out)
        if is_main():
            print("config: " + " ".join(f"{k}={flag_value(v)}" for k, v in dataclasses.asdict(cfg).items()))

        # the model and the data, and every check that needs them, before any long work
        dtype = compute_dtype(cfg, device)
        storage = dtype if cfg.eval_only else torch.float32        # training keeps fp32 master weights
        # (a config JSON: fp32 until the warm start is trained, which a bf16 AdamW would do badly)
        model, tokenizer = load_in_turns(cfg.model, device,
                                         torch.float32 if is_architecture_file(cfg.model) else storage)
        all_block_sizes = sorted({*cfg.block_sizes, cfg.base_block_size, *cfg.eval_block_sizes})
        for B in all_block_sizes:
            check_block_size(B, cfg.steps_per_block, model.config.max_position_embeddings)
        train_problems, eval_sets, reward_fn = load_task(cfg)    # (bad data files stop here)
        if not cfg.eval_only and len(train_problems) < cfg.prompts_per_step:
            raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} is more than the {len(train_problems)} "
                             f"training problems of {cfg.train_dataset}")
        longest = max(len(encode_prompt(tokenizer, p["question"]))
                      for problems in [train_problems, *eval_sets.values()] for p in problems)
        for B in all_block_sizes:                 # the longest prompt, its longest response, whole blocks
            for offset in {0, B // 2}:
                check_fits(longest, cfg.max_new_tokens, model.config.max_position_embeddings, B, offset)
        # the sampler's rows per call and the memory they take, from the architecture (under torchrun the policy
        # will be sharded, and sampled from a whole copy)
        graphs = cfg.compile and device.type == "cuda"
        if cfg.compile and not graphs and is_main():
            print(f"--compile: CUDA graphs need a CUDA device; the sampler runs eagerly on {device.type}")
        sharded = world()[1] > 1 and not cfg.eval_only
        plan = memory_plan(cfg, model, all_block_sizes, longest, device, not cfg.eval_only,
                           dtype != storage or sharded, graphs)
        if is_main():
            print("memory: " + plan["line"])

        model, value_head = starting_point(cfg, model, tokenizer, train_problems, device, out, done, storage)
        if not cfg.eval_only:                     # training memory: recomputed activations, FSDP shards
            if cfg.grad_checkpointing:                 # (the method's name changed in transformers 5.x)
                getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            if sharded:
                shard(model, value_head, device, dtype)
        engine = Engine(model, tokenizer, dtype, plan["rows"], graphs, frozen=cfg.eval_only, keep=plan["keep"],
                        width=plan["width"])      # (a frozen model may fuse its norms)

        if cfg.eval_only:
            evaluate_only(cfg, engine, tokenizer, eval_sets, reward_fn, out)
        else:                                     # (a resumed run keeps the log lines of its finished stages)
            rec = Recorder(cfg, out, tokenizer, keep_stages_below=done + 1 if cfg.resume else None)
            train(cfg, model, value_head, engine, tokenizer, train_problems, eval_sets, reward_fn, rec, done,
                  save=lambda stage, B: save_stage(cfg, out, stage, B, model, value_head, tokenizer))
        barrier()                                 # (every process done before any tears the process group down)


def starting_point(cfg: Config, model, tokenizer, train_problems, device, out: Path, done: int, storage):
    """(policy, value head) to start from: with --resume, the weights and value head of the last finished
    stage; else the tiny model after its warm start, or a checkpoint as it is."""
    if done:                                      # (the warm start is not needed, nor retrained if gone)
        path = stage_dir(cfg, out, done)
        model = load_in_turns(str(path), device, torch.float32)[0]
        if is_main():
            print(f"resuming after stage {done} from {path}")
        return model, load_value_head(model, path)
    if is_architecture_file(cfg.model):
        model = cast_weights(warm_started(cfg, model, tokenizer, train_problems, device, out), storage)
    return model, new_value_head(model)


def evaluate_only(cfg: Config, engine: Engine, tokenizer, eval_sets, reward_fn, out: Path) -> None:
    """--eval-only: the metrics of --model at every evaluation block size: eval.jsonl, a table, eval.json."""
    rec = Recorder(cfg, out, tokenizer, "eval.jsonl")
    evaluate_stage(engine, tokenizer, eval_sets, reward_fn, cfg, rec, 0, cfg.base_block_size, 0)
    if is_main():
        columns = [("dataset", "data"), ("block_size", "B"), ("accuracy", "accuracy"),
                   (f"pass@{cfg.eval_samples}", f"pass@{cfg.eval_samples}"), ("tpf", "TPF"), ("nfe", "NFE"),
                   ("local_strict", "LocalStrict"), ("length", "mean length"), ("truncated", "truncated"),
                   ("tokens_per_s", "tokens/s")]
        table = format_table(rec.records, columns)
        (out / "eval.json").write_text(json_text(rec.records, indent=1))
        print("\n" + table + f"\n\nwrote {out / 'eval.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: python tstar.py [flags]. Returns the exit code: 0, 2 for bad input (one line on
    stderr, no traceback), 130 when interrupted (finished stages are kept)."""
    cfg = None
    try:
        cfg = finalize_config(parse_args(argv))
        run(cfg)
    except UsageError as e:                       # (every process of torchrun exits 2; rank 0 says why, once)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"tstar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                     # (the lock is released on the way out: claimed_out_dir)
        hint = ""
        if cfg is not None and not cfg.eval_only:
            hint = (": finished stages are saved; rerun with --resume to continue" if finished_stages(Path(cfg.out_dir))
                    else ": no stage was finished; run the same command again (a finished warm start is reused)")
        print("\ninterrupted" + hint, file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
