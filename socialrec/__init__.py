"""socialrec: the CLI and the jobs that span stages.

The stages are subpackages mapped from the repository's top-level folders (``training``,
``compression``, ``serving``, ``loadtest``). This package holds what uses several of them:

- ``cli``: the ``socialrec`` command (parses options, calls a stage's ``run``)
- ``retrain``: events -> retrained, compressed, gated bundle -> publish (``socialrec retrain``)
- ``v1``: generated gRPC/protobuf code of the public API
"""
