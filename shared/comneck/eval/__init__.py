"""``comneck-eval``: task quality against bits per pixel, for ComNeck and its baselines.

The data path of one run: a dataset in its published format (:mod:`.datasets`) -> items ->
an evaluation pipeline per curve (:mod:`.pipelines`: ComNeck's neck path, the reconstruction and
post-processing baselines, the uncompressed image, JPEG / WebP / AVIF) at each rate point ->
the backend's answer through :class:`comneck.pipeline.Pipeline` -> a per-item score
(:mod:`.metrics`) -> ``results.jsonl`` (:mod:`.harness`) -> summary, tables, plots, BD-rates and
an HTML report (:mod:`.report`).
"""
