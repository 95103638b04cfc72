"""The signing snippets in the README and docs/local.md, run as written, produce signatures the app accepts.

The docs once signed ``<t>.<raw body>`` while shared.webhooks verifies ``<t>.<source>.<body>``: every
sender who copied them got 401 signature_invalid.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.webhooks import SIGNATURE_HEADER, check_signature

ROOT = Path(__file__).resolve().parents[2]


def code_blocks(path: Path, language: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def block_with(path: Path, language: str, needle: str) -> str:
    found = [block for block in code_blocks(path, language) if needle in block]
    assert len(found) == 1, f"{path.name}: expected one {language} block with {needle!r}, found {len(found)}"
    return found[0]


def accepted(key: str, body: bytes, signature: str, source: str) -> bool:
    failure = check_signature({SIGNATURE_HEADER: signature}, body, lambda: key, time.time(), source=source)
    return failure is None


def test_the_readme_signing_snippet_is_accepted() -> None:
    namespace: dict[str, object] = {}
    exec(block_with(ROOT / "README.md", "python", "hmac.new"), namespace)  # noqa: S102 - our own docs
    key, body, signature = namespace["key"], namespace["body"], namespace["signature"]
    assert isinstance(key, str) and isinstance(body, bytes) and isinstance(signature, str)
    assert accepted(key, body, signature, source=str(namespace["source"]))
    assert not accepted(key, body, signature, source="another-source")


def test_the_local_python_signing_snippet_is_accepted() -> None:
    block = block_with(ROOT / "docs" / "local.md", "python", "hmac.new")
    namespace: dict[str, object] = {}
    exec(block.split("\nrequest = ", 1)[0], namespace)  # noqa: S102 - everything before the HTTP call
    key, body = namespace["key"], namespace["body"]
    assert isinstance(key, bytes) and isinstance(body, bytes)
    signature = f"t={namespace['t']},v1={namespace['v1']}"
    assert accepted(key.decode(), body, signature, source="manual")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_the_local_openssl_signing_snippet_is_accepted() -> None:
    block = block_with(ROOT / "docs" / "local.md", "bash", "openssl dgst")
    script = block.split("\ncurl ", 1)[0] + '\nprintf "%s\\n%s\\n%s\\n%s" "$key" "$t" "$sig" "$body"\n'
    key, t, sig, body = subprocess.run(
        ["bash", "-c", script], check=True, capture_output=True, text=True
    ).stdout.split("\n", 3)
    assert accepted(key, body.encode(), f"t={t},v1={sig}", source="manual")
