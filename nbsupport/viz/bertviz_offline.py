"""bertviz's head and model views that render offline: in an executed notebook's HTML, in JupyterLab and as a
standalone page.

bertviz's HTML pulls require.js from cdnjs, and its script asks require.js for d3 and jQuery from cdnjs too
(bertviz#63): with no network the view is blank. Here the page carries d3 5.7.0 and jQuery 2.2.4 inline (the
versions bertviz asks for, vendored in ``nbsupport/viz/vendor`` from the npm packages, their licences alongside)
and a ten-line stand-in for ``require``/``requirejs`` that hands bertviz those two modules. No ``<script src>``
remains, so nothing is fetched.
"""
from __future__ import annotations

import html as html_lib
import os
import re
from functools import cache
from pathlib import Path
from typing import Any, Literal

from nbsupport.runs import atomic_write_text

VENDOR = Path(__file__).with_name("vendor")
VENDORED_SCRIPTS = ("jquery-2.2.4.min.js", "d3-5.7.0.min.js")

# bertviz calls require.config({paths: {...cdnjs...}}) then requirejs(['jquery', 'd3'], fn): answer from globals.
_REQUIRE_SHIM = """(function () {
  if (window.nbsupportRequireShim) return;
  var modules = {jquery: window.jQuery, d3: window.d3};
  function requirejs(deps, callback) {
    var args = deps.map(function (name) {
      if (!(name in modules)) throw new Error("nbsupport offline bundle has no module " + name);
      return modules[name];
    });
    if (callback) callback.apply(null, args);
  }
  requirejs.config = function () {};
  window.require = window.requirejs = requirejs;
  window.nbsupportRequireShim = true;
})();"""

_REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']https?://[^\"']*[\"'][^>]*>\s*</script>", re.IGNORECASE)


@cache
def offline_bundle() -> str:
    """``<script>`` blocks with jQuery, d3 and the require stand-in (about 330 kB), to put before bertviz's HTML."""
    blocks = []
    for name in VENDORED_SCRIPTS:
        source = (VENDOR / name).read_text(encoding="utf-8")
        blocks.append(f"<script>/* {name} (vendored, see nbsupport/viz/vendor) */\n{source}\n</script>")
    blocks.append(f"<script>{_REQUIRE_SHIM}</script>")
    return "\n".join(blocks)


def make_offline(view_html: str) -> str:
    """bertviz HTML (``head_view(..., html_action="return").data``) with the CDN script tags removed and the
    vendored libraries inlined in front."""
    return offline_bundle() + "\n" + _REMOTE_SCRIPT.sub("", view_html)


def _bertviz_html(attention: Any, tokens: list[str], view: Literal["head", "model"], **kwargs: Any) -> str:
    from bertviz import head_view, model_view

    show = head_view if view == "head" else model_view
    if view not in ("head", "model"):
        raise ValueError(f"view must be 'head' or 'model', got {view!r}")
    return show(attention, tokens, html_action="return", **kwargs).data


def attention_view(attention: Any, tokens: list[str], view: Literal["head", "model"] = "head", **kwargs: Any) -> Any:
    """bertviz's head/model view as an ``IPython.display.HTML`` that works offline (JupyterLab and HTML export).

    Args:
        attention: per layer a (batch=1, heads, query, key) tensor, as ``model(..., output_attentions=True)``
            returns (load SDPA models with ``attn_implementation="eager"``).
        tokens: the query/key tokens (``tokenizer.convert_ids_to_tokens(ids)``).
        view: "head" (one layer, lines between tokens) or "model" (thumbnails of every layer and head).
        **kwargs: passed to bertviz (``sentence_b_start``, ``layer``, ``heads``, ``include_layers``, ...).
    """
    from IPython.display import HTML

    return HTML(make_offline(_bertviz_html(attention, tokens, view, **kwargs)))


def save_attention_html(attention: Any, tokens: list[str], path: str | os.PathLike,
                        view: Literal["head", "model"] = "head", title: str = "Attention", **kwargs: Any) -> Path:
    """Write bertviz's head/model view as a standalone offline page (atomically) and return its path.

    Arguments as :func:`attention_view`; ``title`` heads the page.
    """
    body = make_offline(_bertviz_html(attention, tokens, view, **kwargs))
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html_lib.escape(title)}'
            f'</title>\n</head>\n<body style="font-family: Helvetica, Arial, sans-serif; margin: 1em 1.5em">\n'
            f"<h1 style=\"font-size: 1.3em\">{html_lib.escape(title)}</h1>\n{body}\n</body>\n</html>\n")
    return atomic_write_text(Path(path), page)
