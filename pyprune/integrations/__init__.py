"""pyprune inside other tools. Each submodule imports its host lazily and only when imported itself:

- ``pyprune.integrations.llmcompressor``: ``JointPruningModifier``, pyprune's layer methods as an llm-compressor
  modifier (recipes, ``oneshot``, the sequential pipeline), composable with its quantization modifiers.
"""
