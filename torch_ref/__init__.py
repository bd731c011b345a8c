"""The PyTorch originals as the tutorials write them (state_dict keys as torchvision uses them)."""

from torch_ref.models import CifarCNN, MnistLeNet, MnistLinear, VGG, build, make_layers

__all__ = ["CifarCNN", "MnistLeNet", "MnistLinear", "VGG", "build", "make_layers"]
