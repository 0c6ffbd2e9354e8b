"""Serving fastgen over HTTP (FastAPI + uvicorn) and Ray Serve: an optional extra (``pip install fastgen[serve]``).

Everything here sits above the public API (AsyncEngine, SamplingParams, handles, outputs); nothing below imports it."""
