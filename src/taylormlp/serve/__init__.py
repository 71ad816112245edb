"""Engines that run a release for users: transformers' serving engine (transformers_server.py) and vLLM
(vllm_engine.py)."""
