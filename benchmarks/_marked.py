"""Write one marked section of a Markdown file, leaving the rest of the file as it is.

A section lives between `<!-- section:NAME -->` and `<!-- /section:NAME -->`; writing it
again replaces what is between the markers, and a section not there yet is appended.
`read_sections` lists a file's sections, so that a script rewriting the whole file can put
back those that other scripts wrote.
"""

import os
import re


def write_section(path, name, text):
    path = os.fspath(path)
    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def read_sections(path):
    """[(name, text)] of the marked sections in the file at `path`, in order ([] if none)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    text = open(path, encoding="utf-8").read()
    found = re.finditer(r"<!-- section:(\S+?) -->\n(.*?)\n<!-- /section:\1 -->", text, re.S)
    return [(m.group(1), m.group(2)) for m in found]
