"""Pipeline-parallel early-exit decoding (EE-LLM's second method), batch 1, one process per stage.

Every token goes through every stage, so no stage ever lags and no KV is recomputed. Stage s runs its
layers for the new position(s) and, while the token is undecided, evaluates its exits in depth order.
The first exit that fires decides: the deciding stage sends the token to stage 0 at once (a small
message) and still finishes its layers and passes the hidden state on, so the deeper stages fill their
KV for that token while stage 0 already embeds the next one. With no exit firing, the last stage's
final logits decide. Stage 0 waits only for the decision of token t before starting token t+1.

Messages (torch.distributed point-to-point on megatron's pipeline group; gloo on CPU):

- forward, stage s -> s+1, per step: header int64 ``[kind, n]`` (tag 11), then unless ``kind`` is STOP the
  hidden state ``[n, 1, h]`` of the step's n new positions (tag 12). ``kind``: UNDECIDED, DECIDED (an
  earlier stage decided: only fill KV) or STOP (the request ended; pass it on and return).
- decision, deciding stage -> stage 0: int64 ``[token, depth]`` (tag 13); with sampling, ``token`` is -1
  and the exit's logits ``[vocab]`` follow (tag 14) so that stage 0 samples with the request's generator,
  in token order, exactly as single-stage decoding does.

Messages between two ranks with one tag arrive in the order sent, so consecutive steps never mix.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from nemo_ee.inference.engine import EarlyExitEngine, RowResult
from nemo_ee.inference.generate import Generation, GenerationParams, check_prompt, context_limit
from nemo_ee.inference.policies import ExitRule
from nemo_ee.inference.sampling import sample

UNDECIDED, DECIDED, STOP = 0, 1, 2
TAG_HEADER, TAG_HIDDEN, TAG_DECISION, TAG_LOGITS = 11, 12, 13, 14


class StageDecoder(EarlyExitEngine):
    """One pipeline stage's layers and exits over a static KV cache, one sequence (batch 1).

    Reuses the single-stage engine: the cached core attention, the point buffers (here the stage's
    input point and the points of its layers), exit evaluation (an exit block catches up lazily on the
    positions it skipped, as in KV recomputation) and the final norm + output layer on the last stage.
    """

    whole_model_only = False

    def __init__(self, model: torch.nn.Module, capacity: int) -> None:
        super().__init__(model, 1, capacity)
        self.first_point = model.layer_offset
        self.last_point = model.layer_offset + model.num_local_layers

    @property
    def fed(self) -> int:
        """Positions this stage has taken in so far."""
        return self.produced[self.first_point][0]

    @torch.no_grad()
    def run(
        self,
        tokens: Optional[Sequence[int]] = None,
        hidden: Optional[torch.Tensor] = None,
        rule: Optional[ExitRule] = None,
        on_decision: Optional[Callable[[RowResult], bool]] = None,
    ) -> Optional[torch.Tensor]:
        """Run the stage on new positions: token ids (first stage) or the previous stage's hidden [n, 1, h].

        With a ``rule`` (the token is still undecided), the first local exit that fires, or on the last
        stage the final logits, is handed to ``on_decision`` at once; if that returns True the stage
        stops there (nothing follows this token). Returns the stage's output [n, 1, h] for the next
        stage, or None on the last stage or when stopped.
        """
        first, start = self.first_point, self.fed
        if self.model.pre_process:
            if hidden is not None or not tokens:
                raise ValueError("the first stage takes token ids, not a hidden state")
            self._embed([0], [list(tokens)])
        else:
            if hidden is None or hidden.dim() != 3 or hidden.shape[1] != 1:
                raise ValueError("a later stage takes the previous stage's hidden state [n, 1, h]")
            if start + hidden.shape[0] > self.capacity:
                raise ValueError(f"the sequence would pass the cache capacity of {self.capacity} positions")
            self.points[first][start:start + hidden.shape[0]] = hidden.to(self.dtype)
            self.produced[first][0] = start + hidden.shape[0]
        end = self.fed
        rules, full = {0: rule}, {0: None}
        undecided = rule is not None
        with self._cached_attention():
            for p in range(first, self.last_point + 1):
                if p > first:
                    self._advance(("layer", p), p - 1, [0], out_point=p)
                for index in self.exits_at.get(p, []) if undecided else []:
                    results: dict = {}
                    self._try_exit(index, p, [0], rules, full, results)
                    if results:
                        undecided = False
                        if on_decision(results[0]):
                            return None
                        break
            if self.model.post_process:
                if undecided:
                    results = {}
                    self._final([0], full, results)
                    on_decision(results[0])
                return None
        return self.points[self.last_point][start:end].clone()


class _Link:
    """This rank's point-to-point messages on the pipeline group; sends are asynchronous."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.group = ps.get_pipeline_model_parallel_group()
        self.ranks = dist.get_process_group_ranks(self.group)
        self.stage, self.stages = ps.get_pipeline_model_parallel_rank(), len(self.ranks)
        self.pending: list = []  # (work, tensor): a tensor must live until its send completes

    def send(self, tensor: torch.Tensor, stage: int, tag: int) -> None:
        work = dist.isend(tensor, self.ranks[stage], group=self.group, tag=tag)
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()] + [(work, tensor)]

    def recv(self, tensor: torch.Tensor, stage: Optional[int], tag: int) -> int:
        """Receive into ``tensor`` from ``stage`` (None: any stage); returns the sender's stage."""
        sender = dist.recv(tensor, None if stage is None else self.ranks[stage], group=self.group, tag=tag)
        return self.ranks.index(sender)

    def forward(self, kind: int, hidden: Optional[torch.Tensor], n: int) -> None:
        if self.stage + 1 < self.stages:
            self.send(torch.tensor([kind, n], dtype=torch.long), self.stage + 1, TAG_HEADER)
            if kind != STOP:
                self.send(hidden, self.stage + 1, TAG_HIDDEN)

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def _check(stage_model: torch.nn.Module, link: _Link, prompt: Sequence[int], params: GenerationParams) -> None:
    check_prompt(prompt, stage_model)
    first, last = link.stage == 0, link.stage == link.stages - 1
    if (bool(stage_model.pre_process), bool(stage_model.post_process)) != (first, last):
        raise ValueError(
            f"rank {dist.get_rank()} is pipeline stage {link.stage} of {link.stages} but its model was built with "
            f"pre_process={stage_model.pre_process}, post_process={stage_model.post_process}: build it with "
            "nemo_ee.models.build_model after initialize_distributed(tp, pp)"
        )
    if params.decode_mode == "self_speculative":
        raise ValueError("decode_mode 'self_speculative' cannot run pipelined; use 'early_exit' or 'full'")
    if getattr(stage_model.config, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("pipelined decoding takes one model chunk per rank (no virtual pipeline stages)")


@torch.no_grad()
def generate_pipelined(stage_model: torch.nn.Module, prompt_ids: Sequence[int], params: GenerationParams) -> Generation:
    """Decode one prompt over the pipeline stages (call on every rank); every rank returns the same Generation.

    Tokens and exit depths equal single-stage :func:`nemo_ee.inference.generate.generate` with KV
    recomputation at the same settings (greedy or seeded sampling).
    """
    from nemo_ee.inference.scheduler import _Request  # the batcher's request bookkeeping: same budget and stops

    prompt, link = [int(t) for t in prompt_ids], _Link()
    _check(stage_model, link, prompt, params)
    stage_model.eval()
    request = _Request(0, prompt, params, stage_model)
    capacity = min(context_limit(stage_model), len(prompt) + int(params.max_tokens))
    decoder = StageDecoder(stage_model, capacity)
    try:
        if link.stage == 0:
            _lead(decoder, link, request)
        else:
            _follow(decoder, link, request.rule, request.sampling.greedy)
    finally:
        link.flush()
    box = [request.out if link.stage == 0 else None]
    if link.stages > 1:
        dist.broadcast_object_list(box, src=link.ranks[0], group=link.group)
    return box[0]


def _lead(decoder: StageDecoder, link: _Link, request) -> None:
    """Stage 0: embed, run, and wait for each token's decision (from here or a later stage)."""
    vocab = decoder.ee.vocab_size
    while not request.done:
        decided = [False]

        def take(result: RowResult) -> bool:
            decided[0] = True
            request.accept(sample(result.logits, request.sampling, request.generator), result.depth)
            return request.done

        n = len(request.pending)
        hidden = decoder.run(tokens=request.pending, rule=request.rule, on_decision=take)
        if request.done:
            break
        link.forward(DECIDED if decided[0] else UNDECIDED, hidden, n)
        if not decided[0]:
            head = torch.zeros(2, dtype=torch.long)
            sender = link.recv(head, None, TAG_DECISION)
            token, depth = int(head[0]), int(head[1])
            if token < 0:
                logits = torch.zeros(vocab, dtype=torch.float32)
                link.recv(logits, sender, TAG_LOGITS)
                token = sample(logits, request.sampling, request.generator)
            request.accept(token, depth)
    link.forward(STOP, None, 0)


def _follow(decoder: StageDecoder, link: _Link, rule: ExitRule, greedy: bool) -> None:
    """A later stage: fill KV for every token; decide the ones that reach it undecided."""
    hidden_size = decoder.model.config.hidden_size
    while True:
        head = torch.zeros(2, dtype=torch.long)
        link.recv(head, link.stage - 1, TAG_HEADER)
        kind, n = int(head[0]), int(head[1])
        if kind == STOP:
            link.forward(STOP, None, 0)
            return
        hidden = torch.zeros(n, 1, hidden_size, dtype=decoder.dtype)
        link.recv(hidden, link.stage - 1, TAG_HIDDEN)
        decided = [kind == DECIDED]

        def tell(result: RowResult) -> bool:
            decided[0] = True
            token = int(result.logits.argmax()) if greedy else -1
            link.send(torch.tensor([token, result.depth], dtype=torch.long), 0, TAG_DECISION)
            if token < 0:
                link.send(result.logits.float().contiguous(), 0, TAG_LOGITS)
            return False  # keep going: the deeper layers still need this token's KV

        out = decoder.run(hidden=hidden, rule=None if decided[0] else rule, on_decision=tell)
        link.forward(DECIDED if decided[0] else UNDECIDED, out, n)
