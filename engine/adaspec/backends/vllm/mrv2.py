"""AdaSpec's verifier inside vLLM's adaptive verification (Model Runner V2, CUDA GPUs only).

Enabled by `VllmSettings(adaptive_verification=VerifierSettings(...))` (config.py), which sets
`speculative_config.enable_adaptive_verification`, `worker_cls` = `AdaSpecWorker` and
`additional_config["adaspec"]["verifier"]`. Nothing here runs in config-only or plain plugin
mode, and VllmEngine refuses the switch on any platform but CUDA before loading a model.

Seams (pinned to vLLM 0.32.0; each one guarded by tests/vllm/test_contract.py):

- `vllm.v1.worker.gpu_worker.Worker.initialize_from_config`: `AdaSpecWorker` calls it, then
  `install_verifier`, once the MRV2 runner has built its `AdaptiveVerificationManager`
  (`GPUModelRunner.adaptive_verification`, created in `initialize_kv_cache`) and before warm-up
  profiles its cost tables.
- `AdaptiveVerificationManager` is re-classed to `AdaSpecVerificationManager`, which overrides
  - `get_num_tokens(num_tokens_per_req, draft_tokens)`: vLLM's own method runs first (its
    bookkeeping and its budget), then AdaSpec replaces the draft budget in `_batch_budget`
    (3-tuple: drafts per request, non-draft tokens per request, budget) and the returned token
    count. It reads `_stale_confidences[_stale_idx].np` (acceptance per slot, one step stale,
    as vLLM uses it), `req_states.req_id_to_index`, `req_states.num_computed_tokens_np`,
    `req_states.prefill_len.np`, `_max_total_logits`, `num_bonus_tokens`, `cost_tables`.
    vLLM's `reallocate_drafts` then admits the budget's best slots across requests on the GPU
    (per-request verified lengths), exactly as for its own budget.
  - `record_confidences(confidence_probs, input_batch)` (only with acceptance="profile"):
    replaces vLLM's logistic estimate by the Profile's calibration of the draft's top-1
    probability, sigmoid(`OnlineAcceptanceEstimator.features`) (features = logit(max q)).
- The per-request cap (`adaspec_max_draft`) and K per step stay in AdaSpecScheduler: with
  async scheduling off, MRV2 hands the scheduler placeholder draft lists, which it trims.

What is verified where: the decision (verify_plan.py) by unit tests; this class's
`get_num_tokens` against vLLM's own method body on CPU with hand-built state
(tests/vllm/test_mrv2.py); the calibration kernel on CPU tensors; every internal name and
signature by contract tests. NOT verified anywhere: the install into a live MRV2 runner, CUDA
graph capture with it, `record_confidences` on CUDA streams, and its effect on throughput.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.spec_decode.adaptive_verification import (  # type: ignore[import-not-found, unused-ignore]
    AdaptiveVerificationManager,
)
from vllm.v1.worker.gpu_worker import (  # type: ignore[import-not-found, unused-ignore]
    Worker,
)

from adaspec.backends.vllm.settings import parse_settings
from adaspec.backends.vllm.verifier import AdaSpecVerifier, verifier_settings
from adaspec.backends.vllm.verify_plan import VerifierUnsupportedError

log = logging.getLogger("adaspec.vllm")


def calibrated_confidences(
    features: torch.Tensor, rows: torch.Tensor, inner_edges: torch.Tensor, prob: torch.Tensor
) -> torch.Tensor:
    """P(accept) per draft slot from the Profile's calibration: top-1 probability
    q = sigmoid(logit(max q)) binned like numpy's searchsorted(side="right")."""
    top1 = torch.sigmoid(features[rows].float())
    return prob[torch.bucketize(top1, inner_edges, right=True)]


