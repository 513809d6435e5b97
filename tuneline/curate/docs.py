"""Great Expectations' Data Docs, made readable offline.

GE's pages load Bootstrap, jQuery and a dozen more scripts and stylesheets from CDNs, and its
logo from S3: behind a firewall, or on a machine with no internet, they render as unstyled text,
the index's tables stay empty (a script fills them) and the browser waits on each request. Here
every page gets Bootstrap and jQuery from local copies (the XStatic packages on PyPI ship them),
bootstrap-table and glyphs for GE's five icons from `docs_static/`, and the logo GE already
ships in `static/images`; the other remote assets (the tables' filter controls, date pickers,
Vega charts) are dropped, so a page makes no request outside its folder.
GE's links to its own `static/` folder are re-counted too: deep pages point one level short.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import xstatic.pkg.bootstrap as bootstrap
import xstatic.pkg.jquery as jquery

VENDOR = "static/vendor"
SHIPPED = Path(__file__).with_name("docs_static")  # what no PyPI package has
LOCAL = {  # a remote asset whose URL ends so -> the local file that replaces it
    "bootstrap.min.css": Path(bootstrap.BASE_DIR) / "css" / "bootstrap.min.css",
    "bootstrap.min.js": Path(bootstrap.BASE_DIR) / "js" / "bootstrap.bundle.min.js",  # with Popper
    "jquery-3.7.1.min.js": Path(jquery.BASE_DIR) / "jquery.min.js",
    "bootstrap-table.min.js": SHIPPED / "bootstrap-table.min.js",  # fills the index's tables
    "bootstrap-table.min.css": SHIPPED / "bootstrap-table.min.css",
    "all.min.css": SHIPPED / "icons.css",  # Font Awesome: the five icons GE uses, as glyphs
}
LOGO = "static/images/logo-long.png"

REMOTE_LINK = re.compile(r"<link\b[^>]*\bhref=\"(https?://[^\"]+)\"[^>]*>", re.IGNORECASE)
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=\"(https?://[^\"]+)\"[^>]*>\s*</script>", re.IGNORECASE)
LOCAL_STATIC = re.compile(r"\b(href|src)=\"(?:\./|(?:\.\./)+)static/")  # GE miscounts the depth
REMOTE_IMAGE = re.compile(r"<img\b[^>]*\bsrc=\"(https?://[^\"]+)\"[^>]*>", re.IGNORECASE)


def make_offline(docs_dir: Path) -> None:
    """Rewrite every page under `docs_dir` to load only files under `docs_dir`."""
    vendor = docs_dir / VENDOR
    vendor.mkdir(parents=True, exist_ok=True)
    for source in LOCAL.values():
        shutil.copyfile(source, vendor / source.name)
    for page in docs_dir.rglob("*.html"):
        up = os.path.relpath(docs_dir, page.parent).replace(os.sep, "/")
        page.write_text(offline_html(page.read_text(encoding="utf-8"), up), encoding="utf-8")


def offline_html(html: str, up: str) -> str:
    """The page with its remote assets replaced or dropped; `up` leads from the page to the docs root."""

    def local(url: str) -> str | None:
        name = url.split("?")[0].rsplit("/", 1)[-1]
        return f"{up}/{VENDOR}/{LOCAL[name].name}" if name in LOCAL else None

    def link(match: re.Match[str]) -> str:
        path = local(match[1])
        return match[0].replace(match[1], path) if path else ""

    def script(match: re.Match[str]) -> str:
        path = local(match[1])
        return f'<script src="{path}"></script>' if path else ""

    def image(match: re.Match[str]) -> str:
        return match[0].replace(match[1], f"{up}/{LOGO}") if "logo" in match[1] else ""

    html = LOCAL_STATIC.sub(lambda match: f'{match[1]}="{up}/static/', html)
    html = REMOTE_LINK.sub(link, html)
    html = REMOTE_SCRIPT.sub(script, html)
    return REMOTE_IMAGE.sub(image, html)
