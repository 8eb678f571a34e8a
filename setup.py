"""Computes the package list: `passes/` installs as `onnxslim_edge.passes`.

A static list silently drops new sub-packages of passes/ from the wheel, so both trees
are walked here. Everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGES = [
    *find_packages(include=["onnxslim_edge", "onnxslim_edge.*"]),
    "onnxslim_edge.passes",
    *(f"onnxslim_edge.passes.{sub}" for sub in find_packages("passes")),
]
PACKAGE_DIR = {
    "onnxslim_edge": "onnxslim_edge",
    "onnxslim_edge.passes": "passes",
    **{
        f"onnxslim_edge.passes.{sub}": "passes/" + sub.replace(".", "/")
        for sub in find_packages("passes")
    },
}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
