"""Bad input without a server: nothing listening, a missing or malformed dataset, bad flags.
Clear one-line errors, failures counted, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench.compare import default_labels
from cluster.cli import main as pdserve
from tests.ports import free_port

SMALL = ["--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "4",
         "--disable-tqdm"]  # fmt: skip


def bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = pdserve(["bench", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_nothing_listening_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = bench(capsys, "--base-url", url, *SMALL)
    assert code == 1
    assert f"cannot reach {url}/v1/models" in err and "is the server up?" in err


def test_warmup_failure_stops_before_measuring(
    capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = bench(capsys, "--base-url", url, "--tokenizer", str(tiny_model),
                           "--model", "tiny", *SMALL)  # fmt: skip
    assert code == 1
    assert "all 1 warmup requests" in err and "--warmup-requests 0" in err
    assert "Serving Benchmark Result" not in out


def test_refused_requests_are_counted(
    capsys: pytest.CaptureFixture[str], tiny_model: Path, tmp_path: Path
) -> None:
    url, jsonl = f"http://127.0.0.1:{free_port()}", tmp_path / "out.jsonl"
    code, out, err = bench(capsys, "--base-url", url, "--tokenizer", str(tiny_model),
                           "--model", "tiny", "--warmup-requests", "0", "--output-file",
                           str(jsonl), "--output-details", *SMALL)  # fmt: skip
    assert code == 1 and "all 3 requests failed" in err and "ConnectError" in err
    assert "Successful requests:                     0" in out
    assert "Failed requests:                         3" in out
    record = json.loads(jsonl.read_text())
    assert (record["completed"], record["failed"], record["total_output_tokens"]) == (0, 3, 0)
    assert all("ConnectError" in e for e in record["errors"])


@pytest.mark.parametrize(("content", "message"), [(None, "no such file"), ("[{", "not valid JSON")])
def test_bad_dataset_file(
    capsys: pytest.CaptureFixture[str], tiny_model: Path, tmp_path: Path,
    content: str | None, message: str,
) -> None:  # fmt: skip
    path = tmp_path / "sharegpt.json"
    if content is not None:
        path.write_text(content)
    code, _, err = bench(capsys, "--dataset-name", "sharegpt", "--dataset-path", str(path),
                         "--tokenizer", str(tiny_model), "--model", "tiny", *SMALL)  # fmt: skip
    assert code == 1
    assert err.startswith("pdserve bench: error: --dataset-path") and message in err


def test_tokenizer_must_be_a_local_dir(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, "--tokenizer", "Qwen/Qwen3-8B", "--model", "m", *SMALL)
    assert code == 1 and "nothing is downloaded" in err


def test_bad_flag_values_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pdserve(["bench", "--extra-request-body", "[1]"])
    assert exit_info.value.code == 2
    assert "give a JSON object" in capsys.readouterr().err


def test_compare_needs_an_slo(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = bench(capsys, "--compare", "local-cpu", "local-colocated", *SMALL)
    assert code == 1 and "give --slo-ttft-ms and/or --slo-itl-ms" in err


def test_compare_labels_default_to_the_config_names() -> None:
    a, b = ("configs/local-cpu.yaml", "--set", "x=1"), ("local-colocated",)
    assert default_labels([a, b]) == ["local-cpu", "local-colocated"]
    assert default_labels([("local-cpu",), ("local-cpu", "--set", "prefill=[]")]) == ["A", "B"]
