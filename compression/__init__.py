"""Teacher -> small served bundle: one module per technique, each a pure converter or file step.

- ``tables``: the swappable-table interface (``forward(ids)``, ``.weight``) every technique keeps
- ``distill``: list-aware knowledge distillation (KD at temperature T over the served list)
- ``lowrank``: truncated-SVD factorised tables; candidates served in the r-dim factor space
- ``hashing``: multi-hash ID embeddings (fixed size, unseen ids get a vector)
- ``prune``: magnitude pruning, unstructured (masks) and structured (embedding dims)
- ``quantize``: row-wise int8/int4 tables dequantised in the graph; onnxruntime dynamic int8
- ``export``: ONNX export, FAISS index kinds, ``write_bundle``
- ``served_eval``: metrics and latency through ONNX Runtime + FAISS (the served path)
- ``run``: ``CompressConfig`` and ``run(cfg) -> RUN_DIR/bundle`` (``socialrec compress``)
"""
