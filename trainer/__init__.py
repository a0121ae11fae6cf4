"""The trainer: ``train.py`` (``main()`` and the training loop, the ``Trainer``), its progress and
checkpoints (``checkpoints.py``), its run configuration (recipe -> resolved run ->
ds_config), the lr schedule, evaluation, run records and wandb, run names, elastic membership."""

if __name__ == "trainer":  # the checkout's folder name: be risgd_trainer itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_trainer")
