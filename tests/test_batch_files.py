"""Pure unit tests of the bulk batch pieces (no services): parameters, the streaming line
validator, output line shapes, the upload sink and the multipart receiver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.upload import MultipartReceiver, UploadError
from lmqueue.batches import BatchInputError
from lmqueue.batches.create import check_metadata, parse_window
from lmqueue.batches.output import output_line
from lmqueue.files import FileTooLarge, UploadSink
from lmqueue.jsonl import LineError, ValidLine, validate_file
from lmqueue.settings import reset_settings

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h", 86400), ("7d", 604800), ("30m", 1800), ("90s", 90), ("1h", 3600)]
)
def test_parse_window(text: str, seconds: int) -> None:
    assert parse_window(text, 30 * 86400) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "1w", "-1h", "0s", "31d", "1.5h"])
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(BatchInputError) as info:
        parse_window(text, 30 * 86400)
    assert info.value.param == "completion_window"


def test_metadata_rules() -> None:
    assert check_metadata(None) is None
    assert check_metadata({"a": "b"}) == {"a": "b"}
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}):
        with pytest.raises(BatchInputError):
            check_metadata(bad)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    models = tmp_path / "models.toml"
    models.write_text('[models.gen]\npath = "x"\n[models.emb]\npath = "x"\ntask = "embed"\n')
    monkeypatch.setenv("LMQUEUE_MODELS_FILE", str(models))
    reset_settings()
    yield
    reset_settings()


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _line(cid: str, **body: object) -> str:
    payload = {"model": "gen", "prompt": "hi", **body}
    return json.dumps(
        {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": payload}
    )


def test_validate_file_reports_each_line(registry: None, tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            _line("a"),
            "",
            "[1, 2]",
            _line("a"),
            _line("b", max_tokens=0),
            _line("c", model="emb"),
            _line("d", stream=True),  # nothing reads a batch line's deltas
        ],
    )
    items = list(validate_file(path, "/v1/completions", max_lines=100, max_line_bytes=10_000))
    assert isinstance(items[0], ValidLine) and items[0].body["model"] == "gen"
    errors = [(e.line, e.code, e.param) for e in items if isinstance(e, LineError)]
    assert errors == [
        (3, "invalid_json_line", None),  # line 2 is blank: skipped, but still counted
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_value", "body.max_tokens"),
        (6, "unsupported_endpoint", "body.model"),
        (7, "invalid_value", "body.stream"),
    ]


def test_validate_file_limits(registry: None, tmp_path: Path) -> None:
    path = _write(tmp_path, [_line(f"x{i}") for i in range(5)] + [_line("long", prompt="z" * 500)])
    items = list(validate_file(path, "/v1/completions", max_lines=3, max_line_bytes=10_000))
    assert isinstance(items[-1], LineError) and items[-1].code == "too_many_lines"
    assert len(items) == 4
    items = list(validate_file(path, "/v1/completions", max_lines=100, max_line_bytes=300))
    assert [(e.line, e.code) for e in items if isinstance(e, LineError)] == [(6, "line_too_long")]
    empty = _write(tmp_path, [""])
    assert [
        e.code for e in validate_file(empty, "/v1/completions", max_lines=9, max_line_bytes=99)
    ] == ["empty_file"]  # type: ignore[union-attr]


def test_output_line_shapes() -> None:
    ok = output_line("job_1", "c1", "succeeded", {"object": "text_completion"}, None)
    assert ok == {
        "id": "batch_req_job_1",
        "custom_id": "c1",
        "response": {
            "status_code": 200,
            "request_id": "job_1",
            "body": {"object": "text_completion"},
        },
        "error": None,
    }
    failed = output_line(
        "job_2", "c2", "failed", None, {"code": "x", "message": "m", "status_code": 400}
    )
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["code"] == "x"
    gone = output_line("job_3", "c3", "cancelled", None, {"code": "batch_expired"})
    assert gone["response"] is None and gone["error"]["code"] == "batch_expired"


def test_upload_sink_counts_and_limits(tmp_path: Path) -> None:
    sink = UploadSink(tmp_path, max_bytes=10)
    sink.write(b"a\nb")
    assert (sink.bytes, sink.lines) == (3, 2)
    with pytest.raises(FileTooLarge):
        sink.write(b"x" * 8)
    sink.discard()
    assert list(tmp_path.iterdir()) == []


def test_multipart_receiver_streams_the_file_part(tmp_path: Path) -> None:
    sink = UploadSink(tmp_path, max_bytes=1 << 20)
    rx = MultipartReceiver("multipart/form-data; boundary=XX", sink)
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n{}\n{}\n\r\n--XX--\r\n"
    )
    for i in range(0, len(body), 7):  # arbitrary chunking
        rx.write(body[i : i + 7])
    rx.finish()
    assert rx.fields == {"purpose": "batch"} and rx.filename == "in.jsonl"
    assert (sink.bytes, sink.lines) == (6, 2)
    sink.discard()
    with pytest.raises(UploadError):
        MultipartReceiver("application/json", sink)
