"""Model packages and ``fl-serve``: a run's global model with its provenance, served where the data scaling lives.

* :mod:`serving.package`: ``fl-sim export-model`` / ``fl-server export`` write a package
  (weights in safetensors, model config, the department's data schema, a model card in JSON
  and Markdown, a SHA-256 manifest); :func:`serving.package.load_package` checks every hash.
* :mod:`serving.features`: records in the department's schema -> model inputs, with the
  data loaders' own validation and scaling (health: fixed public constants; forecasting: each
  request window's own statistics).
* :mod:`serving.app` / :mod:`serving.cli`: the FastAPI app and the ``fl-serve`` command.
"""
