"""The served path: ONNX parity, FAISS index kinds, served evaluation, bundle round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from compression.export import INDEX_KINDS, build_index, choose_index
from compression.hashing import to_hashed
from compression.lowrank import to_lowrank
from compression.quantize import quantize_tables
from compression.served_eval import ServedModel, served_evaluate, tower_inputs
from serving.bundle import BundleError, load_manifest, open_bundle
from tests_compression_helpers import make_bundle  # noqa: F401  (placeholder, replaced below)
