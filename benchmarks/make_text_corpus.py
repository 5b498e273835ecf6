"""Build an English prose corpus from Debian documentation packages, for `rabit train --text`.

    python benchmarks/make_text_corpus.py OUT.txt

Downloads (apt-get download, no install; a Debian or Ubuntu machine with its package index) python3.11-doc,
debian-handbook and debian-reference-en, unpacks them (dpkg-deb) in a temporary folder, and writes one UTF-8 text
file: the reStructuredText sources of the Python documentation, then the English HTML chapters of the Debian
Administrator's Handbook and of the Debian Reference as text, documents separated by blank lines. Human-written
text, none of it from WikiText (docs/results.md: "SmolLM2-135M: training on real text"). On bookworm (2026-11-27) it
gave 639 documents, 12,792,454 characters (sha256 45d8df86...c5c1), 3,322,368 SmolLM2 tokens.
"""

from __future__ import annotations

import argparse
import glob
import html.parser
import os
import re
import subprocess
import tempfile

PACKAGES = ("python3.11-doc", "debian-handbook", "debian-reference-en")


class _Text(html.parser.HTMLParser):
    """The text of an HTML page: block elements become line breaks; head, script and style are dropped."""

    BLOCKS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr", "dt", "dd"}
    HIDDEN = {"script", "style", "head"}

    def __init__(self):
        super().__init__()
        self.out: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in self.HIDDEN
        if tag in self.BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        self.hidden -= tag in self.HIDDEN

    def handle_data(self, data):
        if not self.hidden:
            self.out.append(data)


def html_text(path: str) -> str:
    p = _Text()
    with open(path, encoding="utf-8", errors="replace") as f:
        p.feed(f.read())
    text = re.sub(r"[ \t]+", " ", "".join(p.out))
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def corpus(root: str) -> list[str]:
    """The documents under an unpacked root, in a fixed order."""
    docs = []
    for f in sorted(glob.glob(f"{root}/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", recursive=True)):
        with open(f, encoding="utf-8") as fh:
            docs.append(fh.read().strip())
    docs += [html_text(f) for f in sorted(glob.glob(f"{root}/usr/share/doc/debian-handbook/html/en-US/*.html"))]
    docs += [html_text(f) for f in sorted(glob.glob(f"{root}/usr/share/debian-reference/*.en.html"))]
    return [d for d in docs if d]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the text file to write")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True)
        root = os.path.join(tmp, "root")
        for deb in sorted(glob.glob(f"{tmp}/*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        docs = corpus(root)
    if not docs:
        raise SystemExit("make_text_corpus: the packages held no documents (their layout changed?)")
    text = "\n\n".join(docs)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{args.out}: {len(docs)} documents, {len(text):,} characters")


if __name__ == "__main__":
    main()
