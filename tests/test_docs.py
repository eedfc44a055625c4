"""The docs: the mkdocs site builds in strict mode, and the README stays a short map whose links resolve."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 12_000  # characters: the README is a map, the territory is in docs/

# [text](target) and [text](target "title"); images too. Reference-style definitions: [id]: target
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def _without_code(text: str) -> str:
  """The text with fenced code blocks and inline code removed (links inside code are not links)."""
  text = re.sub(r"^(```|~~~).*?^\1\s*$", "", text, flags=re.M | re.S)
  return re.sub(r"`[^`\n]*`", "", text)


def relative_links(text: str) -> list[str]:
  """Link targets of a markdown text that point into the repository (no scheme, not a bare anchor)."""
  body = _without_code(text)
  targets = INLINE_LINK.findall(body) + REFERENCE_LINK.findall(body)
  return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_mkdocs_build_strict(tmp_path):
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                         "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"mkdocs build --strict failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
  assert (tmp_path / "site" / "index.html").exists()
  assert (tmp_path / "site" / "reference" / "scorer" / "index.html").exists()


def test_readme_is_short():
  n = len(README.read_text(encoding="utf-8"))
  assert n <= README_LIMIT, f"README.md has {n:,} characters, more than {README_LIMIT:,}: move the detail to docs/"


def test_readme_relative_links_exist():
  links = relative_links(README.read_text(encoding="utf-8"))
  assert links, "README.md links to no page of docs/"
  missing = [t for t in links if not (README.parent / t.split("#", 1)[0]).exists()]
  assert not missing, f"README.md links to files that do not exist: {missing}"


def test_link_finder():
  text = ("[a](docs/x.md) [b](docs/y.md#part) ![c](img.png \"t\") [d](https://example.org) [e](#anchor)\n"
          "`[f](not/a/link.md)`\n```\n[g](in/code.md)\n```\n[h]: docs/ref.md\n")
  assert relative_links(text) == ["docs/x.md", "docs/y.md#part", "img.png", "docs/ref.md"]
