"""`pdserve bench` / scripts/bench_serving.py: SGLang's bench_serving, PD-aware, with plots.

The flags, the summary table's labels and the JSONL field names are SGLang's, so a person who
benchmarks SGLang or vLLM reads ours the same way. One file per step of a run:

    cli.py       the flags (SGLang's) and the entry point; --compare hands over to compare.py
    datasets.py  the prompts: random, random-ids, sharegpt, generated-shared-prefix
    backends.py  one HTTP request per prompt, streamed and timed (native /generate, OpenAI)
    runner.py    Poisson arrivals, the concurrency cap, warmup, the progress bar
    metrics.py   TTFT / ITL / TPOT / E2E / throughput / goodput from the timings (pure math)
    report.py    the summary table and the JSONL record
    plot.py      latency distributions and tokens/s over time (--plot)
    compare.py   two cluster configs at a few request rates: goodput under SLOs (--compare)
"""
