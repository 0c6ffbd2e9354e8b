"""Batch jobs above the public API: manifests (manifest.py), trustworthy output folders (writer.py), the job loop
(job.py, run.py; grace.py decides what an interruption cuts, progress.py what the user sees) and Ray Data scale-out
(ray_data.py, optional: ``pip install -e ".[ray]"`` from a checkout)."""
