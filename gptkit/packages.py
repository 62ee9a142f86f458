"""Imported first by every entry point, so that a Python without the project's packages (the system python3 instead
of the venv's) gets one line saying how to run, not a ModuleNotFoundError from deep inside an import.

    venv/bin/python tour.py bpe      # or: source venv/bin/activate, then python tour.py bpe
"""

import importlib.util
import sys

missing = [name for name in ("torch", "numpy") if importlib.util.find_spec(name) is None]
if missing:
    print(f"error: {sys.executable} has no {' or '.join(missing)}; run `make setup-all` once, then run the scripts "
          "with venv/bin/python (or `source venv/bin/activate` once in the shell, then python)", file=sys.stderr)
    sys.exit(2)
