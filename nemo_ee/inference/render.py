"""Text rendering of generations: each token marked with its exit, and the decoding statistics line.

Shared by ``scripts/generate.py``, the Triton client and reports, so every tool shows exits the same way:

- :func:`mark_exits`: ``def⟨2⟩ f⟨4⟩(⟨2⟩`` — every token's text followed by ``⟨depth⟩``, the number of
  backbone layers it left after (the final layer for full-depth tokens). A token that ends inside a
  multi-byte character gets an empty text (its bytes show with the token that completes the character),
  so there is exactly one marker per token and :func:`strip_marks` gives back ``tokenizer.decode(ids)``.
- :func:`format_stats` / :func:`parse_stats`: one ``STATS key=value ...`` line (tokens/s, mean exit depth,
  share of tokens per exit depth).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

OPEN, CLOSE = "\u27e8", "\u27e9"  # ⟨ ⟩ (no colour codes: safe in logs and files)
_MARK = re.compile(f"{OPEN}(\\d+){CLOSE}")


def token_pieces(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded string ('' while a multi-byte character is incomplete)."""
    pieces, done = [], ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: i + 1]))
        if text.endswith("\ufffd") and i + 1 < len(token_ids):
            pieces.append("")  # incomplete character: wait for the token that completes it
            continue
        pieces.append(text[len(done):] if text.startswith(done) else text)
        done = text
    return pieces


def mark_exits(tokenizer: Any, token_ids: Sequence[int], exit_layers: Sequence[int]) -> str:
    """``text⟨depth⟩`` per token: the generated text with each token's exit depth after it."""
    if len(token_ids) != len(exit_layers):
        raise ValueError(f"{len(token_ids)} tokens but {len(exit_layers)} exit layers")
    return "".join(f"{piece}{OPEN}{int(depth)}{CLOSE}"
                   for piece, depth in zip(token_pieces(tokenizer, token_ids), exit_layers))


def strip_marks(marked: str) -> str:
    """The text of :func:`mark_exits` output without its ``⟨depth⟩`` markers."""
    return _MARK.sub("", marked)


def marked_depths(marked: str) -> list[int]:
    """The exit depths of :func:`mark_exits` output, in token order."""
    return [int(m) for m in _MARK.findall(marked)]


def exit_stats(exit_layers: Sequence[Sequence[int]], seconds: float) -> dict:
    """Decoding statistics of a batch: tokens, seconds, tokens/s, mean exit depth, share per depth."""
    depths = [int(d) for row in exit_layers for d in row]
    n = len(depths)
    share = {d: depths.count(d) / n for d in sorted(set(depths))} if n else {}
    return {"tokens": n, "seconds": float(seconds), "tokens_per_s": n / seconds if seconds > 0 else 0.0,
            "mean_exit_depth": sum(depths) / n if n else 0.0, "exit_share": share}


def format_stats(stats: Mapping[str, Any]) -> str:
    """``STATS tokens=40 seconds=0.512 tokens_per_s=78.1 mean_exit_depth=2.750 exit_share=1:0.250,4:0.750``."""
    share = ",".join(f"{d}:{s:.3f}" for d, s in sorted(stats["exit_share"].items())) or "-"
    return (f"STATS tokens={stats['tokens']} seconds={stats['seconds']:.4g} tokens_per_s={stats['tokens_per_s']:.1f}"
            f" mean_exit_depth={stats['mean_exit_depth']:.3f} exit_share={share}")


def parse_stats(line: str) -> dict:
    """The dict of a :func:`format_stats` line (numbers as numbers; exit_share as {depth: share})."""
    if not line.startswith("STATS "):
        raise ValueError(f"not a STATS line: {line!r}")
    fields = dict(item.split("=", 1) for item in line[len("STATS "):].split())
    share = {} if fields["exit_share"] == "-" else {
        int(d): float(s) for d, s in (pair.split(":") for pair in fields["exit_share"].split(","))}
    return {"tokens": int(fields["tokens"]), "seconds": float(fields["seconds"]),
            "tokens_per_s": float(fields["tokens_per_s"]), "mean_exit_depth": float(fields["mean_exit_depth"]),
            "exit_share": share}
