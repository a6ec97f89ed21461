"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from api.settings import LOG_LEVELS
from cluster import commands
from cluster.k8s.command import add_k8s
from cluster.running import add_running
from modelgen.spec import add_flags, spec_from_flags


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="write a tiny random-weight HF checkpoint")
    p.add_argument("--out", required=True, help="directory to write (new or empty)")
    p.add_argument("--force", action="store_true", help="overwrite what --out holds")
    add_flags(p)
    p.set_defaults(func=_make_model)


def _make_model(args: argparse.Namespace) -> int:
    from modelgen.make import make_model

    out = Path(args.out)
    if not args.force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        # NOTE: random weights over a real checkpoint would be a loss nobody could undo
        raise FileExistsError(f"{out} exists and is not empty (--force overwrites it)")
    spec = spec_from_flags(args)
    print(make_model(spec.arch, args.out, **spec.make_kwargs()))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="run prompts through the offline engine")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for more prompts")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-backend", default="torch")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per prompt per line (else text)"
    )
    commands.add_parallel_flags(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    parallel = commands.parallel_options(args)
    if parallel.get("node_rank", 0) > 0:  # another host of the rank group: its ranks only
        from engine.options import EngineOptions
        from engine.parallel.worker import serve_ranks

        return serve_ranks(args.model, EngineOptions(**parallel))
    with LLM(
        args.model,
        dtype=args.dtype,
        page_size=args.page_size,
        attention_backend=args.attention_backend,
        **parallel,
    ) as llm:
        _print_completions(llm, args, params)
    return 0


def _print_completions(llm: Any, args: argparse.Namespace, params: Any) -> None:
    """One prompt: its text alone. Several: each prompt and its text quoted (an output may hold
    newlines), so that where one ends is never in doubt; --json: one object per prompt."""
    for prompt, done in zip(args.prompt, llm.generate(args.prompt, params), strict=True):
        if args.json:
            record = {
                "text": done.text,
                "token_ids": done.token_ids,
                "finish_reason": done.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif len(args.prompt) == 1:
            print(done.text, flush=True)
        else:
            print(f"Prompt: {prompt!r}\nOutput: {done.text!r}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument(
        "--log-level", default="warning", type=str.lower, choices=LOG_LEVELS, help="this command's"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_model(sub)
    _add_generate(sub)
    commands.add_launch(sub)
    add_running(sub)
    commands.add_node(sub, "prefill")
    commands.add_node(sub, "decode")
    commands.add_gateway(sub)
    add_k8s(sub)
    # NOTE: `pdserve bench ARGS` hands ARGS to cluster/bench, whose flags are SGLang's (`-h` lists)
    sub.add_parser("bench", add_help=False, help="benchmark a server (SGLang bench_serving flags)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from cluster.bench.cli import main as bench

        return bench(rest, prog="pdserve bench")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"pdserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
