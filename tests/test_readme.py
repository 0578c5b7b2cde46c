"""The README's API snippets run as written (in a fresh process, as a user would)."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_api_snippets_run():
    text = (ROOT / "README.md").read_text()
    api = text[text.index("## API"):]
    api = api[:api.index("\n## ", 1)] if "\n## " in api[1:] else api  # the API section only
    blocks = re.findall(r"```python\n(.*?)```", api, flags=re.S)
    assert len(blocks) >= 8, "README's API section lost its snippets"
    script = "\n".join(blocks) + "\nprint('README snippets OK')\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**__import__("os").environ,
                                                      "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "README snippets OK" in proc.stdout
