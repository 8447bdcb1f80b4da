"""The LoRSU demo app: `python app.py` (Hugging Face Spaces runs this file).

Options: `--model` (or env LORSU_MODEL; default `toy`, the offline model in assets/), `--host`
and `--port` (or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT). See docs/ui.md.
"""

try:  # ZeroGPU wants `spaces` imported before torch touches CUDA; elsewhere it is optional
    import spaces  # noqa: F401
except ImportError:
    pass

import sys

from lorsu_demo.ui.app import main

if __name__ == "__main__":
    sys.exit(main())
