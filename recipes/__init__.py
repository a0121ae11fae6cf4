"""The recipes: one YAML per dataset (and :mod:`risgd_recipes.bundled`, which finds them and their
ds_configs). The trainer lives in ``trainer/`` (risgd_trainer), the tools in ``tools/`` (risgd_tools);
their old names under ``risgd_recipes`` / ``recipes`` keep working (risgd_common.aliases.MOVED)."""

from risgd_common.aliases import install

install()  # risgd_recipes.train, risgd_recipes.config, ...: the modules that moved, by their old names

if __name__ == "recipes":  # the checkout's folder name: be risgd_recipes itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_recipes")
