"""`pdserve bench` / scripts/bench_serving.py: SGLang's bench_serving, PD-aware, with plots.

The flags, the summary table's labels and the JSONL field names are SGLang's, so a person who
benchmarks SGLang or vLLM reads ours the same way. One file per step of a run:

    cli.py       the entry point: one run against a running server (--compare: compare.py)
    flags.py     SGLang's flags and defaults, plus --plot, the SLOs and --compare
    probe.py     what is asked of the server first: model id, tokenizer dir, PD instances
    datasets.py  the prompts: random, random-ids, sharegpt, generated-shared-prefix
    backends.py  one HTTP request per prompt, streamed and timed (native /generate, OpenAI)
    runner.py    Poisson arrivals, the concurrency cap, warmup, the progress bar
    metrics.py   TTFT / ITL / TPOT / E2E / throughput / goodput from the timings (pure math)
    report.py    the summary table and the JSONL record
    plot.py      latency distributions and tokens/s over time (--plot)
    compare.py   two cluster configs at a few request rates: goodput under SLOs (--compare)
    launcher.py  a cluster for the length of a `with` (`pdserve launch` in a child process)
"""
