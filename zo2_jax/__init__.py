"""zo2_jax: zeroth-order fine-tuning (MeZO) with ZO2 offloading, in JAX.

    import zo2_jax.models as zm          # load / logits / save_pretrained / generate
    from zo2_jax.zo import MeZOEngine, mezo_sgd, zo_value_and_grad
    from zo2_jax.offload import ZO2Engine, Storage
    from zo2_jax.train import TrainConfig, train
"""

__version__ = "0.1.0"
