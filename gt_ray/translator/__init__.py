"""The Grad-Transformer translator, one module per concern.

- `gt_ray.translator.config`: `TranslatorConfig`, `TrainConfig` and the modes they accept
  (pure dataclasses: no torch, no transformers).
- `gt_ray.translator.model`: `Normalizer`, `GradTransformer` and `Translator`, the public
  inference path (raw TinyLM vectors in, raw LLM vectors out).
- `gt_ray.translator.train`: the optimizer, one epoch, validation, early stopping and
  `train_translator`.
- `gt_ray.translator.function_loss`: the function objective (the LLM's answer loss with a
  generated update plugged in).
- `gt_ray.translator.behaviour`: ``input: behaviour``, the translator reading what an update
  makes the provider's TinyLM do (its answers to public probe prompts) instead of its
  coordinates.
- `gt_ray.translator.checkpoint`: the one writer and the readers of a checkpoint directory
  (weights, `translator.json`, `history.json`, `input_norms.json`).

Nothing is re-exported here, so importing `gt_ray.translator.config` loads no model code.
This package never imports ray.
"""
