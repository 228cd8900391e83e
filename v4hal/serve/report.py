"""The screen table of a serving run (`v4hal.serve.driver.run_requests`'s figures)."""
from __future__ import annotations

from typing import Any

from v4hal.bench.report import format_bytes, text_table

__all__ = ["format_report"]


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _layouts(res: dict[str, Any]) -> str:
    """'model1_fp8 + indexer_fp4', or with DeepSeek-V4.1's own compressed layout 'v41_window_fp8 +
    v41_compressed_fp4 + indexer_fp4' (window, compressed, indexer caches)."""
    comp = res.get("compressed_layout")
    mid = f" + {comp}" if comp and comp != res["attn_layout"] else ""
    return f"{res['attn_layout']}{mid} + {res['indexer_layout']}"


def _v4_row(res: dict[str, Any]) -> list[list[str]]:
    """The row setting a V4.1 run's one-request cache bytes beside its V4 counterpart's (none for a V4 run)."""
    v4 = res.get("v4_counterpart")
    if not v4:
        return []
    mine, theirs = res["kv_bytes_per_token_request"], v4["kv_bytes_per_token_request"]
    return [["KV bytes/token vs V4", f"one {v4['request_tokens']}-token request: {mine:.1f} here "
             f"({res['cache_layers']} layers) vs {theirs:.1f} for {v4['model']} ({v4['cache_layers']} layers incl. "
             f"MTP, {v4['attn_layout']} + {v4['indexer_layout']} pages of {v4['block_size']}; computed from its "
             f"pool's page sizes, not run): {mine / theirs:.2f}x"]]


def format_report(res: dict[str, Any]) -> str:
    """The screen table of a `run_requests` result."""
    single = res.get("single") or {}
    kinds = list(res["peak_pages"])
    arrival = "seeded gaps of 0-3 steps" if res["arrival"] is None else f"one every {res['arrival']} steps"
    rows = [
        ["requests", f"{res['finished']} / {res['requests']} finished in {res['steps']} steps "
                     f"({res['decode_only_steps']} decode-only), arrivals: {arrival}"],
        ["engine", f"{len(res['failed'])} failed, {res['preemptions']} preemptions"
                   + "".join(f"; request {i}: {why}" for i, why in list(res["failed"].items())[:3])
                   + ("; ..." if len(res["failed"]) > 3 else "")],
        ["prompts", f"{min(res['prompt_lengths'])} .. {max(res['prompt_lengths'])} tokens "
                    f"(shared prefix {res['shared_prefix']}), {res['max_new_tokens']} new tokens each"],
        ["prefill", f"{res['prefill_tokens']} tokens, {_fmt(res['prefill_tok_s'])} tok/s"],
        ["decode", f"{res['decode_tokens']} tokens, {_fmt(res['decode_tok_s'])} tok/s "
                   f"(decode-only steps: {_fmt(res['decode_only_tok_s'])} tok/s, "
                   f"{_fmt(res['decode_only_mean_batch'])} requests per step on average)"],
        ["single request", f"decode {_fmt(single.get('decode_tok_s'))} tok/s (alone through V4Model.forward, "
                           f"batch 1, prompt "
                           f"{single.get('prompt_len')} = the requests' mean, median of "
                           f"{len(single.get('decode_tok_s_runs', []))} runs)"
         if single else "not measured"],
        ["batched / single", f"{_fmt(res['speedup'], '.2f')}x (decode-only steps: "
                             f"{_fmt(res['speedup_decode_only'], '.2f')}x)"],
        ["requests/s", f"{res['requests_s']:.2f} ({res['wall_s']:.2f} s)"],
        ["pages (" + "/".join(kinds) + ")", "peak " + "/".join(str(res["peak_pages"][k]) for k in kinds)
         + ", final " + "/".join(str(res["final_pages"][k]) for k in kinds)
         + f" ({res['prefixes_registered_at_end']} prefixes registered), after evicting them "
         + "/".join(str(res["pages_after_evict"][k]) for k in kinds)
         + ", of " + "/".join(str(res["pool_pages"][k]) for k in kinds)],
        ["pool", f"{format_bytes(res['pool_bytes'])} of pages (budget {format_bytes(res['pool_memory'])}); "
                 f"{res['waited']} requests waited for pages after they arrived"],
        ["KV bytes/token", f"{_fmt(res['kv_bytes_per_token_peak'])} at peak ({res['live_bytes_peak']} B for "
                           f"{res['live_tokens_at_peak']} positions); one {res['request_tokens']}-token request: "
                           f"{res['kv_bytes_per_token_request']:.1f}; pool peak {res['pool_bytes_peak']} B"],
        *_v4_row(res),
        ["prefix reuse", f"{res['prefix_hits']} hits of {res['prefix_lookups']} lookups, "
                         f"{res['prefix_tokens_saved']} tokens saved"],
        ["setup", f"chunk {res['chunk']}, block size {res['block_size']}, layout {res['layout']} "
                  f"({_layouts(res)}), {res['device']}, {res['threads']} threads"],
    ]
    if res.get("ep"):
        rows.append(["expert parallel", f"{res['ep']} ranks ({res['transport']}), requests per rank "
                     + "/".join(map(str, res["rank_requests"])) + ", steps joined without a token of their own "
                     + "/".join(map(str, res["rank_idle_steps"])) + "; step times are the slowest rank's, the "
                     "single request runs on every rank"])
    return text_table(["", "value"], rows, left=2)
