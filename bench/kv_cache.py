"""Multi-turn KV-cache reuse vs recomputing the history, side by side in one run (issue 5; requirement 7).

A five-turn conversation on ``builtin:bench-llama`` (torch engine, greedy; the realistic-size model: on the
2-layer tiny one a 400-token prefill costs about as much as the fixed cost of one forward pass, which hides what
reuse saves): four turns (user text plus the model's
``--new-tokens`` reply) make a history of about ``--history-tokens`` (400) tokens, then turn 5 adds a short user
message of about ``--last-turn-tokens`` (16) tokens. For each of ``--repeats``
rounds, turns 1-4 run with a fresh conversation id (not timed), then turn 5 is timed twice, interleaved:

- ``reuse``: turn 5 with the conversation id: the cached state covers the history, only the new turn is fed;
- ``recompute``: the same prompt without a conversation id: the whole history is fed again.

Each figure is the median over the rounds. Timed twice: the whole turn (prefill + ``--new-tokens`` greedy tokens,
what a client waits for) and time to first token (prefill + one token, where reuse saves its work).
``reuse_speedup`` is recompute / reuse for time to first token (goal >= 10); ``reuse_speedup_turn`` the same for
the whole turn. The outputs of the two paths are checked to be identical. ``threads`` in the figures is torch's
thread count for the run (``--threads``); on a machine shared with other work, ``--threads 1`` is disturbed least
(two threads wait for each other whenever another process holds one of the cores).

Prints one JSON line ``{"bench": "kv_cache", "figures", "ratios", "goals"}`` and writes
``bench/results/kv_cache.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench._report import add_output_args, emit

_USER = (
    "User: Tell me a story about a small robot who learned to count the stars, one by one, every night, until "
    "morning. What is the weather like? It is sunny and warm, with a light breeze from the west. Numbers one two "
    "three four five six seven eight nine ten eleven twelve.\nAssistant:"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="muai bench kv_cache", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:bench-llama", help="model path (default: builtin:bench-llama)")
    p.add_argument("--turns", type=int, default=5, help="turn whose latency is measured (default 5)")
    p.add_argument("--history-tokens", type=int, default=400, help="history length before the last turn (~)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per turn (default 8)")
    p.add_argument("--last-turn-tokens", type=int, default=16, help="size of the new user message of the last turn")
    p.add_argument("--repeats", type=int, default=7, help="rounds; figures are medians (default 7)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_output_args(p, strict=False)
    return p.parse_args(argv)


def _text_of(tokenizer: Any, tokens: int) -> str:
    """Words of the sample text, as many as fit in about ``tokens`` tokens."""
    words = _USER.split(" ")
    text = words[0]
    for i in range(1, len(words) * 16):
        candidate = text + " " + words[i % len(words)]
        if len(tokenizer(candidate).input_ids) > tokens:
            break
        text = candidate
    return text


def _user_turns(tokenizer: Any, turns: int, history_tokens: int, new_tokens: int, last_turn_tokens: int) -> list[str]:
    """``turns - 1`` user messages that, with the replies, make about ``history_tokens``; then a short last one."""
    per_turn = max(8, history_tokens // max(1, turns - 1) - new_tokens)
    body = _text_of(tokenizer, per_turn)
    last = _text_of(tokenizer, last_turn_tokens)
    return [f"\n{body} ({n})" for n in range(1, turns)] + [f"\n{last}"]


def _timed(engine: Any, prompt: str, sp: Any, cid: str | None) -> tuple[float, Any]:
    from adapters.base import GenerationRequest

    start = time.perf_counter()
    (res,) = engine._generate_sync([GenerationRequest(prompt, sp, conversation_id=cid)])
    elapsed = time.perf_counter() - start
    if res.error is not None:
        raise res.error
    return elapsed, res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from adapters.base import ModelSpec, SamplingParams
    from adapters.tiny import resolve_model_path
    from adapters.torch_engine import TorchEngine

    settings = {"threads": args.threads} if args.threads else {}
    engine = TorchEngine(settings)
    engine.load(ModelSpec("bench", resolve_model_path(args.model), device=args.device, max_model_len=None,
                          options={"kv_cache": {"enabled": True, "budget_bytes": 512 * 1024**2}}))
    try:
        turns = _user_turns(engine.tokenizer, args.turns, args.history_tokens, args.new_tokens,
                            args.last_turn_tokens)
        sp_turn = SamplingParams(max_new_tokens=args.new_tokens)
        sp_first = SamplingParams(max_new_tokens=1)
        # Warm-up: allocator and kernels, both paths.
        for _ in range(2):
            _timed(engine, turns[0] * 4, sp_turn, None)

        reuse_turn, recompute_turn, reuse_ttft, recompute_ttft = [], [], [], []
        identical = True
        history_lens, cached = [], []
        for r in range(args.repeats):
            for sp, reuse_out, recompute_out in ((sp_turn, reuse_turn, recompute_turn),
                                                 (sp_first, reuse_ttft, recompute_ttft)):
                cid = f"bench-{r}-{sp.max_new_tokens}"
                history = ""
                for user in turns[:-1]:
                    history += user
                    _, res = _timed(engine, history, sp_turn, cid)
                    history += res.text
                prompt = history + turns[-1]
                if r % 2:  # alternate the order so neither path always runs on a warmer cache
                    t_re, res_re = _timed(engine, prompt, sp, None)
                    t_ru, res_ru = _timed(engine, prompt, sp, cid)
                else:
                    t_ru, res_ru = _timed(engine, prompt, sp, cid)
                    t_re, res_re = _timed(engine, prompt, sp, None)
                identical &= res_ru.text == res_re.text and res_ru.cache_hit
                reuse_out.append(t_ru)
                recompute_out.append(t_re)
                history_lens.append(res_ru.prompt_tokens)
                cached.append(res_ru.cached_tokens)
                engine.end_conversation(cid)
        stats = engine.cache_stats()
        import torch

        threads = torch.get_num_threads()
    finally:
        engine.close()

    def med_ms(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1e3, 4)

    figures = {
        "turn": args.turns,
        "prompt_tokens_last_turn": int(statistics.median(history_lens)),
        "cached_tokens_last_turn": int(statistics.median(cached)),
        "ratio_definition": "reuse_speedup: time to first token of the last turn, recompute / reuse; "
                            "reuse_speedup_turn: the whole turn (new_tokens generated)",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ttft_reuse_ms": med_ms(reuse_ttft),
        "ttft_recompute_ms": med_ms(recompute_ttft),
        "turn_reuse_ms": med_ms(reuse_turn),
        "turn_recompute_ms": med_ms(recompute_turn),
        "outputs_identical": identical,
        "cache_hit_rate": round(stats.hit_rate, 4) if stats else 0.0,
        "device": args.device,
        "threads": threads,
        "model": args.model,
    }
    ratios = {
        "reuse_speedup": round(statistics.median(recompute_ttft) / statistics.median(reuse_ttft), 3),
        "reuse_speedup_turn": round(statistics.median(recompute_turn) / statistics.median(reuse_turn), 3),
    }
    return {"bench": "kv_cache", "figures": figures, "ratios": ratios, "goals": {"reuse_speedup": ">= 10"}}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    report = run(args)
    emit(report, args.results_dir)
    return 0 if report["figures"]["outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
