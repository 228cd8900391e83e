"""``python -m v4hal.apps.ep_bench``: the expert-parallel dispatch/combine measurement of
`v4hal.parallel.bench.measure_ep` (bytes per token, time per MoE layer, bf16 vs FP8 payload) from the command line."""
from __future__ import annotations

import argparse
import sys

from v4hal.apps.args import reports_errors
from v4hal.hal.errors import RangeError
from v4hal.parallel.bench import PAYLOADS, format_table, measure_ep
from v4hal.parallel.bench import __doc__ as bench_doc

#: the name in this command's error lines (``v4hal ep_bench: error: ...``)
COMMAND = "ep_bench"
#: upper bounds of the numeric flags: ranks are local processes, and each rank holds ``tokens x dim`` bf16
#: activations plus their copies to every expert (``MAX_ELEMENTS`` bounds ``tokens x dim x topk``)
MAX_EP = 64
MAX_TOKENS = 1 << 16
MAX_DIM = 1 << 16
MAX_EXPERTS = 4096
MAX_ELEMENTS = 1 << 28
MAX_ITERS = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``python -m v4hal.apps.ep_bench``."""
    from v4hal.apps.args import choice_list, int_in, model_preset, threads, writable_path

    p.add_argument("--ep", type=int_in(1, MAX_EP), default=2, help="local gloo ranks (default 2)")
    p.add_argument("--tokens", type=int_in(1, MAX_TOKENS), default=256, help="tokens per rank (default 256)")
    p.add_argument("--model", type=model_preset, default="v4-flash",
                   help="preset whose hidden size, routed experts and experts per token are the defaults of --dim, "
                        "--experts, --topk (default v4-flash: 4096, 256, 6; v41-flash: 5120, 384, 6)")
    p.add_argument("--dim", type=int_in(1, MAX_DIM), default=None, help="hidden size (default: --model's)")
    p.add_argument("--experts", type=int_in(1, MAX_EXPERTS), default=None, help="routed experts (default: --model's)")
    p.add_argument("--topk", type=int_in(1, MAX_EXPERTS), default=None,
                   help="experts per token (default: --model's)")
    p.add_argument("--iters", type=int_in(1, MAX_ITERS), default=5, help="timed iterations (default 5)")
    p.add_argument("--warmup", type=int_in(0, MAX_ITERS), default=2, help="untimed iterations first (default 2)")
    p.add_argument("--payloads", default=",".join(PAYLOADS), type=choice_list(list(PAYLOADS), "payload"),
                   help=f"comma list among {','.join(PAYLOADS)}")
    p.add_argument("--start-method", default="fork", choices=("fork", "spawn"), help="process start method")
    p.add_argument("--threads", type=threads, default=None, help="torch threads per rank (default cpus // ep)")
    p.add_argument("--json", default=None, metavar="PATH", type=writable_path, help="also write the result as JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")


def check_args(a: argparse.Namespace) -> None:
    """Fill ``--dim``, ``--experts``, ``--topk`` left out from ``--model``'s config, then the checks that involve
    several options (`RangeError`), before any rank starts."""
    from v4hal.model.config import ModelConfig

    cfg = ModelConfig.preset(getattr(a, "model", None) or "v4-flash")
    for name, value in (("dim", cfg.dim), ("experts", cfg.n_routed_experts), ("topk", cfg.n_activated_experts)):
        if getattr(a, name, None) is None:
            setattr(a, name, value)
    if a.topk > a.experts:
        raise RangeError(f"--topk {a.topk} exceeds --experts {a.experts}")
    if a.experts % a.ep:
        raise RangeError(f"--experts {a.experts} do not split evenly over --ep {a.ep} ranks")
    if "fp8" in a.payloads and a.dim % 128:
        raise RangeError(f"--dim {a.dim}: an FP8 payload needs a multiple of 128 (act_quant blocks); "
                         f"give --payloads bf16 or another --dim")
    if a.tokens * a.dim * a.topk > MAX_ELEMENTS:
        raise RangeError(f"--tokens {a.tokens} x --dim {a.dim} x --topk {a.topk} = {a.tokens * a.dim * a.topk} "
                         f"dispatched values per rank; at most {MAX_ELEMENTS}")


def main(argv: list[str] | None = None) -> int:
    """``python -m v4hal.apps.ep_bench``: 0 when measured, 2 on bad options or a failed write (one line
    ``v4hal ep_bench: error: ...`` on stderr; ``--debug`` shows the traceback)."""
    from v4hal.apps.args import EXIT_USAGE, error_line
    from v4hal.apps.main import CommandLineError, Parser

    p = Parser(prog="python -m v4hal.apps.ep_bench", description=bench_doc.split("\n\n")[0])
    add_arguments(p)
    try:
        a = p.parse_args(argv)
    except CommandLineError as e:
        print(error_line(COMMAND, str(e)), file=sys.stderr)
        return EXIT_USAGE
    return _run(a)


@reports_errors(COMMAND)
def _run(a: argparse.Namespace) -> int:
    from v4hal.apps.args import write_json

    check_args(a)
    res = measure_ep(a.ep, a.tokens, a.dim, a.experts, a.topk, payloads=tuple(a.payloads.split(",")),
                     iters=a.iters, warmup=a.warmup, start_method=a.start_method, threads=a.threads)
    print(format_table(res))
    if a.json:
        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
