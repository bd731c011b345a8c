"""jaxvgg: the classic PyTorch image-classification tutorials in JAX/Flax, proven identical.

    import jaxvgg
    model = jaxvgg.create_model("vgg11", num_classes=10)          # policy: the fastest forms here
    variables = jaxvgg.from_torch("vgg11", torch_model.state_dict(), input_shape=(32, 32, 3), num_classes=10)
    log_probs_or_logits = model.apply(variables, images_nhwc)
    native = jaxvgg.create_model("vgg11", num_classes=10, policy=jaxvgg.Policy())  # plain lax.conv, XLA's dots
"""

from jaxvgg.convert import from_torch, load_torch_state_dict, to_torch, transplant
from jaxvgg.models import count_params, create_model, init_params, list_models, trainable_mask
from jaxvgg.parallel import compile_step
from jaxvgg.policy import Policy, make_policy

__all__ = [
    "Policy",
    "compile_step",
    "count_params",
    "create_model",
    "from_torch",
    "init_params",
    "list_models",
    "load_torch_state_dict",
    "make_policy",
    "to_torch",
    "transplant",
    "trainable_mask",
]
__version__ = "0.1.0"
