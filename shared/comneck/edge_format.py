"""The layout of an ONNX edge folder (written by ``comneck export-edge``, read by the ONNX edge):
names both sides share, without torch or onnx."""

from __future__ import annotations

#: Version of the folder's layout; an edge refuses folders of another.
EDGE_FORMAT = 1
MANIFEST = "edge.json"
ANALYSIS = "analysis.onnx"
TABLES = "tables.npz"
PARAMS = "params"
