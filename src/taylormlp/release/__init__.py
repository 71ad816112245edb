"""Model files in and out: what a path is (kinds), sources (directories, GGUF, built-in names), safetensors shards
and the layer stream, release directories (write, verify, load), the model card, inspect and the leak check."""
