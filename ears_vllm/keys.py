"""Keyed randomness: one uniform per (request seed, position, token id), the same in PyTorch as in vLLM's Triton.

vLLM's Model Runner V2 samples with keyed Gumbel noise: the uniform of token ``offset`` at position ``pos`` of a
request with ``seed`` is ``murmur3_uniform32(seed, pos, offset)`` (``vllm/v1/worker/gpu/sample/gumbel.py``; its
drafter adds ``1 << 30`` to the position). :func:`murmur3_uniform32` computes the same float32 bits in PyTorch
(uint32 arithmetic kept in int64 and masked), so a verifier on the host can regenerate exactly the noise MRV2's
sampler and drafter used: the groundwork of exponential races with shared keys (ERSD, issue 18), where the key of
token x is ``E_x = -log(1 - u_x)`` (MRV2's Gumbel noise is ``-log(E_x)``).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# vLLM MRV2's salt on the position when its drafter samples (gumbel.py ``_DRAFT_NOISE_SALT``).
DRAFT_NOISE_SALT = 1 << 30


def _rotl32(value: torch.Tensor, shift: int) -> torch.Tensor:
    return ((value << shift) | (value >> (32 - shift))) & _MASK32


def _mix(h: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    key = _rotl32((key * 0xCC9E2D51) & _MASK32, 15)
    key = (key * 0x1B873593) & _MASK32
    h = _rotl32(h ^ key, 13)
    return (h * 5 + 0xE6546B64) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def murmur3_prefix(
    seed: torch.Tensor,  # [...] int64
    pos: torch.Tensor,  # [...] int64
    domain: int = 0,
) -> torch.Tensor:  # [...] int64 holding a uint32
    """The hash state after the seed's two words and the position: what a row's keys share (the Triton race
    kernel mixes in the token id itself)."""
    seed, pos = seed.long(), pos.long()
    h = torch.full_like(seed, domain & _MASK32)
    h = _mix(h, seed & _MASK32)
    h = _mix(h, (seed >> 32) & _MASK32)
    return _mix(h, pos & _MASK32)


def murmur3_hash32(
    seed: torch.Tensor,  # [...] int64
    pos: torch.Tensor,  # [...] int64
    offset: torch.Tensor,  # [...] int (the token id)
    domain: int = 0,
) -> torch.Tensor:  # [...] int64 holding a uint32
    h = _mix(murmur3_prefix(seed, pos, domain), offset.long() & _MASK32)
    return _fmix32(h ^ 16)


def murmur3_uniform32(
    seed: torch.Tensor,  # [...] int64
    pos: torch.Tensor,  # [...] int64
    offset: torch.Tensor,  # [...] int
) -> torch.Tensor:  # [...] float32 in (0, 1)
    """``(hash + 0.5) * 2**-32`` rounded to float32 as vLLM rounds it (the two 16-bit halves, each exact)."""
    random32 = murmur3_hash32(seed, pos, offset)
    hi16, lo16 = (random32 >> 16).to(torch.float32), (random32 & 0xFFFF).to(torch.float32)
    return hi16 * 1.52587890625e-05 + (lo16 + 0.5) * 2.3283064365386963e-10
