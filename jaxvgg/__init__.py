"""jaxvgg: the classic PyTorch image-classification tutorials in JAX/Flax, proven identical.

    import jaxvgg
    model = jaxvgg.create_model("vgg11", num_classes=10)
    variables = jaxvgg.from_torch("vgg11", torch_model.state_dict(), input_shape=(32, 32, 3), num_classes=10)
    log_probs_or_logits = model.apply(variables, images_nhwc)
"""

from jaxvgg.convert import from_torch, load_torch_state_dict, to_torch
from jaxvgg.models import count_params, create_model, init_params, list_models, trainable_mask

__all__ = [
    "count_params",
    "create_model",
    "from_torch",
    "init_params",
    "list_models",
    "load_torch_state_dict",
    "to_torch",
    "trainable_mask",
]
__version__ = "0.1.0"
