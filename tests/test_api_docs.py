"""The curl and `openai` client examples in docs/api.md and README.md work as written (pointed at the
shared live server instead of port 8000)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_server import REPO, shared_server

pytestmark = pytest.mark.slow
DOC = REPO / "docs" / "api.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", Path(DOC).read_text(), flags=re.S)


def _retarget(code: str) -> str:
    assert "127.0.0.1:8000" in code
    return code.replace("127.0.0.1:8000", shared_server().url.removeprefix("http://"))


def test_curl_examples() -> None:
    curls = [b for b in _blocks("bash") if b.startswith("curl")]
    assert len(curls) == 3
    whole = json.loads(subprocess.run(_retarget(curls[0]), shell=True, check=True,
                                      capture_output=True, text=True, timeout=120).stdout)
    assert whole["choices"][0]["message"]["content"]
    streamed = subprocess.run(_retarget(curls[1]), shell=True, check=True, capture_output=True,
                              text=True, timeout=120).stdout
    events = [line for line in streamed.splitlines() if line]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    embedded = json.loads(subprocess.run(_retarget(curls[2]), shell=True, check=True,
                                         capture_output=True, text=True, timeout=120).stdout)
    vectors = [d["embedding"] for d in embedded["data"]]
    assert len(vectors) == 2 and all(len(v) == 576 for v in vectors)  # (the hidden size)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-4 for v in vectors) and vectors[0] != vectors[1]


def test_openai_client_example() -> None:
    (code,) = _blocks("python")
    out = subprocess.run([sys.executable, "-c", _retarget(code)], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert len(out.strip().splitlines()) >= 2, out  # the reply, then the streamed reply


def test_readme_examples() -> None:
    """The README's curl and openai examples, run as written against the live server."""
    text = (REPO / "README.md").read_text()
    curls = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if b.startswith("curl")]
    (python,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(curls) == 1
    reply = json.loads(subprocess.run(_retarget(curls[0]), shell=True, check=True, capture_output=True,
                                      text=True, timeout=120).stdout)
    assert reply["choices"][0]["message"]["content"]
    out = subprocess.run([sys.executable, "-c", _retarget(python)], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip()
