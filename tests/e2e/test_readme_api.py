"""The README's API table, run as written: every curl line, in the table's order, against the
native stack through the router (only ``localhost:8080`` becomes the stack's address)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from devstack import ScratchStack, wavgen
from tests.support import ROOT

LIST = (
    "list your records, newest first, one a page here (for the next page, set "
    "`NEXT=<the answer's next_cursor>` and add `&cursor=$NEXT`; `null`: the last page)"
)
ROTATE = (
    "rotate the token, with a key set once (`KEY=$(python3 -c 'import uuid; "
    "print(uuid.uuid4())')`): the same line again answers the same new token"
)
_ROW = re.compile(r"^\| ([^|]+) \| `(curl [^`]+)`")
# What each call answers when it works (the complete call may finish within its Prefer: wait).
EXPECTED = {
    "create a user": {201},
    "upload a WAV": {201},
    "upload with encoding options and tags": {201},
    "download the MP3": {200},
    LIST: {200},
    "start a direct upload (large WAV), its form saved in `upload.json`": {201},
    "send the WAV to the bucket (the form's fields, then the file)": {200, 201, 204},
    "complete it: a job, `202` at once (add `-H 'Prefer: wait=25'` to block up to 25 s for a "
    "`201` with the record)": {202},
    "poll the job": {200},
    "delete a record": {204},
    ROTATE: {200},
    "erase the user, with the rotated token (`TOKEN=<its token>`)": {204},
}
START, COMPLETE = list(EXPECTED)[5], list(EXPECTED)[7]


def api_rows() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## API") : text.index("## Configuration")]
    return [
        (m.group(1).strip(), m.group(2)) for line in section.splitlines() if (m := _ROW.match(line))
    ]


def run(command: str, base: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    line = command.replace("localhost:8080", base) + " -w '\\n%{http_code}'"
    done = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, (line, done.stderr)
    output, _, code = done.stdout.rpartition("\n")
    return int(code), output


def key_set_once(row: str, env: dict[str, str]) -> str:
    """The row's own ``KEY=...`` command, run as written."""
    set_key = re.search(r"`(KEY=[^`]+)`", row)
    assert set_key, row
    key = subprocess.run(
        ["bash", "-c", set_key.group(1) + '; echo "$KEY"'], capture_output=True, text=True,
        env=env, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    assert len(key) == 36, key
    return key


def body_of(output: str) -> Any:
    """The JSON body of an answer (after the headers when curl printed them with -i)."""
    if output.startswith("HTTP/"):
        output = output.replace("\r\n", "\n").split("\n\n", 1)[1]
    return json.loads(output)


def test_every_curl_line_of_the_api_table_works_as_written(
    stack: ScratchStack, tmp_path: Path
) -> None:
    assert shutil.which("curl"), "the README's examples use curl"
    rows = api_rows()
    assert [name for name, _ in rows] == list(EXPECTED), "the table and this test disagree"
    (tmp_path / "take.wav").write_bytes(wavgen.wav(seconds=1.0))
    base = stack.base_url.removeprefix("http://")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    for name, command in rows:
        if name == ROTATE:
            env["KEY"] = key_set_once(name, env)
        code, output = run(command, base, env, tmp_path)
        assert code in EXPECTED[name], (name, code, output)
        if name == "create a user":
            user = body_of(output)
            env |= {"USER_ID": user["id"], "TOKEN": user["token"]}
        elif name == "upload a WAV":
            env["RECORD_ID"] = body_of(output)["id"]
        elif name == "upload with encoding options and tags":
            record = body_of(output)
            assert record["channels"] == 1 and record["vbr_quality"] == 2
            assert record["tags"]["title"] == "First take"
        elif name == "download the MP3":
            assert (tmp_path / "take.mp3").stat().st_size > 0
        elif name == LIST:
            # One a page: follow the cursor as the row says, to the last page.
            first = body_of(output)
            assert len(first["records"]) == 1 and first["next_cursor"], first
            next_page = command.replace('&limit=1"', '&limit=1&cursor=$NEXT"')
            assert next_page != command, command
            code, output = run(next_page, base, {**env, "NEXT": first["next_cursor"]}, tmp_path)
            second = body_of(output)
            assert code == 200 and len(second["records"]) == 1, output
            assert second["next_cursor"] is None, second
            assert second["records"][0]["id"] == env["RECORD_ID"]  # the older upload
        elif name == START:
            env["UPLOAD_ID"] = json.loads((tmp_path / "upload.json").read_text())["id"]
        elif name == COMPLETE or name == "poll the job":
            assert body_of(output)["status"] in ("queued", "converting", "done")
        elif name == ROTATE:
            # The same line again, with the same key (and the old token): the same answer.
            again, replayed = run(command, base, env, tmp_path)
            assert again == 200 and body_of(replayed) == body_of(output), replayed
            env["TOKEN"] = body_of(output)["token"]


def test_retrying_with_the_key_set_once_returns_the_first_answer(
    stack: ScratchStack, tmp_path: Path
) -> None:
    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| retry any POST safely"))
    set_key = re.search(r"`(KEY=[^`]+)`", row)
    header = re.search(r'`(-H "Idempotency-Key: \$KEY")`', row)
    assert set_key and header, row
    create = dict(api_rows())["create a user"]
    base = stack.base_url.removeprefix("http://")
    line = f"{set_key.group(1)}; for try in 1 2; do {create} {header.group(1)}; echo; done"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", "-c", line.replace("localhost:8080", base)], capture_output=True, text=True,
        env=env, cwd=tmp_path, timeout=60, check=True,
    )  # fmt: skip
    first, second = (json.loads(answer) for answer in done.stdout.strip().splitlines())
    assert first["id"] and first == second, done.stdout


def test_the_quick_start_answers_what_it_shows(stack: ScratchStack, tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    start = text[text.index("## Quick start") : text.index("## Docker Compose")]
    make_wav = re.search(r"^(ffmpeg -f lavfi [^\n]+)$", start, flags=re.M)
    shown = re.search(r'"duration_seconds": ([\d.]+), "size_bytes": (\d+)', start)
    assert make_wav and shown, start
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    subprocess.run(
        ["bash", "-c", make_wav.group(1) + " -v error"], cwd=tmp_path, env=env, check=True
    )
    base = stack.base_url.removeprefix("http://")
    _, created = run(dict(api_rows())["create a user"], base, env, tmp_path)
    user = json.loads(created)
    env |= {"USER_ID": user["id"], "TOKEN": user["token"]}
    code, output = run(dict(api_rows())["upload a WAV"], base, env, tmp_path)
    record = json.loads(output)
    assert code == 201, output
    assert (record["duration_seconds"], record["size_bytes"]) == (
        float(shown.group(1)),
        int(shown.group(2)),
    ), "the quick start shows another answer than a real run gives"
