"""Streaming calibration: observe the activations conversion needs, in flat memory.

``collect.stream_tensors`` runs batches through one onnxruntime session with chosen
intermediate tensors exposed and yields them batch by batch.
"""
