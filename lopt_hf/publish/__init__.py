"""Publishing, on top of meta-training and evaluation: a meta-training run becomes a Hub artifact.

* :mod:`.metatrain_command` — the ``metatrain`` command: train (``lopt_hf.metatrain``), then export;
* :mod:`.export` — a checkpoint → an artifact folder (config.json, model.safetensors, model card, plots);
* :mod:`.card_evaluation` — the card's evaluation, run with ``lopt_hf.evaluation``;
* :mod:`.push` — an artifact folder → a Hub repo.
"""
