"""Models for risgd: CIFAR-style ResNets registered in timm's registry.

Importing this package registers them, after which ``timm.create_model("resnet20_cifar")`` works.
ImageNet ResNet-50 comes straight from timm (``timm.create_model("resnet50")``).
``model_bytes(name)`` is the fp32 size of what one RI-SGD round averages (parameters and
floating-point buffers), the number the cost model takes (``--model-bytes``).
"""

if __name__ == "models":  # the checkout's folder name: be risgd_models itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_models")
else:
    from . import cifar_resnet  # noqa: F401  (registers the models)
    from .factory import check_model, create_model, model_bytes

    __all__ = ["check_model", "create_model", "model_bytes"]
