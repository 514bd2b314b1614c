import sys

# `python -m sdrt.cli` puts the working directory first on sys.path. In the repository root that makes its
# kernels/ folder (installed as sdrt.kernels) shadow the PyPI `kernels` package transformers imports
# (`sdrt bench` loads diffusers and transformers); sdrt is installed, so the entry is not needed.
if sys.path and sys.path[0] in ("", ".", __import__("os").getcwd()):
    del sys.path[0]

from sdrt.cli import main  # noqa: E402

sys.exit(main())
