"""Generation with early exits: prefill, one-token decode steps, stop tokens, per-row exit rules.

Every row of a batch is its own request: its own exit rule, sampling settings and seed, and it
generates exactly what it would generate alone (the engine keeps each row's deep KV correct).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from nemo_ee.inference.policies import POLICIES, ExitRule, check_active_exits
from nemo_ee.inference.sampling import SamplingParams

DECODE_MODES = ("early_exit", "self_speculative", "full")


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """One request's settings. ``threshold=None`` decodes with the full model.

    ``exit_thresholds``: {exit layer number: threshold} overriding ``threshold`` there (calibration
    writes these); with ``threshold=None`` only those exits are used.
    ``active_exits``: exit layer numbers the rule may use (None: all). Self-speculative decoding
    drafts ``num_draft`` tokens at exit layer ``draft_exit`` (None: the model's first exit); with
    ``draft_threshold``, fewer when the draft exit's max probability falls below it.
    """

    max_tokens: int = 32  # new tokens at most (the context may end a request sooner)
    exit_policy: str = "max_prob"  # max_prob | entropy | top2_margin
    threshold: Optional[float] = None  # None: never exit early; max_prob > 1 never fires either
    exit_thresholds: Optional[dict] = None  # {exit layer: threshold}, e.g. from calibration
    active_exits: Optional[tuple] = None  # exit layers the rule may use (None: all)
    decode_mode: str = "early_exit"  # early_exit | self_speculative | full
    draft_exit: Optional[int] = None  # self-speculative draft exit layer (None: the shallowest)
    num_draft: int = 4  # drafted tokens per verification (at most, with draft_threshold)
    draft_threshold: Optional[float] = None  # stop drafting when the draft exit's max prob is below (None: fixed)
    exit_vocab: Optional[tuple] = None  # token ids the exits (and drafts) score; None: the whole vocabulary
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0  # the request's sampling generator seed
    stop_token_ids: tuple = ()  # generation ends after any of these

    def __post_init__(self) -> None:
        if int(self.max_tokens) != self.max_tokens or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be an integer >= 1")
        if self.exit_policy not in POLICIES:
            raise ValueError(f"exit_policy {self.exit_policy!r} is not one of {list(POLICIES)}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode {self.decode_mode!r} is not one of {list(DECODE_MODES)}")
        if int(self.num_draft) != self.num_draft or self.num_draft < 1:
            raise ValueError(f"num_draft={self.num_draft} must be an integer >= 1")
        if self.exit_vocab is not None:
            vocab = tuple(sorted({int(t) for t in self.exit_vocab}))
            if not vocab or len(vocab) != len(self.exit_vocab) or vocab[0] < 0:
                raise ValueError(f"exit_vocab must be distinct token ids >= 0 (got {len(self.exit_vocab)} ids, "
                                 f"{len(vocab)} distinct, smallest {vocab[0] if vocab else None})")
            object.__setattr__(self, "exit_vocab", vocab)
        if self.draft_threshold is not None and not 0.0 <= self.draft_threshold <= 1.0:
            raise ValueError(f"draft_threshold={self.draft_threshold} must be a max probability in 0..1 (or None)")
        self.sampling  # validates temperature / top_k / top_p

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(float(self.temperature), int(self.top_k), float(self.top_p), int(self.seed))

    def rule(self, exit_layer_nums: Sequence[int]) -> ExitRule:
        """The exit rule of this request on a model with exits at ``exit_layer_nums``."""
        if self.decode_mode == "full" or (self.threshold is None and not self.exit_thresholds):
            return ExitRule(self.exit_policy, None)
        active = check_active_exits(self.active_exits, exit_layer_nums)
        per_exit = None
        if self.exit_thresholds:
            check_active_exits(list(self.exit_thresholds), exit_layer_nums)  # unknown layers are an error
            index = {layer: i for i, layer in enumerate(exit_layer_nums)}
            per_exit = tuple((index[int(layer)], t) for layer, t in self.exit_thresholds.items())
        return ExitRule(self.exit_policy, self.threshold, active, per_exit=per_exit, vocab=self.exit_vocab)


@dataclasses.dataclass
class Generation:
    """A finished request: the new token ids, the depth (backbone layers run) each one left at, why it stopped."""

    prompt_ids: list
    token_ids: list
    exit_layers: list
    finish_reason: str = "length"
    seconds: float = 0.0

    @property
    def mean_exit_depth(self) -> float:
        return sum(self.exit_layers) / max(1, len(self.exit_layers))


def context_limit(model: torch.nn.Module) -> int:
    """Positions a sequence (prompt + generated) may use."""
    return int(model.ee_config.max_positions)


def check_prompt(prompt: Sequence[int], model: torch.nn.Module) -> None:
    """A clear error for an empty prompt, a prompt that fills the context or out-of-vocabulary ids."""
    limit = context_limit(model)
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {limit}, so at most {limit - 1}")
    vocab = model.ee_config.vocab_size
    bad = [t for t in prompt if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}")


def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: Union[GenerationParams, Sequence[GenerationParams]] = GenerationParams(),
) -> list[Generation]:
    """Generate for every prompt in one batch (one row each, any mix of decode modes); returns one
    :class:`Generation` per prompt."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    per_row = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} parameter sets for {len(prompts)} prompts")
    for prompt in prompts:
        check_prompt(prompt, model)
    from nemo_ee.inference.scheduler import ContinuousBatcher

    capacity = min(context_limit(model), max(len(p) + r.max_tokens for p, r in zip(prompts, per_row)))
    batcher = ContinuousBatcher(model, max_batch=len(prompts), capacity=capacity)
    ids = [batcher.submit(p, r) for p, r in zip(prompts, per_row)]
    while batcher.busy:
        batcher.step()
    return [batcher.result(i) for i in ids]
