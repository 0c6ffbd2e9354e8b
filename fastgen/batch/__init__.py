"""Batch jobs above the public API: manifests (manifest.py), trustworthy output folders (writer.py), the job loop
(job.py, run.py) and Ray Data scale-out (ray_data.py, optional: ``pip install "fastgen[ray]"``)."""
