"""Feature spaces for the generic metrics: the eval encoder (a small contrastive image-text model trained on the
data set itself: ``contrastive_model.py``, ``contrastive_training.py``, ``retrieval.py``, loaded through
``eval_encoder.py``), the pretrained ones (open_clip, Inception: ``pretrained.py``), and ``spaces.py``, which
resolves an evaluation's ``--encoder`` / ``--clip`` / Inception choice to these."""
