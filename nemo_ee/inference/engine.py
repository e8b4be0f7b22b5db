"""The early-exit forward for decoding: per-row exits with KV recomputation over a static cache.

Vocabulary: a *point* p is the hidden state after p backbone layers (0 = embeddings). Layer p+1 and
the exit blocks reading point p consume it. The engine keeps, per (attention module, row), how many
positions that module has cached, and in a static buffer the hidden states of the points a module can
lag behind: a row stops only at an exit, so those are the exit points and the ends (between two exits a
layer's output goes straight to the next layer).

A step feeds new tokens per row and walks the points upwards. At each exit a row's rule decides; a
row that leaves stops there. The layers above have no KV for its tokens yet: the next time the row
goes deeper, each layer first processes the positions it is missing (read from the point buffer)
together with the new ones, in one batched forward (EE-LLM's KV recomputation, without recomputing the
layers below). Rows of a batch lag by different amounts; their queries are padded to the longest for
attention (and, on the fast path, packed without padding everywhere else).

The modules are megatron's own (embedding, layers, exit heads, final norm, output layer). At TP=1 the
layers and heads run as plain tensor ops on their parameters (:mod:`nemo_ee.inference.fast_layers`);
otherwise only each attention module's ``core_attention`` is swapped for the cached one during a step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Sequence

import torch

from nemo_ee.inference.fast_layers import FastLayer, fast_logits, fast_mlp, layer_problem, mlp_problem, output_problem
from nemo_ee.inference.kv_cache import CachedCoreAttention, KVCache, QueryLayout, cached_attention
from nemo_ee.inference.policies import ExitRule


@dataclasses.dataclass
class RowResult:
    """Where a row's last new token left and the logits [vocab] it left with.

    ``exit_index``: global exit index, or None for the final layer; ``depth``: backbone layers run.
    ``final_logits``: [n, vocab] final-layer logits of positions ``final_from``.. (``all_final_from``).
    """

    exit_index: Optional[int]
    depth: int
    logits: torch.Tensor
    final_logits: Optional[torch.Tensor] = None


class EarlyExitEngine:
    """Decoding state for ``batch_size`` rows of an :class:`EarlyExitGPTModel` (one pipeline stage, any TP)."""

    # :class:`nemo_ee.inference.pipelined.StageDecoder` reuses the machinery on one stage of a pipeline.
    whole_model_only = True

    def __init__(self, model: torch.nn.Module, batch_size: int, capacity: int, fast: Optional[bool] = None) -> None:
        """``fast``: run layers and heads as plain tensor ops (:mod:`nemo_ee.inference.fast_layers`); None: when
        the model allows it, True: require it (a ValueError names why not), False: megatron's modules."""
        if self.whole_model_only and not (model.pre_process and model.post_process):
            raise ValueError("the decoding engine needs the whole model on one pipeline stage (PP=1)")
        ee = model.ee_config
        if capacity > ee.max_positions:
            raise ValueError(f"capacity {capacity} exceeds the model's {ee.max_positions} positions")
        self.model, self.ee = model, ee
        self.num_layers = ee.num_layers
        self.batch_size, self.capacity = batch_size, capacity
        offset = model.layer_offset  # slots and points carry global layer numbers
        self.attention = {("layer", offset + j + 1): layer for j, layer in enumerate(model.decoder.layers)}
        self.exits_at: dict[int, list[int]] = {}
        for index in model.local_exit_indices:
            head = model.exits[str(index)]
            self.exits_at.setdefault(head.point, []).append(index)
            if head.block is not None:
                self.attention[("exit", index)] = head.block
        attn = model.decoder.layers[0].self_attention
        groups = attn.num_query_groups_per_partition
        head_dim = attn.hidden_size_per_attention_head
        dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device  # caches and indices live with the weights (CPU or GPU)
        self.cache = KVCache(self.attention, batch_size, capacity, groups, head_dim, dtype, device=self.device)
        self.cores = {slot: CachedCoreAttention(self.cache, slot, model.config.softmax_scale, head_dim)
                      for slot in self.attention}
        self.scale = self.cores[next(iter(self.cores))].scale if self.cores else 1.0
        hidden = model.config.hidden_size
        self.dtype = dtype
        self.produced = [[0] * batch_size for _ in range(self.num_layers + 1)]
        self.rope = self.cos = self.sin = None
        if ee.position_embedding_type == "rope":
            self.rope = model.rotary_pos_emb(capacity)[:, 0, 0, :].to(self.device)  # [capacity, rot_dim]
            self.cos, self.sin = torch.cos(self.rope).to(dtype), torch.sin(self.rope).to(dtype)
        self.shared_weight = model.shared_embedding_or_output_weight() if (
            ee.share_embeddings_and_output_weights or ee.tie_exit_output) else None
        self.fast_problem = self._fast_problem() if fast is not False else "the fast path was turned off"
        if fast and self.fast_problem:
            raise ValueError(f"the fast decoding path cannot run this model: {self.fast_problem}")
        self.fast = self.fast_problem is None
        self.fast_layers = {slot: FastLayer(module) for slot, module in self.attention.items()} if self.fast else {}
        self._layouts: dict = {}
        self._carry: Optional[tuple] = None
        self._slices: dict = {}  # (exit index, exit vocabulary) -> (ids, output-matrix rows)
        # Points read back later: a row stops only at an exit point, so only there (and at the stage's ends)
        # can a module above lag behind and catch up from the buffer; between them the output is carried.
        self.kept_points = {offset, offset + len(model.decoder.layers), *self.exits_at}
        self.points = {p: torch.zeros(capacity, batch_size, hidden, dtype=dtype, device=self.device)
                       for p in sorted(self.kept_points)}

    def _fast_problem(self) -> Optional[str]:
        """Why this model's modules cannot run as plain tensor ops (None: they can); see fast_layers."""
        for slot, module in self.attention.items():
            problem = layer_problem(module)
            if problem:
                return f"{slot[0]} {slot[1]}: {problem}"
        heads = [self.model.output_layer] if self.model.post_process else []
        heads += [self.model.exits[str(i)].output_layer for i in self.model.local_exit_indices]
        for head in heads:
            problem = output_problem(head)
            if problem:
                return problem
        for index in self.model.local_exit_indices:
            head = self.model.exits[str(index)]
            problem = mlp_problem(head.mlp, f"exit {index} mlp") if head.mlp is not None else None
            if problem:
                return problem
        return None

    def _ints(self, values) -> torch.Tensor:
        """An int64 tensor on the model's device (every index the engine builds goes through here)."""
        if isinstance(values, range):
            return torch.arange(values.start, values.stop, dtype=torch.long, device=self.device)
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ bookkeeping
    def length(self, row: int) -> int:
        """Positions fed to ``row`` so far."""
        return self.produced[0][row]

    def truncate(self, row: int, length: int) -> None:
        """Drop everything of ``row`` at or after position ``length`` (rejected drafts)."""
        self.cache.truncate(row, length)
        for produced in self.produced:
            produced[row] = min(produced[row], length)

    def reset(self, row: int) -> None:
        """Free ``row`` for a new sequence."""
        self.truncate(row, 0)

    @contextlib.contextmanager
    def _cached_attention(self):
        swapped = []
        self._layouts, self._carry = {}, None
        try:
            for slot, layer in (() if self.fast else self.attention.items()):
                swapped.append((layer.self_attention, layer.self_attention.core_attention))
                layer.self_attention.core_attention = self.cores[slot]
            yield
        finally:
            for attention, original in swapped:
                attention.core_attention = original
            self.model._captured = {}
            self._layouts, self._carry = {}, None

    # ------------------------------------------------------------------ one module over its missing positions
    def _layout(self, rows: list[int], starts: list[int], counts: list[int]) -> QueryLayout:
        """The step's shared :class:`QueryLayout` of these rows, first positions and query counts."""
        key = (tuple(rows), tuple(starts), tuple(counts))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = QueryLayout(rows, starts, counts, self.capacity, self.device)
            if self.rope is not None:
                layout.cos = self.cos[layout.clamped].unsqueeze(2)  # [n, R, 1, rot_dim]
                layout.sin = self.sin[layout.clamped].unsqueeze(2)
                layout.rope = self.rope[layout.clamped].unsqueeze(2)
        return layout

    def _advance(self, slot, src: int, rows: list[int], out_point: Optional[int]) -> tuple[torch.Tensor, list[int]]:
        """Run attention module ``slot`` on every position of ``rows`` at point ``src`` it has not cached.

        Returns its outputs and each row's query count; writes them to ``out_point``. The outputs are [n_max, R, h]
        (padded), except on the fast path with ragged rows and an ``out_point``: [m, 1, h], the real positions.
        """
        lengths = self.cache.length[slot]
        starts = [lengths[r] for r in rows]
        ends = [self.produced[src][r] for r in rows]
        counts = [e - s for s, e in zip(starts, ends)]
        layout = self._layout(rows, starts, counts)
        # Ragged rows on the fast path run packed: the linears see only real positions ([m, 1, h]), and
        # only attention pads them (prefill of prompts of different lengths, KV catch-up of some rows).
        packed = self.fast and layout.select is not None
        carry = self._carry
        if carry is not None and carry[0] == src and carry[1] is layout:
            x = carry[2]  # the module below just produced exactly these positions
        elif src not in self.kept_points:
            raise RuntimeError(f"{slot} lags behind point {src}, which is not kept (rows {rows}, from {starts})")
        elif packed:
            x = self.points[src][layout.flat_positions, layout.flat_rows].unsqueeze(1)  # [m, 1, h]
        else:
            x = self.points[src][layout.clamped, layout.columns]                    # [n, R, h]
        if self.fast:
            cos, sin = (None, None) if self.rope is None else (
                (layout.pick(layout.cos).unsqueeze(1), layout.pick(layout.sin).unsqueeze(1)) if packed
                else (layout.cos, layout.sin))
            out = self.fast_layers[slot](x, lambda q, k, v: cached_attention(self.cache, slot, layout, q, k, v,
                                                                             self.scale, packed), cos, sin)
        else:
            self.cores[slot].layout = layout
            kwargs = {"attention_mask": None}
            if self.rope is not None:
                kwargs["rotary_pos_emb"] = layout.rope
            out, _ = self.attention[slot](hidden_states=x, **kwargs)
        for r, e in zip(rows, ends):
            lengths[r] = e
        if out_point is not None and out_point in self.kept_points:
            points = self.points[out_point]
            if packed:
                points[layout.flat_positions, layout.flat_rows] = out[:, 0].to(self.dtype)
            elif layout.select is None:
                points[layout.positions, layout.columns] = out.to(self.dtype)
            else:
                points[layout.flat_positions, layout.flat_rows] = out[layout.select].to(self.dtype)
        if out_point is not None:
            for r, e in zip(rows, ends):
                self.produced[out_point][r] = e
            self._carry = (out_point, layout, out)
        if packed and out_point is None:  # an exit block's caller reads [n, R, h]
            padded = out.new_zeros(layout.n, layout.count, out.shape[-1])
            padded[layout.select] = out[:, 0]
            out = padded
        return out, counts

    def _last(self, point: int, rows: list[int]) -> torch.Tensor:
        """Hidden states [R, h] at ``point`` of each row's last position."""
        last = self._ints([self.produced[point][r] - 1 for r in rows])
        return self.points[point][last, self._ints(rows)]

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(
        self,
        rows: Sequence[int],
        tokens: Sequence[Sequence[int]],
        rules: Sequence[ExitRule],
        final_from: Optional[Sequence[Optional[int]]] = None,
    ) -> dict[int, RowResult]:
        """Feed ``tokens[i]`` to row ``rows[i]`` and decide where each row's last token leaves.

        ``final_from[i]``: also return final-layer logits for positions from there on (that row is
        then run to full depth whatever its rule; self-speculative verification).
        """
        rows = list(rows)
        if len(set(rows)) != len(rows) or not rows:
            raise ValueError(f"rows {rows} must be distinct and non-empty")
        if any(not t for t in tokens):
            raise ValueError("every row needs at least one new token")
        final_from = list(final_from) if final_from is not None else [None] * len(rows)
        rule_of = dict(zip(rows, rules))
        full_of = dict(zip(rows, final_from))
        self._embed(rows, tokens)
        results: dict[int, RowResult] = {}
        alive = list(rows)
        with self._cached_attention():
            for p in range(self.num_layers + 1):
                if p > 0:
                    self._advance(("layer", p), p - 1, alive, out_point=p)
                for index in self.exits_at.get(p, []):
                    alive = self._try_exit(index, p, alive, rule_of, full_of, results)
                    if not alive:
                        return results
            self._final(alive, full_of, results)
        return results

    def _embed(self, rows: list[int], tokens: Sequence[Sequence[int]]) -> None:
        counts = [len(t) for t in tokens]
        n = max(counts)
        starts = [self.produced[0][r] for r in rows]
        if max(s + c for s, c in zip(starts, counts)) > self.capacity:
            raise ValueError(f"a row would pass the cache capacity of {self.capacity} positions")
        ids = self._ints([list(t) + [0] * (n - len(t)) for t in tokens])
        steps = self._ints(range(n)).unsqueeze(0)
        positions = self._ints(starts).unsqueeze(1) + steps                               # [R, n]
        emb = self.model.embedding(input_ids=ids, position_ids=positions.clamp(max=self.capacity - 1))
        valid = steps < self._ints(counts).unsqueeze(1)                                   # [R, n]
        columns = self._ints(rows).unsqueeze(1).expand(len(rows), n)
        self.points[0][positions[valid], columns[valid]] = emb.transpose(0, 1)[valid].to(self.dtype)
        for r, s, c in zip(rows, starts, counts):
            self.produced[0][r] = s + c

    def _try_exit(self, index, point, alive, rule_of, full_of, results) -> list[int]:
        candidates = [r for r in alive if full_of[r] is None and rule_of[r].uses(index)]
        if not candidates:
            return alive
        head = self.model.exits[str(index)]
        if head.block is not None:
            out, counts = self._advance(("exit", index), point, candidates, out_point=None)
            hidden = out[self._ints(counts) - 1, self._ints(range(len(candidates)))]
        else:
            hidden = self._last(point, candidates)
        hidden = self._tail(head, hidden.unsqueeze(0))[0]
        vocabs = [rule_of[r].vocab for r in candidates]
        if all(v is None for v in vocabs):
            logits = self._project(head.output_layer, hidden.unsqueeze(0), head.tied)[0]
        else:
            logits = torch.empty(len(candidates), self.ee.vocab_size, device=self.device)
            for vocab in dict.fromkeys(vocabs):  # rows sharing a vocabulary share one projection
                js = [j for j, v in enumerate(vocabs) if v == vocab]
                picked = hidden[self._ints(js)]
                if vocab is None:
                    logits[js] = self._project(head.output_layer, picked.unsqueeze(0), head.tied)[0]
                else:
                    ids, weight = self._exit_slice(index, head, vocab)
                    part = torch.full((len(js), self.ee.vocab_size), -math.inf, device=self.device)
                    part[:, ids] = fast_logits(head.output_layer, picked, weight)
                    logits[js] = part
        gone = set()
        for j, r in enumerate(candidates):
            if bool(rule_of[r].fires(logits[j], index)):
                results[r] = RowResult(index, point, logits[j])
                gone.add(r)
        return [r for r in alive if r not in gone]

    def _exit_slice(self, index: int, head, vocab: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, the rows of exit ``index``'s output matrix for them), built once per vocabulary."""
        key = (index, vocab)
        found = self._slices.get(key)
        if found is None:
            if not self.fast:
                raise ValueError(f"an exit vocabulary needs the fast decoding path: {self.fast_problem}")
            if vocab[-1] >= self.ee.vocab_size:
                raise ValueError(f"exit_vocab id {vocab[-1]} is outside the vocabulary 0..{self.ee.vocab_size - 1}")
            ids = self._ints(list(vocab))
            full = self.shared_weight if head.tied else head.output_layer.weight
            if head.output_layer.bias is not None:
                raise ValueError("an exit vocabulary needs exit output layers without bias")
            found = self._slices[key] = (ids, full[ids].contiguous())
        return found

    def _final(self, alive: list[int], full_of: dict, results: dict) -> None:
        if not alive:
            return
        L = self.num_layers
        norm = self.model.decoder.final_layernorm
        logits = self._project(self.model.output_layer, norm(self._last(L, alive).unsqueeze(0)),
                               self.ee.share_embeddings_and_output_weights)[0]
        for j, r in enumerate(alive):
            results[r] = RowResult(None, L, logits[j])
            start = full_of[r]
            if start is not None:
                pos = self._ints(range(start, self.produced[L][r]))
                h = self.points[L][pos, torch.full_like(pos, r)]
                results[r].final_logits = self._project(
                    self.model.output_layer, norm(h.unsqueeze(1)), self.ee.share_embeddings_and_output_weights
                )[:, 0]

    def _tail(self, head, hidden: torch.Tensor) -> torch.Tensor:
        """The exit's residual MLP and norm (:meth:`ExitHead.tail`), with the fast MLP when it applies."""
        if not self.fast or head.mlp is None:
            return head.tail(hidden)
        hidden = hidden + fast_mlp(head.mlp, head.mlp_norm(hidden))
        return head.norm(hidden) if head.norm is not None else hidden

    def _project(self, output_layer, hidden: torch.Tensor, tied: bool) -> torch.Tensor:
        if self.fast:
            return fast_logits(output_layer, hidden, self.shared_weight if tied else None)
        logits, _ = output_layer(hidden, weight=self.shared_weight if tied else None, runtime_gather_output=True)
        return logits.float()
