"""nbsupport: the tested library behind the workbench's notebooks.

Shared modules (``config``, ``runs``, ``train``, ``metrics``, ``manifest``, ``models``, ``viz``, ``runner``) never
import a system; each system (``seg2d``, ...) is a subpackage with ``data``, ``model`` and ``pipeline``.
"""
__version__ = "0.1.0"
