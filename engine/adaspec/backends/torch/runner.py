"""Ragged batched forward of a Qwen2/Llama causal LM over a slot KV cache.

The HF model's own forward assumes one cache per batch with equal lengths. Speculative decoding
needs rows of different cache lengths and query lengths in one pass (a draft pass over requests
that each have their own pending tokens; one verification of ragged draft lengths), so the
forward here is rebuilt from the model's own modules (same weights, same numerics) and attention
reads the slot cache through a boolean mask: key position p is visible to query t of row i iff
p ≤ L_i + t, where L_i is the row's cache length before the pass.

Rows of very different query lengths (a prompt chunk riding along with one-token decode rows)
would waste most of a padded [B, max q] batch, so such a pass is *packed*: the projections and
MLPs run over the real tokens only, and attention runs per group of rows of similar length,
each group padded to its own longest row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from adaspec.backends.torch.kv import SlotKVCache

SUPPORTED_MODEL_TYPES = frozenset({"qwen2", "llama"})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, Q, D]; cos/sin: [B, Q, D] (the model's rotary embedding)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def check_supported(model: Any) -> None:
    """Refuse architectures whose layout the ragged forward does not reproduce exactly."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the torch backend "
            f"(supported: {sorted(SUPPORTED_MODEL_TYPES)})"
        )
    base = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if base is None or not hasattr(base, name):
            raise ValueError(f"model has no model.{name}; not a Qwen2/Llama causal LM")
    if not hasattr(model, "lm_head"):
        raise ValueError("model has no lm_head; not a causal LM")


