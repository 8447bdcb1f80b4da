"""The Gradio app: teach, watch, chat, roll back.

This package is the only place that imports gradio, and only `app.py` does so. The other modules
(`engine`, `workspace`, `uploads`, `figures`, `text`) are plain Python, importable without Gradio,
so that `python -m lorsu_demo train` never pays for it.
"""
