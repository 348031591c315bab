"""Training side of the pipeline: data in, a trained and evaluated teacher out.

- ``dataset``: the in-memory :class:`Dataset` shape, its load report, CSR helpers
- ``data``: file loaders (Last.fm, TSV), ``DataConfig`` and ``load_dataset`` over every source
- ``synthetic``: the seeded synthetic generator (builds on ``dataset`` only)
- ``events``: app events merged into a dataset; a dataset written back as TSV
- ``split``: the fixed evaluation split; ``features``: tower inputs of a split
- ``metrics``: Recall/NDCG with full ranking; ``baselines``: MostPopular, ItemKNN, EASE,
  CommonNeighbors, AdamicAdar
- ``model``: the two-tower model; ``train``: training, early stopping, checkpoints, DDP
- ``run``: ``RunConfig`` and ``run(cfg) -> RUN_DIR`` (``socialrec train``)
"""
