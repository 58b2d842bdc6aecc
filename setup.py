"""Packaging. The Triton sources live in the top-level `kernels/` folder and are installed
as `fastortho.kernels` (package_dir mapping), never as a top-level `kernels` module."""
from setuptools import setup

setup(
    packages=["fastortho", "fastortho.ops", "fastortho.kernels"],
    package_dir={"fastortho": "fastortho", "fastortho.kernels": "kernels"},
)
