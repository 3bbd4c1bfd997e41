"""Batch detection: the scene pipeline over folders of photos and videos, on one machine or as a
Slurm job array (`signserve detect`, `make detect-cluster`)."""