class AdaSpecVerificationManager(AdaptiveVerificationManager):  # type: ignore[misc, unused-ignore]
    """vLLM's manager with AdaSpec choosing the draft budget (see the module docstring)."""

    adaspec: AdaSpecVerifier
    _batch_budget: tuple[dict[str, int], dict[str, int], int] | None
    _adaspec_estimator: Any
    _adaspec_cal: tuple[torch.Tensor, torch.Tensor] | None

    @classmethod
    def adopt(
        cls, mgr: Any, verifier: AdaSpecVerifier, estimator: Any
    ) -> AdaSpecVerificationManager:
        """Turn vLLM's live manager into this class in place (its buffers, streams and cost
        tables stay as vLLM built them)."""
        mgr.__class__ = cls
        mgr.adaspec = verifier
        mgr._adaspec_estimator = estimator
        mgr._adaspec_cal = None
        if verifier.cfg.acceptance == "profile":
            inner, prob = verifier.calibration_arrays()
            device = mgr.req_states.device
            mgr._adaspec_cal = (
                torch.tensor(inner, dtype=torch.float32, device=device),
                torch.tensor(prob, dtype=torch.float32, device=device),
            )
        assert isinstance(mgr, AdaSpecVerificationManager)
        return mgr

    def get_num_tokens(
        self, num_tokens_per_req: dict[str, int], draft_tokens: dict[str, list[int]]
    ) -> int:
        total = int(super().get_num_tokens(num_tokens_per_req, draft_tokens))
        assert self._batch_budget is not None  # vLLM's get_num_tokens just set it
        drafts_per_req, non_draft_per_req, vllm_budget = self._batch_budget
        req_ids = list(num_tokens_per_req)
        n = len(req_ids)
        rs = self.req_states
        slots = np.fromiter((rs.req_id_to_index[r] for r in req_ids), dtype=np.int64, count=n)
        drafts = np.fromiter((drafts_per_req[r] for r in req_ids), dtype=np.int64, count=n)
        base = np.fromiter((non_draft_per_req[r] for r in req_ids), dtype=np.int64, count=n)
        context = rs.num_computed_tokens_np[slots].astype(np.float64)
        emits = context + base >= rs.prefill_len.np[slots]
        accept = self._stale_confidences[self._stale_idx].np[slots].astype(np.float64)
        max_budget = max(0, int(self._max_total_logits) - n * int(self.num_bonus_tokens))
        plan = self.adaspec.decide(
            accept, drafts, emits, context, base, max_budget, self.cost_tables, int(vllm_budget)
        )
        self._batch_budget = (drafts_per_req, non_draft_per_req, plan.draft_budget)
        return total - int(vllm_budget) + plan.draft_budget

    def record_confidences(self, confidence_probs: torch.Tensor, input_batch: Any) -> None:
        cal = self._adaspec_cal
        if cal is not None:
            rows = input_batch.idx_mapping[: input_batch.num_reqs]
            confidence_probs = calibrated_confidences(
                self._adaspec_estimator.features, rows, cal[0], cal[1]
            )
        super().record_confidences(confidence_probs, input_batch)


def install_verifier(runner: Any, vllm_config: Any) -> AdaSpecVerificationManager:
    """Hand the runner's adaptive verification to AdaSpec; refuse clearly where it cannot."""
    from vllm.v1.worker.gpu.model_runner import (  # type: ignore[import-not-found, unused-ignore]
        GPUModelRunner as ModelRunnerV2,
    )

    settings = parse_settings(vllm_config.additional_config)
    cfg = verifier_settings(settings)
    if not isinstance(runner, ModelRunnerV2):
        raise VerifierUnsupportedError(
            "adaptive_verification needs vLLM's Model Runner V2; this worker runs "
            f"{type(runner).__module__}.{type(runner).__qualname__}"
        )
    mgr = getattr(runner, "adaptive_verification", None)
    if mgr is None:
        raise VerifierUnsupportedError(
            "vLLM built no adaptive verification manager: speculative_config."
            "enable_adaptive_verification is off, or the speculator turned it off"
        )
    if isinstance(mgr, AdaSpecVerificationManager):
        return mgr
    estimator = getattr(getattr(runner, "speculator", None), "acceptance_estimator", None)
    if cfg.acceptance == "profile" and estimator is None:
        raise VerifierUnsupportedError(
            "adaptive_verification.acceptance='profile' needs the draft's top-1 probabilities "
            "(vLLM's OnlineAcceptanceEstimator features); this speculator has none (a "
            "confidence head?): use acceptance='vllm'"
        )
    out = AdaSpecVerificationManager.adopt(mgr, AdaSpecVerifier(settings), estimator)
    log.info(
        "adaspec: verifier installed in vLLM's adaptive verification (acceptance=%s, step_cost=%s)",
        cfg.acceptance,
        cfg.step_cost,
    )
    return out


class AdaSpecWorker(Worker):  # type: ignore[misc, unused-ignore]
    """vLLM's GPU worker that installs the AdaSpec verifier once the KV cache (and with it the
    adaptive verification manager) exists. Passed as `worker_cls`."""

    def initialize_from_config(self, kv_cache_config: Any) -> None:
        super().initialize_from_config(kv_cache_config)
        install_verifier(self.model_runner, self.vllm_config)
