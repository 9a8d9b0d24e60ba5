"""core: robust knowledge distillation (RSLAD and baselines) as a plain library and CLI.

This package never imports ``api`` or ``worker``: a researcher can use it alone.
"""

__version__ = "0.1.0"
