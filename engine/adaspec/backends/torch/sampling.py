"""Token choice and lossless verification of draft tokens.

Greedy: a draft token is accepted while it equals the target's argmax; the first mismatch emits
the target's token instead, and if every draft token matched the target's next token is the bonus.

Sampling (standard speculative rejection sampling): the same temperature/top-p transform is
applied to the draft distribution q and the target distribution p. Draft token x is accepted with
probability min(1, p(x)/q(x)); on the first rejection the emitted token is drawn from
normalize(max(0, p − q)); after all are accepted a bonus token is drawn from p. Every emitted
token then follows the target's (transformed) distribution exactly.

Device: probabilities may live on the model's device (a GPU); the per-request generators are
CPU generators. Only scalars (token ids, the probabilities of drafted tokens) cross to the host:
`sample` inverts the CDF on the device with a uniform drawn on the host when the two differ.
On CPU every function keeps its plain torch path (`torch.multinomial`), so results there are
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaspec.backends.base import SamplingParams


def check_params(params: SamplingParams, field_prefix: str = "params") -> None:
    """Reject sampling parameters the samplers cannot honour, naming the field."""
    if not params.temperature >= 0.0:
        raise ValueError(f"{field_prefix}.temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"{field_prefix}.top_p must be in (0, 1], got {params.top_p}")
    cap = params.max_draft
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise ValueError(f"{field_prefix}.max_draft must be an integer >= 0 or None, got {cap!r}")


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0.0


def make_generator(params: SamplingParams, fallback_seed: int) -> torch.Generator:
    """A per-request CPU generator: seeded from params.seed, else from the backend's seed stream."""
    seed = params.seed if params.seed is not None else fallback_seed
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[N, V] float logits → [N, V] float32 probabilities after temperature and nucleus cut.

    top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the token that
    crosses the threshold is kept), then renormalises.
    """
    if temperature <= 0.0:
        raise ValueError("probs_from_logits needs temperature > 0 (greedy uses argmax)")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """Draw one token id from a [V] probability vector (weights need not sum to 1)."""
    if probs.device.type == gen.device.type:
        return int(torch.multinomial(probs, 1, generator=gen).item())
    return sample_inverse_cdf(probs, gen)


def sample_inverse_cdf(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One draw by inverting the CDF at a uniform from `gen`, computed where `probs` lives.

    Why: `torch.multinomial` needs its generator on the probabilities' device, and moving a
    vocabulary row to the host for it would sync on every sampled token; this moves one id.
    A zero-weight token is never drawn (the CDF does not rise at it).
    """
    u = torch.rand((1,), generator=gen, dtype=torch.float64, device=gen.device)
    cdf = probs.double().cumsum(0)
    x = u.to(cdf.device) * cdf[-1]
    i = torch.searchsorted(cdf, x, right=True)
    return int(i.clamp_(max=probs.shape[0] - 1))


@dataclass(frozen=True)
class Verified:
    accepted: int
    """Draft tokens accepted."""
    tokens: list[int]
    """Tokens emitted: the accepted drafts, then the corrected or bonus token."""


def verify_greedy(drafts: list[int], target_logits: torch.Tensor) -> Verified:
    """target_logits: [len(drafts) + 1, V]; row j is the target's view after drafts[:j]."""
    return accept_greedy(drafts, target_logits.argmax(dim=-1).tolist())


def accept_greedy(drafts: list[int], best: Sequence[int]) -> Verified:
    """`verify_greedy` from the target's argmax ids ([len(drafts) + 1]), computed for a whole
    batch on the device so only ids reach the host."""
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return Verified(n, [*drafts[:n], int(best[n])])


def verify_sampled(
    drafts: list[int],
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    gen: torch.Generator,
) -> Verified:
    """Rejection sampling. draft_probs: [s, V] (q of each draft position, transformed);
    target_probs: [s + 1, V] (p, transformed with the same parameters)."""
    s = len(drafts)
    if s:
        dev = target_probs.device
        idx = torch.tensor(drafts, dtype=torch.long, device=dev)
        rows = torch.arange(s, device=dev)
        p_x = target_probs[rows, idx].cpu()  # only the drafted tokens' probabilities move
        q_x = draft_probs[rows, idx].cpu()
        u = torch.rand(s, generator=gen)
        # u < p/q  ⇔  u·q < p (q > 0 for a token the draft sampled); accepted w.p. min(1, p/q).
        ok = (u * q_x < p_x).tolist()
    else:
        ok = []
    n = 0
    while n < s and ok[n]:
        n += 1
    if n < s:
        residual = torch.clamp(target_probs[n] - draft_probs[n], min=0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0.0 else target_probs[n]
        x = sample(dist, gen)
    else:
        x = sample(target_probs[s], gen)
    return Verified(n, [*drafts[:n], x])
