"""Serving fastgen over HTTP (FastAPI + uvicorn) and Ray Serve: an optional extra (from a checkout:
``pip install -e ".[serve]"``).

Everything here sits above the public API (AsyncEngine, SamplingParams, handles, outputs); nothing below imports it."""
