"""hsf_bids: hippocampal subfield segmentation as a BIDS App.

Runs the Hippocampal Segmentation Factory (HSF) ONNX models on BIDS datasets.
"""

__version__ = "0.1.0.dev0"
