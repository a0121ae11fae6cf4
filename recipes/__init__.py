"""Recipes: per-dataset YAML configs, their schema, the comparison tool and the demo."""

if __name__ == "recipes":  # the checkout's folder name: be risgd_recipes itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_recipes")
