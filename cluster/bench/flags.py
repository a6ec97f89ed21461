"""The flags: SGLang bench_serving's names and defaults, plus --plot, SLOs and --compare."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .backends import BACKENDS
from .datasets import DatasetSpec

DATASETS = ("random", "random-ids", "sharegpt", "generated-shared-prefix")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Benchmark online serving (SGLang bench_serving's flags)."
    )
    add_target(p)
    add_dataset(p)
    add_traffic(p)
    add_output(p)
    add_compare(p)
    return p


def add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="sglang",
        help="sglang/sglang-native: POST /generate; sglang-oai, vllm: /v1/completions; "
        "sglang-oai-chat, vllm-chat: /v1/chat/completions",
    )
    p.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:30000 (else host/port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="default: 30000 (SGLang, pdserve), 8000 (vllm)")
    p.add_argument("--model", help="model id to send (default: the server's first /v1/models)")
    p.add_argument(
        "--tokenizer",
        help="LOCAL checkpoint dir (default: --model if it is a dir, "
        "else the server's model path when that is a dir here); nothing is downloaded",
    )
    p.add_argument(
        "--pd-separated",
        action="store_true",
        help="the server is a PD gateway: check it has prefill instances, record them",
    )
    p.add_argument(
        "--extra-request-body",
        type=json_object,
        default={},
        metavar="JSON",
        help="merged into every request body, e.g. '{\"top_k\": 1}'",
    )


def add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset-name",
        choices=DATASETS,
        default="random",
        help="SGLang's default is sharegpt, which needs --dataset-path here",
    )
    p.add_argument("--dataset-path", default="", help="ShareGPT-format JSON file")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--sharegpt-output-len", type=int, help="fixed output length for sharegpt")
    p.add_argument("--sharegpt-context-len", type=int, help="drop longer prompt+output pairs")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths are drawn from [L * ratio, L]",
    )
    p.add_argument("--apply-chat-template", action="store_true", help="sharegpt prompts")
    p.add_argument(
        "--tokenize-prompt",
        action="store_true",
        help="send token ids instead of text (native backends, random datasets)",
    )
    g = p.add_argument_group("generated-shared-prefix dataset")
    g.add_argument("--gsp-num-groups", type=int, default=64)
    g.add_argument("--gsp-prompts-per-group", type=int, default=16)
    g.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    g.add_argument("--gsp-question-len", type=int, default=128)
    g.add_argument("--gsp-output-len", type=int, default=256)


def add_traffic(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests/s, Poisson arrivals; inf sends all at once",
    )
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--disable-stream", action="store_true")


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-file", help="append one JSON line per run (SGLang's fields)")
    p.add_argument(
        "--output-details",
        action="store_true",
        help="add per-request lens, ttfts, itls, texts and errors to the line",
    )
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="latency distributions and tokens/s over time (--compare: goodput)",
    )
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT objective, for goodput")
    p.add_argument(
        "--slo-itl-ms",
        type=float,
        help="objective on a request's mean inter-token latency, for goodput",
    )


def add_compare(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("comparing two clusters (launched in turn with `pdserve launch`)")
    g.add_argument(
        "--compare",
        nargs=2,
        metavar=("CONFIG_A", "CONFIG_B"),
        help="`pdserve launch` arguments of each, one string apiece, e.g. local-cpu "
        "local-colocated (1P1D vs colocated), or 'local-cpu --set gateway.port=31000'",
    )
    g.add_argument(
        "--compare-labels",
        nargs=2,
        metavar=("A", "B"),
        help="names in the table and plot (default: the config file names)",
    )
    g.add_argument(
        "--request-rates",
        type=rate_list,
        default=(1.0, 2.0, 4.0),
        help="comma-separated request rates to run each cluster at",
    )
    g.add_argument(
        "--launch-command",
        help="what launches a CONFIG instead of `pdserve launch` (a wrapper, ssh, ...); it must "
        "print `pdserve cluster ready: URL` when up and stop the cluster on SIGTERM",
    )
    g.add_argument("--launch-timeout", type=float, default=600.0)
    g.add_argument("--log-dir", default="bench-logs", help="the clusters' logs go here")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give a JSON object, e.g. {"top_k": 1}')
    return value


def rate_list(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("give rates like 1,2,4 (or inf)") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("give positive rates like 1,2,4")
    return rates


def dataset_spec(args: argparse.Namespace) -> DatasetSpec:
    return DatasetSpec(
        name=args.dataset_name,
        num_prompts=args.num_prompts,
        path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        sharegpt_output_len=args.sharegpt_output_len,
        sharegpt_context_len=args.sharegpt_context_len,
        gsp_num_groups=args.gsp_num_groups,
        gsp_prompts_per_group=args.gsp_prompts_per_group,
        gsp_system_prompt_len=args.gsp_system_prompt_len,
        gsp_question_len=args.gsp_question_len,
        gsp_output_len=args.gsp_output_len,
        apply_chat_template=args.apply_chat_template,
        tokenize_prompt=args.tokenize_prompt,
        seed=args.seed,
    )
