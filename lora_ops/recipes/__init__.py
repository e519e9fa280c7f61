"""Paper recipes: each paper's training / merging procedure with its ablations, on an offline testbed.

``ilora`` and ``seeded_lora`` are the recipes (``lora-ops reproduce ilora|seeded-lora``); ``data``, ``model``,
``train``, ``eval``, ``adapters`` and ``results`` are the shared testbed. Importing this package loads nothing
heavy: transformers and PEFT are imported by the modules that need them.
"""
