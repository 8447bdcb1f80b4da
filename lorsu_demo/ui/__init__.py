"""The Gradio app: teach, watch, chat, roll back.

This package is the only place that imports gradio, and only `app.py`, `compare.py` and
`takeaway.py` do so. The other modules (`engine`, `core`, `compare_core`, `workspace`, `uploads`,
`figures`, `text`) are plain Python, importable without Gradio, so that
`python -m lorsu_demo train` never pays for it.
"""
