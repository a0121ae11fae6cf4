"""The tools around the trainer: launching it (``launch``, ``elastic_launch``), ``compare``, the
``demo`` and the ``paper``."""

if __name__ == "tools":  # the checkout's folder name: be risgd_tools itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_tools")
