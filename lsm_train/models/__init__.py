"""The model zoo: MLP, CNN, DBN, ResNet, VGGNet, AlexNet, ViT and GoogLeNet at any input size.

    from lsm_train.models import create_model, list_models
    model = create_model("resnet", num_classes=10, in_channels=1, image_size=8)
    model.hidden_layers        # ordered module names of the hidden outputs, for hooks

``create_model("torchvision:resnet18", ...)`` / ``"timm:..."`` build external models
(``pip install lsm_train[vision]``). Every family module registers its builders on import.
"""

from lsm_train.models import (  # noqa: F401  (registration side effects)
    alexnet,
    cnn,
    dbn,
    googlenet,
    mlp,
    resnet,
    vgg,
    vit,
)
from lsm_train.models.dbn import DBN, RBM
from lsm_train.models.registry import create_model, list_models, model_options, register_model

FAMILIES = ("mlp", "cnn", "dbn", "resnet", "vgg", "alexnet", "vit", "googlenet")

__all__ = [
    "create_model",
    "list_models",
    "model_options",
    "register_model",
    "DBN",
    "RBM",
    "FAMILIES",
]