class ModelRunner:
    """One model, its slot KV cache, and the ragged batched forward."""

    def __init__(
        self,
        model: Any,
        max_slots: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        check_supported(model)
        cfg = model.config
        layer_types = getattr(cfg, "layer_types", None) or []
        window = getattr(cfg, "sliding_window", None)
        if "sliding_attention" in layer_types and window is not None and window < max_len:
            raise ValueError(
                f"sliding-window attention (window {window}) is not supported for "
                f"max_len {max_len}; lower max_model_len to <= {window}"
            )
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos is not None and max_len > int(max_pos):
            raise ValueError(
                f"max_len {max_len} exceeds the model's max_position_embeddings ({max_pos})"
            )
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        model.eval()
        self.model = model
        self.device = torch.device(device)
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.vocab_size = int(cfg.vocab_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        head_dim = getattr(cfg, "head_dim", None)
        self.head_dim = int(head_dim or cfg.hidden_size // self.num_heads)
        self._base = model.model
        self._layers = list(self._base.layers)
        self.cache = SlotKVCache(
            len(self._layers),
            max_slots,
            self.kv_heads,
            max_len,
            self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    # ------------------------------------------------------------------ slots

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def alloc(self) -> int:
        return self.cache.alloc()

    def free(self, slot: int) -> None:
        self.cache.free(slot)

    def length(self, slot: int) -> int:
        return self.cache.length(slot)

    def truncate(self, slot: int, n: int) -> None:
        self.cache.truncate(slot, n)

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(
        self,
        slots: list[int],
        token_lists: list[list[int]],
        *,
        last_n: int | None = None,
        on_device: bool = False,
    ) -> list[torch.Tensor]:
        """Append each row's tokens to its slot and return float32 logits per row.

        Row i gets logits [q_i, vocab] for its q_i = len(token_lists[i]) tokens, or only for its
        last min(last_n, q_i) tokens when `last_n` is given (0: no logits, e.g. a prefill whose
        next token is not needed). Position t of row i predicts the token after it.
        The logits are on the host unless `on_device`: then they stay on the model's device
        (no device→host copy of rows × vocab floats; the caller reduces them there first).
        """
        if len(slots) != len(token_lists):
            raise ValueError("slots and token_lists differ in length")
        if not slots:
            return []
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one forward")
        B = len(slots)
        q_lens = [len(t) for t in token_lists]
        if min(q_lens) < 1:
            raise ValueError("every row needs at least one token")
        starts = [self.cache.length(s) for s in slots]
        for s, L, q in zip(slots, starts, q_lens, strict=True):
            if L + q > self.cache.max_len:
                raise ValueError(f"slot {s}: {L} + {q} tokens exceed max_len={self.cache.max_len}")
        for toks in token_lists:
            for tok in toks:
                if not 0 <= tok < self.vocab_size:
                    raise ValueError(
                        f"token id {tok} outside the vocabulary [0, {self.vocab_size})"
                    )
        if _padding_waste(q_lens) > _PACK_ABOVE:
            return self._forward_packed(slots, token_lists, starts, q_lens, last_n, on_device)
        dev = self.device
        Q = max(q_lens)
        Lk = max(L + q for L, q in zip(starts, q_lens, strict=True))

        ids = torch.zeros((B, Q), dtype=torch.long)
        for i, toks in enumerate(token_lists):
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        ids = ids.to(dev)
        t_idx = torch.arange(Q, device=dev)
        q_t = torch.tensor(q_lens, device=dev)
        start_t = torch.tensor(starts, device=dev)
        valid = t_idx[None, :] < q_t[:, None]  # [B, Q]
        # Padding queries reuse the row's last position: finite attention, output ignored.
        pos = start_t[:, None] + torch.minimum(t_idx[None, :], q_t[:, None] - 1)  # [B, Q]
        rows_w, cols_w = valid.nonzero(as_tuple=True)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        slot_w = slot_t[rows_w]
        pos_w = pos[rows_w, cols_w]

        uniform = Q == 1 and len(set(starts)) == 1
        mask: torch.Tensor | None = None
        if not uniform:
            key_pos = torch.arange(Lk, device=dev)
            mask = (key_pos[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # [B, 1, Q, Lk]
        contiguous = slots == list(range(slots[0], slots[0] + B))

        h = self._base.embed_tokens(ids)
        cos, sin = self._base.rotary_emb(h, pos)
        for li, layer in enumerate(self._layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            qh = attn.q_proj(x).view(B, Q, -1, self.head_dim).transpose(1, 2)
            kh = attn.k_proj(x).view(B, Q, -1, self.head_dim).transpose(1, 2)
            vh = attn.v_proj(x).view(B, Q, -1, self.head_dim).transpose(1, 2)
            qh = _apply_rope(qh, cos, sin)
            kh = _apply_rope(kh, cos, sin)
            kc = self.cache.keys[li]
            vc = self.cache.values[li]
            kc[slot_w, :, pos_w] = kh.transpose(1, 2)[rows_w, cols_w]
            vc[slot_w, :, pos_w] = vh.transpose(1, 2)[rows_w, cols_w]
            if contiguous:
                keys = kc[slots[0] : slots[0] + B, :, :Lk]
                vals = vc[slots[0] : slots[0] + B, :, :Lk]
            else:
                keys = kc[:, :, :Lk].index_select(0, slot_t)
                vals = vc[:, :, :Lk].index_select(0, slot_t)
            out = sdpa(qh, keys, vals, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            out = out.transpose(1, 2).reshape(B, Q, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))

        for s, q_len in zip(slots, q_lens, strict=True):
            self.cache.advance(s, q_len)
        if last_n == 0:
            return [torch.empty((0, self.vocab_size)) for _ in slots]
        # Kept positions indexed from host lists (a boolean mask would sync on the device).
        counts = [q if last_n is None else min(q, last_n) for q in q_lens]
        keep = [
            i * Q + t
            for i, (q, n) in enumerate(zip(q_lens, counts, strict=True))
            for t in range(q - n, q)
        ]
        flat = h.reshape(B * Q, -1)
        hidden = self._base.norm(flat[torch.tensor(keep, dtype=torch.long, device=dev)])
        return self._split_logits(hidden, counts, on_device)

    def _forward_packed(
        self,
        slots: list[int],
        token_lists: list[list[int]],
        starts: list[int],
        q_lens: list[int],
        last_n: int | None,
        on_device: bool = False,
    ) -> list[torch.Tensor]:
        """`forward` over the real tokens only (see the module docstring); same results."""
        dev = self.device
        n_tok = sum(q_lens)
        offsets = [0]
        for q in q_lens:
            offsets.append(offsets[-1] + q)
        ids = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.long, device=dev)
        pos_l = [L + t for L, q in zip(starts, q_lens, strict=True) for t in range(q)]
        pos = torch.tensor(pos_l, dtype=torch.long, device=dev)
        slot_w = torch.tensor(
            [s for s, q in zip(slots, q_lens, strict=True) for _ in range(q)], device=dev
        )
        groups = [
            _AttnGroup.build(rows, slots, starts, q_lens, offsets, dev)
            for rows in _group_rows(q_lens)
        ]

        h = self._base.embed_tokens(ids[None, :])  # [1, N, hidden]
        cos, sin = self._base.rotary_emb(h, pos[None, :])
        heads = self.num_heads * self.head_dim
        for li, layer in enumerate(self._layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            qh = attn.q_proj(x).view(1, n_tok, -1, self.head_dim).transpose(1, 2)
            kh = attn.k_proj(x).view(1, n_tok, -1, self.head_dim).transpose(1, 2)
            vh = attn.v_proj(x).view(1, n_tok, -1, self.head_dim)
            qh = _apply_rope(qh, cos, sin)[0].transpose(0, 1)  # [N, heads, D]
            kh = _apply_rope(kh, cos, sin)[0].transpose(0, 1)  # [N, kv_heads, D]
            kc = self.cache.keys[li]
            vc = self.cache.values[li]
            kc[slot_w, :, pos] = kh
            vc[slot_w, :, pos] = vh[0]
            out = torch.empty((n_tok, heads), dtype=h.dtype, device=dev)
            for g in groups:
                keys = kc[:, :, : g.lk].index_select(0, g.slots)
                vals = vc[:, :, : g.lk].index_select(0, g.slots)
                q_g = qh[g.gather].transpose(1, 2)  # [Bg, heads, Qg, D]
                o = sdpa(q_g, keys, vals, attn_mask=g.mask, scale=attn.scaling, enable_gqa=True)
                o = o.transpose(1, 2).reshape(g.gather.shape[0], g.gather.shape[1], heads)
                out.index_copy_(0, g.dest, o[g.valid])
            h = h + attn.o_proj(out[None])
            h = h + layer.mlp(layer.post_attention_layernorm(h))

        for s, q_len in zip(slots, q_lens, strict=True):
            self.cache.advance(s, q_len)
        if last_n == 0:
            return [torch.empty((0, self.vocab_size)) for _ in slots]
        keep = [
            i
            for q, off in zip(q_lens, offsets, strict=False)
            for i in range(off + (0 if last_n is None else max(0, q - last_n)), off + q)
        ]
        counts = [q if last_n is None else min(q, last_n) for q in q_lens]
        hidden = self._base.norm(h[0, torch.tensor(keep, dtype=torch.long, device=dev)])
        return self._split_logits(hidden, counts, on_device)

    def _split_logits(
        self, hidden: torch.Tensor, counts: list[int], on_device: bool
    ) -> list[torch.Tensor]:
        """lm_head over the kept positions, as float32 per row (host or device)."""
        logits = self.model.lm_head(hidden).float()
        if not on_device:
            logits = logits.cpu()
        return list(torch.split(logits, counts, dim=0))


_PACK_ABOVE = 0.5
"""Pack a pass when more than this fraction of a padded [B, max q] batch would be padding."""


def _padding_waste(q_lens: list[int]) -> float:
    padded = len(q_lens) * max(q_lens)
    return 1.0 - sum(q_lens) / padded


def _group_rows(q_lens: list[int]) -> list[list[int]]:
    """Rows grouped for attention, longest first; a row joins the current group while the
    group stays at most half padding."""
    groups: list[list[int]] = []
    tokens = 0
    for i in sorted(range(len(q_lens)), key=lambda r: -q_lens[r]):
        if groups:
            g = groups[-1]
            width = q_lens[g[0]]
            if width * (len(g) + 1) <= 2 * (tokens + q_lens[i]):
                g.append(i)
                tokens += q_lens[i]
                continue
        groups.append([i])
        tokens = q_lens[i]
    return groups


class _AttnGroup:
    """Index tensors for one attention group of a packed pass."""

    __slots__ = ("dest", "gather", "lk", "mask", "slots", "valid")

    def __init__(
        self,
        slots: torch.Tensor,
        gather: torch.Tensor,
        valid: torch.Tensor,
        dest: torch.Tensor,
        mask: torch.Tensor,
        lk: int,
    ) -> None:
        self.slots = slots
        self.gather = gather
        self.valid = valid
        self.dest = dest
        self.mask = mask
        self.lk = lk

    @classmethod
    def build(
        cls,
        rows: list[int],
        slots: list[int],
        starts: list[int],
        q_lens: list[int],
        offsets: list[int],
        dev: torch.device,
    ) -> _AttnGroup:
        qg = max(q_lens[r] for r in rows)
        t = torch.arange(qg, device=dev)
        q = torch.tensor([q_lens[r] for r in rows], device=dev)
        off = torch.tensor([offsets[r] for r in rows], device=dev)
        start = torch.tensor([starts[r] for r in rows], device=dev)
        last = torch.minimum(t[None, :], q[:, None] - 1)  # padding repeats the last query
        gather = off[:, None] + last  # [Bg, Qg] packed token index
        valid = t[None, :] < q[:, None]
        qpos = start[:, None] + last
        lk = max(starts[r] + q_lens[r] for r in rows)
        key_pos = torch.arange(lk, device=dev)
        mask = (key_pos[None, None, :] <= qpos[:, :, None]).unsqueeze(1)  # [Bg, 1, Qg, Lk]
        dest = gather[valid]
        g_slots = torch.tensor([slots[r] for r in rows], dtype=torch.long, device=dev)
        return cls(g_slots, gather, valid, dest, mask, lk)
